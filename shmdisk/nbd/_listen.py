"""Listening sockets and the thread that accepts on them.

A :class:`Listener` is a Unix socket file or a TCP address the server opened itself, or a
socket handed to it (socket activation). A socket file the server makes gets mode 0600 unless
told otherwise (the mode is set before the socket listens, so nobody else can connect in
between). :class:`Acceptor` accepts on all of them and hands each new connection on with its
:class:`~shmdisk.nbd._peer.Peer`, which records which kind it came through, so access rules
see every socket alike.

The acceptor bounds what clients can make the server hold: at most ``max_connections`` at
once (the next ones wait in the listen backlog, as with any busy server: NBD has no way to
say "busy, come back later" before the handshake), and running out of descriptors or memory
(``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) backs off, from 50 ms to 2 s between tries,
instead of spinning on a listener that stays readable; such trouble is logged once when it
starts, at most once a minute while it lasts, and once when it is over.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence

from ._peer import Peer, peer_of

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_SOCKET_MODE",
    "Acceptor",
    "ListenError",
    "Listener",
    "describe_sockname",
]

log = logging.getLogger("shmdisk.nbd")

BACKLOG = 128
DEFAULT_SOCKET_MODE = 0o600
# Clients served at once; the next ones wait. Enough for a few VMs and copy tools with several
# connections each (nbdcopy opens 4), few enough that their threads and buffers stay bounded.
DEFAULT_MAX_CONNECTIONS = 64

# Accept failures that mean "out of a resource": wait before trying again.
_SCARCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Failures that concern one client only (it left before we accepted it): try the next at once.
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
LOG_EVERY = 60.0


class ListenError(OSError):
    """The server cannot listen where it was asked to; the message names the address."""

    def __str__(self) -> str:
        return str(self.strerror)


def describe_sockname(sock: socket.socket) -> str:
    """``unix:PATH``, ``HOST:PORT`` or ``[V6HOST]:PORT`` of a bound socket."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):  # an abstract-namespace address
            return "unix:@" + name[1:].decode("utf-8", "replace")
        return f"unix:{name}" if name else "unix:(unnamed)"
    host, port = str(name[0]), int(name[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener:
    """One listening socket; closing it removes the socket file the server created."""

    def __init__(self, sock: socket.socket, *, activated: bool, path: str | None = None) -> None:
        self.sock = sock
        self.activated = activated
        self.path = path  # our own socket file, removed on close
        self._ino: tuple[int, int] | None = None
        if path is not None:
            st = os.stat(path)
            self._ino = (st.st_dev, st.st_ino)

    @classmethod
    def unix(cls, path: str, mode: int = DEFAULT_SOCKET_MODE) -> Listener:
        """Listen on a new socket file at ``path`` with permission bits ``mode``.

        Connecting needs write permission on the file; the mode is set between bind and
        listen, so no client can connect while the file still has the umask's bits.
        """
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            listener = cls(sock, activated=False, path=path)
            # chmod follows symlinks: check that the name is still our socket after it.
            os.chmod(path, mode)
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) != listener._ino or stat.S_IMODE(st.st_mode) != mode:
                raise OSError(errno.EEXIST, "the socket file was replaced while being set up")
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise ListenError(exc.errno, f"cannot listen on unix:{path}: {exc.strerror}") from exc
        return listener

    @classmethod
    def tcp(cls, host: str, port: int) -> Listener:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ListenError(errno.EINVAL, f"cannot listen on {where}: {exc.strerror}") from exc
        family, kind, proto, _name, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise ListenError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from exc
        return cls(sock, activated=False)

    @property
    def is_tcp(self) -> bool:
        return self.sock.family in (socket.AF_INET, socket.AF_INET6)

    def describe(self) -> str:
        text = describe_sockname(self.sock)
        return f"{text} (activated socket)" if self.activated else text

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.path is not None and self._ino is not None:
            # Only our own socket file: a later server may have replaced it meanwhile.
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            self._ino = None


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(f"cannot listen on unix:{path}: another server is listening there")


class Acceptor:
    """Accepts on every listener in a thread of its own until :meth:`stop`.

    ``on_connect(sock, peer, listener)`` takes each new connection; the server calls
    :meth:`release` when one ends, which makes room under ``max_connections``.
    """

    def __init__(
        self,
        listeners: Sequence[Listener],
        on_connect: Callable[[socket.socket, Peer, Listener], None],
        max_connections: int,
    ) -> None:
        self._listeners = list(listeners)
        self._on_connect = on_connect
        self._max = max_connections
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._loop, name="shmdisk-nbd-accept", daemon=True)
        self._stopping = False
        self._lock = threading.Lock()
        self._active = 0
        self._full_logged = -LOG_EVERY
        self._trouble = _Trouble()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def release(self) -> None:
        """A connection ended: one more client may be accepted."""
        with self._lock:
            self._active -= 1
            wake = self._active == self._max - 1
        if wake:
            self._wake()  # the loop may be waiting for room

    def active(self) -> int:
        with self._lock:
            return self._active

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        by_sock = {listener.sock: listener for listener in self._listeners}
        with selectors.DefaultSelector() as sel:
            for listener in self._listeners:
                listener.sock.setblocking(False)
            sel.register(self._wake_r, selectors.EVENT_READ)
            listening = False
            pause = 0.0
            while not self._stopping:
                want = pause == 0.0 and self._has_room()
                if want != listening:
                    # Listeners are watched only while a client may be accepted: a full server
                    # or one out of descriptors would otherwise wake up for nothing, forever.
                    for listener in self._listeners:
                        if want:
                            sel.register(listener.sock, selectors.EVENT_READ)
                        else:
                            sel.unregister(listener.sock)
                    listening = want
                events = sel.select(pause or None)
                pause = 0.0
                for key, _events in events:
                    listener = by_sock.get(key.fileobj)  # type: ignore[call-overload]
                    if listener is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    if self._has_room():
                        pause = max(pause, self._accept(listener))

    def _has_room(self) -> bool:
        with self._lock:
            room = self._active < self._max
        if not room and time.monotonic() - self._full_logged >= LOG_EVERY:
            self._full_logged = time.monotonic()
            log.warning(
                "%d clients connected (the most allowed): new clients wait until one leaves",
                self._max,
            )
        return room

    def _accept(self, listener: Listener) -> float:
        """Accept one client on ``listener``; how long to pause before the next try."""
        try:
            sock, addr = listener.sock.accept()
        except (BlockingIOError, InterruptedError):
            return 0.0
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                return 0.0
            return self._trouble.failed(listener, exc)
        self._trouble.recovered(listener)
        with self._lock:
            self._active += 1
        try:
            sock.setblocking(True)
            if listener.is_tcp:
                # The spec asks both ends to disable Nagle: replies are small and latency-bound.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = peer_of(sock, addr, activated=listener.activated)
            self._on_connect(sock, peer, listener)
        except Exception as exc:
            # No thread for it (out of threads or memory), say: this client is dropped, the
            # server goes on, and the next try waits a little.
            with contextlib.suppress(OSError):
                sock.close()
            self.release()
            return self._trouble.failed(listener, exc)
        return 0.0


class _Trouble:
    """Back-off and rate-limited logging for accept failures (out of descriptors, say)."""

    def __init__(self) -> None:
        self.count = 0
        self.since = 0.0
        self.logged = 0.0
        self.delay = 0.0

    def failed(self, listener: Listener, exc: BaseException) -> float:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self.since = self.logged = now
            log.warning(
                "cannot accept clients on %s: %s; retrying (logged again once a minute while "
                "it lasts)",
                listener.describe(),
                _reason(exc),
            )
        elif now - self.logged >= LOG_EVERY:
            self.logged = now
            log.warning(
                "still cannot accept clients on %s: %s (%d failures in %.0f s)",
                listener.describe(),
                _reason(exc),
                self.count,
                now - self.since,
            )
        self.delay = min(BACKOFF_MAX, max(BACKOFF_FIRST, self.delay * 2))
        return self.delay

    def recovered(self, listener: Listener) -> None:
        if self.count:
            log.warning(
                "accepting clients on %s again, after %d failures in %.0f s",
                listener.describe(),
                self.count,
                time.monotonic() - self.since,
            )
        self.count = 0
        self.delay = 0.0


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
