"""One handler per command that touches the disk.

Each handler serves a request that :class:`~shmdisk.nbd._requests.Checker` has already let
through, and returns its reply; a failure is raised (the transmission turns it into an error
reply). ``wait=False`` asks the disk not to wait for pages another process has locked: the
receiving thread tries that first, and hands the request to a worker when the disk says it
would block (``WouldBlockError``). When a FLUSH may run (after the writes before it) and what
a DISC means are the transmission's business.
"""

from __future__ import annotations

from shmdisk import errors

from . import _proto as P
from ._buffers import Buffer
from ._exports import Export
from ._replies import Replies, Reply
from ._requests import Request

__all__ = ["HOLE_READ", "MAX_EXTENTS", "DiskCommands"]

# A BLOCK_STATUS reply lists at most this many extents (each costs a page-map seek); the spec
# lets the server stop early, and clients simply ask again from where the reply ended.
MAX_EXTENTS = 2048
# Structured reads this long first ask the page map whether the whole range is unwritten, and
# if so answer with one hole chunk instead of that many zeros (one seek against a copy and a
# send). Shorter reads are not worth the seek.
HOLE_READ = 64 * 1024


class DiskCommands:
    """The disk-side handlers of one connection's session."""

    def __init__(self, export: Export, replies: Replies) -> None:
        self.disk = export.disk
        self.size = export.size
        self.sector_size = export.sector_size
        self.page_size = export.page_size
        self.replies = replies
        self.structured = replies.structured

    def read(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        handle, offset, length = req.handle, req.offset, req.length
        if length == 0:
            return self.replies.empty_read(handle)
        if self.structured and length >= HOLE_READ:
            ss = self.sector_size
            if self.disk.seek_mapped(offset // ss) >= -(-(offset + length) // ss):
                return self.replies.hole(handle, offset, length)
        assert buf is not None
        self.disk.read_at(offset, buf.payload(length), wait=wait)
        return self.replies.data(buf, handle, offset, length)

    def write(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        # FUA needs nothing more: the data is in shared memory, where every reader sees it.
        assert buf is not None
        self.disk.write_at(req.offset, buf.payload(req.length), wait=wait)
        return self.replies.ok(req.handle)

    def trim(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        # TRIM is a hint: the whole pages inside the range are given back, and the partly
        # covered pages at its ends are left as they are (zeroing them would be a write the
        # client did not ask for). A range that reaches the end of the export covers its
        # last page even when the export ends mid-page.
        offset, end = req.offset, req.offset + req.length
        page, ss = self.page_size, self.sector_size
        lo = -(-offset // page) * page
        hi = end if end == self.size else end // page * page
        if hi > lo:
            self.disk.discard(lo // ss, (hi - lo) // ss)
        elif end > self.disk.get_info().size_sectors * ss:
            # Nothing to give back, but the range still has to exist (after a live shrink).
            raise errors.OutOfRangeError("TRIM: range beyond the end of the disk")
        return self.replies.ok(req.handle)

    def write_zeroes(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        # Zeroing memory is always faster than receiving the same zeros, so FAST_ZERO requests
        # are simply served. Whole sectors go to write_zeroes (which unmaps whole pages unless
        # NO_HOLE asks to keep them); the ragged ends of an unaligned range are written.
        disk, ss = self.disk, self.sector_size
        offset, length = req.offset, req.length
        end = offset + length
        first, last = -(-offset // ss), end // ss
        if last <= first:
            if length:
                disk.write_at(offset, bytes(length))
            return self.replies.ok(req.handle)
        if offset < first * ss:
            disk.write_at(offset, bytes(first * ss - offset))
        disk.write_zeroes(first, last - first, may_unmap=not req.flags & P.CMD_FLAG_NO_HOLE)
        if end > last * ss:
            disk.write_at(last * ss, bytes(end - last * ss))
        return self.replies.ok(req.handle)

    def flush(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        # Shared memory has nothing to flush; the call checks that the disk is still there.
        # (The writes a FLUSH must see done are the transmission's concern.)
        self.disk.flush()
        return self.replies.ok(req.handle)

    def cache(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        # The data already lives in memory: there is nothing to warm up, whatever the length.
        return self.replies.ok(req.handle)

    def block_status(self, req: Request, buf: Buffer | None, wait: bool) -> Reply:
        disk, ss = self.disk, self.sector_size
        offset, end = req.offset, req.offset + req.length
        last = -(-end // ss)
        limit = 1 if req.flags & P.CMD_FLAG_REQ_ONE else MAX_EXTENTS
        extents: list[tuple[int, int]] = []
        # Walk the page map run by run and stop at the limit, rather than listing every extent
        # of a possibly huge, fragmented range first.
        s = offset // ss
        while s < last and len(extents) < limit:
            mapped_at = disk.seek_mapped(s)
            if mapped_at > s:
                nxt, status = min(mapped_at, last), P.STATE_HOLE | P.STATE_ZERO
            else:
                nxt, status = min(disk.seek_unmapped(s), last), 0
            if nxt <= s:
                break  # the disk shrank below the size the client was given
            extents.append((min(nxt * ss, end) - max(s * ss, offset), status))
            s = nxt
        if not extents:
            raise errors.OutOfRangeError("BLOCK_STATUS: range beyond the end of the disk")
        return self.replies.block_status(req.handle, extents)
