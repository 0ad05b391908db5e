"""TLS for NBD: the credentials a server loads once, and the encrypted stream of one client.

**Modes** (``--tls``, as nbdkit spells them): ``off`` refuses ``NBD_OPT_STARTTLS``
(``NBD_REP_ERR_POLICY``); ``on`` lets each client choose; ``require`` answers every option but
``STARTTLS`` and ``ABORT`` with ``NBD_REP_ERR_TLS_REQD`` until the client has upgraded (the
protocol's FORCEDTLS), which is what stops a man in the middle from talking both ends down to
plain text.

**Credentials.** X.509 certificates in the directory layout nbdkit and qemu-nbd use
(``--tls-certificates DIR``): ``server-cert.pem`` and ``server-key.pem`` (the key unencrypted:
a server cannot ask for a passphrase), ``ca-cert.pem`` (needed with ``--tls-verify-peer``, which
refuses clients without a certificate signed by that CA) and optionally ``ca-crl.pem``. Or
pre-shared keys in the file format ``psktool`` writes (``--tls-psk FILE``: ``user:hexkey`` per
line), where the running Python's ``ssl`` can serve them (3.13 and later). TLS 1.2 is the
oldest version accepted, as the protocol asks.

**The stream.** After the handshake a connection's thread receives while workers send, at the
same time; an OpenSSL connection must not be used from two threads at once, and the plain
receive path relies on ``MSG_DONTWAIT`` and ``MSG_WAITALL``, which ``ssl`` sockets refuse.
:class:`TLSStream` answers both: a socket-shaped object whose ``recv_into`` honours those two
flags, whose ``sendall`` may be called from any thread, and which calls into OpenSSL only under
its lock and only without blocking (it waits for the descriptor with ``poll``, outside the
lock). The plain path keeps the bare socket and pays nothing for TLS.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CA_CERT",
    "CA_CRL",
    "MODES",
    "SERVER_CERT",
    "SERVER_KEY",
    "TLSConfigError",
    "TLSCredentials",
    "TLSHandshakeError",
    "TLSStream",
    "load_credentials",
    "parse_psk_file",
    "psk_supported",
    "start_tls",
]

MODES = ("off", "on", "require")
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

# Plain text written at most this much per OpenSSL call, so a big reply does not keep the lock
# (and the receiving thread) waiting for long; 16 full records.
_WRITE_CHUNK = 256 * 1024


class TLSConfigError(ValueError):
    """The TLS options cannot be served as given; the message says what to pass instead."""


class TLSHandshakeError(ConnectionError):
    """A client's TLS handshake failed (bad certificate, wrong key, not TLS at all)."""


@dataclass(frozen=True)
class TLSCredentials:
    """A server's TLS context, loaded once and shared by every connection."""

    context: ssl.SSLContext
    kind: str  # "x509" or "psk"
    verify_peer: bool
    source: str  # the directory or file, for messages
    # PSK: the user name the key callback last saw on this thread. The callback runs inside
    # the handshake, on the connection's own thread, so this is that connection's user.
    psk_user: threading.local | None = None

    def describe(self) -> str:
        if self.kind == "psk":
            return f"pre-shared keys from {self.source}"
        checked = ", client certificates checked" if self.verify_peer else ""
        return f"certificates from {self.source}{checked}"


def psk_supported() -> bool:
    """Whether this Python's ``ssl`` can serve pre-shared keys (3.13 and later)."""
    return hasattr(ssl.SSLContext, "set_psk_server_callback")


def load_credentials(
    certificates: str | None, psk_file: str | None, verify_peer: bool
) -> TLSCredentials | None:
    """The server's TLS credentials from the options; None when neither is given."""
    if certificates is not None and psk_file is not None:
        raise TLSConfigError("give --tls-certificates or --tls-psk, not both")
    if psk_file is not None:
        if verify_peer:
            raise TLSConfigError(
                "--tls-verify-peer checks client certificates; with --tls-psk every client "
                "already proves it holds a key"
            )
        return _psk_credentials(psk_file)
    if certificates is not None:
        return _x509_credentials(certificates, verify_peer)
    if verify_peer:
        raise TLSConfigError("--tls-verify-peer needs --tls-certificates DIR (with ca-cert.pem)")
    return None


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client that renegotiates can make the server redo handshakes at will; NBD never needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # An end of the stream without close_notify is just the end: NBD messages carry their own
    # lengths, so a cut is seen as a cut message, never taken for a whole one. Without this,
    # OpenSSL 3 answers such an end (also the server's own shutdown of its receiving side when
    # it stops) with a decode_error alert instead of closing cleanly.
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    # No session tickets: clients do not resume NBD sessions, and without them nothing is sent
    # after the handshake that the client did not ask for.
    ctx.num_tickets = 0
    return ctx


