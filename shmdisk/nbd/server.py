"""An NBD server for shmdisk disks: the server's life from start to stop.

:class:`NBDServer` ties the parts together: the exports (``_exports.py``), the listening
sockets and the accepting thread (``_listen.py``, ``_activation.py``), and one
:class:`~shmdisk.nbd._connection.Connection` per client, which runs the handshake
(``_negotiation.py``) and then the requests (``_transmission.py``, ``_handlers.py``).
Threads come from one cache and are reused by later connections and requests.

Every connection and every local process sees the same shared memory, so the server keeps no
cache and advertises ``NBD_FLAG_CAN_MULTI_CONN``.

**Who gets in.** A Unix socket file is made with mode 0600 (``socket_mode``), and each client on
it is served only as far as its own uid and groups could open the disk (``_access.py``). TCP
has no such identity, so a TCP listener requires TLS unless told otherwise: without TLS
credentials the server refuses to start, and with ``tls="off"`` (or ``"on"``, which lets a
client choose plain text) it warns that anyone who can reach the port gets the exports.
"""

from __future__ import annotations

import contextlib
import ipaddress
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
from ._listen import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SOCKET_MODE,
    Acceptor,
    Listener,
    describe_sockname,
)
from ._negotiation import TLSSetting
from ._peer import Peer
from ._proto import DEFAULT_HOST, DEFAULT_PORT
from ._tls import CA_CERT, MODES, SERVER_CERT, SERVER_KEY, TLSConfigError, load_credentials
from ._workers import ThreadCache

