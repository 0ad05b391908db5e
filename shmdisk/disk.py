"""The public API: create, connect and destroy named disks, and the ``Disk`` handle.

A ``Disk`` maps its segment (layout: ``_layout.py``) and follows the locking protocol of
``_locks.py``. Every check of a call runs before any byte is touched, so a failing call changes
nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import operator
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import numpy as np

from . import _layout as L
from . import _locks, _pagemap, _segment
from .errors import (
    BadBufferError,
    CorruptSegmentError,
    DisconnectedError,
    DiskFullError,
    InvalidArgumentError,
    InvalidGeometryError,
    IsReadOnlyError,
    OutOfRangeError,
    UnknownError,
    WouldBlockError,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    from typing_extensions import Buffer as BufferLike

    # One buffer-protocol object, or a list/tuple of them (consecutive sectors).
    Buffers: TypeAlias = BufferLike | Iterable[BufferLike]

_ZEROS = memoryview(bytes(1 << 20))  # source for zero-filling holes without allocating
_F_SIZE = L.F_SIZE_SECTORS
_F_CAP = L.F_CAPACITY
_F_GONE = L.F_DESTROYED
_MAPPED = L.MAPPED
_LOCK_FREE = _locks.LOCK_FREE_READS
_TRIES = _locks.OPTIMISTIC_TRIES
_lock = _locks.lock
_unlock = _locks.unlock
_fcntl = fcntl.fcntl
_pack = _locks.FLOCK.pack
_SETLKW = _locks.SETLKW
_RD = _locks.RDLCK
_WR = _locks.WRLCK
_UN = _locks.UNLCK
_SEQ = L.SEQ_MASK
_MAPPED_ODD = L.MAPPED | 1
_NO_WRAP = 0xFFFFFFFE  # a mapped word below this survives "| 1, + 1" without wrapping
_STRUCT_CACHE = 1 << 16
_word_written = _pagemap.word_written
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
# Page-map words per OS page of the map: 4096 / 4 = 2**10.
_GROUP_BYTES_SHIFT = 12
_GROUP_SHIFT = _GROUP_BYTES_SHIFT - 2


class _ThreadLock:
    """One thread's lock descriptor on a disk, and whether that thread is inside a call.

    OFD locks exclude per open file description, so every thread gets its own descriptor.
    ``busy`` lets ``disconnect`` (from any thread) leave alone a descriptor whose thread may
    hold a lock right now: closing it would drop that lock mid-copy, and the thread's unlock
    would then hit a closed or reused descriptor number. The thread closes it itself when it
    leaves its call. Dropped with the thread's local storage when the thread ends, which
    closes the descriptor, so short-lived threads do not pile descriptors up.
    """

    __slots__ = ("__weakref__", "busy", "fd", "fds", "guard")

    def __init__(self, fd: int, fds: set[int] | None, guard: threading.RLock) -> None:
        self.fd, self.fds, self.guard, self.busy = fd, fds, guard, False

    def close(self) -> None:
        """Close the descriptor once (caller holds ``guard``): only while it is registered."""
        if self.fds is not None and self.fd in self.fds:
            self.fds.discard(self.fd)
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __del__(self) -> None:
        if self.fds is not None:  # None: orphaned by a fork, the child closed it already
            with self.guard:
                self.close()


@dataclass(frozen=True)
class DiskInfo:
    """What ``Disk.get_info`` reports (mirage's ``Mirage_block.info``)."""

    read_write: bool
    sector_size: int
    size_sectors: int


class Extent(NamedTuple):
    """A run of sectors that all hold data (``mapped``) or are all known to be zero."""

    sector: int
    n_sectors: int
    mapped: bool


def _index(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"{what} must be an integer, not {type(value).__name__}"
        ) from None


def _zero(view: memoryview) -> None:
    n = len(view)
    if n <= len(_ZEROS):
        view[:] = _ZEROS[:n]
    else:
        np.frombuffer(view, dtype=np.uint8)[:] = 0


def _copy_in(dv: memoryview, off: int, views: Sequence[memoryview]) -> None:
    """Copy consecutive buffers into the mapping from byte ``off`` on."""
    for v in views:
        k = len(v)
        dv[off : off + k] = v
        off += k


def _copy_from(dv: memoryview, off: int, views: Sequence[memoryview]) -> None:
    """Fill consecutive buffers from the mapping, from byte ``off`` on."""
    for v in views:
        k = len(v)
        v[:] = dv[off : off + k]
        off += k


# Every live handle, so a forked child can drop the lock descriptors it inherited.
_live: weakref.WeakSet[Disk] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for disk in list(_live):
        disk._forget_inherited_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Disk:
    """A connected handle on a named disk; get one from :func:`create` or :func:`connect`.

    Use it as a context manager (leaving disconnects, never destroys). Pickling a ``Disk``
    reconnects by name in the receiving process.
    """

    # Class-level defaults: disconnect() and __repr__ work even if __init__ failed midway.
    _fd = -1
    _meta: mmap.mmap | None = None
    _data: mmap.mmap | None = None
    _hq: memoryview | None = None
    _cap = 0

    def __init__(self, name: str, opened: _segment.Opened, read_only: bool) -> None:
        h = opened.header
        self.name = name
        self.read_only = read_only
        self.sector_size = h.sector_size
        self.page_size = h.page_size
        self._shift = h.page_size.bit_length() - 1
        self._max_pages = h.max_pages
        self._data_offset = h.data_offset
        self._fds_lock = threading.RLock()  # RLock: a _ThreadLock may be collected under it
        self._lock_fds: set[int] = set()
        self._thread_locks: weakref.WeakSet[_ThreadLock] = weakref.WeakSet()
        self._tls = threading.local()
        self._page_structs: dict[int, tuple[bytes, bytes]] = {}
        self._fd = opened.fd
        prot = mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE
        self._prot = prot
        try:
            self._meta = mmap.mmap(opened.fd, h.data_offset, mmap.MAP_SHARED, prot)
            self._hq = memoryview(self._meta)[: L.HEADER_SIZE].cast("Q")
            map_end = L.MAP_OFFSET + h.max_pages * L.MAP_WORD_SIZE
            self._wv = memoryview(self._meta)[L.MAP_OFFSET : map_end].cast("I")
            self._words = np.frombuffer(
                self._meta, dtype=np.uint32, count=h.max_pages, offset=L.MAP_OFFSET
            )
            # One flag per page of the page map: known to be allocated (see _snapshot).
            self._known = bytearray((h.max_pages >> _GROUP_SHIFT) + 1)
            self._map_data()
        except BaseException:
            self.disconnect()
            raise
        _live.add(self)

    # ----------------------------------------------------------------- mapping

    def _map_data(self) -> None:
        """(Re)map the data area at the capacity the header states, after checking the file."""
        hq = self._hq
        assert hq is not None
        # Size before capacity: resize stores the capacity first and the size second, so a
        # size read first never belongs to a newer resize than the capacity read after it.
        size_bytes = hq[_F_SIZE] * self.sector_size
        cap = hq[_F_CAP]
        file_size = os.fstat(self._fd).st_size
        if (
            cap % self.page_size
            or cap > self._max_pages * self.page_size
            or file_size < self._data_offset + cap
            or size_bytes > cap
        ):
            # Never map past the end of the file: touching that would be SIGBUS.
            raise CorruptSegmentError(f"disk {self.name!r}: header capacity {cap} is inconsistent")
        if cap == self._cap and self._data is not None:
            return
        if cap == 0:
            data = None
            self._dv = memoryview(b"")
            self._dn = np.zeros(0, dtype=np.uint8)
        else:
            data = mmap.mmap(self._fd, cap, mmap.MAP_SHARED, self._prot, offset=self._data_offset)
            self._dv = memoryview(data)
            self._dn = np.frombuffer(data, dtype=np.uint8)
        self._data = data
        self._cap = cap

    def _forget_inherited_locks(self) -> None:
        # The child shares the parent's open file descriptions, hence its locks: closing our
        # copies releases nothing of the parent's, and new ones give the child its own locks.
        for lk in list(self._thread_locks):
            lk.fds = None  # its guard may be held by a parent thread that does not exist here
        for fd in self._lock_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._lock_fds = set()
        self._thread_locks = weakref.WeakSet()
        self._tls = threading.local()
        self._fds_lock = threading.RLock()

    def _thread_lock(self) -> _ThreadLock:
        """This thread's lock descriptor, opened on its first call."""
        try:
            return self._tls.lk  # type: ignore[no-any-return]
        except AttributeError:
            pass
        with self._fds_lock:
            if self._hq is None:
                raise DisconnectedError(f"disk {self.name!r} is disconnected")
            fd = _locks.reopen(self._fd, not self.read_only)
            self._lock_fds.add(fd)
            lk = _ThreadLock(fd, self._lock_fds, self._fds_lock)
            self._thread_locks.add(lk)
        self._tls.lk = lk
        return lk

    def _lock_fd(self) -> int:
        return self._thread_lock().fd

    def _enter(self) -> _ThreadLock:
        """Mark this thread inside a call that uses descriptors (see ``_ThreadLock``)."""
        try:
            lk = self._tls.lk
        except AttributeError:
            lk = self._thread_lock()
        lk.busy = True
        if self._hq is None:  # checked after marking: disconnect marks, then looks
            self._leave(lk)
            raise DisconnectedError(f"disk {self.name!r} is disconnected")
        return lk  # type: ignore[no-any-return]

    def _leave(self, lk: _ThreadLock) -> None:
        lk.busy = False
        if self._hq is None:
            # Disconnected meanwhile: close our descriptor, and if no other thread is inside
            # a call any more, release everything else too.
            with self._fds_lock:
                lk.close()
                self._release_if_idle()

    @contextlib.contextmanager
    def _call(self) -> Iterator[_ThreadLock]:
        lk = self._enter()
        try:
            yield lk
        finally:
            self._leave(lk)

    # ----------------------------------------------------------------- checks

    def _header(self) -> memoryview:
        """The live header, after checking that the handle and the disk still exist."""
        hq = self._hq
        if hq is None:
            raise DisconnectedError(f"disk {self.name!r} is disconnected")
        if hq[_F_GONE]:
            self._gone()
        return hq

    def _gone(self) -> None:
        self.disconnect()
        raise DisconnectedError(f"disk {self.name!r} was destroyed")

    def _views(self, buffers: Buffers, writable: bool) -> tuple[list[memoryview], int]:
        """Byte views of the caller's buffers and their total length, all checked."""
        t = type(buffers)
        if t is bytearray or t is bytes or t is memoryview:
            # The common case, decided without the general loop below.
            v = memoryview(buffers)  # type: ignore[arg-type]
            n = v.nbytes
            if (
                v.format == "B"
                and v.ndim == 1
                and v.c_contiguous
                and not (writable and v.readonly)
                and n % self.sector_size == 0
            ):
                return [v], n
        if t is list or t is tuple:
            items: Iterable[Any] = buffers  # type: ignore[assignment]
        else:
            items = (buffers,)
        views = []
        total = 0
        ss = self.sector_size
        for b in items:
            try:
                v = memoryview(b)
            except TypeError:
                raise BadBufferError(
                    f"expected a buffer (bytearray, memoryview, numpy array, mmap), "
                    f"not {type(b).__name__}"
                ) from None
            if writable and v.readonly:
                raise BadBufferError("read needs writable buffers; this one is read-only")
            if not v.c_contiguous:
                raise BadBufferError("buffers must be C-contiguous")
            if v.ndim != 1 or v.format != "B":
                v = v.cast("B")
            n = len(v)
            if n % ss:
                raise BadBufferError(
                    f"buffer of {n} bytes is not a whole number of {ss}-byte sectors"
                )
            views.append(v)
            total += n
        return views, total

    def _check_range(self, hq: memoryview, off: int, total: int) -> None:
        end = hq[_F_SIZE] * self.sector_size
        if off < 0 or off + total > end:
            ss = self.sector_size
            raise OutOfRangeError(
                f"bytes [{off}, {off + total}) (sectors {off / ss:g}+{total / ss:g}) lie outside "
                f"disk {self.name!r} of {end // ss} sectors"
            )
        if off + total > self._cap:
            self._map_data()  # another process grew the disk

    # ----------------------------------------------------------------- the API

    def get_info(self) -> DiskInfo:
        """Sector size, size (current after any resize by any process) and writability."""
        hq = self._header()
        return DiskInfo(not self.read_only, self.sector_size, hq[_F_SIZE])

    @property
    def size_sectors(self) -> int:
        return self.get_info().size_sectors

    @property
    def closed(self) -> bool:
        return self._hq is None

    def read(self, sector: int, buffers: Buffers, *, wait: bool = True) -> None:
        """Fill ``buffers`` (one or a list, each whole sectors) from ``sector`` onwards.

        With ``wait=False`` a read that would have to wait for a writer in another thread or
        process raises ``WouldBlockError`` instead, having changed nothing.
        """
        t = type(buffers)
        if t is bytearray and type(sector) is int:
            # The common case, checked without building views; _read checks the range.
            n = len(buffers)  # type: ignore[arg-type]
            if not n % self.sector_size:
                return self._read(sector * self.sector_size, (buffers,), n, wait)  # type: ignore[arg-type]
        views, total = self._views(buffers, True)
        if type(sector) is not int:
            sector = _index(sector, "sector")
        self._read(sector * self.sector_size, views, total, wait)

    def write(self, sector: int, buffers: Buffers, *, wait: bool = True) -> None:
        """Copy ``buffers`` (one or a list, each whole sectors) to the disk at ``sector``.

        With ``wait=False`` a write whose pages are locked by another thread or process
        raises ``WouldBlockError`` instead, having written nothing.
        """
        t = type(buffers)
        if (
            (
                t is bytes
                or t is bytearray
                or (t is memoryview and buffers.format == "B" and buffers.c_contiguous)  # type: ignore[union-attr]
            )
            and type(sector) is int
            and not self.read_only
        ):
            # The common case: a plain byte buffer can be copied from as it is (a contiguous
            # 1-D byte memoryview too); _write checks the range.
            n = len(buffers)  # type: ignore[arg-type]
            if not n % self.sector_size and (t is not memoryview or buffers.ndim == 1):  # type: ignore[union-attr]
                off = sector * self.sector_size
                p0 = off >> self._shift
                if n and off >= 0 and (off + n - 1) >> self._shift == p0:
                    return self._write_page(off, off + n, p0, (buffers,), wait)  # type: ignore[arg-type]
                return self._write(off, (buffers,), n, wait)  # type: ignore[arg-type]
        if self.read_only:
            self._header()
            raise IsReadOnlyError(f"disk {self.name!r} is connected read-only")
        views, total = self._views(buffers, False)
        if type(sector) is not int:
            sector = _index(sector, "sector")
        self._write(sector * self.sector_size, views, total, wait)

    def read_at(self, offset: int, buffer: BufferLike, *, wait: bool = True) -> None:
        """Fill ``buffer`` from byte ``offset``; any alignment, atomic like ``read``."""
        v = self._byte_view(buffer, True)
        self._read(_index(offset, "offset"), [v], len(v), wait)

    def write_at(self, offset: int, data: BufferLike, *, wait: bool = True) -> None:
        """Write ``data`` at byte ``offset``; any alignment, atomic like ``write``."""
        if self.read_only:
            self._header()
            raise IsReadOnlyError(f"disk {self.name!r} is connected read-only")
        v = self._byte_view(data, False)
        self._write(_index(offset, "offset"), [v], len(v), wait)

    def _byte_view(self, buffer: BufferLike, writable: bool) -> memoryview:
        try:
            v = memoryview(buffer)
        except TypeError:
            raise BadBufferError(f"expected a buffer, not {type(buffer).__name__}") from None
        if writable and v.readonly:
            raise BadBufferError("read needs a writable buffer; this one is read-only")
        if not v.c_contiguous:
            raise BadBufferError("buffers must be C-contiguous")
        return v if v.ndim == 1 and v.format == "B" else v.cast("B")

    # The two hot paths below are written out flat on purpose: at 4 KiB a request costs a few
    # microseconds, and every extra Python call in them costs about 0.1 us of that.

    def _read(self, off: int, views: Sequence[memoryview], total: int, wait: bool = True) -> None:
        hq = self._hq
        if hq is None:
            raise DisconnectedError(f"disk {self.name!r} is disconnected")
        end = off + total
        if hq[_F_GONE]:
            self._gone()
        if off < 0 or end > hq[_F_SIZE] * self.sector_size or end > self._cap:
            self._check_range(hq, off, total)  # raises, or remaps after another's resize
        if total == 0:
            return
        shift = self._shift
        p0 = off >> shift
        p1 = ((end - 1) >> shift) + 1
        if _LOCK_FREE:
            try:
                if p1 - p0 == 1 and len(views) == 1 and self._known[p0 >> _GROUP_SHIFT]:
                    # One page, one buffer: the commonest read, written out here.
                    wv = self._wv
                    w = wv[p0]
                    if not w & 1:
                        if w >= _MAPPED:
                            views[0][:] = self._dv[off:end]
                        else:
                            _zero(views[0])
                        if wv[p0] == w:
                            return
                if self._read_lock_free(off, views, total, p0, p1):
                    return
            except (AssertionError, AttributeError, IndexError, TypeError, ValueError, OSError):
                # A disconnect from another thread took the mapping away mid-call.
                if self._hq is None:
                    raise DisconnectedError(f"disk {self.name!r} is disconnected") from None
                raise
        lk = self._enter()
        try:
            fd = lk.fd
            if wait:
                _fcntl(fd, _SETLKW, _pack(_RD, 0, p0, p1 - p0, 0))
            else:
                self._lock_now(fd, _RD, p0, p1 - p0)
            try:
                hq = self._header()
                self._check_range(hq, off, total)
                self._copy_out(off, views, self._snapshot(p0, p1))
            finally:
                _fcntl(fd, _SETLKW, _pack(_UN, 0, p0, p1 - p0, 0))
        finally:
            self._leave(lk)

    def _read_lock_free(
        self, off: int, views: Sequence[memoryview], total: int, p0: int, p1: int
    ) -> bool:
        """Seqlock read (see _locks.py): copy, then check that no writer touched the pages.

        True when done; False when a writer was seen twice or is still at work, so the
        caller waits for it on the shared lock.
        """
        end = off + total
        for _ in range(_TRIES):
            if p1 - p0 == 1 and len(views) == 1 and self._known[p0 >> _GROUP_SHIFT]:
                wv = self._wv
                w = wv[p0]
                if w & 1:
                    return False
                if w >= _MAPPED:
                    views[0][:] = self._dv[off:end]
                else:
                    _zero(views[0])
                if wv[p0] == w:
                    return True
            elif 0 not in self._known[p0 >> _GROUP_SHIFT : ((p1 - 1) >> _GROUP_SHIFT) + 1]:
                # The words as bytes: one memcpy to take, one memcmp to check again.
                meta = self._meta
                assert meta is not None
                a, b = L.MAP_OFFSET + 4 * p0, L.MAP_OFFSET + 4 * p1
                before = meta[a:b]
                ws = np.frombuffer(before, dtype=np.uint32)
                # All mapped and all even, in one reduction: bit 31 set and (after ^1)
                # bit 0 set in every word.
                if int(np.bitwise_and.reduce(ws ^ np.uint32(1))) & _MAPPED_ODD == _MAPPED_ODD:
                    _copy_from(self._dv, off, views)
                elif int(np.bitwise_or.reduce(ws)) & 1:
                    return False  # a writer is in there: wait for it on the lock
                else:
                    self._copy_out(off, views, ws)
                if meta[a:b] == before:
                    return True
            else:
                ws = self._snapshot(p0, p1)
                if (ws & 1).any():
                    return False
                self._copy_out(off, views, ws)
                if np.array_equal(ws, self._snapshot(p0, p1)):
                    if self._hq is None:  # its descriptor may have gone mid-snapshot
                        raise DisconnectedError(f"disk {self.name!r} is disconnected")
                    return True
            hq = self._header()
            self._check_range(hq, off, total)
        return False

    def _snapshot(self, p0: int, p1: int) -> _pagemap.Words:
        """A copy of the page-map words of pages ``[p0, p1)``, read without allocating.

        Reading a hole of the page map through the mapping would make tmpfs allocate it, so
        reading a never-written region would cost memory. A hole means "never written", so its
        words are zero; whether a map page is a hole is asked of the file (SEEK_DATA) until it
        is known to be allocated, which, since the map is never punched, stays true.
        """
        g0, g1 = p0 >> _GROUP_SHIFT, (p1 - 1) >> _GROUP_SHIFT
        known = self._known
        if (g0 == g1 and known[g0]) or 0 not in known[g0 : g1 + 1]:
            return self._words[p0:p1].copy()
        out = np.zeros(p1 - p0, dtype=np.uint32)
        for g in range(g0, g1 + 1):
            if not known[g]:
                off = L.MAP_OFFSET + (g << _GROUP_BYTES_SHIFT)
                try:
                    if os.lseek(self._fd, off, os.SEEK_DATA) != off:
                        continue
                except OSError:
                    continue  # ENXIO: no data at or after off
                known[g] = 1
            lo, hi = max(p0, g << _GROUP_SHIFT), min(p1, (g + 1) << _GROUP_SHIFT)
            out[lo - p0 : hi - p0] = self._words[lo:hi]
        return out

    def _copy_out(self, off: int, views: Sequence[memoryview], ws: _pagemap.Words) -> None:
        """Copy bytes from ``off`` into ``views``; pages not mapped are zero-filled, not read."""
        dv = self._dv
        if int(ws.min()) >= _MAPPED:
            _copy_from(dv, off, views)
            return
        if int(ws.max()) < _MAPPED:
            for v in views:
                _zero(v)
            return
        # Mixed: walk the page runs and the buffers together.
        shift = self._shift
        base = (off >> shift) << shift
        page_runs = _pagemap.runs(ws)
        ri = 0
        for v in views:
            v = memoryview(v)  # slices of it must be views, not copies (bytearray)
            vstart, vend = off, off + len(v)
            while ri < len(page_runs):
                a, b, mapped = page_runs[ri]
                lo = max(vstart, base + (a << shift))
                hi = min(vend, base + (b << shift))
                if lo < hi:
                    part = v[lo - vstart : hi - vstart]
                    if mapped:
                        part[:] = dv[lo:hi]
                    else:
                        _zero(part)
                if base + (b << shift) > vend:
                    break  # this run goes on into the next buffer
                ri += 1
            off = vend

    def _write(self, off: int, views: Sequence[memoryview], total: int, wait: bool = True) -> None:
        hq = self._header()
        if off < 0 or off + total > hq[_F_SIZE] * self.sector_size:
            self._check_range(hq, off, total)  # raises
        if total == 0:
            return
        end = off + total
        shift = self._shift
        p0 = off >> shift
        n = ((end - 1) >> shift) + 1 - p0
        if n == 1:
            return self._write_page(off, end, p0, views, wait)
        lk = self._enter()
        try:
            ss = self.sector_size
            lock_s, unlock_s = _pack(_WR, 0, p0, n, 0), _pack(_UN, 0, p0, n, 0)
            fd = lk.fd
            if wait:
                _fcntl(fd, _SETLKW, lock_s)
            else:
                self._lock_now(fd, _WR, p0, n)
            try:
                # Again under the lock: a resize or destroy may have come in between.
                if hq[_F_GONE] or end > hq[_F_SIZE] * ss or end > self._cap:
                    self._check_range(self._header(), off, total)
                dv = self._dv
                seg = self._words[p0 : p0 + n]
                g0, g1 = p0 >> _GROUP_SHIFT, (p0 + n - 1) >> _GROUP_SHIFT
                if (
                    0 not in self._known[g0 : g1 + 1]  # reading seg faults no map hole
                    and int(seg.min()) >= _MAPPED
                    and int(seg.max()) < _NO_WRAP
                ):
                    # A rewrite of pages that all hold data (the common case): each word
                    # made odd, then one higher (even) in place, with no temporaries. No
                    # word is near its wrap, so the mapped bit is never touched. (We hold
                    # the pages exclusively: nobody else changes these words meanwhile.)
                    np.bitwise_or(seg, np.uint32(1), out=seg)
                    try:
                        _copy_in(dv, off, views)
                    finally:
                        np.add(seg, np.uint32(1), out=seg)
                else:
                    ws = self._snapshot(p0, p0 + n)
                    if int(ws.min()) < _MAPPED:
                        self._prepare(p0, ws)
                    seg[:] = _pagemap.writing(ws)
                    try:
                        _copy_in(dv, off, views)
                    finally:
                        seg[:] = _pagemap.written(ws)
            finally:
                _fcntl(fd, _SETLKW, unlock_s)
        finally:
            self._leave(lk)

    def _write_page(
        self, off: int, end: int, p0: int, views: Sequence[memoryview], wait: bool
    ) -> None:
        """A write within one page: the commonest request, written out flat (see _read)."""
        try:
            lk = self._tls.lk
        except AttributeError:
            lk = self._thread_lock()
        lk.busy = True  # before the check below: disconnect marks closed, then looks
        try:
            hq = self._hq
            if hq is None:
                raise DisconnectedError(f"disk {self.name!r} is disconnected")
            if hq[_F_GONE]:
                self._gone()
            ss = self.sector_size
            if end > hq[_F_SIZE] * ss:
                self._check_range(hq, off, end - off)  # raises
            # Packing two flock structs is about 0.25 us of a ~3.5 us 4 KiB write: keep the
            # ones of recently written pages (bounded; cleared when full).
            structs = self._page_structs.get(p0)
            if structs is None:
                if len(self._page_structs) >= _STRUCT_CACHE:
                    self._page_structs.clear()
                structs = self._page_structs[p0] = (
                    _pack(_WR, 0, p0, 1, 0),
                    _pack(_UN, 0, p0, 1, 0),
                )
            fd = lk.fd
            if wait:
                _fcntl(fd, _SETLKW, structs[0])
            else:
                self._lock_now(fd, _WR, p0, 1)
            try:
                # Again under the lock: a resize or destroy may have come in between.
                if hq[_F_GONE] or end > hq[_F_SIZE] * ss or end > self._cap:
                    self._check_range(self._header(), off, end - off)
                wv = self._wv
                w = wv[p0] if self._known[p0 >> _GROUP_SHIFT] else self._word(p0)
                if w < _MAPPED:
                    self._prepare(p0, np.array([w], dtype=np.uint32))
                wv[p0] = w | 1  # odd: lock-free readers of this page retry or wait
                try:
                    if len(views) == 1:
                        self._dv[off:end] = views[0]
                    else:
                        _copy_in(self._dv, off, views)
                finally:
                    wv[p0] = (((w & _SEQ) | 1) + 1) & _SEQ | _MAPPED  # even, mapped
            finally:
                _fcntl(fd, _SETLKW, structs[1])
        finally:
            lk.busy = False
            if self._hq is None:
                self._leave(lk)

    def _lock_now(self, fd: int, kind: int, start: int, length: int) -> None:
        if not _locks.try_lock(fd, kind, start, length):
            raise WouldBlockError(
                f"disk {self.name!r}: pages {start}-{start + length - 1} are locked elsewhere"
            )

    def _allocate(self, page: int, n: int) -> None:
        """Give pages real memory before their first write.

        A store into a tmpfs hole when /dev/shm is full kills the process with SIGBUS;
        fallocate turns that into ENOSPC, raised before anything is written.
        """
        shift = self._shift
        try:
            os.posix_fallocate(self._fd, self._data_offset + (page << shift), n << shift)
        except OSError as e:
            # Give back whatever part of the range was allocated before the failure.
            assert self._data is not None
            self._data.madvise(mmap.MADV_REMOVE, page << shift, n << shift)
            if e.errno == 28:
                raise DiskFullError(
                    f"disk {self.name!r}: no space left in {_segment.SHM_DIR} "
                    f"for {n} new page(s); nothing was written"
                ) from None
            raise UnknownError(f"disk {self.name!r}: allocation failed: {e}") from None
        if n >= 4:
            # Map the new pages in with one call instead of a page fault each: a first write
            # of 256 KiB runs about 1.5x faster. Only a hint: old kernels say EINVAL.
            try:
                assert self._data is not None
                self._data.madvise(_MADV_POPULATE_WRITE, page << shift, n << shift)
            except OSError:
                pass

    def _prepare(self, p0: int, ws: _pagemap.Words) -> None:
        """Give memory to the pages of ``ws`` that have none, and to their page-map pages.

        Called before anything is stored: on a full tmpfs a store into a page without memory
        (data or page map alike) is SIGBUS, while this raises DiskFullError and gives back
        what it took, so the failed call leaves nothing behind.
        """
        done: list[tuple[int, int]] = []
        try:
            for a, b, mapped in _pagemap.runs(ws):
                if not mapped:
                    self._allocate(p0 + a, b - a)
                    done.append((p0 + a, b - a))
            self._allocate_map(p0, p0 + len(ws))
        except DiskFullError:
            assert self._data is not None
            shift = self._shift
            for page, n in done:
                self._data.madvise(mmap.MADV_REMOVE, page << shift, n << shift)
            raise

    def _allocate_map(self, p0: int, p1: int) -> None:
        """Allocate the page-map pages holding the words of pages ``[p0, p1)``."""
        known = self._known
        for g in range(p0 >> _GROUP_SHIFT, ((p1 - 1) >> _GROUP_SHIFT) + 1):
            if known[g]:
                continue
            try:
                os.posix_fallocate(self._fd, L.MAP_OFFSET + (g << _GROUP_BYTES_SHIFT), 4096)
            except OSError as e:
                if e.errno == 28:
                    raise DiskFullError(
                        f"disk {self.name!r}: no space left in {_segment.SHM_DIR}; "
                        "nothing was written"
                    ) from None
                raise UnknownError(f"disk {self.name!r}: allocation failed: {e}") from None
            known[g] = 1

    def _word(self, p: int) -> int:
        """Page ``p``'s map word, without touching (and so allocating) a page-map hole."""
        if self._known[p >> _GROUP_SHIFT]:
            return int(self._wv[p])
        return int(self._snapshot(p, p + 1)[0])

    def _require_writable(self) -> memoryview:
        hq = self._header()
        if self.read_only:
            raise IsReadOnlyError(f"disk {self.name!r} is connected read-only")
        return hq

    def discard(self, sector: int, n_sectors: int) -> None:
        """Make ``n_sectors`` from ``sector`` read as zeros, giving whole pages back."""
        self._zero_range(sector, n_sectors, unmap=True)

    def write_zeroes(self, sector: int, n_sectors: int, *, may_unmap: bool = True) -> None:
        """Zero a range; with ``may_unmap=False`` the pages stay allocated (NBD ``NO_HOLE``)."""
        self._zero_range(sector, n_sectors, unmap=may_unmap)

    def _zero_range(self, sector: object, n_sectors: object, unmap: bool) -> None:
        s = _index(sector, "sector")
        n = _index(n_sectors, "n_sectors")
        hq = self._require_writable()
        ss = self.sector_size
        if n < 0:
            raise OutOfRangeError(f"sector count {n} is negative")
        self._check_range(hq, s * ss, n * ss)
        if n == 0:
            return
        a, b = s * ss, (s + n) * ss
        p0, p1 = a >> self._shift, ((b - 1) >> self._shift) + 1
        with self._call() as lk:
            self._zero_range_locked(lk.fd, a, b, p0, p1, unmap)

    def _zero_range_locked(self, fd: int, a: int, b: int, p0: int, p1: int, unmap: bool) -> None:
        ss, shift, page = self.sector_size, self._shift, self.page_size
        _lock(fd, _WR, p0, p1 - p0)
        try:
            hq = self._header()
            self._check_range(hq, a, b - a)
            if not unmap:
                # Zero in place, pages kept: allocate first, so on a full tmpfs the call fails
                # before it has zeroed anything.
                ws = self._snapshot(p0, p1)
                if int(ws.min()) < _MAPPED:
                    self._prepare(p0, ws)
                seg = self._words[p0:p1]
                seg[:] = _pagemap.writing(ws)
                try:
                    self._dn[a:b] = 0
                finally:
                    seg[:] = _pagemap.written(ws)
                return
            # Bytes past the end of the disk are always zero, so a range that reaches the end
            # covers its last page whole.
            full_lo = -(-a // page)
            full_hi = p1 if b == hq[_F_SIZE] * ss else b >> shift
            if full_lo >= full_hi:  # no whole page: one or two partly covered pages
                parts = [(p, max(a, p << shift), min(b, (p + 1) << shift)) for p in range(p0, p1)]
                self._zero_and_drop(parts, p1, p1)
            else:
                parts = []
                if p0 < full_lo:
                    parts.append((p0, a, full_lo << shift))
                if full_hi < p1:
                    parts.append((full_hi, full_hi << shift, b))
                self._zero_and_drop(parts, full_lo, full_hi)
        finally:
            _unlock(fd, p0, p1 - p0)

    def _zero_and_drop(self, parts: list[tuple[int, int, int]], lo: int, hi: int) -> None:
        """Zero byte ranges ``(page, start, end)`` in place and drop whole pages ``[lo, hi)``.

        The caller holds all these pages exclusively. For lock-free readers it must look like
        one step: every page that will change is made odd before any of them changes, and
        made even only when all are done. (Page by page, a reader could find the first pages
        already zeroed and the later ones not yet, each with an even, unchanged word.)
        """
        assert self._data is not None
        wv, words, shift = self._wv, self._words, self._shift
        # Partly covered pages that hold data (the others are zero already) ...
        edits = [(p, x, y, w) for p, x, y in parts if (w := self._word(p)) >= _MAPPED]
        # ... and the runs of whole pages that hold data (the page map's holes are skipped).
        runs = []
        p = lo
        while p < hi:
            p = _pagemap.scan(self._fd, words, p, hi, True)
            if p >= hi:
                break
            q = _pagemap.scan(self._fd, words, p, hi, False)
            runs.append((p, q))
            p = q
        for p, _, _, w in edits:
            wv[p] = w | 1
        for p, q in runs:
            seg = words[p:q]
            # Odd and no longer mapped, in one store per word. Unmapped before the punch: a
            # crash in between leaves an allocated page marked unmapped (harmless), never a
            # hole marked mapped (a store into it could SIGBUS on a full tmpfs).
            seg[:] = (seg & np.uint32(L.SEQ_MASK)) | np.uint32(1)
        for _, x, y, _ in edits:
            self._dn[x:y] = 0
        for p, q in runs:
            self._data.madvise(mmap.MADV_REMOVE, p << shift, (q - p) << shift)
        for p, q in runs:
            seg = words[p:q]
            seg[:] = _pagemap.discarded(seg)
        for p, _, _, w in edits:
            wv[p] = _word_written(w)

    def resize(self, size_sectors: int) -> None:
        """Grow (with zeros) or shrink (dropping the tail for good); every process sees it."""
        n = _index(size_sectors, "size_sectors")
        self._require_writable()
        ss = self.sector_size
        limit = self._max_pages * self.page_size // ss
        if not 0 <= n <= limit:
            raise InvalidGeometryError(
                f"size {n} is outside [0, {limit}] sectors, the limit set when disk "
                f"{self.name!r} was created (see create(max_size_sectors=...))"
            )
        with self._call() as lk:
            self._resize_locked(lk.fd, n)

    def _resize_locked(self, fd: int, n: int) -> None:
        ss = self.sector_size
        _lock(fd, _WR, _locks.WHOLE_START, _locks.WHOLE_LEN)
        try:
            hq = self._header()
            if hq[_F_CAP] > self._cap:
                self._map_data()
            old_bytes, new_bytes = hq[_F_SIZE] * ss, n * ss
            shift, page = self._shift, self.page_size
            if new_bytes < old_bytes:
                parts = []
                if new_bytes % page:
                    p = new_bytes >> shift
                    parts.append((p, new_bytes, min(self._cap, (p + 1) << shift)))
                self._zero_and_drop(parts, -(-new_bytes // page), -(-old_bytes // page))
            elif new_bytes > self._cap:
                cap = min(self._max_pages * page, max(L.align_up(new_bytes, page), 2 * self._cap))
                try:
                    os.ftruncate(self._fd, self._data_offset + cap)
                except OSError as e:
                    raise UnknownError(f"disk {self.name!r}: cannot grow: {e}") from None
                hq[_F_CAP] = cap
            hq[_F_SIZE] = n
            hq[L.F_GENERATION] = hq[L.F_GENERATION] + 1
        finally:
            _unlock(fd, _locks.WHOLE_START, _locks.WHOLE_LEN)
        if hq[_F_CAP] > self._cap:
            self._map_data()

    def seek_mapped(self, sector: int) -> int:
        """First sector >= ``sector`` that may hold data; the disk size if none."""
        return self._seek(sector, True)

    def seek_unmapped(self, sector: int) -> int:
        """First sector >= ``sector`` that is certainly zero; the disk size if none."""
        return self._seek(sector, False)

    def _seek(self, sector: object, mapped: bool) -> int:
        s = _index(sector, "sector")
        hq = self._header()
        if s < 0:
            raise OutOfRangeError(f"sector {s} is negative")
        size = hq[_F_SIZE]
        if s >= size:
            return s
        ss, shift = self.sector_size, self._shift
        end_page = -(-(size * ss) // self.page_size)
        with self._call():
            p = _pagemap.scan(self._fd, self._words, (s * ss) >> shift, end_page, mapped)
        if p >= end_page:
            return size
        return min(size, max(s, (p << shift) // ss))

    def extents(self, start: int = 0, end: int | None = None) -> list[Extent]:
        """The runs of mapped and zero sectors covering ``[start, end)`` (default: the disk)."""
        size = self.get_info().size_sectors
        lo = _index(start, "start")
        hi = size if end is None else _index(end, "end")
        if not 0 <= lo <= hi <= size:
            raise OutOfRangeError(
                f"extent range [{lo}, {hi}) is outside the disk of {size} sectors"
            )
        out: list[Extent] = []
        s = lo
        while s < hi:
            m = self.seek_mapped(s)
            if m > s:
                out.append(Extent(s, min(m, hi) - s, False))
                s = min(m, hi)
                continue
            u = min(self.seek_unmapped(s), hi)
            out.append(Extent(s, u - s, True))
            s = u
        return out

    def mapped_pages(self) -> int:
        """How many pages of the disk hold data (and memory)."""
        hq = self._header()
        pages = -(-(hq[_F_SIZE] * self.sector_size) // self.page_size)
        with self._call():
            return _pagemap.count_mapped_fd(self._fd, pages)

    def flush(self) -> None:
        """Nothing to do (memory is the medium), but a disconnected handle still fails."""
        self._header()

    def open(self, mode: str = "rb", buffering: int = -1) -> BinaryIO:
        """The disk as a binary file object, buffered as ``open`` does (``shmdisk._fileio``)."""
        from ._fileio import open_disk

        self._header()
        return open_disk(self, mode, buffering)

    def disconnect(self) -> None:
        """Release this handle (descriptors, mappings); idempotent. The disk stays.

        Safe while other threads are inside calls on this handle: they finish or raise
        ``DisconnectedError``, and what they still use is released when the last one leaves.
        """
        guard = self.__dict__.get("_fds_lock")
        if guard is None:  # __init__ failed before its bookkeeping existed
            self._release()
            return
        with guard:
            self._hq = None  # first: every later call sees a disconnected handle
            for lk in list(self._thread_locks):
                if not lk.busy:
                    lk.close()
            self._release_if_idle()

    def _release_if_idle(self) -> None:
        """After disconnect (caller holds ``_fds_lock``): release all once no call is inside."""
        if not any(lk.busy for lk in self._thread_locks):
            for fd in [*self._lock_fds]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._lock_fds.clear()
            self._release()

    def _release(self) -> None:
        self._hq = None
        self._wv = memoryview(b"")
        self._words = np.zeros(0, dtype=np.uint32)
        self._dv = memoryview(b"")
        self._dn = np.zeros(0, dtype=np.uint8)
        for m in (self._data, self._meta):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # a lock-free read still copies from it: unmapped when it is done
        self._data = self._meta = None
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1
        self._cap = 0

    def __enter__(self) -> Disk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()

    def __reduce__(self) -> tuple[Any, tuple[str, bool]]:
        return (_reconnect, (self.name, self.read_only))

    def __repr__(self) -> str:
        if self._hq is None:
            return f"<shmdisk.Disk {self.name!r} disconnected>"
        mode = "ro" if self.read_only else "rw"
        return f"<shmdisk.Disk {self.name!r} {self._hq[_F_SIZE]} x {self.sector_size} B {mode}>"

    def __del__(self) -> None:
        if self._fd >= 0:
            self.disconnect()


def _reconnect(name: str, read_only: bool) -> Disk:
    return connect(name, read_only=read_only, create=False)


def create(
    name: str,
    size_sectors: int,
    sector_size: int = L.DEFAULT_SECTOR_SIZE,
    *,
    mode: int = 0o600,
    max_size_sectors: int | None = None,
) -> Disk:
    """Create a new, all-zero disk; ``DiskExistsError`` if the name is taken.

    The disk may later be resized up to ``max_size_sectors`` (default: the larger of its size
    and 1 TiB); the reservation costs no memory.
    """
    name = _segment.validate_name(name)
    opened = _segment.create_segment(name, size_sectors, sector_size, mode, max_size_sectors)
    try:
        return Disk(name, opened, read_only=False)
    except BaseException:
        _segment.destroy_segment(name, timeout=5.0)
        raise


def connect(name: str, *, read_only: bool = False, create: bool = True) -> Disk:
    """Connect to the disk ``name``; if missing, create the default disk (32768 x 512 B).

    Racing connects agree on one device. With ``create=False`` a missing name raises
    ``DiskNotFoundError``.
    """
    name = _segment.validate_name(name)
    if create:
        opened = _segment.create_or_open(name, read_only)
    else:
        opened = _segment.open_segment(name, read_only)
    return Disk(name, opened, read_only=read_only)


def destroy(name: str, *, timeout: float = 30.0) -> None:
    """Destroy the disk: connected handles get ``DisconnectedError``; a missing name is fine.

    Waits for I/O in flight (at most ``timeout`` seconds, then ``LockTimeoutError``).
    """
    _segment.destroy_segment(_segment.validate_name(name), timeout)