def _x509_credentials(directory: str, verify_peer: bool) -> TLSCredentials:
    def path(name: str) -> str:
        return os.path.join(directory, name)

    if not os.path.isdir(directory):
        raise TLSConfigError(f"--tls-certificates {directory}: not a directory")
    needed = [SERVER_CERT, SERVER_KEY] + ([CA_CERT] if verify_peer else [])
    missing = [name for name in needed if not os.path.isfile(path(name))]
    if missing:
        raise TLSConfigError(
            f"--tls-certificates {directory}: missing {', '.join(missing)} "
            f"(the directory holds {SERVER_CERT}, {SERVER_KEY} and, to check clients, "
            f"{CA_CERT}, as for nbdkit and qemu-nbd)"
        )
    ctx = _base_context()

    def no_passphrase() -> str:
        raise TLSConfigError(f"{path(SERVER_KEY)} is encrypted; the server needs it unencrypted")

    try:
        ctx.load_cert_chain(path(SERVER_CERT), path(SERVER_KEY), password=no_passphrase)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"--tls-certificates {directory}: cannot use {SERVER_CERT} with {SERVER_KEY}: "
            f"{exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise TLSConfigError(f"--tls-certificates {directory}: {exc.strerror or exc}") from None
    if verify_peer:
        try:
            ctx.load_verify_locations(cafile=path(CA_CERT))
            if os.path.isfile(path(CA_CRL)):
                ctx.load_verify_locations(cafile=path(CA_CRL))
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"--tls-certificates {directory}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE  # any client may connect; TLS still encrypts
    return TLSCredentials(ctx, "x509", verify_peer, directory)