if TYPE_CHECKING:
    from shmdisk.disk import Disk

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "DEFAULT_SOCKET_MODE",
    "NBDServer",
    "TLSConfigError",
    "run_cli",
    "serve",
]

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
    ``socket_mode`` is the permission bits of the socket file it makes (0600: only its own
    user, and root, can connect). ``owner`` (a user name or uid) is a user whose disks the
    server may serve besides its own and root's, as for ``shmdisk.connect``.

    Access: a client on a Unix socket is served only as far as its uid and groups could open
    the disk itself (read-write, read-only, or refused); ``access``, a callable
    ``policy(export_name, peer) -> Access``, can narrow that further, never widen it.

    TLS (``NBD_OPT_STARTTLS``): ``tls_certificates`` is a directory with ``server-cert.pem``,
    ``server-key.pem`` and ``ca-cert.pem`` (as for nbdkit and qemu-nbd); ``tls_verify_peer``
    refuses clients without a certificate signed by that CA; ``tls_psk`` is a ``psktool`` key
    file (Python 3.13 and later). ``tls`` is "off", "on" (the client chooses) or "require";
    by default "require" on TCP and on Unix sockets "on" with credentials, "off" without. A
    TCP listener without TLS credentials is refused unless ``tls="off"`` says plain text is
    wanted (logged as a warning, as is ``tls="on"`` on TCP).

    At most ``max_connections`` clients are served at once; the next ones wait to be accepted.
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
        socket_mode: int = DEFAULT_SOCKET_MODE,
        tls: str | None = None,
        tls_certificates: str | None = None,
        tls_verify_peer: bool = False,
        tls_psk: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        owner: int | str | None = None,
    ) -> None:
        if isinstance(exports, str):
            exports = [exports]
        if not exports:
            raise ValueError("at least one export is needed")
        if sockets and socket_path is not None:
            raise ValueError("give either sockets or socket_path, not both")
        if tls is not None and tls not in MODES:
            raise ValueError(f"tls must be one of {', '.join(MODES)}, not {tls!r}")
        if isinstance(socket_mode, bool) or not isinstance(socket_mode, int):
            raise TypeError("socket_mode must be an int such as 0o600")
        if not 0 <= socket_mode <= 0o777:
            raise ValueError(f"socket_mode {socket_mode:#o} is outside 0..0o777")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError("max_connections must be an int")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.read_only = read_only
        self.create = create
        self.socket_mode = socket_mode
        self.tls = tls
        self.tls_certificates = tls_certificates
        self.tls_verify_peer = tls_verify_peer
        self.tls_psk = tls_psk
        self.max_connections = max_connections
        self.stopping = False
        self._sockets = list(sockets)
        self._exports = ExportTable(
            exports,
            read_only=read_only,
            create=create,
            policy=access or allow_all,
            owner=owner,
        )
        self._tls_settings: dict[int, TLSSetting] = {}
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
            credentials = load_credentials(
                self.tls_certificates, self.tls_psk, self.tls_verify_peer
            )
            # Every TLS decision is made before a disk is opened or an address taken, so a
            # server that would refuse to start leaves nothing behind.
            if self._sockets:
                families = [s.family for s in self._sockets]
            elif self.socket_path is not None:
                families = [socket.AF_UNIX]
            else:
                families = [socket.AF_INET]
            modes = [self._tls_mode(family, credentials is not None) for family in families]
            self._exports.open()
            if self._sockets:
                self._listeners = [Listener(s, activated=True) for s in self._sockets]
            elif self.socket_path is not None:
                self._listeners = [Listener.unix(self.socket_path, self.socket_mode)]
            else:
                self._listeners = [Listener.tcp(self.host, self.port)]
            for listener, mode in zip(self._listeners, modes, strict=True):
                self._tls_settings[id(listener)] = TLSSetting(mode, credentials)
                if listener.is_tcp and mode != "require":
                    log.warning("%s", _plain_tcp_warning(listener, mode, self.read_only))
            self._acceptor = Acceptor(self._listeners, self._on_connect, self.max_connections)
            self._acceptor.start()
        except BaseException:
            self.stop()
            raise
        where = ", ".join(
            f"{listener.describe()} (TLS {self._tls_settings[id(listener)].mode})"
            for listener in self._listeners
        )
        log.info("serving %s on %s", ", ".join(self._exports.names()), where)
        if credentials is not None:
            log.info("TLS: %s", credentials.describe())
        return self

    def _tls_mode(self, family: int, have_credentials: bool) -> str:
        """The TLS mode of a listener of ``family``; raises TLSConfigError if it cannot work."""
        tcp = family in (socket.AF_INET, socket.AF_INET6)
        mode = self.tls
        if mode is None:
            mode = "require" if tcp else ("on" if have_credentials else "off")
        if mode != "off" and not have_credentials:
            if tcp and self.tls is None:
                raise TLSConfigError(
                    "TCP clients must use TLS, so the server needs TLS credentials: pass "
                    f"--tls-certificates DIR (a directory with {SERVER_CERT}, {SERVER_KEY} "
                    f"and, to check clients, {CA_CERT}), or --tls off to serve plain TCP to "
                    "anyone who can reach the port (or serve on a Unix socket: --socket PATH)"
                )
            raise TLSConfigError(
                f"--tls {mode} needs TLS credentials: --tls-certificates DIR or --tls-psk FILE"
            )
        return mode

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
        """An NBD URI (as nbdinfo, nbdcopy and qemu take) for ``export`` (default: the first);
        ``nbds://`` or ``nbds+unix://`` where the first listener requires TLS (a client adds
        its own ``tls-certificates=DIR`` or ``tls-psk-file=FILE``)."""
        name = self._exports.default if export is None else export
        address = self.address
        tls = ""
        if self._listeners:
            setting = self._tls_settings.get(id(self._listeners[0]))
            tls = "s" if setting is not None and setting.mode == "require" else ""
        if isinstance(address, str):
            return f"nbd{tls}+unix:///{name}?socket={address}"
        host, port = address
        host = f"[{host}]" if ":" in host else host
        return f"nbd{tls}://{host}:{port}/{name}"

    def export_names(self) -> list[str]:
        return self._exports.names()

    def connections(self) -> int:
        """How many clients are connected now."""
        with self._lock:
            return len(self._clients)

    # --- connections -------------------------------------------------------------------------
    def _on_connect(self, sock: socket.socket, peer: Peer, listener: Listener) -> None:
        self._count += 1
        label = f"conn {self._count} ({peer})"
        tls = self._tls_settings[id(listener)]
        conn = Connection(sock, peer, label, self._exports, self._threads, self._is_stopping, tls)
        with self._lock:
            if self.stopping:
                sock.close()
                self._release()
                return
            self._clients.add(conn)
        log.info("%s: connected", label)
        try:
            self._threads.run(lambda: self._run_connection(conn))
        except BaseException:
            with self._lock:
                self._clients.discard(conn)
            raise  # the acceptor closes the socket, releases the slot and backs off

    def _run_connection(self, conn: Connection) -> None:
        try:
            conn.run()
        finally:
            with self._lock:
                self._clients.discard(conn)
            self._release()

    def _release(self) -> None:
        if self._acceptor is not None:
            self._acceptor.release()

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


