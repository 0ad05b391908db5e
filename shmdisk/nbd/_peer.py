"""Who is on the other end of a connection: how it reached the server, and who it is.

A :class:`Peer` is made once per accepted connection, before a byte is exchanged, and handed to
the negotiation, which passes it to the access decision (``_access.py``). Everything a policy
might want to judge a client by belongs here, so that adding a rule never means reaching back
into the listener.
"""

from __future__ import annotations

import enum
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["Credentials", "Peer", "Transport", "peer_of"]

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}: three 32-bit integers in host order.
_UCRED = struct.Struct("=iII")


class Transport(enum.Enum):
    """The kind of socket a client came in on."""

    UNIX = "unix"
    TCP = "tcp"


@dataclass(frozen=True)
class Credentials:
    """The client process as the kernel saw it when it connected (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Peer:
    """One client connection, as known when it was accepted.

    ``activated`` is true when the listening socket was handed to the server (systemd socket
    activation, or a captive server started by ``nbdinfo [ ... ]``) rather than opened by it.
    ``address`` is the client's ``host:port`` over TCP; Unix-socket clients are nameless, so
    it is None there and ``credentials`` say who the client is instead (None over TCP, or when
    the kernel would not tell).
    """

    transport: Transport
    activated: bool = False
    address: str | None = None
    credentials: Credentials | None = None

    def __str__(self) -> str:
        if self.transport is Transport.TCP:
            where = self.address or "tcp client"
        elif self.credentials is not None:
            c = self.credentials
            where = f"unix pid {c.pid} uid {c.uid}"
        else:
            where = "unix client"
        return f"{where}, activated socket" if self.activated else where


def peer_of(sock: socket.socket, addr: Any, *, activated: bool) -> Peer:
    """Describe a freshly accepted connection ``sock`` (``addr`` as ``accept`` returned it)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host, port = str(addr[0]), int(addr[1])
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return Peer(Transport.TCP, activated, address, None)
    return Peer(Transport.UNIX, activated, None, _credentials(sock))


def _credentials(sock: socket.socket) -> Credentials | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Credentials(pid, uid, gid) if pid > 0 else None
