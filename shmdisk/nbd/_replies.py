"""Transmission replies: their bytes, and the one socket they all leave through.

Replies come from two places: the connection's receiving thread, which batches small ones
(:meth:`Replies.queue`, sent by :meth:`Replies.flush` before it would wait for the client), and
workers serving requests in parallel, which send theirs at once (:meth:`Replies.send`). The
lock keeps each reply whole on the wire; the order between replies is free, as the protocol
allows.
"""

from __future__ import annotations

import threading

from . import _proto as P
from ._buffers import DATA_AT, Buffer
from ._channel import Stream

__all__ = ["Replies", "Reply"]

Reply = bytes | bytearray | memoryview

# Error messages are for humans; keep them short on the wire.
_MAX_MESSAGE = 1024


class Replies:
    """Encodes one connection's replies and sends them, whole, from any thread."""

    def __init__(self, sock: Stream, structured: bool) -> None:
        self.sock = sock
        self.structured = structured
        self.lock = threading.Lock()
        self.batch = bytearray()  # the receiving thread's queued replies; only it touches this

    # --- encoding ----------------------------------------------------------------------------
    def ok(self, handle: int) -> bytes:
        return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle)

    def empty_read(self, handle: int) -> bytes:
        """The reply to a READ of zero bytes."""
        if not self.structured:
            return self.ok(handle)
        return P.STRUCTURED_REPLY.pack(
            P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0
        )

    def error(self, handle: int, code: int, message: str) -> bytes:
        if not self.structured:
            # A failed simple READ reply carries no payload, so the stream stays in step.
            return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, code, handle)
        text = message.encode("utf-8", "replace")[:_MAX_MESSAGE]
        payload = P.ERROR_PAYLOAD.pack(code, len(text)) + text
        header = P.STRUCTURED_REPLY.pack(
            P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, handle, len(payload)
        )
        return header + payload

    def data(self, buf: Buffer, handle: int, offset: int, length: int) -> memoryview:
        """The reply to a READ whose ``length`` bytes are already in ``buf.payload``.

        The header is written into the buffer just before the data, so the whole reply is one
        contiguous view (valid until the buffer is reused).
        """
        if self.structured:
            start = DATA_AT - P.STRUCTURED_DATA.size
            P.STRUCTURED_DATA.pack_into(
                buf.view,
                start,
                P.STRUCTURED_REPLY_MAGIC,
                P.REPLY_FLAG_DONE,
                P.REPLY_TYPE_OFFSET_DATA,
                handle,
                length + 8,
                offset,
            )
        else:
            start = DATA_AT - P.SIMPLE_REPLY.size
            P.SIMPLE_REPLY.pack_into(buf.view, start, P.SIMPLE_REPLY_MAGIC, 0, handle)
        return buf.view[start : DATA_AT + length]

    def hole(self, handle: int, offset: int, length: int) -> bytes:
        """A structured READ reply saying the whole range reads as zeros."""
        return P.STRUCTURED_HOLE.pack(
            P.STRUCTURED_REPLY_MAGIC,
            P.REPLY_FLAG_DONE,
            P.REPLY_TYPE_OFFSET_HOLE,
            handle,
            12,
            offset,
            length,
        )

    def block_status(self, handle: int, extents: list[tuple[int, int]]) -> bytes:
        payload = bytearray(P.U32.pack(P.META_BASE_ALLOCATION_ID))
        for length, status in extents:
            payload += P.EXTENT.pack(length, status)
        header = P.STRUCTURED_REPLY.pack(
            P.STRUCTURED_REPLY_MAGIC,
            P.REPLY_FLAG_DONE,
            P.REPLY_TYPE_BLOCK_STATUS,
            handle,
            len(payload),
        )
        return header + payload

    # --- sending -----------------------------------------------------------------------------
    def queue(self, reply: Reply) -> None:
        """Add a reply to the receiving thread's batch (that thread only)."""
        self.batch += reply

    def flush(self) -> None:
        """Send the batch (receiving thread only)."""
        if self.batch:
            with self.lock:
                self.sock.sendall(self.batch)
            self.batch.clear()

    def send(self, reply: Reply) -> None:
        """Send one reply now, whole (any thread)."""
        with self.lock:
            self.sock.sendall(reply)
