"""The transmission phase of one connection: take requests, serve them, answer them.

The connection's own thread receives every request and serves it at once, asking the disk
not to wait (``wait=False``); small replies are batched (a burst of small requests costs a few
system calls, not several each), and the batch leaves just before the thread would wait for
the client, so no reply ever waits for the client to send more. A request the disk would
block on (another process holds its pages) goes to one of the connection's workers, which
waits for the pages, while the thread goes on with the requests behind it. Workers send
their replies themselves, so replies may leave out of order, as the protocol allows.

Why not hand big reads and writes to workers too, so the copy of one overlaps the transfer
of the next? Measured on 2 cores with nbdcopy and fio, it made 1 MiB reads and writes 10-30%
slower: the disk copies with the GIL held, so the workers mostly take turns, and every
hand-off costs a thread wake-up. With a disk that copies without the GIL it would pay; the
place to decide it is :meth:`Transmission.dispatch`.

Ordering that the protocol does ask for is kept here: a FLUSH is answered only once every
write received before it has completed; a DISC (and the end of the connection for any
reason) waits for every request in flight to be answered. Memory is bounded: at most
:data:`MAX_IN_FLIGHT` requests and :data:`BUDGET` payload bytes are with the workers at once;
beyond that the thread stops reading, and the socket pushes back on the client.

When the server stops, the socket's receiving side is shut: requests already received are
still answered (those not yet started with ``ESHUTDOWN``), then the connection closes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
from collections.abc import Callable

from shmdisk import errors

from . import _proto as P
from ._buffers import IDLE_RELEASE, Buffer, BufferPool
from ._channel import Closed, Stream, hangup_reason, readable_within, shutdown
from ._handlers import DiskCommands
from ._negotiation import Session
from ._replies import Replies, Reply
from ._requests import WRITING, Checker, Request, RequestError, error_code
from ._workers import ThreadCache, Workers

__all__ = ["BUDGET", "MAX_IN_FLIGHT", "Transmission"]

log = logging.getLogger("shmdisk.nbd")

Handler = Callable[[Request, Buffer | None, bool], Reply]

# Workers per connection: requests waiting for pages other processes hold wait on these.
WORKERS = 4
MAX_IN_FLIGHT = 16
BUDGET = 64 * 1024 * 1024
# A WRITE longer than the maximum is answered EINVAL and its payload read and dropped, as
# nbdkit does, as long as it is no longer than this; a longer one is a denial of service.
MAX_SKIP = 2 * P.MAX_REQUEST
# Requests arrive through a staging buffer this big: room for a 4 KiB write with its header
# and the next header, while a big write leaves at most this much to copy out of it.
STAGE = 8192 + 256
# Replies up to this size join the batch; bigger ones are sent on their own, from their buffer.
SMALL_REPLY = 32 * 1024
BATCH_LIMIT = 256 * 1024
# While the batch is smaller than this, requests that have already arrived are taken before
# it is sent: a pipelining client's write acks then leave several at a time, yet no reply
# waits for the client to send more.
ACK_BATCH = 256
# Bigger socket buffers let replies (and, over TCP, requests) queue up while the other side is
# busy; over a Unix socket the sender's buffer is the one that limits.
SOCKET_BUFFER = 4 * 1024 * 1024

_HEADER = P.REQUEST.size
_unpack_header = P.REQUEST.unpack_from


class Transmission:
    """Serves one connection's requests until it ends; :meth:`run` returns why it ended."""

    def __init__(
        self,
        sock: Stream,
        session: Session,
        label: str,
        threads: ThreadCache,
        stopping: Callable[[], bool],
    ) -> None:
        self.sock = sock
        self.label = label
        self.stopping = stopping
        self.checker = Checker(session)
        self.replies = Replies(sock, session.structured)
        commands = DiskCommands(session.export, self.replies)
        self.handlers: dict[int, Handler] = {
            P.CMD_READ: commands.read,
            P.CMD_WRITE: commands.write,
            P.CMD_TRIM: commands.trim,
            P.CMD_WRITE_ZEROES: commands.write_zeroes,
            P.CMD_FLUSH: commands.flush,
            P.CMD_CACHE: commands.cache,
            P.CMD_BLOCK_STATUS: commands.block_status,
        }
        self.pool = BufferPool()
        self.readable_within = readable_within(sock)
        self.workers = Workers(threads, WORKERS)
        # Requests with the workers, and the FLUSHes waiting for writes among them.
        self.cond = threading.Condition()
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.write_seq = 0  # numbers the writes given to workers, in order of arrival
        self.writes: set[int] = set()  # those still running
        # FLUSHes waiting for writes, with the number of writes given out before each.
        self.flushes: collections.deque[tuple[int, Request]] = collections.deque()
        self.broken: str | None = None  # why a worker found the connection dead
        # What came in: stage[pos:have] are received bytes not yet taken.
        self.stage = bytearray(STAGE)
        self.stage_view = memoryview(self.stage)
        self.pos = self.have = 0
        # Counters for the log line: this thread's, and the workers' (kept under self.cond).
        self.requests = 0
        self.bytes_read = self.bytes_written = 0
        self.worker_bytes_read = self.worker_bytes_written = 0
        self.warned = False

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> str:
        reason = "done"
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        try:
            while True:
                self.serve(self.next_request())
        except Closed as exc:
            reason = str(exc)
        except OSError as exc:
            reason = self.broken or hangup_reason(exc) or f"socket error: {exc.strerror or exc}"
        finally:
            self.finish()
        return reason

    def serve(self, req: Request) -> None:
        """Check ``req``, take in its payload, and serve it here or on a worker."""
        self.requests += 1
        cmd = req.cmd
        if cmd == P.CMD_DISC:
            # No reply; everything asked before it is answered first (finish() sees to it).
            raise Closed("client disconnected")
        problem = self.checker.check(cmd, req.flags, req.offset, req.length)
        buf = None
        if cmd == P.CMD_WRITE:
            if problem is None:
                buf = self.buffer_for(req.length)
                self.receive_into(buf.payload(req.length))
            elif req.length <= MAX_SKIP:
                self.skip(req.length)  # the stream stays in step; only this request fails
            else:
                raise Closed(f"WRITE of {req.length} bytes is too large to skip")
        if problem is None and self.stopping():
            problem = RequestError(P.ESHUTDOWN, "server is shutting down")
        if problem is not None:
            if buf is not None:
                self.pool.give(buf)
            self.answer(self.fail(req, problem))
            return
        if cmd == P.CMD_FLUSH and self.flush_later(req):
            return
        if cmd == P.CMD_READ and req.length:
            buf = self.buffer_for(req.length)
        self.dispatch(req, buf, self.handlers[cmd])

    def dispatch(self, req: Request, buf: Buffer | None, handler: Handler) -> None:
        """Serve ``req`` on this thread, or give it to a worker if the disk would block."""
        try:
            reply = handler(req, buf, False)
        except errors.WouldBlockError:
            # Another process holds these pages: wait for them on a worker, not here.
            self.offload(req, buf, handler)
            return
        except Exception as exc:
            reply = self.fail(req, exc)
        else:
            if req.cmd == P.CMD_READ:
                self.bytes_read += req.length
            elif req.cmd == P.CMD_WRITE:
                self.bytes_written += req.length
        self.answer(reply)
        if buf is not None:
            self.pool.give(buf)  # the reply has been copied out of it, or sent

    def answer(self, reply: Reply) -> None:
        """Send a reply made on this thread: batched if small, at once if not."""
        replies = self.replies
        if len(reply) <= SMALL_REPLY:
            replies.batch += reply
            if len(replies.batch) >= BATCH_LIMIT:
                replies.flush()
        else:
            replies.flush()
            replies.send(reply)

    def fail(self, req: Request, exc: BaseException) -> bytes:
        """The error reply for ``req`` failing with ``exc``; server bugs are logged as such."""
        code = error_code(exc, req.cmd)
        if code is None:
            log.exception("%s: server bug while serving %s", self.label, req.name, exc_info=exc)
            code = P.EIO
        elif code == P.EIO and not self.warned:
            # Not the client's fault (a destroyed disk, say): worth a line, once.
            self.warned = True
            log.warning("%s: %s failed: %s", self.label, req.name, exc)
        message = exc.message if isinstance(exc, RequestError) else str(exc)
        return self.replies.error(req.handle, code, message)

    # --- FLUSH: it waits for the writes before it -------------------------------------------
    def flush_later(self, req: Request) -> bool:
        """Hold ``req`` back if writes received before it are still with workers.

        Writes served on this thread are done already; the last of the workers' earlier
        writes to finish serves the FLUSH (see :meth:`work`).
        """
        with self.cond:
            if not self.writes:
                return False
            self.flushes.append((self.write_seq, req))
            return True

    # --- workers -----------------------------------------------------------------------------
    def buffer_for(self, length: int) -> Buffer:
        """A buffer for a ``length``-byte payload, once the workers' budget has room."""
        while self.in_flight:
            with self.cond:
                full = self.in_flight >= MAX_IN_FLIGHT or (
                    self.in_flight > 0 and self.in_flight_bytes + length > BUDGET
                )
                if not full:
                    break
                if not self.replies.batch:
                    self.cond.wait()  # a worker finishing makes room
                    continue
            # The batch must leave before this thread waits (never send holding self.cond).
            self.replies.flush()
        return self.pool.take()

    def offload(self, req: Request, buf: Buffer | None, handler: Handler) -> None:
        seq = None
        size = req.length if buf is not None else 0
        with self.cond:
            self.in_flight += 1
            self.in_flight_bytes += size
            if req.cmd in WRITING:
                seq = self.write_seq
                self.write_seq += 1
                self.writes.add(seq)
        self.workers.submit(lambda: self.work(req, buf, handler, seq, size))

    def work(
        self, req: Request, buf: Buffer | None, handler: Handler, seq: int | None, size: int
    ) -> None:
        """A worker serves ``req`` and sends the reply; then the bookkeeping, whatever happened."""
        reply: Reply = b""
        ok = False
        try:
            try:
                reply = handler(req, buf, True)
                ok = True
            except Exception as exc:
                reply = self.fail(req, exc)
            self.send_from_worker(reply)
        finally:
            del reply  # a view of the buffer, which goes back to the pool now
            released: list[Request] = []
            with self.cond:
                if buf is not None:
                    self.pool.give(buf)
                self.in_flight_bytes -= size
                if ok and req.cmd == P.CMD_READ:
                    self.worker_bytes_read += req.length
                elif ok and req.cmd == P.CMD_WRITE:
                    self.worker_bytes_written += req.length
                if seq is not None:
                    self.writes.discard(seq)
                    oldest = min(self.writes, default=self.write_seq)
                    while self.flushes and self.flushes[0][0] <= oldest:
                        released.append(self.flushes.popleft()[1])
                if not released:
                    self.in_flight -= 1
                    self.cond.notify_all()
            if released:
                # Still counted in flight until the FLUSHes it released are answered, so the
                # connection cannot end (and close the socket) before they are.
                try:
                    for flush in released:
                        self.send_from_worker(self.serve_here(flush, self.handlers[P.CMD_FLUSH]))
                finally:
                    with self.cond:
                        self.in_flight -= 1
                        self.cond.notify_all()

    def serve_here(self, req: Request, handler: Handler) -> Reply:
        """The reply to a payload-less request served on the calling thread."""
        try:
            return handler(req, None, True)
        except Exception as exc:
            return self.fail(req, exc)

    def send_from_worker(self, reply: Reply) -> None:
        try:
            self.replies.send(reply)
        except OSError as exc:
            # The client is gone (or stuck and cut off): make the receiving thread notice.
            self.broken = hangup_reason(exc) or f"socket error: {exc.strerror or exc}"
            shutdown(self.sock, socket.SHUT_RDWR)

    def finish(self) -> None:
        """Wait for every request in flight, send what is batched, release the buffers."""
        with self.cond:
            while self.in_flight:
                self.cond.wait()
            # Writes are all done, so every waiting FLUSH may be served.
            flushes = [req for _, req in self.flushes]
            self.flushes.clear()
        for req in flushes:
            self.replies.queue(self.serve_here(req, self.handlers[P.CMD_FLUSH]))
        with contextlib.suppress(OSError):
            self.replies.flush()
        self.pool.close()

    # --- receiving ---------------------------------------------------------------------------
    def next_request(self) -> Request:
        if self.have - self.pos < _HEADER:
            self.fill_header()
        req: Request = tuple.__new__(Request, _unpack_header(self.stage, self.pos))
        self.pos += _HEADER
        if req.magic != P.REQUEST_MAGIC:
            raise Closed(f"bad request magic {req.magic:#x}")
        return req

    def fill_header(self) -> None:
        """Receive until a whole request header is staged, sending batched replies first."""
        stage, view, replies = self.stage, self.stage_view, self.replies
        if self.pos:
            left = self.have - self.pos
            stage[:left] = stage[self.pos : self.have]
            self.pos, self.have = 0, left
        while self.have < _HEADER:
            if replies.batch and len(replies.batch) < ACK_BATCH:
                # Replies are pending: take more requests if they are already here, but never
                # wait for the client while it may be waiting for us.
                try:
                    n = self.sock.recv_into(
                        view[self.have :], STAGE - self.have, socket.MSG_DONTWAIT
                    )
                except BlockingIOError:
                    replies.flush()
                    continue
            else:
                replies.flush()
                if self.pool.holding and not self.readable_within(IDLE_RELEASE):
                    # The client has gone quiet: its buffers' memory goes back to the system.
                    self.pool.release_idle()
                n = self.sock.recv_into(view[self.have :], STAGE - self.have)
            if n == 0:
                raise Closed(self.end_reason("client hung up mid-request" if self.have else ""))
            self.have += n

    def end_reason(self, default: str) -> str:
        if self.broken:
            return self.broken
        if self.stopping():
            return "server stopping"
        return default or "client hung up"

    def receive_into(self, view: memoryview) -> None:
        """Fill ``view`` with the payload that follows the current header."""
        staged = min(self.have - self.pos, len(view))
        if staged:
            view[:staged] = self.stage_view[self.pos : self.pos + staged]
            self.pos += staged
        got, total = staged, len(view)
        # No need to send batched replies first: the client is in the middle of sending this
        # request and does not wait for them to finish it.
        while got < total:
            n = self.sock.recv_into(view[got:], total - got, socket.MSG_WAITALL)
            if n == 0:
                raise Closed(self.end_reason("client hung up mid-request"))
            got += n

    def skip(self, n: int) -> None:
        """Read and drop ``n`` payload bytes."""
        staged = min(self.have - self.pos, n)
        self.pos += staged
        n -= staged
        if n:
            self.pos = self.have = 0  # the stage is empty: use it as scratch
        while n:
            k = self.sock.recv_into(self.stage_view, min(n, STAGE))
            if k == 0:
                raise Closed(self.end_reason("client hung up mid-request"))
            n -= k
