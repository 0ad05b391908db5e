"""Socket activation: listening sockets handed over by whoever started the server.

systemd (a ``.socket`` unit with ``Accept=no``) and the block tools' captive servers
(``nbdinfo [ shmdisk serve NAME ]``, ``nbdcopy``, ``nbdfuse``) open the listening socket
themselves, start the server with it as descriptor 3 (then 4, ...), and say so in the
environment: ``LISTEN_PID`` (the process the sockets are for) and ``LISTEN_FDS`` (how many).
The variables are removed once read, so programs the server starts do not take the sockets
for theirs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = ["FIRST_FD", "ActivationError", "activated_sockets", "listen_fds"]

FIRST_FD = 3  # SD_LISTEN_FDS_START


class ActivationError(ValueError):
    """The environment announces activated sockets that cannot be served on."""


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[int]:
    """The descriptors passed to this process by socket activation; [] if there are none.

    Sockets announced for another process (``LISTEN_PID`` is not ours, as when the variables
    were inherited from a parent) are not ours to take.
    """
    env = os.environ if environ is None else environ
    pid_text, count_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid_text is None or count_text is None:
        return []
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        raise ActivationError(
            f"socket activation: LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r} are not numbers"
        ) from None
    if pid != os.getpid() or count <= 0:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    fds = list(range(FIRST_FD, FIRST_FD + count))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(
                f"socket activation: LISTEN_FDS={count} but descriptor {fd} is not open"
            ) from exc
    return fds


def activated_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets passed by socket activation, checked; [] if there are none."""
    sockets = []
    for fd in listen_fds(environ):
        try:
            sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
        except OSError as exc:
            raise ActivationError(
                f"socket activation: descriptor {fd} is not a socket ({exc.strerror})"
            ) from None
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_UNIX,
            socket.AF_INET,
            socket.AF_INET6,
        ):
            sock.detach()
            raise ActivationError(
                f"socket activation: descriptor {fd} is not a stream socket (Unix or TCP)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(
                f"socket activation: descriptor {fd} is not listening; "
                "a systemd .socket unit for shmdisk needs Accept=no"
            )
        sockets.append(sock)
    return sockets
