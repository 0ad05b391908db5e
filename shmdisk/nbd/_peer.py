"""Who is on the other end of a connection: how it reached the server, and who it is.

A :class:`Peer` is made once per accepted connection, before a byte is exchanged, and handed to
the negotiation, which passes it to the access decision (``_access.py``). Everything a policy
might want to judge a client by belongs here, so that adding a rule never means reaching back
into the listener.
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["Credentials", "Peer", "Transport", "peer_of", "proc_groups"]

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}: three 32-bit integers in host order.
_UCRED = struct.Struct("=iII")
# SO_PEERGROUPS (Linux 4.13): the supplementary groups the client had when it connected, as
# gid_t values. Not in Python's socket module; the same number on every Linux architecture.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Python's getsockopt reads at most 1024 bytes: 256 groups. More fall back to /proc.
_MAX_GROUPS_BYTES = 1024
# (uid_t)-1: no such id ("the kernel does not know"), as SO_PEERCRED gives for a socket that
# never had a peer.
_NO_ID = 0xFFFFFFFF


class Transport(enum.Enum):
    """The kind of socket a client came in on."""

    UNIX = "unix"
    TCP = "tcp"


@dataclass(frozen=True)
class Credentials:
    """The client process as the kernel saw it when it connected.

    ``pid``, ``uid`` and ``gid`` (effective ids) come from ``SO_PEERCRED``; ``groups``, the
    supplementary groups, from ``SO_PEERGROUPS``, or else from ``/proc/PID/status`` when that
    still describes the same uid and gid (empty when neither can be read: fewer rights, never
    more).
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Peer:
    """One client connection, as known when it was accepted.

    ``activated`` is true when the listening socket was handed to the server (systemd socket
    activation, or a captive server started by ``nbdinfo [ ... ]``) rather than opened by it.
    ``address`` is the client's ``host:port`` over TCP; Unix-socket clients are nameless, so
    it is None there and ``credentials`` say who the client is instead (None over TCP, or when
    the kernel would not tell). ``tls`` becomes true once the client has upgraded with
    ``NBD_OPT_STARTTLS``; ``tls_identity`` is then who TLS proved it to be: the subject of
    its verified certificate (``--tls-verify-peer``) such as ``"CN=client.example"``, or
    ``"PSK user NAME"``.
    """

    transport: Transport
    activated: bool = False
    address: str | None = None
    credentials: Credentials | None = None
    tls: bool = False
    tls_identity: str | None = None

    def __str__(self) -> str:
        if self.transport is Transport.TCP:
            where = self.address or "tcp client"
        elif self.credentials is not None:
            c = self.credentials
            where = f"unix pid {c.pid} uid {c.uid}"
        else:
            where = "unix client"
        if self.activated:
            where += ", activated socket"
        if self.tls:
            where += f", TLS as {self.tls_identity}" if self.tls_identity else ", TLS"
        return where


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
    if uid == _NO_ID or gid == _NO_ID:
        return None  # the kernel has no credentials for this socket
    # The pid is 0 when the client lives in a pid namespace this process cannot see (a server
    # in a container, a client outside it); its uid and gid are still the kernel's word.
    groups = _socket_groups(sock)
    if groups is None:
        groups = proc_groups(pid, uid, gid) if pid > 0 else ()
    return Credentials(pid, uid, gid, groups)


def _socket_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The client's supplementary groups as the kernel recorded them at connect; None if the
    kernel cannot say (too old, or too many groups for one getsockopt)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_GROUPS_BYTES)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.ERANGE, errno.EINVAL):
            return None
        raise
    count = len(raw) // 4
    return struct.unpack(f"={count}I", raw[: 4 * count])


def proc_groups(pid: int, uid: int, gid: int) -> tuple[int, ...]:
    """The supplementary groups in ``/proc/PID/status``, if that process still has effective
    ids ``uid`` and ``gid``; () otherwise.

    The pid may have exited and been reused by another process since it connected: the check
    on the ids keeps another user's groups from being lent to this client.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            fields = dict(line.partition(":")[::2] for line in f)
        uids, gids = fields["Uid"].split(), fields["Gid"].split()
        if int(uids[1]) != uid or int(gids[1]) != gid:
            return ()
        return tuple(int(g) for g in fields.get("Groups", "").split())
    except (OSError, KeyError, IndexError, ValueError):
        return ()
