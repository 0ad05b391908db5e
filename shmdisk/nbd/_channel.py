"""Whole-message socket I/O for the handshake, and the one way a connection ends: :class:`Closed`.

The negotiation reads and writes through a :class:`Channel`, never through the socket itself,
so a layer that replaces the socket mid-handshake (TLS after ``NBD_OPT_STARTTLS``) only has to
swap :attr:`Channel.sock`. A client that hangs up, resets or stops reading becomes
:class:`Closed` with a reason meant for the log, not a socket error.

:class:`Stream` is what the rest of the server asks of a connection's socket: a plain
``socket.socket`` is one, and so is ``_tls.TLSStream``.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Channel", "Closed", "Stream", "hangup_reason", "readable_within", "shutdown"]


class Stream(Protocol):
    """The socket operations a connection uses, plain or TLS.

    ``recv_into`` must honour ``MSG_DONTWAIT`` and ``MSG_WAITALL``; ``sendall`` must send each
    call's bytes whole even when called from several threads (callers hold a lock as well).
    """

    def recv_into(
        self, buffer: memoryview | bytearray, nbytes: int = ..., flags: int = ...
    ) -> int: ...

    def sendall(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def settimeout(self, value: float | None, /) -> None: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...

    def shutdown(self, how: int, /) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


def readable_within(stream: Stream) -> Callable[[float], bool]:
    """A function telling whether ``stream`` has something to receive (bytes, or its end)
    within a number of seconds; a TLS stream also counts what it has already decrypted."""
    own = getattr(stream, "readable", None)
    if own is not None:
        return own  # type: ignore[no-any-return]
    poller = select.poll()
    poller.register(stream.fileno(), select.POLLIN)

    def readable(timeout: float) -> bool:
        return bool(poller.poll(timeout * 1000))

    return readable


def shutdown(stream: Stream, how: int) -> None:
    """Shut ``stream``'s descriptor down (waking a thread blocked on it); never raises."""
    with contextlib.suppress(OSError):
        stream.shutdown(how)


class Closed(Exception):
    """The connection is over; ``str(exc)`` says why, for the log."""


def hangup_reason(exc: OSError) -> str | None:
    """The log reason when ``exc`` just means the client went away; None for a real fault."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
        return "client hung up"
    return None


class Channel:
    """A connected socket, read and written in whole messages.

    With a ``deadline`` (a ``time.monotonic()`` value), every receive and send waits at most
    until then and then raises ``TimeoutError``: the whole handshake has one time limit, so a
    client that sends a byte now and then cannot hold a connection slot forever.
    """

    def __init__(
        self, sock: Stream, stopping: Callable[[], bool], deadline: float | None = None
    ) -> None:
        self.sock = sock
        self._stopping = stopping
        self.deadline = deadline

    def remaining(self) -> float | None:
        """Seconds left until the deadline (None: no deadline); TimeoutError once past it."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake deadline passed")
        return left

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`Closed` if the client goes away first."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                self.sock.settimeout(self.remaining())
                k = self.sock.recv_into(view[got:], n - got)
            except OSError as exc:
                reason = hangup_reason(exc)
                if reason is None:
                    raise
                raise Closed(reason) from None
            if k == 0:
                if self._stopping():
                    raise Closed("server stopping")
                raise Closed("client hung up" if got == 0 else "client hung up mid-message")
            got += k
        return bytes(buf)

    def send(self, data: bytes) -> None:
        """Send all of ``data``; :class:`Closed` if the client has gone."""
        try:
            self.sock.settimeout(self.remaining())
            self.sock.sendall(data)
        except OSError as exc:
            reason = hangup_reason(exc)
            if reason is None:
                raise
            raise Closed(reason) from None
