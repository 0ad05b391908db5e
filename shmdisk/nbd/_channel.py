"""Whole-message socket I/O for the handshake, and the one way a connection ends: :class:`Closed`.

The negotiation reads and writes through a :class:`Channel`, never through the socket itself,
so a layer that replaces the socket mid-handshake (TLS after ``NBD_OPT_STARTTLS``) only has to
swap :attr:`Channel.sock`. A client that hangs up, resets or stops reading becomes
:class:`Closed` with a reason meant for the log, not a socket error.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

__all__ = ["Channel", "Closed", "hangup_reason"]


class Closed(Exception):
    """The connection is over; ``str(exc)`` says why, for the log."""


def hangup_reason(exc: OSError) -> str | None:
    """The log reason when ``exc`` just means the client went away; None for a real fault."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
        return "client hung up"
    return None


class Channel:
    """A connected socket, read and written in whole messages."""

    def __init__(self, sock: socket.socket, stopping: Callable[[], bool]) -> None:
        self.sock = sock
        self._stopping = stopping

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`Closed` if the client goes away first."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
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
            self.sock.sendall(data)
        except OSError as exc:
            reason = hangup_reason(exc)
            if reason is None:
                raise
            raise Closed(reason) from None
