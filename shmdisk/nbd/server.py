"""An NBD server for shmdisk disks: the server's life from start to stop.

:class:`NBDServer` ties the parts together: the exports (``_exports.py``), the listening
sockets and the accepting thread (``_listen.py``, ``_activation.py``), and one
:class:`~shmdisk.nbd._connection.Connection` per client, which runs the handshake
(``_negotiation.py``) and then the requests (``_transmission.py``, ``_handlers.py``).
Threads come from one cache and are reused by later connections and requests.

Every connection and every local process sees the same shared memory, so the server keeps no
cache and advertises ``NBD_FLAG_CAN_MULTI_CONN``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from . import _activation
from ._access import AccessPolicy, allow_all
from ._connection import Connection
from ._exports import ExportTable
from ._listen import Acceptor, Listener, describe_sockname
from ._peer import Peer
from ._proto import DEFAULT_HOST, DEFAULT_PORT
from ._workers import ThreadCache

if TYPE_CHECKING:
    from shmdisk.disk import Disk

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "NBDServer", "run_cli", "serve"]

log = logging.getLogger("shmdisk.nbd")


class NBDServer:
    """Serve disks to NBD clients on a Unix socket, a TCP address, or sockets handed over.

    ``exports`` are disk names (the server connects to them, and disconnects on :meth:`stop`)
    or connected :class:`~shmdisk.Disk` handles (left connected). The export name of a disk is
    its disk name; the first one is also the default export (the empty name)::

        with NBDServer(["vm0"], socket_path="/run/vm0.sock") as server:
            ...  # nbdinfo 'nbd+unix:///vm0?socket=/run/vm0.sock'

    ``sockets`` are listening sockets opened by someone else (socket activation passes them);
    the server serves on them instead of opening its own, and leaves their files alone.
    ``access`` decides per export and client what a connection may do (see ``_access.py``);
    by default every client may do what the export allows.
    """

    def __init__(
        self,
        exports: Sequence[str | Disk],
        *,
        socket_path: str | None = None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        read_only: bool = False,
        create: bool = False,
        sockets: Sequence[socket.socket] = (),
        access: AccessPolicy | None = None,
    ) -> None:
        if isinstance(exports, str):
            exports = [exports]
        if not exports:
            raise ValueError("at least one export is needed")
        if sockets and socket_path is not None:
            raise ValueError("give either sockets or socket_path, not both")
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.read_only = read_only
        self.create = create
        self.stopping = False
        self._sockets = list(sockets)
        self._exports = ExportTable(
            exports, read_only=read_only, create=create, policy=access or allow_all
        )
        self._listeners: list[Listener] = []
        self._acceptor: Acceptor | None = None
        self._threads = ThreadCache("shmdisk-nbd")
        self._lock = threading.Lock()
        self._clients: set[Connection] = set()
        self._count = 0
        self._started = False
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> NBDServer:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> NBDServer:
        """Open the disks, start listening and accepting; returns self."""
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        try:
            self._exports.open()
            if self._sockets:
                self._listeners = [Listener(s, activated=True) for s in self._sockets]
            elif self.socket_path is not None:
                self._listeners = [Listener.unix(self.socket_path)]
            else:
                self._listeners = [Listener.tcp(self.host, self.port)]
            self._acceptor = Acceptor(self._listeners, self._on_connect)
            self._acceptor.start()
        except BaseException:
            self.stop()
            raise
        where = ", ".join(listener.describe() for listener in self._listeners)
        log.info("serving %s on %s", ", ".join(self._exports.names()), where)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every connection, release the sockets and the disks.

        Idempotent and safe to call from several threads (a second Ctrl-C, say): later callers
        wait for the first to finish. Requests already received are answered (those not yet
        started with ``ESHUTDOWN``); a client that does not read its replies is cut off after
        ``timeout`` seconds.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stop(timeout)
            self._stopped.set()

    def _stop(self, timeout: float) -> None:
        self.stopping = True
        deadline = time.monotonic() + timeout
        if self._acceptor is not None:
            self._acceptor.stop(timeout)
        # Shutting the receiving side makes each connection read what its client already sent,
        # then see the end: it answers all of that and closes.
        self._shutdown_clients(socket.SHUT_RD)
        if not self._wait_for_clients(deadline):
            # Whoever is left is stuck sending to a client that stopped reading: cut it off.
            self._shutdown_clients(socket.SHUT_RDWR)
            self._wait_for_clients(time.monotonic() + 1.0)
        self._threads.stop(deadline)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        self._exports.close()

    def serve_forever(self) -> None:
        """Start if needed and block until :meth:`stop` is called (from another thread)."""
        if not self._started:
            self.start()
        while not self._stopped.wait(0.5):
            pass

    # --- information -------------------------------------------------------------------------
    @property
    def address(self) -> str | tuple[str, int]:
        """The Unix socket path, or the bound (host, port) (port 0 becomes the real port)."""
        if self._listeners:
            sock = self._listeners[0].sock
            name = sock.getsockname()
            if sock.family == socket.AF_UNIX:
                return name if isinstance(name, str) else name.decode("utf-8", "replace")
            return str(name[0]), int(name[1])
        if self.socket_path is not None:
            return self.socket_path
        return self.host, self.port

    def describe_address(self) -> str:
        if self._listeners:
            return describe_sockname(self._listeners[0].sock)
        address = self.address
        if isinstance(address, str):
            return f"unix:{address}"
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def uri(self, export: str | None = None) -> str:
        """An NBD URI (as nbdinfo, nbdcopy and qemu take) for ``export`` (default: the first)."""
        name = self._exports.default if export is None else export
        address = self.address
        if isinstance(address, str):
            return f"nbd+unix:///{name}?socket={address}"
        host, port = address
        host = f"[{host}]" if ":" in host else host
        return f"nbd://{host}:{port}/{name}"

    def export_names(self) -> list[str]:
        return self._exports.names()

    # --- connections -------------------------------------------------------------------------
    def _on_connect(self, sock: socket.socket, peer: Peer) -> None:
        self._count += 1
        label = f"conn {self._count} ({peer})"
        conn = Connection(sock, peer, label, self._exports, self._threads, self._is_stopping)
        with self._lock:
            if self.stopping:
                sock.close()
                return
            self._clients.add(conn)
        log.info("%s: connected", label)
        self._threads.run(lambda: self._run_connection(conn))

    def _run_connection(self, conn: Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._clients.discard(conn)

    def _is_stopping(self) -> bool:
        return self.stopping

    def _shutdown_clients(self, how: int) -> None:
        with self._lock:
            clients = list(self._clients)
        for conn in clients:
            conn.shutdown(how)

    def _wait_for_clients(self, deadline: float) -> bool:
        """Wait until every connection has closed; False if some remain at ``deadline``."""
        while True:
            with self._lock:
                if not self._clients:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def serve(
    exports: Sequence[str | Disk],
    *,
    socket_path: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    read_only: bool = False,
    create: bool = False,
    sockets: Sequence[socket.socket] = (),
) -> None:
    """Serve ``exports`` until SIGINT or SIGTERM (call from the main thread)."""
    server = NBDServer(
        exports,
        socket_path=socket_path,
        host=host,
        port=port,
        read_only=read_only,
        create=create,
        sockets=sockets,
    )
    with _stop_on_signals(server):
        server.serve_forever()


@contextlib.contextmanager
def _stop_on_signals(server: NBDServer) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        # stop() joins threads; do it outside the signal handler's frame.
        threading.Thread(target=server.stop, daemon=True).start()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        server.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_cli(
    *,
    names: Iterable[str],
    socket_path: str | None,
    bind: tuple[str, int] | None,
    read_only: bool,
    create: bool,
    quiet: bool,
    verbose: bool = False,
) -> int:
    """The body of ``shmdisk serve``: log to stderr, serve until a signal, exit 0.

    Socket activation (``LISTEN_PID``/``LISTEN_FDS``) takes precedence over the default
    address, and conflicts with an explicit ``--socket`` or ``--bind``. Under activation the
    per-connection lines are off unless ``verbose``: a captive server shares its terminal with
    the client that started it (``nbdinfo [ shmdisk serve NAME ]``).
    """
    sockets = _activation.activated_sockets()
    if sockets and (socket_path is not None or bind is not None):
        for s in sockets:
            s.detach()  # not ours to close: the activating process owns them
        raise ValueError(
            "a listening socket was passed by socket activation; "
            "--socket and --bind cannot be used with it"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("shmdisk serve: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    chatty = verbose or not (quiet or sockets)
    log.setLevel(logging.INFO if chatty else logging.WARNING)
    log.propagate = False
    host, port = bind if bind is not None else (DEFAULT_HOST, DEFAULT_PORT)
    try:
        serve(
            list(names),
            socket_path=socket_path,
            host=host,
            port=port,
            read_only=read_only,
            create=create,
            sockets=sockets,
        )
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])  # setLevel, not assignment: it clears the loggers' level cache
        log.propagate = saved[1]
    return 0