def parse_psk_file(text: str, where: str = "PSK file") -> dict[str, bytes]:
    """``user:hexkey`` lines (as ``psktool`` writes them) -> {user: key}."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        user, sep, hexkey = line.rpartition(":")
        if not sep or not user:
            raise TLSConfigError(f"{where}, line {number}: not USER:HEXKEY")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            raise TLSConfigError(f"{where}, line {number}: the key is not hexadecimal") from None
        if not key:
            raise TLSConfigError(f"{where}, line {number}: empty key")
        keys[user] = key
    if not keys:
        raise TLSConfigError(f"{where}: no keys")
    return keys


def _psk_credentials(psk_file: str) -> TLSCredentials:
    if not psk_supported():
        raise TLSConfigError(
            "--tls-psk needs Python 3.13 or later (ssl.SSLContext.set_psk_server_callback); "
            f"this is Python {sys.version.split()[0]}: use --tls-certificates DIR instead"
        )
    try:
        with open(psk_file, encoding="utf-8") as f:
            keys = parse_psk_file(f.read(), psk_file)
    except OSError as exc:
        raise TLSConfigError(f"--tls-psk {psk_file}: {exc.strerror or exc}") from None
    ctx = _base_context()
    # PSK cipher suites for TLS 1.2; TLS 1.3 uses its own suites with the same callback.
    ctx.set_ciphers("PSK")

    seen = threading.local()

    def lookup(identity: str | None) -> bytes:
        seen.user = identity
        return keys.get(identity or "", b"")  # an empty key refuses the client

    ctx.set_psk_server_callback(lookup)  # type: ignore[attr-defined,unused-ignore]
    return TLSCredentials(ctx, "psk", False, psk_file, seen)


def start_tls(
    sock: socket.socket, credentials: TLSCredentials, deadline: float | None
) -> tuple[TLSStream, str | None]:
    """Run the server side of the TLS handshake on ``sock``, finished by ``deadline`` (a
    ``time.monotonic()`` value, or None); the stream, and who the client proved to be (its
    certificate's subject or PSK user name; None if it proved nothing).

    ``sock`` belongs to the returned stream from now on. Raises :class:`TLSHandshakeError`.
    The handshake runs without blocking, against the one deadline: a socket timeout would
    start again with every byte, and a client sending one byte a minute would never time out.
    """
    try:
        tls = credentials.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (ssl.SSLError, OSError) as exc:
        raise TLSHandshakeError(f"TLS setup failed: {exc}") from None
    stream = TLSStream(tls, None)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            stream._wait(events, deadline)
    except (ssl.SSLError, OSError) as exc:
        stream.abort()
        if isinstance(exc, TimeoutError):
            raise TLSHandshakeError("TLS handshake timed out") from None
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise TLSHandshakeError(f"TLS handshake failed: {reason}") from None
    return stream, _identity(tls, credentials)


def _identity(tls: ssl.SSLSocket, credentials: TLSCredentials) -> str | None:
    if credentials.psk_user is not None:
        user = getattr(credentials.psk_user, "user", None)
        credentials.psk_user.user = None
        return f"PSK user {user}" if user else None
    cert = tls.getpeercert()
    if not cert:
        return None
    subject: Sequence[Sequence[tuple[str, str]]] = cert.get("subject", ())  # type: ignore[assignment]
    parts = [f"{_SHORT_NAMES.get(key, key)}={value}" for rdn in subject for key, value in rdn]
    return ",".join(parts) or None


# The usual short names of distinguished-name attributes, as in "CN=client,O=Example".
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
}


class TLSStream:
    """A TLS connection shaped like the socket the handshake and transmission code uses.

    ``recv_into(buf, n, flags)`` honours ``MSG_DONTWAIT`` (raise ``BlockingIOError`` rather than
    wait) and ``MSG_WAITALL`` (fill all ``n`` bytes); ``sendall`` may be called from several
    threads, each call's bytes leaving whole. A client that hangs up without a TLS close
    (``close_notify``) reads as end-of-file, like a clean close: the connection just ends.
    """

    def __init__(self, tls: ssl.SSLSocket, timeout: float | None) -> None:
        self._tls = tls
        self._fd = tls.fileno()
        tls.setblocking(False)
        self._timeout = timeout
        self._lock = threading.Lock()  # held only around non-blocking calls into OpenSSL
        self._send_lock = threading.Lock()  # one sendall at a time: each leaves whole

    # --- the socket subset the server uses ------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def setsockopt(self, level: int, optname: int, value: int) -> None:
        self._tls.setsockopt(level, optname, value)

    def shutdown(self, how: int) -> None:
        """Shut the descriptor down underneath TLS (wakes a blocked receive; no TLS alert).

        ``SSLSocket.shutdown`` would also drop its TLS state while another thread uses it.
        """
        socket.socket.shutdown(self._tls, how)

    def close(self) -> None:
        """Say goodbye in TLS (``close_notify``, without waiting for the reply), then close."""
        with self._lock:
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self._tls.unwrap()
            with contextlib.suppress(OSError):
                self._tls.close()

    def abort(self) -> None:
        """Close without a word (after a failed handshake there is no TLS to close)."""
        with contextlib.suppress(OSError):
            self._tls.close()

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        n = nbytes or len(view)
        if not flags & socket.MSG_WAITALL:
            return self._recv_some(view[:n], not flags & socket.MSG_DONTWAIT)
        got = 0
        while got < n:
            k = self._recv_some(view[got:n], True)
            if k == 0:
                break
            got += k
        return got

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        deadline = self._deadline()
        with self._send_lock:
            while view:
                chunk = view[:_WRITE_CHUNK]
                with self._lock:
                    try:
                        view = view[self._tls.send(chunk) :]
                        continue
                    except ssl.SSLWantWriteError:
                        events = select.POLLOUT
                    except ssl.SSLWantReadError:
                        events = select.POLLIN
                # OpenSSL wants the same bytes again once the socket is ready.
                self._wait(events, deadline)

    def readable(self, timeout: float) -> bool:
        """Whether bytes (or the end) can be received within ``timeout`` seconds."""
        with self._lock:
            if self._tls.pending():
                return True
        return self._poll(select.POLLIN, timeout)

    # --- internals ------------------------------------------------------------------------------
    def _recv_some(self, view: memoryview, wait: bool) -> int:
        deadline = self._deadline()
        while True:
            with self._lock:
                try:
                    return self._tls.recv_into(view, len(view))
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0  # closed, with or without close_notify: the end either way
            if not wait:
                raise BlockingIOError("no TLS record ready")
            self._wait(events, deadline)

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _wait(self, events: int, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._poll(events, timeout):
            raise TimeoutError("timed out")

    def _poll(self, events: int, timeout: float | None) -> bool:
        poller = select.poll()
        poller.register(self._fd, events)
        return bool(poller.poll(None if timeout is None else timeout * 1000))
