"""An NBD server for shmdisk disks: fixed-newstyle handshake, structured replies, block status.

One thread per client connection (threads are reused by later connections); all of them share
the export's :class:`~shmdisk.Disk` handle (the core gives each thread its own lock descriptor,
so requests from different connections and from local processes exclude each other correctly).
Requests of one connection are served in order; clients that pipeline (nbdcopy, qemu) keep the
socket full, and clients that want parallelism open several connections, which
``NBD_FLAG_CAN_MULTI_CONN`` allows because every connection sees the same shared memory.

The data path avoids copies: a request payload is received straight into a page-aligned buffer
and handed to ``Disk.write_at``; a read is filled by ``Disk.read_at`` right behind its reply
header in the same buffer and leaves in one ``sendall``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import shmdisk
from shmdisk import errors
from shmdisk.nbd import _proto as P

if TYPE_CHECKING:
    from shmdisk.disk import Disk

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "NBDServer", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 10809

log = logging.getLogger("shmdisk.nbd")

# Where a payload starts inside a connection's page-aligned buffer. The reply header sits just
# before it, so header and data leave in one send. 256 bytes past the page boundary keeps the
# copies between this buffer and the disk's page-aligned memory off the 8/16-byte page-offset
# aliasing that makes this machine's fast string copy several times slower.
_DATA_AT = 256
_HANDSHAKE_TIMEOUT = 60.0
# A BLOCK_STATUS reply lists at most this many extents (each costs a page-map seek); the spec
# lets the server stop early, and clients simply ask again from where the reply ended.
_MAX_EXTENTS = 2048
# Bigger socket buffers let replies (and, over TCP, requests) queue up while the other side is
# busy; over a Unix socket the sender's buffer is the one that limits.
_SOCKET_BUFFER = 4 * 1024 * 1024
# Requests are received through a staging buffer this big: room for a 4 KiB write with its
# header and the next header, while a big write leaves at most this much to copy out of it.
_STAGE = 8192 + 256
# Read replies up to this size are queued and sent together with other replies; bigger ones go
# out on their own, straight from the read buffer.
_SMALL_REPLY = 32 * 1024
_OUT_LIMIT = 256 * 1024
# While fewer reply bytes than this are queued, the loop takes requests that have already
# arrived before sending them: a pipelining client's write acks then leave several at a time
# (nbdcopy writes ~15% faster), yet no reply ever waits for the client to send more.
_ACK_BATCH = 256


class _Closed(Exception):
    """The connection is over (client hung up, protocol violation, or server stopping)."""


@dataclass(frozen=True)
class _Export:
    name: str
    disk: Disk
    read_only: bool
    size: int  # bytes, fixed at the moment a client enters transmission
    sector_size: int
    page_size: int

    def transmission_flags(self, structured: bool) -> int:
        flags = (
            P.FLAG_HAS_FLAGS
            | P.FLAG_SEND_FLUSH
            | P.FLAG_SEND_CACHE
            # Every connection reads and writes the same shared memory, with no cache of its
            # own, so a flush on one connection covers writes made on all the others.
            | P.FLAG_CAN_MULTI_CONN
        )
        if structured:
            flags |= P.FLAG_SEND_DF  # a read reply is always a single content chunk anyway
        if self.read_only:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= (
                P.FLAG_SEND_FUA
                | P.FLAG_SEND_TRIM
                | P.FLAG_SEND_WRITE_ZEROES
                | P.FLAG_SEND_FAST_ZERO
            )
        return flags

    def block_sizes(self) -> tuple[int, int, int]:
        minimum = self.sector_size
        preferred = max(self.sector_size, self.page_size, 4096)
        return minimum, preferred, P.MAX_REQUEST


def _error_code(exc: BaseException, *, writing: bool) -> int:
    """The NBD error number for an exception raised by a disk operation."""
    if isinstance(exc, errors.IsReadOnlyError):
        return P.EPERM
    if isinstance(exc, errors.DiskFullError):
        return P.ENOSPC
    if isinstance(exc, errors.OutOfRangeError):
        # The spec asks for ENOSPC on writes past the end and EINVAL on everything else.
        return P.ENOSPC if writing else P.EINVAL
    if isinstance(exc, ValueError):
        return P.EINVAL
    if isinstance(exc, PermissionError):
        return P.EPERM
    if isinstance(exc, OSError) and not isinstance(exc, errors.DisconnectedError):
        return P.nbd_errno(exc.errno)
    return P.EIO


_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_DISC: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}
_WRITING = frozenset({P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES})
_COMMAND_NAMES = {
    P.CMD_READ: "READ",
    P.CMD_WRITE: "WRITE",
    P.CMD_DISC: "DISC",
    P.CMD_FLUSH: "FLUSH",
    P.CMD_TRIM: "TRIM",
    P.CMD_CACHE: "CACHE",
    P.CMD_WRITE_ZEROES: "WRITE_ZEROES",
    P.CMD_BLOCK_STATUS: "BLOCK_STATUS",
}


class _RequestError(Exception):
    """A request fails with an NBD error; the connection goes on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class _Connection:
    """One client: the handshake, then requests until the client or the server ends it."""

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # export the selected meta context belongs to
        self.export: _Export | None = None
        self.strict_blocks = False  # client promised to honour our block sizes
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._warned = False
        self._out = bytearray()  # replies queued by the transmission loop
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None

    # --- socket helpers --------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely, or raise _Closed if the client goes away first."""
        recv_into = self.sock.recv_into
        got = 0
        total = len(view)
        while got < total:
            n = recv_into(view[got:], total - got, socket.MSG_WAITALL)
            if n == 0:
                if self.server.stopping:
                    raise _Closed("server stopping")
                raise _Closed("client hung up" if got == 0 else "client hung up mid-message")
            got += n

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        if n:
            self._recv_into(memoryview(buf))
        return bytes(buf)

    def _buffer(self) -> memoryview:
        # Anonymous mappings are page aligned and only take memory where touched, so one
        # maximum-size buffer per connection costs no more than the requests actually made.
        if self._view is None:
            self._buf = mmap.mmap(-1, _DATA_AT + P.MAX_REQUEST)
            self._view = memoryview(self._buf)
        return self._view

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        # A slice of the buffer still alive somewhere would make mmap.close() raise; the
        # mapping then goes away with its last reference instead.
        with contextlib.suppress(BufferError):
            if self._view is not None:
                self._view.release()
            if self._buf is not None:
                self._buf.close()
        self._view = None
        self._buf = None

    # --- the whole connection --------------------------------------------------------------
    def run(self) -> None:
        reason = "done"
        try:
            self.sock.settimeout(_HANDSHAKE_TIMEOUT)
            export = self._handshake()
            if export is not None:
                self.sock.settimeout(None)
                self.export = export
                log.info(
                    "%s: export %r, %d bytes, %s%s%s",
                    self.peer,
                    export.name,
                    export.size,
                    "read-only" if export.read_only else "read-write",
                    ", structured replies" if self.structured else "",
                    ", base:allocation" if self.meta_export == export.name else "",
                )
                self._transmission(export)
        except _Closed as exc:
            reason = str(exc)
        except TimeoutError:
            reason = "handshake timed out"
        except OSError as exc:
            reason = f"socket error: {exc.strerror or exc}"
        except Exception as exc:  # a bug must cost this connection only, never the server
            log.exception("%s: internal error", self.peer)
            reason = f"internal error: {exc!r}"
        finally:
            self.close()
        log.info(
            "%s: closed (%s): %d requests, %d bytes read, %d bytes written",
            self.peer,
            reason,
            self.requests,
            self.bytes_read,
            self.bytes_written,
        )

    # --- handshake -------------------------------------------------------------------------
    def _send_option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_REPLY.pack(P.REPLY_MAGIC, option, reply, len(payload)) + payload)

    def _send_option_error(self, option: int, reply: int, message: str) -> None:
        self._send_option_reply(option, reply, message.encode()[: P.MAX_STRING])

    def _handshake(self) -> _Export | None:
        self.sock.sendall(
            P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (client_flags,) = P.CLIENT_FLAGS.unpack(self._recv_exact(4))
        if client_flags & ~P.KNOWN_CLIENT_FLAGS:
            raise _Closed(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(self._recv_exact(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise _Closed("bad option magic")
            if length > P.MAX_OPTION:
                raise _Closed(f"option {option} too long ({length} bytes)")
            data = self._recv_exact(length)
            if self.server.stopping:
                if option == P.OPT_ABORT:
                    self._send_option_reply(option, P.REP_ACK)
                    raise _Closed("client aborted")
                self._send_option_error(option, P.REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if option == P.OPT_EXPORT_NAME:
                export = self.server.lookup(data.decode("utf-8", "replace"))
                if export is None:
                    # This option cannot fail politely: the spec says to hang up.
                    raise _Closed(f"unknown export {data[:256]!r}")
                reply = P.EXPORT_NAME_REPLY.pack(
                    export.size, export.transmission_flags(self.structured)
                )
                if not self.no_zeroes:
                    reply += bytes(124)
                self.sock.sendall(reply)
                if self.meta_export != export.name:
                    self.meta_export = None
                return export
            if option == P.OPT_ABORT:
                self._send_option_reply(option, P.REP_ACK)
                raise _Closed("client aborted")
            if option in (P.OPT_INFO, P.OPT_GO):
                export = self._option_info(option, data)
                if export is not None and option == P.OPT_GO:
                    return export
            elif option == P.OPT_LIST:
                if data:
                    self._send_option_error(option, P.REP_ERR_INVALID, "LIST takes no data")
                    continue
                for name in self.server.export_names():
                    raw = name.encode()
                    self._send_option_reply(option, P.REP_SERVER, P.U32.pack(len(raw)) + raw)
                self._send_option_reply(option, P.REP_ACK)
            elif option == P.OPT_STRUCTURED_REPLY:
                if data:
                    self._send_option_error(option, P.REP_ERR_INVALID, "takes no data")
                    continue
                self.structured = True
                self._send_option_reply(option, P.REP_ACK)
            elif option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._option_meta(option, data)
            else:
                self._send_option_error(option, P.REP_ERR_UNSUP, f"option {option} unsupported")

    def _option_info(self, option: int, data: bytes) -> _Export | None:
        """NBD_OPT_INFO / NBD_OPT_GO; returns the export when the reply was a success."""
        if len(data) < 6:
            self._send_option_error(option, P.REP_ERR_INVALID, "option too short")
            return None
        (name_len,) = P.U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            self._send_option_error(option, P.REP_ERR_INVALID, "bad name length")
            return None
        name_raw = data[4 : 4 + name_len]
        (count,) = P.U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            self._send_option_error(option, P.REP_ERR_INVALID, "bad information request list")
            return None
        requests = {P.U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(count)}
        try:
            name = name_raw.decode()
        except UnicodeDecodeError:
            self._send_option_error(option, P.REP_ERR_INVALID, "export name is not UTF-8")
            return None
        export = self.server.lookup(name)
        if export is None:
            self._send_option_error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        info = P.REP_INFO
        self._send_option_reply(
            option,
            info,
            P.INFO_EXPORT_PAYLOAD.pack(
                P.INFO_EXPORT, export.size, export.transmission_flags(self.structured)
            ),
        )
        if P.INFO_NAME in requests:
            self._send_option_reply(option, info, P.U16.pack(P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests:
            text = (
                f"shmdisk {export.name}: {export.size // export.sector_size} sectors of "
                f"{export.sector_size} bytes"
            )
            self._send_option_reply(option, info, P.U16.pack(P.INFO_DESCRIPTION) + text.encode())
        # Always sent: it tells every client the natural granularity. Only a client that asked
        # for it in NBD_OPT_GO is held to it; others may send unaligned requests, which
        # read_at/write_at serve exactly.
        minimum, preferred, maximum = export.block_sizes()
        self._send_option_reply(
            option,
            info,
            P.INFO_BLOCK_SIZE_PAYLOAD.pack(P.INFO_BLOCK_SIZE, minimum, preferred, maximum),
        )
        self._send_option_reply(option, P.REP_ACK)
        if option == P.OPT_GO:
            self.strict_blocks = P.INFO_BLOCK_SIZE in requests
            if self.meta_export != export.name:
                self.meta_export = None
        return export

    def _option_meta(self, option: int, data: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.meta_export = None  # a SET replaces the selection, even when it fails
        if not self.structured:
            self._send_option_error(option, P.REP_ERR_INVALID, "structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._send_option_error(option, P.REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        export = self.server.lookup(name)
        if export is None:
            self._send_option_error(option, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        match = False
        for query in queries:
            if setting:
                match = match or query == P.META_BASE_ALLOCATION
            else:
                match = match or query in ("base:", P.META_BASE_ALLOCATION)
        if not setting and not queries:
            match = True  # an empty query list lists everything we have
        if match:
            context_id = P.META_BASE_ALLOCATION_ID if setting else 0
            self._send_option_reply(
                option, P.REP_META_CONTEXT, P.U32.pack(context_id) + P.META_BASE_ALLOCATION.encode()
            )
            if setting:
                self.meta_export = export.name
        self._send_option_reply(option, P.REP_ACK)

    # --- transmission ----------------------------------------------------------------------
    def _transmission(self, export: _Export) -> None:
        """Serve requests until the client leaves.

        Requests arrive through a small staging buffer: one ``recv`` takes whatever is queued,
        often several small requests at once, and big payloads go straight to their own
        buffer. Small replies collect in ``self._out`` and leave together, at the latest just
        before the loop would wait for the client, so a burst of small requests costs a few
        syscalls, not several per request.
        """
        sock = self.sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        disk = export.disk
        size = export.size
        structured = self.structured
        meta = self.meta_export == export.name
        align = export.sector_size if self.strict_blocks else 1
        ss = export.sector_size
        read_only = export.read_only
        buf = self._buffer()
        stage = bytearray(_STAGE)
        sv = memoryview(stage)
        pos = have = 0  # unread request bytes are stage[pos:have]
        out = self._out
        unpack_from = P.REQUEST.unpack_from
        header_size = P.REQUEST.size
        recv_into = self._recv_into
        sock_recv_into = sock.recv_into
        sendall = sock.sendall
        simple_pack = P.SIMPLE_REPLY.pack
        data_pack_into = P.STRUCTURED_DATA.pack_into
        simple_pack_into = P.SIMPLE_REPLY.pack_into
        read_at = disk.read_at
        write_at = disk.write_at
        max_request = P.MAX_REQUEST
        data_start = _DATA_AT
        small_reply = _SMALL_REPLY
        out_limit = _OUT_LIMIT
        request_magic = P.REQUEST_MAGIC
        simple_magic = P.SIMPLE_REPLY_MAGIC
        cmd_read = P.CMD_READ
        cmd_write = P.CMD_WRITE
        allowed = _ALLOWED_FLAGS
        done = P.REPLY_FLAG_DONE
        dontwait = socket.MSG_DONTWAIT
        ack_batch = _ACK_BATCH

        while True:
            if have - pos < header_size:
                if pos:
                    stage[: have - pos] = stage[pos:have]
                    have -= pos
                    pos = 0
                while have < header_size:
                    if out and len(out) < ack_batch:
                        # Replies are pending: take more requests if they are already here,
                        # but never wait for the client while it may be waiting for us.
                        try:
                            n = sock_recv_into(sv[have:], _STAGE - have, dontwait)
                        except BlockingIOError:
                            sendall(out)
                            out.clear()
                            continue
                    else:
                        if out:
                            sendall(out)
                            out.clear()
                        n = sock_recv_into(sv[have:], _STAGE - have)
                    if n == 0:
                        if out:  # a client that half-closed still gets what it asked for
                            with contextlib.suppress(OSError):
                                sendall(out)
                            out.clear()
                        if self.server.stopping:
                            raise _Closed("server stopping")
                        raise _Closed(
                            "client hung up" if have == 0 else "client hung up mid-request"
                        )
                    have += n
            magic, flags, cmd, handle, offset, length = unpack_from(stage, pos)
            pos += header_size
            if magic != request_magic:
                raise _Closed(f"bad request magic {magic:#x}")
            self.requests += 1
            end = offset + length

            # The two hot commands come first, with their checks inline.
            if cmd == cmd_read:
                if (
                    length <= max_request
                    and not flags & ~allowed[cmd]
                    and end <= size
                    and not (offset | length) % align
                    and (structured or not flags & P.CMD_FLAG_DF)
                ):
                    if length == 0:
                        self._reply_ok(handle, structured)
                        continue
                    # No hole detection here: it would cost more per read than it saves, and
                    # sparse-aware clients ask BLOCK_STATUS first and never read the holes.
                    data = buf[data_start : data_start + length]
                    try:
                        read_at(offset, data)
                    except Exception as exc:
                        self._reply_error(handle, _error_code(exc, writing=False), str(exc), cmd)
                        continue
                    finally:
                        data.release()
                    self.bytes_read += length
                    if structured:
                        start = data_start - P.STRUCTURED_DATA.size
                        data_pack_into(
                            buf,
                            start,
                            P.STRUCTURED_REPLY_MAGIC,
                            done,
                            P.REPLY_TYPE_OFFSET_DATA,
                            handle,
                            length + 8,
                            offset,
                        )
                    else:
                        start = data_start - P.SIMPLE_REPLY.size
                        simple_pack_into(buf, start, simple_magic, 0, handle)
                    reply = buf[start : data_start + length]
                    try:
                        if length <= small_reply:
                            out += reply
                            if len(out) >= out_limit:
                                sendall(out)
                                out.clear()
                        else:
                            if out:
                                sendall(out)
                                out.clear()
                            sendall(reply)
                    finally:
                        reply.release()
                    continue
                try:
                    self._check(export, cmd, flags, offset, length, align)
                except _RequestError as exc:
                    self._reply_error(handle, exc.code, exc.message, cmd)
                continue

            if cmd == cmd_write:
                if length > max_request:
                    # The payload that follows is too big to take in; the spec allows hanging
                    # up rather than reading (and discarding) it.
                    raise _Closed(f"WRITE of {length} bytes exceeds the {max_request} maximum")
                data = buf[data_start : data_start + length]
                try:
                    staged = min(have - pos, length)
                    if staged:
                        data[:staged] = sv[pos : pos + staged]
                        pos += staged
                    if staged < length:
                        # No need to send pending replies first: the client is in the middle
                        # of sending this request and does not wait for them to finish it.
                        recv_into(data[staged:])
                    if (
                        not read_only
                        and not flags & ~allowed[cmd]
                        and end <= size
                        and not (offset | length) % align
                    ):
                        try:
                            write_at(offset, data)
                        except Exception as exc:
                            self._reply_error(handle, _error_code(exc, writing=True), str(exc), cmd)
                            continue
                        self.bytes_written += length
                        out += simple_pack(simple_magic, 0, handle)
                        continue
                finally:
                    data.release()
                try:
                    self._check(export, cmd, flags, offset, length, align)
                except _RequestError as exc:
                    self._reply_error(handle, exc.code, exc.message, cmd)
                continue

            if cmd == P.CMD_DISC:
                # Everything asked before the disconnect gets its reply first.
                if out:
                    sendall(out)
                    out.clear()
                raise _Closed("client disconnected")

            try:
                self._check(export, cmd, flags, offset, length, align)
                if cmd == P.CMD_FLUSH:
                    disk.flush()
                elif cmd == P.CMD_TRIM:
                    self._trim(disk, offset, length, ss)
                elif cmd == P.CMD_WRITE_ZEROES:
                    self._write_zeroes(disk, offset, length, ss, flags)
                elif cmd == P.CMD_CACHE:
                    pass  # the data already lives in memory; nothing to warm up
                elif cmd == P.CMD_BLOCK_STATUS:
                    if not meta:
                        raise _RequestError(P.EINVAL, "no metadata context was selected")
                    self._block_status(disk, handle, offset, length, ss, flags)
                    continue
            except _RequestError as exc:
                self._reply_error(handle, exc.code, exc.message, cmd)
                continue
            except Exception as exc:
                code = _error_code(exc, writing=cmd in _WRITING)
                self._reply_error(handle, code, str(exc), cmd)
                continue
            self._reply_ok(handle, False)

    def _check(
        self, export: _Export, cmd: int, flags: int, offset: int, length: int, align: int
    ) -> None:
        """Raise the _RequestError a request deserves, if any (the spec's order of concerns)."""
        name = _COMMAND_NAMES.get(cmd)
        if name is None:
            raise _RequestError(P.EINVAL, f"unknown command {cmd}")
        if flags & ~_ALLOWED_FLAGS[cmd]:
            raise _RequestError(P.EINVAL, f"{name}: unsupported flags {flags:#x}")
        if flags & P.CMD_FLAG_DF and not self.structured:
            raise _RequestError(P.EINVAL, "READ: DF flag without structured replies")
        writing = cmd in _WRITING
        if writing and export.read_only:
            raise _RequestError(P.EPERM, f"{name}: export is read-only")
        if cmd == P.CMD_FLUSH:
            if offset or length:
                raise _RequestError(P.EINVAL, "FLUSH: offset and length must be zero")
            return
        if cmd in (P.CMD_READ, P.CMD_WRITE, P.CMD_CACHE) and length > P.MAX_REQUEST:
            raise _RequestError(P.EINVAL, f"{name}: {length} bytes exceeds the maximum request")
        if offset + length > export.size:
            code = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            raise _RequestError(code, f"{name}: range beyond the end of the export")
        if (offset | length) % align:
            raise _RequestError(P.EINVAL, f"{name}: not aligned to {align} bytes")
        if cmd == P.CMD_BLOCK_STATUS and length == 0:
            raise _RequestError(P.EINVAL, "BLOCK_STATUS: zero length")

    # --- replies ---------------------------------------------------------------------------
    # Replies below are queued in self._out; the transmission loop sends them.
    def _reply_ok(self, handle: int, structured_done: bool) -> None:
        if structured_done:
            # A READ of nothing still needs a structured reply: one empty final chunk.
            self._out += P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0
            )
        else:
            self._out += P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle)

    def _reply_error(self, handle: int, code: int, message: str, cmd: int) -> None:
        if code == P.EIO and not self._warned:
            # Not the client's fault (a destroyed disk, say): worth a line, once.
            self._warned = True
            log.warning("%s: %s failed: %s", self.peer, _COMMAND_NAMES.get(cmd, cmd), message)
        if self.structured:
            text = message.encode("utf-8", "replace")[:1024]
            payload = P.ERROR_PAYLOAD.pack(code, len(text)) + text
            self._out += P.STRUCTURED_REPLY.pack(
                P.STRUCTURED_REPLY_MAGIC,
                P.REPLY_FLAG_DONE,
                P.REPLY_TYPE_ERROR,
                handle,
                len(payload),
            )
            self._out += payload
        else:
            # A failed simple READ reply carries no payload, so the stream stays in step.
            self._out += P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, code, handle)

    # --- the less frequent commands --------------------------------------------------------
    @staticmethod
    def _trim(disk: Disk, offset: int, length: int, ss: int) -> None:
        # TRIM is a hint: only whole sectors inside the range are discarded (the spec lets the
        # server round the start up and the end down).
        first = -(-offset // ss)
        last = (offset + length) // ss
        if last > first:
            disk.discard(first, last - first)

    @staticmethod
    def _write_zeroes(disk: Disk, offset: int, length: int, ss: int, flags: int) -> None:
        # Zeroing memory is always faster than receiving the same zeros over the socket, so a
        # FAST_ZERO request is simply served.
        may_unmap = not flags & P.CMD_FLAG_NO_HOLE
        end = offset + length
        first = -(-offset // ss)
        last = end // ss
        if last <= first:
            if length:
                disk.write_at(offset, bytes(length))
            return
        if offset < first * ss:
            disk.write_at(offset, bytes(first * ss - offset))
        disk.write_zeroes(first, last - first, may_unmap=may_unmap)
        if end > last * ss:
            disk.write_at(last * ss, bytes(end - last * ss))

    def _block_status(
        self, disk: Disk, handle: int, offset: int, length: int, ss: int, flags: int
    ) -> None:
        end = offset + length
        last = -(-end // ss)
        limit = 1 if flags & P.CMD_FLAG_REQ_ONE else _MAX_EXTENTS
        descriptors: list[tuple[int, int]] = []
        # Walk the page map run by run and stop at the limit, rather than listing every extent
        # of a possibly huge, fragmented range first.
        s = offset // ss
        while s < last and len(descriptors) < limit:
            mapped_at = disk.seek_mapped(s)
            if mapped_at > s:
                nxt, status = min(mapped_at, last), P.STATE_HOLE | P.STATE_ZERO
            else:
                nxt, status = min(disk.seek_unmapped(s), last), 0
            if nxt <= s:
                break  # the disk shrank below the size the client was given
            descriptors.append((min(nxt * ss, end) - max(s * ss, offset), status))
            s = nxt
        if not descriptors:
            raise _RequestError(P.EINVAL, "BLOCK_STATUS: range beyond the end of the disk")
        payload = bytearray(P.U32.pack(P.META_BASE_ALLOCATION_ID))
        for n, status in descriptors:
            payload += P.EXTENT.pack(n, status)
        self._out += P.STRUCTURED_REPLY.pack(
            P.STRUCTURED_REPLY_MAGIC,
            P.REPLY_FLAG_DONE,
            P.REPLY_TYPE_BLOCK_STATUS,
            handle,
            len(payload),
        )
        self._out += payload


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Parse an NBD_OPT_{LIST,SET}_META_CONTEXT payload; None if it is malformed."""
    try:
        pos = 0
        (name_len,) = P.U32.unpack_from(data, pos)
        pos += 4
        if name_len > P.MAX_STRING or pos + name_len > len(data):
            return None
        name = data[pos : pos + name_len].decode()
        pos += name_len
        (count,) = P.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (query_len,) = P.U32.unpack_from(data, pos)
            pos += 4
            if query_len > P.MAX_STRING or pos + query_len > len(data):
                return None
            queries.append(data[pos : pos + query_len].decode())
            pos += query_len
        if pos != len(data):
            return None
    except (struct.error, UnicodeDecodeError):
        return None
    return name, queries


class NBDServer:
    """Serve disks to NBD clients on a Unix socket or a TCP address.

    ``exports`` are disk names (the server connects to them, and disconnects on :meth:`stop`)
    or connected :class:`~shmdisk.Disk` handles (left connected). The export name of a disk is
    its disk name; the first one is also the default export (the empty name)::

        with NBDServer(["vm0"], socket_path="/run/vm0.sock") as server:
            ...  # nbdinfo 'nbd+unix:///vm0?socket=/run/vm0.sock'
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
    ) -> None:
        if isinstance(exports, str):
            exports = [exports]
        if not exports:
            raise ValueError("at least one export is needed")
        self._specs = list(exports)
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.read_only = read_only
        self.create = create
        self.stopping = False
        self._exports: dict[str, _Export] = {}
        self._default: str = ""
        self._owned: list[Disk] = []
        self._listener: socket.socket | None = None
        self._socket_ino: tuple[int, int] | None = None
        self._wake_r = self._wake_w = -1
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._clients: dict[_Connection, socket.socket] = {}
        # Connection threads are reused: each thread that touches a disk gets its own lock
        # descriptor from the core, kept until the disk is disconnected, so a thread per
        # connection would pile up descriptors over a long-running server's life.
        self._queue: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._started = False
        self._count = 0

    # --- lifecycle -------------------------------------------------------------------------
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
            self._open_exports()
            self._listener = self._listen()
            self._wake_r, self._wake_w = os.pipe()
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name="shmdisk-nbd-accept", daemon=True
            )
            self._accept_thread.start()
        except BaseException:
            self.stop()
            raise
        log.info("serving %s on %s", ", ".join(self._exports), self.describe_address())
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every connection, release the socket and the disks.

        Idempotent and safe to call from several threads (a second Ctrl-C, say): later callers
        wait for the first to finish. A request being served still gets its reply; a client
        that does not read its replies is cut off after ``timeout`` seconds.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stop(timeout)
            self._stopped.set()

    def _stop(self, timeout: float) -> None:
        self.stopping = True
        deadline = time.monotonic() + timeout
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        accept_thread = self._accept_thread
        if accept_thread is not None and accept_thread is not threading.current_thread():
            accept_thread.join(timeout)
        # Shutting the read side wakes a blocked recv with end-of-file, and the thread closes
        # its connection once the request in hand has its reply.
        self._shutdown_clients(socket.SHUT_RD)
        if not self._wait_for_clients(deadline):
            # Whoever is left is stuck sending to a client that stopped reading: cut it off.
            self._shutdown_clients(socket.SHUT_RDWR)
            self._wait_for_clients(time.monotonic() + 1.0)
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        self._remove_socket_file()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        for disk in self._owned:
            with contextlib.suppress(Exception):
                disk.disconnect()
        self._owned.clear()

    def serve_forever(self) -> None:
        """Start if needed and block until :meth:`stop` is called (from another thread)."""
        if not self._started:
            self.start()
        while not self._stopped.wait(0.5):
            pass

    # --- information -----------------------------------------------------------------------
    @property
    def address(self) -> str | tuple[str, int]:
        """The Unix socket path, or the bound (host, port) (port 0 becomes the real port)."""
        if self.socket_path is not None:
            return self.socket_path
        if self._listener is not None:
            sockname = self._listener.getsockname()
            return str(sockname[0]), int(sockname[1])
        return self.host, self.port

    def describe_address(self) -> str:
        address = self.address
        if isinstance(address, str):
            return f"unix:{address}"
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def uri(self, export: str | None = None) -> str:
        """An NBD URI (as nbdinfo, nbdcopy and qemu take) for ``export`` (default: the first)."""
        name = self._default if export is None else export
        address = self.address
        if isinstance(address, str):
            return f"nbd+unix:///{name}?socket={address}"
        host, port = address
        host = f"[{host}]" if ":" in host else host
        return f"nbd://{host}:{port}/{name}"

    def export_names(self) -> list[str]:
        return list(self._exports)

    def lookup(self, name: str) -> _Export | None:
        """The export a client asked for ("" is the default export), with its current size.

        A disk the server connected by name and that was destroyed since is looked up again by
        name, so a disk re-created under the same name is served to new connections.
        """
        key = name or self._default
        export = self._exports.get(key)
        if export is None:
            return None
        try:
            info = export.disk.get_info()
        except errors.DisconnectedError as exc:
            fresh = self._reconnect(export)
            if fresh is None:
                log.warning("export %r is unavailable: %s", export.name, exc)
                return None
            export = fresh
            info = export.disk.get_info()
        except Exception as exc:
            log.warning("export %r is unavailable: %s", export.name, exc)
            return None
        size = info.size_sectors * info.sector_size
        read_only = export.read_only or not info.read_write
        if size != export.size or read_only != export.read_only:
            export = _Export(
                export.name, export.disk, read_only, size, info.sector_size, export.page_size
            )
        return export

    # --- internals -------------------------------------------------------------------------
    def _open_exports(self) -> None:
        for spec in self._specs:
            if isinstance(spec, str):
                disk = shmdisk.connect(spec, read_only=self.read_only, create=self.create)
                self._owned.append(disk)
            else:
                disk = spec
            if disk.name in self._exports:
                raise ValueError(f"disk {disk.name!r} is exported twice")
            self._exports[disk.name] = self._export_of(disk)
            if not self._default:
                self._default = disk.name

    def _export_of(self, disk: Disk) -> _Export:
        info = disk.get_info()
        return _Export(
            name=disk.name,
            disk=disk,
            read_only=self.read_only or disk.read_only or not info.read_write,
            size=info.size_sectors * info.sector_size,
            sector_size=info.sector_size,
            page_size=disk.page_size,
        )

    def _reconnect(self, old: _Export) -> _Export | None:
        """A new handle on a destroyed disk's name, if we own it and the name exists again."""
        with self._lock:
            current = self._exports[old.name]
            if current.disk is not old.disk:
                return current  # another connection got here first
            if not any(d is old.disk for d in self._owned) or self.stopping:
                return None  # the caller's handle: not ours to replace
            try:
                disk = shmdisk.connect(old.name, read_only=self.read_only, create=False)
            except Exception:
                return None
            self._owned.append(disk)
            export = self._export_of(disk)
            self._exports[old.name] = export
        log.info("export %r: the disk was re-created; new connections get the new one", old.name)
        return export

    def _listen(self) -> socket.socket:
        if self.socket_path is not None:
            path = self.socket_path
            self._clear_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                st = os.stat(path)
                self._socket_ino = (st.st_dev, st.st_ino)
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
            return sock
        infos = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _name, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        """Remove a socket file left by a dead server; refuse to touch anything else."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        finally:
            probe.close()
        raise FileExistsError(f"another server is listening on {path}")

    def _remove_socket_file(self) -> None:
        if self.socket_path is None or self._socket_ino is None:
            return
        # Only our own socket file: a later server may have replaced it meanwhile.
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_ino:
                os.unlink(self.socket_path)
        self._socket_ino = None

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        listener.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping:
                for key, _events in sel.select():
                    if key.fileobj is not listener:
                        return
                    try:
                        sock, addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.warning("accept failed: %s", exc)
                        continue
                    self._start_client(sock, addr)

    def _start_client(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # The spec asks both ends to disable Nagle: replies are small and latency-bound.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host = str(addr[0])
            peer = f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
        else:
            peer = _unix_peer(sock)
        self._count += 1
        peer = f"conn {self._count} ({peer})"
        conn = _Connection(self, sock, peer)
        with self._lock:
            if self.stopping:
                sock.close()
                return
            self._clients[conn] = sock
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that idle worker takes this connection from the queue
        log.info("%s: connected", peer)
        if spawn:
            worker = threading.Thread(
                target=self._worker, name=f"shmdisk-nbd-{len(self._workers)}", daemon=True
            )
            self._workers.append(worker)
            worker.start()
        self._queue.put(conn)

    def _worker(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            try:
                conn.run()
            except BaseException:  # run() handles its own errors; this is a last resort
                log.exception("%s: connection handler failed", conn.peer)
            finally:
                with self._lock:
                    self._clients.pop(conn, None)
                    self._idle += 1

    def _shutdown_clients(self, how: int) -> None:
        with self._lock:
            socks = list(self._clients.values())
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(how)

    def _wait_for_clients(self, deadline: float) -> bool:
        """Wait until every connection has closed; False if some remain at ``deadline``."""
        while True:
            with self._lock:
                if not self._clients:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _unix_peer(sock: socket.socket) -> str:
    """Name a Unix-socket client by its process, which is all a Unix peer has."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[0:4], sys.byteorder)
        return f"unix pid {pid}"
    except OSError:
        return "unix client"


def serve(
    exports: Sequence[str | Disk],
    *,
    socket_path: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    read_only: bool = False,
    create: bool = False,
) -> None:
    """Serve ``exports`` until SIGINT or SIGTERM (call from the main thread)."""
    server = NBDServer(
        exports,
        socket_path=socket_path,
        host=host,
        port=port,
        read_only=read_only,
        create=create,
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
) -> int:
    """The body of ``shmdisk serve``: log to stderr, serve until a signal, exit 0."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("shmdisk serve: %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
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
        )
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])  # setLevel, not assignment: it clears the loggers' level cache
        log.propagate = saved[1]
    return 0