def _plain_tcp_warning(listener: Listener, mode: str, read_only: bool) -> str:
    host = str(listener.sock.getsockname()[0])
    try:
        loopback = ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        loopback = False
    who = "any local user" if loopback else "any local user and any host that can reach it"
    how = "plain TCP" if mode == "off" else "plain TCP to clients that do not ask for TLS"
    what = "read" if read_only else "read and write"
    return (
        f"serving {how} on {listener.describe()} (--tls {mode}): {who} can {what} the "
        "exports, unauthenticated and unencrypted; use --tls require with --tls-certificates, "
        "or a Unix socket, to restrict them"
    )


def serve(
    exports: Sequence[str | Disk],
    *,
    socket_path: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    read_only: bool = False,
    create: bool = False,
    sockets: Sequence[socket.socket] = (),
    access: AccessPolicy | None = None,
    socket_mode: int = DEFAULT_SOCKET_MODE,
    tls: str | None = None,
    tls_certificates: str | None = None,
    tls_verify_peer: bool = False,
    tls_psk: str | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    owner: int | str | None = None,
) -> None:
    """Serve ``exports`` until SIGINT or SIGTERM (call from the main thread).

    The options are those of :class:`NBDServer`.
    """
    server = NBDServer(
        exports,
        socket_path=socket_path,
        host=host,
        port=port,
        read_only=read_only,
        create=create,
        sockets=sockets,
        access=access,
        socket_mode=socket_mode,
        tls=tls,
        tls_certificates=tls_certificates,
        tls_verify_peer=tls_verify_peer,
        tls_psk=tls_psk,
        max_connections=max_connections,
        owner=owner,
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
    socket_mode: int = DEFAULT_SOCKET_MODE,
    tls: str | None = None,
    tls_certificates: str | None = None,
    tls_verify_peer: bool = False,
    tls_psk: str | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    owner: str | None = None,
) -> int:
    """The body of ``shmdisk serve``: log to stderr, serve until a signal, exit 0.

    Socket activation (``LISTEN_PID``/``LISTEN_FDS``) takes precedence over the default
    address, and conflicts with an explicit ``--socket`` or ``--bind``. Under activation the
    per-connection lines are off unless ``verbose``: a captive server shares its terminal with
    the client that started it (``nbdinfo [ shmdisk serve NAME ]``). Warnings (plain TCP, a
    refused client, running out of descriptors) are always shown.
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
    handler.setFormatter(_CliFormatter())
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
            socket_mode=socket_mode,
            tls=tls,
            tls_certificates=tls_certificates,
            tls_verify_peer=tls_verify_peer,
            tls_psk=tls_psk,
            max_connections=max_connections,
            owner=owner,
        )
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])  # setLevel, not assignment: it clears the loggers' level cache
        log.propagate = saved[1]
    return 0


class _CliFormatter(logging.Formatter):
    """``shmdisk serve: MESSAGE``; warnings and errors say so (``shmdisk serve: warning: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"shmdisk serve: {record.levelname.lower()}: {text}"
        return f"shmdisk serve: {text}"
