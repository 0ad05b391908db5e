"""Listening sockets and the thread that accepts on them.

A :class:`Listener` is a Unix socket file or a TCP address the server opened itself, or a
socket handed to it (socket activation). :class:`Acceptor` accepts on all of them and hands
each new connection on with its :class:`~shmdisk.nbd._peer.Peer`, which records which kind it
came through, so access rules see every socket alike.
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

__all__ = ["Acceptor", "ListenError", "Listener", "describe_sockname"]

log = logging.getLogger("shmdisk.nbd")

BACKLOG = 128


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
    def unix(cls, path: str) -> Listener:
        _clear_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            listener = cls(sock, activated=False, path=path)
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
    """Accepts on every listener in a thread of its own until :meth:`stop`."""

    def __init__(
        self,
        listeners: Sequence[Listener],
        on_connect: Callable[[socket.socket, Peer], None],
    ) -> None:
        self._listeners = list(listeners)
        self._on_connect = on_connect
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="shmdisk-nbd-accept", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _loop(self) -> None:
        by_sock = {listener.sock: listener for listener in self._listeners}
        with selectors.DefaultSelector() as sel:
            for listener in self._listeners:
                listener.sock.setblocking(False)
                sel.register(listener.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _events in sel.select():
                    listener = by_sock.get(key.fileobj)  # type: ignore[call-overload]
                    if listener is None:
                        return  # woken to stop
                    self._accept(listener)

    def _accept(self, listener: Listener) -> None:
        try:
            sock, addr = listener.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # Out of descriptors, say: the socket stays readable, so do not spin on it.
            log.warning("accept on %s failed: %s", listener.describe(), exc)
            time.sleep(0.1)
            return
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # The spec asks both ends to disable Nagle: replies are small and latency-bound.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_connect(sock, peer_of(sock, addr, activated=listener.activated))
