"""Page I/O: the only code that takes page locks and runs the seqlock protocol.

**The lock table.** The segment holds ``STRIPES`` robust, process-shared mutexes (``_layout.py``
gives the bytes). Page ``p`` belongs to stripe ``(p >> STRIPE_SHIFT) % STRIPES``: runs of 16
pages share a stripe, so a 1 MiB request takes 16 mutexes, not 256, and neighbouring requests of
different processes rarely meet.

* **A writer** (write, discard, write_zeroes) of pages ``[p0, p1)`` takes their stripes in
  ascending order (every taker uses that order, so nobody deadlocks), all of them when the
  range spans ``STRIPES`` units or more, and records its *intent* ``(p0, p1 - p0)`` in each
  slot. Then, for every page it changes: (1) make its SEQ counter odd, (2) fence, (3) change
  the bytes, (4) fence, (5) make the counter even, one step past the odd value. Changes that
  span pages look like one step to readers: every page is made odd before any page changes,
  and even only when all are done. The fences matter for large copies: glibc's memcpy and
  memset use non-temporal stores above a size threshold, and those may pass the counter stores
  around them (a torn read was reproduced without the closing fence).
* **Whole-disk operations** (resize, freeze, destroy, a point-in-time copy) take every stripe.
* **A reader** copies without any lock: it notes the words of its pages, copies (from the
  page, from a backing disk, or zeros, as each word says), and checks the words again; equal
  and even means no writer touched the pages meanwhile (x86 keeps stores, and loads, in
  program order; the native engine also fences). An odd word means a writer is at work: a
  read-write handle then takes the stripes and reads under them; a read-only handle cannot
  (taking a mutex writes to it), so it polls, and reads the pages as they are once it sees
  that their holder died (the futex word says ``FUTEX_OWNER_DIED``).
* **A holder that dies** (any signal, exit) leaves its mutexes to the kernel, which marks them
  owner-died; the next taker gets ``EOWNERDEAD`` and, before anything else, *repairs* the
  pages of the dead holder's intent that belong to that stripe: odd counters are made even,
  and pages that are not MAPPED are punched out of the file (a first write, discard or shrink
  cut short must leave an unmapped page reading as zeros and costing no memory). Then it
  marks the mutex consistent. An exception while holding stripes (Ctrl-C included) is treated
  the same way: repair, then unlock.
* **Limits kept**: a thread never holds more than ``ROBUST_LIST_LIMIT`` mutexes (the kernel
  would leave the excess stuck if it died); a thread that holds stripes of a disk never waits
  for stripes of the same disk again (a signal handler re-entering a write would wait for
  itself): it gets ``ReentrantCallError``; and a mapping is never unmapped while a call uses it
  (``_mapping.py``), so no thread unmaps a table one of its stripes is held in.

**Where data lives.** A page that is MAPPED holds data; one that is not reads as zeros, or, in
an overlay, from the backing disk unless ZEROED. No store through a mapping ever lands in a
tmpfs hole (on a full ``/dev/shm`` that is SIGBUS): before the first store into a page (data
or page map) its memory is allocated with ``fallocate``, which fails cleanly with ENOSPC before
anything changed; or, for data pages a write covers whole, the write goes through the file
(``pwritev``, ``write_fresh``), which allocates as it writes and fails with ENOSPC as cleanly,
having its pages punched back before the error leaves.
Reading the page map through the mapping where it is a hole would allocate it, so the map's
holes are found with ``SEEK_DATA`` (``snapshot``).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import _layout as L
from . import _pagemap, _stripes
from ._mapping import Mapping, Segment
from .errors import (
    BackingLostError,
    CorruptSegmentError,
    DisconnectedError,
    DiskFullError,
    IsReadOnlyError,
    LockTimeoutError,
    OutOfRangeError,
    ReentrantCallError,
    UnknownError,
    WouldBlockError,
)

Words = _pagemap.Words

_ZEROS = memoryview(bytes(1 << 20))  # a source for zero-filling without allocating
_FENCE_BYTES = 16384  # smaller copies never take glibc's non-temporal path
_IOV_FEW = 64  # buffers one pwritev takes here (the kernel's limit, IOV_MAX, is 1024)
_MAPPED = L.MAPPED
_SEQ = L.SEQ_MASK
_ZEROED = L.ZEROED
_F_SIZE = L.F_SIZE_SECTORS
_F_GONE = L.F_DESTROYED
_F_FROZEN = L.F_FROZEN
_I_FIRST = L.INTENT_FIRST // 8
_I_COUNT = L.INTENT_COUNT // 8
_SLOT_Q = L.SLOT_SIZE // 8
_SLOT_I = L.SLOT_SIZE // 4
_MAP_SHIFT = L.MAP_PAGE_SHIFT
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
_ST_RANGE = 2


# ---------------------------------------------------------------- per-thread state


class _ThreadState(threading.local):
    """The disks whose stripes this thread holds (or is taking), and how many it holds."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.count = 0


_held = _ThreadState()


def _forget_after_fork() -> None:
    # The child owns none of the mutexes the forking thread held.
    _held.keys = []
    _held.count = 0


os.register_at_fork(after_in_child=_forget_after_fork)


# ---------------------------------------------------------------- the page map


def snapshot(seg: Segment, p0: int, p1: int) -> Words:
    """A copy of the words of pages ``[p0, p1)``, read without allocating map holes.

    A hole of the page map was never written, so its words are zero; whether a map page is a
    hole is asked of the file until it is known to hold memory, which then stays true (the map
    is never punched).
    """
    g0, g1 = p0 >> _MAP_SHIFT, (p1 - 1) >> _MAP_SHIFT
    known = seg.known
    if (g0 == g1 and known[g0]) or 0 not in known[g0 : g1 + 1]:
        return seg.words[p0:p1].copy()
    out = np.zeros(p1 - p0, dtype=np.uint32)
    for g in range(g0, g1 + 1):
        if not known[g]:
            off = L.MAP_OFFSET + g * L.MAP_PAGE_BYTES
            try:
                if os.lseek(seg.fd, off, os.SEEK_DATA) != off:
                    continue
            except OSError:
                continue  # ENXIO: no data at or after off
            known[g] = 1
        lo, hi = max(p0, g << _MAP_SHIFT), min(p1, (g + 1) << _MAP_SHIFT)
        out[lo - p0 : hi - p0] = seg.words[lo:hi]
    return out


def allocate_map(seg: Segment, p0: int, p1: int) -> None:
    """Give memory to the page-map pages holding the words of pages ``[p0, p1)``."""
    known = seg.known
    for g in range(p0 >> _MAP_SHIFT, ((p1 - 1) >> _MAP_SHIFT) + 1):
        if not known[g]:
            _fallocate(seg, L.MAP_OFFSET + g * L.MAP_PAGE_BYTES, L.MAP_PAGE_BYTES, "page map")
            known[g] = 1


def _fallocate(seg: Segment, offset: int, length: int, what: str) -> None:
    try:
        os.posix_fallocate(seg.fd, offset, length)
    except OSError as e:
        _stripes.punch(seg.fd, offset, length)  # whatever part it did allocate
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk {seg.name!r}: no space left in /dev/shm for the {what}; nothing was written"
            ) from e
        raise UnknownError(
            e.errno, f"disk {seg.name!r}: allocating {what} failed: {e.strerror}"
        ) from e


# Odd counters this process made even in ``repair`` (the native engine counts its own, see
# ``_native.repaired_pages``): evidence for the stress tools that repairs really ran.
repaired_pages = 0


def repair(seg: Segment, s: int) -> None:
    """Put right what the dead holder of stripe ``s`` may have left (see the module text).

    Only the parts of the file that hold memory are visited, so an intent over a huge, sparse
    disk is repaired as fast as a small one. The caller holds stripe ``s``. Mirrors
    ``repair`` in ``_native.c``.
    """
    global repaired_pages
    first = int(seg.lq[s * _SLOT_Q + _I_FIRST])
    count = int(seg.lq[s * _SLOT_Q + _I_COUNT])
    if first >= seg.max_pages or count == 0:
        return
    end = min(first + count, seg.max_pages)
    # A unit (16 words) lies within one page of the map, so one flag of ``known`` covers it.
    # 1. Odd counters, in the units of stripe s whose words hold memory (4 bytes a page).
    for a, b in _units_with_memory(seg.fd, L.MAP_OFFSET, 2, s, first, end):
        seg.known[a >> _MAP_SHIFT] = 1
        ws = seg.words[a:b]
        odd = np.flatnonzero(ws & np.uint32(1))
        if len(odd):
            seg.words[a + odd] = _pagemap.done(ws[odd], ws[odd] & np.uint32(L.FLAGS))
            repaired_pages += len(odd)
    # 2. Memory of pages that are not mapped, in the units of stripe s that hold memory.
    shift, base = seg.shift, seg.data_offset
    for a, b in _units_with_memory(seg.fd, base, shift, s, first, end):
        ws = seg.words[a:b] if seg.known[a >> _MAP_SHIFT] else np.zeros(b - a, dtype=np.uint32)
        loose = np.flatnonzero(ws < np.uint32(_MAPPED)) + a
        if len(loose):
            breaks = np.flatnonzero(np.diff(loose) != 1) + 1
            for run in np.split(loose, breaks):
                p0 = int(run[0])
                _stripes.punch(seg.fd, base + (p0 << shift), len(run) << shift)


def _units_with_memory(
    fd: int, base: int, shift: int, s: int, first: int, end: int
) -> Iterator[tuple[int, int]]:
    """The pages ``[a, b)`` of each unit of stripe ``s`` within ``[first, end)`` whose bytes
    hold memory, ascending; page ``q``'s bytes start at ``base + (q << shift)`` (the data area,
    or with ``shift`` 2 the page map).

    Found with SEEK_DATA alone, which skips holes at once: SEEK_HOLE walks every page of a dense
    run, and 1024 stripes doing so from a dead holder's intent took over a second of CPU for a
    128 MiB run. Mirrors ``next_unit`` in ``_native.c``.
    """
    p = first
    while p < end:
        try:
            d = os.lseek(fd, base + (p << shift), os.SEEK_DATA)
        except OSError:
            return  # ENXIO: no memory at or after p
        q = (d - base) >> shift
        if q >= end:
            return
        u = q >> L.STRIPE_SHIFT
        u += (s - u) % L.STRIPES  # the unit of stripe s holding page q, or the next one
        a = max(first, u << L.STRIPE_SHIFT)
        if a >= end:
            return
        if a > q:
            p = a  # the memory found belongs to another stripe: look again from ours
            continue
        yield a, min(end, (u + 1) << L.STRIPE_SHIFT)
        p = (u + L.STRIPES) << L.STRIPE_SHIFT


def stripes_for(p0: int, p1: int) -> list[int]:
    """The stripes of pages ``[p0, p1)`` in the order they are taken (ascending)."""
    u0, u1 = p0 >> L.STRIPE_SHIFT, (p1 - 1) >> L.STRIPE_SHIFT
    if u1 - u0 + 1 >= L.STRIPES:
        return list(range(L.STRIPES))
    r0, r1 = u0 % L.STRIPES, u1 % L.STRIPES
    if r0 <= r1:
        return list(range(r0, r1 + 1))
    return [*range(r1 + 1), *range(r0, L.STRIPES)]


def _slow(off: int, buf: Any) -> int:
    """The fast path of a disconnected handle: always the slow path (which raises)."""
    return 1


def _holder_gone(seg: Segment, s: int) -> bool:
    """Nobody alive holds stripe ``s``: its holder died (the kernel cleared its thread id and
    set FUTEX_OWNER_DIED), or nobody holds it at all while a page says a writer is there
    (a damaged page map). Either way the pages will not change until someone repairs them."""
    return not seg.li[s * _SLOT_I] & L.FUTEX_TID_MASK


def _owned_here(seg: Segment, s: int, tid: int) -> bool:
    return seg.li[s * _SLOT_I] & L.FUTEX_TID_MASK == tid


def _release_after_error(m: Mapping, stripes: Sequence[int]) -> None:
    """An exception came while this thread held (or was taking) ``stripes``: undo safely.

    Whatever the holder left half-done is repaired as for a dead holder, then the stripe is
    released. Runs to the end even if another exception (a second Ctrl-C) arrives meanwhile.
    """
    seg, table, tid = m.seg, m.table, threading.get_native_id()
    pending: BaseException | None = None
    for s in reversed(stripes):
        while True:
            try:
                if _owned_here(seg, s, tid):
                    repair(seg, s)
                    owner = seg.li[s * _SLOT_I + _stripes.OWNER_FIELD]
                    if owner == _stripes.OWNER_INCONSISTENT:
                        table.consistent(s)  # only the python engine can get here
                    table.unlock(s)
                break
            except BaseException as e:
                if isinstance(e, OSError):
                    break
                pending = e
    if pending is not None:
        raise pending


# ---------------------------------------------------------------- copying


def fill_unshared(seg: Segment, off: int, src: Mapping, n: int) -> None:
    """Copy bytes ``[off, off + n)`` of the data of ``src`` to the same place in a segment that
    no other thread or process can see (a copy being made, before it is named), and mark its
    pages MAPPED. ``src``'s bytes there must not change meanwhile.

    Nobody reads or writes such a segment, so there are no locks to take and no counters to
    make odd. The bytes go from file to file in the kernel (``copy_file_range``): tmpfs
    allocates the pages it fills without zeroing them first, nothing is mapped or faulted in
    on either side, and a full tmpfs fails cleanly (ENOSPC). That runs about twice as fast as
    allocating (``fallocate``), populating and copying through the mappings, and faster than
    ``cp``. The pages' bytes outside the range must be zeros: tmpfs fills the rest of a new
    page with zeros.
    """
    shift = seg.shift
    p0, p1 = off >> shift, ((off + n - 1) >> shift) + 1
    allocate_map(seg, p0, p1)
    done = 0
    try:
        while done < n:
            try:
                k = os.copy_file_range(
                    src.seg.fd,
                    seg.fd,
                    n - done,
                    src.seg.data_offset + off + done,
                    seg.data_offset + off + done,
                )
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                k = 0
            if k == 0:  # not between these files: through the source's mapping instead
                k = os.pwrite(seg.fd, src.dv[off + done : off + n], seg.data_offset + off + done)
            done += k
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk {seg.name!r}: no space left in /dev/shm for the copy") from e
        raise UnknownError(
            e.errno, f"disk {seg.name!r}: writing the copy failed: {e.strerror}"
        ) from e
    seg.words[p0:p1] |= np.uint32(_MAPPED)


def _through_file(seg: Segment, off: int, views: Sequence[memoryview], total: int) -> bool:
    """Whether a write of ``views`` at ``off`` covers whole pages and can go through the file
    (``write_fresh``) when they are all fresh: few enough buffers for one system call."""
    mask = seg.page_size - 1
    return not (off & mask or total & mask) and len(views) <= _IOV_FEW


def write_fresh(seg: Segment, off: int, views: Sequence[memoryview], total: int) -> None:
    """Write ``views`` (``total`` bytes, whole pages) at data byte ``off`` of pages that hold no
    memory, whose stripes are held and counters odd, through the file (``pwritev``).

    tmpfs gives a page written whole through the file its memory without zeroing it first:
    about half the time of allocating (``fallocate``) and then copying through the mapping
    (4 KiB: 2.0 against 3.8 us; 1 MiB: 0.34 against 0.6-0.7 ms). The write and the mappings
    see the same page cache, so every process sees the bytes, and the system call orders the
    copy before the counters' next store. On any failure (a full tmpfs: ``DiskFullError``) the
    pages are punched back to holes before the error leaves: the caller restores their words
    and the write leaves nothing behind.
    """
    pos = seg.data_offset + off
    done = 0
    try:
        while done < total:
            done += os.pwritev(seg.fd, _after(views, done), pos + done)
    except BaseException as e:
        _stripes.punch(seg.fd, pos, total)
        if not isinstance(e, OSError):
            raise
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk {seg.name!r}: no space left in /dev/shm for the data; nothing was written"
            ) from e
        raise UnknownError(e.errno, f"disk {seg.name!r}: writing failed: {e.strerror}") from e


def _after(views: Sequence[memoryview], skip: int) -> Sequence[memoryview]:
    """``views`` less their first ``skip`` bytes (after a short write)."""
    if not skip:
        return views
    rest = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        rest.append(v[skip:])
        skip = 0
    return rest


def zero_view(v: memoryview) -> None:
    n = len(v)
    if n <= len(_ZEROS):
        v[:] = _ZEROS[:n]
    else:
        np.frombuffer(v, dtype=np.uint8)[:] = 0


def copy_in(dv: memoryview, off: int, views: Sequence[memoryview] | None, total: int) -> None:
    """Copy consecutive buffers (None: zeros) into the data area from byte ``off`` on."""
    if views is None:
        np.frombuffer(dv, dtype=np.uint8, count=total, offset=off)[:] = 0
        return
    for v in views:
        k = len(v)
        dv[off : off + k] = v
        off += k


def sources(m: Mapping, p0: int, ws: Words) -> list[tuple[int, int, Mapping | None]]:
    """Where pages ``p0 + i`` read from, as runs ``(page, end, mapping or None for zeros)``.

    ``ws`` are the pages' words in ``m``; odd counters are read past (the caller decided that
    is safe). Pages of an overlay that are neither MAPPED nor ZEROED come from its base.
    """
    kinds = np.where(ws >= np.uint32(_MAPPED), 1, 0).astype(np.int8)
    if m.base is not None and p0 < m.base_pages:
        via_base = (ws & np.uint32(_MAPPED | _ZEROED)) == 0
        via_base[max(0, m.base_pages - p0) :] = False
        kinds[via_base] = 2
    out: list[tuple[int, int, Mapping | None]] = []
    for a, b, kind in _pagemap.kind_runs(kinds):
        if kind == 1:
            out.append((p0 + a, p0 + b, m))
        elif kind == 0:
            out.append((p0 + a, p0 + b, None))
        else:
            base = m.base
            assert base is not None
            if base.seg.hq[_F_GONE]:
                raise BackingLostError(
                    f"disk {m.seg.name!r}: its backing disk {base.seg.name!r} was destroyed"
                )
            bws = snapshot(base.seg, p0 + a, p0 + b)
            out.extend(sources(base, p0 + a, bws))
    return out


def copy_out(m: Mapping, off: int, views: Sequence[memoryview], ws: Words) -> None:
    """Fill ``views`` from byte ``off`` on, each page from where its word says."""
    shift = m.seg.shift
    if m.base is None:
        if int(ws.min()) >= _MAPPED:
            for v in views:
                k = len(v)
                v[:] = m.dv[off : off + k]
                off += k
            return
        if int(ws.max()) < _MAPPED:
            for v in views:
                zero_view(v)
            return
    runs = sources(m, off >> shift, ws)
    ri = 0
    for v in views:
        v = memoryview(v)  # slices of it must be views, not copies (bytearray)
        vstart, vend = off, off + len(v)
        while ri < len(runs):
            a, b, src = runs[ri]
            lo, hi = max(vstart, a << shift), min(vend, b << shift)
            if lo < hi:
                part = v[lo - vstart : hi - vstart]
                if src is None:
                    zero_view(part)
                else:
                    part[:] = src.dv[lo:hi]
            if b << shift > vend:
                break  # this run goes on into the next buffer
            ri += 1
        off = vend


# ---------------------------------------------------------------- a handle's page I/O


def python_fast_paths(m: Mapping) -> tuple[Any, Any, Any, Any]:
    """The python engine's commonest requests, written out flat for one mapping.

    Returns ``fast_read(off, buf)`` (a lock-free read within one page), ``fast_write(off,
    buf)`` (a rewrite of one mapped page under its stripe), and ``read_sectors`` /
    ``write_sectors(sector, buf)`` (the same from a sector number, for ``Disk.read/write``),
    each returning 0 when done and 1 when the general path must do it (which then checks the
    arguments and raises the typed errors). They are the protocol steps of
    ``PageIO._read_lock_free`` and ``PageIO._write_pages`` specialised to one page and one
    flat buffer (bytearray, bytes or a memoryview: one whose structure does not fit fails the
    copy, before any byte moves, and goes the general way), bound to the mapping's views as
    closure variables: in pure Python every attribute lookup or call on the hot path costs a
    few percent of a 4 KiB request. Each is made twice from one body, for a unit of one byte
    and of one sector.

    Re-entry (a signal handler calling in while the interrupted code holds a stripe here) is
    left to the general path: this trylock fails on a stripe the thread holds, and ``_Hold``
    refuses a stripe its own thread holds.
    """
    seg = m.seg
    hq, wv, lq, known, dv = seg.hq, seg.wv, seg.lq, seg.known, m.dv
    cap, shift, ss = m.cap, seg.shift, seg.sector_size
    table = m.table
    plain = m.base is None
    # An overlay's: the headers of the disks under it (a destroyed one fails every call, as in
    # the native engine), and its base's page map, known flags and data (frozen: never grow).
    chain: tuple[memoryview, ...] = ()
    b = m.base
    while b is not None:
        chain += (b.seg.hq,)
        b = b.base
    base_pages = m.base_pages
    bwv, bknown, bdv = (
        (m.base.seg.wv, m.base.seg.known, m.base.dv) if m.base is not None else (wv, known, dv)
    )
    addrs = table.addr if table is not None else []
    trylock: Any = table.c_trylock if table is not None else None
    unlock: Any = table.c_unlock if table is not None else None
    held = _held
    limit = _stripes.ROBUST_LIST_LIMIT
    stripe_shift, stripes = L.STRIPE_SHIFT, L.STRIPES

    def reader(unit: int) -> Any:
        def read(at: Any, buf: Any) -> int:
            t = type(buf)
            if type(at) is not int or at < 0 or not (t is bytearray or t is memoryview):
                return 1
            try:
                n = len(buf)
                if t is memoryview and not buf.c_contiguous:
                    return 1  # refused by the general path, as the native engine refuses it
            except ValueError:  # a released memoryview
                return 1
            off = at * unit
            end = off + n
            p0 = off >> shift
            if not (
                n
                and not n % unit
                and (end - 1) >> shift == p0
                and end <= cap
                and known[p0 >> _MAP_SHIFT]
                and end <= hq[_F_SIZE] * ss
                and not hq[_F_GONE]
            ):
                return 1
            for below in chain:
                if below[_F_GONE]:
                    return 1
            w = wv[p0]
            if w & 1:
                return 1
            try:
                if w >= _MAPPED:
                    buf[:] = dv[off:end]
                elif plain or w & _ZEROED or p0 >= base_pages:
                    zero_view(memoryview(buf))
                else:
                    # An overlay's page that the base holds, the commonest case, written out.
                    bw = bwv[p0] if bknown[p0 >> _MAP_SHIFT] else 0
                    if bw >= _MAPPED and not bw & 1:
                        buf[:] = bdv[off:end]
                    elif _py_read_below(m, p0, off, end, buf):
                        return 1
            except (TypeError, ValueError, BufferError):
                return 1  # a buffer that does not fit (or was released): nothing was copied
            return 0 if wv[p0] == w else 1

        return read

    def writer(unit: int) -> Any:
        def write(at: Any, buf: Any) -> int:
            t = type(buf)
            if (
                type(at) is not int
                or at < 0
                or not (t is bytearray or t is memoryview or t is bytes)
                or trylock is None
            ):
                return 1
            try:
                n = len(buf)
                if t is memoryview and not buf.c_contiguous:
                    return 1  # refused by the general path, as the native engine refuses it
            except ValueError:  # a released memoryview
                return 1
            off = at * unit
            end = off + n
            p0 = off >> shift
            if (
                not n
                or n % unit
                or (end - 1) >> shift != p0
                or end > cap
                or not known[p0 >> _MAP_SHIFT]
                or held.count >= limit
            ):
                return 1
            s = (p0 >> stripe_shift) % stripes
            addr = addrs[s]
            try:
                rc = trylock(addr)
                if rc == 0:
                    lq[s * _SLOT_Q + _I_FIRST] = p0
                    lq[s * _SLOT_Q + _I_COUNT] = 1
                    w = wv[p0]
                    if (
                        w >= _MAPPED
                        and not hq[_F_GONE]
                        and not hq[_F_FROZEN]
                        and end <= hq[_F_SIZE] * ss
                        and (plain or not _chain_lost(m))
                    ):
                        big = n >= _FENCE_BYTES
                        wv[p0] = w | 1  # odd: lock-free readers retry or wait
                        if big:
                            _stripes.fence()
                        try:
                            dv[off:end] = buf
                        except (TypeError, ValueError, BufferError):
                            wv[p0] = w  # a buffer that does not fit: nothing was copied
                            unlock(addr)
                            return 1
                        if big:
                            _stripes.fence()
                        wv[p0] = _MAPPED | ((w + 2) & _SEQ)  # even again, one step on
                        unlock(addr)
                        return 0
                    unlock(addr)
                elif rc == errno.EOWNERDEAD:
                    table.after_trylock(s, rc)  # repaired; the general path takes it again
                    unlock(addr)
            except BaseException:
                _release_after_error(m, [s])
                raise
            return 1

        return write

    return reader(1), writer(1), reader(ss), writer(ss)


class _Hold:
    """``with``: the stripes of one call, taken in ascending order with the intent recorded;
    released on leaving, and repaired first if an exception (Ctrl-C included) left the pages
    half-changed. A class rather than a generator: it is on every first write's path."""

    __slots__ = ("deadline", "intent", "io", "key", "m", "stripes", "taken", "wait")

    def __init__(
        self,
        io: PageIO,
        m: Mapping,
        stripes: list[int],
        intent: tuple[int, int],
        wait: bool,
        deadline: float | None,
    ) -> None:
        self.io, self.m, self.stripes, self.intent = io, m, stripes, intent
        self.wait, self.deadline, self.taken = wait, deadline, 0
        self.key = m.seg.key

    def __enter__(self) -> None:
        m, name = self.m, self.io.name
        if not m.seg.writable:
            raise IsReadOnlyError(f"disk {name!r} is connected read-only")
        held = _held
        if self.key in held.keys:
            raise _reentry_error(name)
        if held.count + len(self.stripes) > _stripes.ROBUST_LIST_LIMIT:
            raise ReentrantCallError(
                f"disk {name!r}: this thread would hold more than "
                f"{_stripes.ROBUST_LIST_LIMIT} locks"
            )
        held.keys.append(self.key)
        table = m.table
        first, count = self.intent
        try:
            for s in self.stripes:
                rc = table.trylock(s)
                if rc == errno.EBUSY:
                    if _owned_here(m.seg, s, threading.get_native_id()):
                        # A one-page fast path of this thread holds it: a signal handler
                        # called in while it ran. That stripe is the interrupted call's to
                        # release, so it leaves the list _undo releases.
                        self.stripes = self.stripes[: self.taken]
                        raise _reentry_error(name)
                    if not self.wait:
                        raise WouldBlockError(
                            f"disk {name!r}: pages are locked by another thread or process"
                        )
                    rc = self.io._wait(table, s, self.deadline)
                if rc:
                    raise _lock_error(name, rc)
                self.taken += 1
                if count:
                    table.set_intent(s, first, count)
        except BaseException:
            self._undo()
            raise
        held.count += self.taken

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        _held.count -= self.taken
        if exc_type is None:
            table = self.m.table
            for s in reversed(self.stripes):
                table.unlock(s)
            _held.keys.remove(self.key)
        else:
            self._undo()

    def _undo(self) -> None:
        # The stripe being taken when the exception came may be ours too: the release looks
        # at each one's owner.
        try:
            _release_after_error(self.m, self.stripes[: self.taken + 1])
        finally:
            _held.keys.remove(self.key)


class PageIO:
    """The page I/O of one handle: its current mapping and every operation on pages.

    ``m`` is the current ``Mapping`` (None once disconnected). A call takes ``m`` once and
    works on that object to the end, so a concurrent remap or disconnect never pulls memory
    from under it.
    """

    def __init__(self, name: str, m: Mapping) -> None:
        self.name = name
        self._swap = threading.Lock()
        self.m: Mapping | None = None
        # fast_read / fast_write(off, buffer) -> 0 when done, else a reason to take the slow
        # path: the native engine's calls, or the python engine's one-page paths.
        self.fast_read: Any = _slow
        self.fast_write: Any = _slow
        # read_sectors / write_sectors(sector, buffer) -> 0 when done: the same for whole
        # sectors, with the plain-argument checks of Disk.read/write done inside.
        self.read_sectors: Any = _slow
        self.write_sectors: Any = _slow
        self.attach(m)

    def attach(self, m: Mapping | None) -> None:
        """Make ``m`` the current mapping (None: disconnected)."""
        self.m = m
        if m is None:
            self.fast_read = self.fast_write = self.read_sectors = self.write_sectors = _slow
        elif m.native is not None:
            self.fast_read, self.fast_write = m.native.read, m.native.write
            self.read_sectors, self.write_sectors = m.native.read_sectors, m.native.write_sectors
        else:
            paths = python_fast_paths(m)
            self.fast_read, self.fast_write, self.read_sectors, self.write_sectors = paths

    # ------------------------------------------------------------ checks

    def current(self) -> Mapping:
        m = self.m
        if m is None:
            raise DisconnectedError(f"disk {self.name!r} is disconnected")
        return m

    def gone(self) -> None:
        """The disk was destroyed: this handle is disconnected from now on."""
        self.attach(None)
        raise DisconnectedError(f"disk {self.name!r} was destroyed")

    def check(self, m: Mapping | None, off: int, total: int, writing: bool) -> Mapping:
        """The mapping to use for bytes ``[off, off + total)``, after every check (raises)."""
        if m is None:
            raise DisconnectedError(f"disk {self.name!r} is disconnected")
        seg = m.seg
        hq = seg.hq
        if hq[_F_GONE]:
            self.gone()
        if m.base is not None:
            self._check_base(m)
        if writing:
            if not seg.writable:
                raise IsReadOnlyError(f"disk {self.name!r} is connected read-only")
            if hq[_F_FROZEN]:
                raise IsReadOnlyError(f"disk {self.name!r} is frozen (read-only for good)")
        ss = seg.sector_size
        size = hq[_F_SIZE]
        if size * ss > seg.max_pages * seg.page_size:
            raise CorruptSegmentError(
                f"disk {self.name!r}: header says {size} sectors, beyond its page map"
            )
        end = size * ss
        if off < 0 or off + total > end:
            raise OutOfRangeError(_range_message(self.name, off, total, ss, size))
        if off + total > m.cap:
            m = self.remap(m)
            if off + total > m.cap:
                raise CorruptSegmentError(f"disk {self.name!r}: size beyond its capacity")
        return m

    def remap(self, m: Mapping) -> Mapping:
        """Map the data area at the capacity the header states now (another process grew it)."""
        new = m.grown()
        if new is not m:
            with self._swap:
                if self.m is m:
                    self.attach(new)
        return new

    def _check_base(self, m: Mapping) -> None:
        b = m.base
        while b is not None:
            if b.seg.hq[_F_GONE]:
                raise BackingLostError(
                    f"disk {self.name!r}: its backing disk {b.seg.name!r} was destroyed"
                )
            b = b.base

    def size_sectors(self) -> int:
        m = self.current()
        seg = m.seg
        hq = seg.hq
        if hq[_F_GONE]:
            self.gone()
        size = int(hq[_F_SIZE])
        if size * seg.sector_size > seg.max_pages * seg.page_size:
            # A damaged header: nobody may size a buffer, an export or a scan by it.
            raise CorruptSegmentError(
                f"disk {self.name!r}: header says {size} sectors, beyond its page map"
            )
        return size

    # ------------------------------------------------------------ holding stripes

    def holding(
        self,
        m: Mapping,
        stripes: list[int],
        intent: tuple[int, int],
        wait: bool = True,
        deadline: float | None = None,
    ) -> _Hold:
        """Hold ``stripes`` of ``m``'s table (with ``intent`` recorded) while a block runs."""
        return _Hold(self, m, stripes, intent, wait, deadline)

    def _wait(self, table: Any, s: int, deadline: float | None) -> int:
        """Wait for stripe ``s`` in slices, so that Ctrl-C and ``deadline`` get in."""
        while True:
            ns = _stripes.SLICE_NS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeoutError(
                        f"disk {self.name!r}: pages still locked elsewhere when the timeout ran out"
                    )
                ns = min(ns, int(left * 1e9) + 1)
            rc = table.lock(s, ns)
            if rc != errno.ETIMEDOUT:
                return int(rc)

    def hold_all(
        self, wait: bool = True, deadline: float | None = None, intent: tuple[int, int] = (0, 0)
    ) -> Any:
        """Hold every stripe: no page of the disk changes while the block runs."""
        m = self.current()
        return self.holding(m, list(range(L.STRIPES)), intent, wait, deadline)

    # ------------------------------------------------------------ reading

    def read(
        self,
        off: int,
        views: Sequence[memoryview],
        total: int,
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Fill ``views`` with bytes ``[off, off + total)``: one consistent snapshot."""
        try:
            if self.fast_read(off, views[0] if len(views) == 1 else views) == 0:
                return
        except OverflowError:
            pass  # an offset beyond 64 bits: the checks of the slow path say what is wrong
        self._read_slow(self.m, off, views, total, wait, timeout)

    def _read_slow(
        self,
        m: Mapping | None,
        off: int,
        views: Sequence[memoryview],
        total: int,
        wait: bool,
        timeout: float | None,
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 2e-5
        while True:
            m = self.check(m, off, total, writing=False)
            if total == 0:
                return
            seg = m.seg
            p0, p1 = off >> seg.shift, ((off + total - 1) >> seg.shift) + 1
            if self._read_lock_free(m, off, views, p0, p1, past_dead=not seg.writable):
                return
            if seg.writable:
                # A writer is at work: wait for it on its stripes, then read under them.
                with self.holding(m, stripes_for(p0, p1), (p0, 0), wait, deadline):
                    m = self.check(m, off, total, writing=False)
                    copy_out(m, off, views, snapshot(m.seg, p0, p1))
                return
            # A read-only handle cannot take a mutex: poll until the writer is done (or dead).
            if not wait:
                raise WouldBlockError(f"disk {self.name!r}: a writer is changing these pages")
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"disk {self.name!r}: a writer still held the pages when the timeout ran out"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def _read_lock_free(
        self, m: Mapping, off: int, views: Sequence[memoryview], p0: int, p1: int, past_dead: bool
    ) -> bool:
        """Seqlock read: copy, then check that no writer touched the pages. True when done.

        With ``past_dead``, pages left odd by a holder that died are read as they are (they
        stay so until a read-write handle repairs them).
        """
        seg = m.seg
        for _ in range(2):
            ws = snapshot(seg, p0, p1)
            odd = np.flatnonzero(ws & np.uint32(1))
            dead: set[int] = set()
            if len(odd):
                if not past_dead:
                    return False
                dead = {L.stripe_of(p0 + int(i)) for i in odd}
                if not all(_holder_gone(seg, s) for s in dead):
                    return False
            copy_out(m, off, views, ws)
            if np.array_equal(ws, snapshot(seg, p0, p1)) and all(
                _holder_gone(seg, s) for s in dead
            ):
                return True
        return False

    # ------------------------------------------------------------ writing

    def write(
        self,
        off: int,
        views: Sequence[memoryview],
        total: int,
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Write ``views`` at byte ``off``: all of it or (on error) none of it, atomically."""
        try:
            if self.fast_write(off, views[0] if len(views) == 1 else views) == 0:
                return
        except OverflowError:
            pass  # an offset beyond 64 bits: the checks of the slow path say what is wrong
        self._write_slow(self.m, off, views, total, wait, timeout)

    def _write_slow(
        self,
        m: Mapping | None,
        off: int,
        views: Sequence[memoryview] | None,
        total: int,
        wait: bool,
        timeout: float | None,
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        m = self.check(m, off, total, writing=True)
        if total == 0:
            return
        shift = m.seg.shift
        p0, p1 = off >> shift, ((off + total - 1) >> shift) + 1
        with self.holding(m, stripes_for(p0, p1), (p0, p1 - p0), wait, deadline):
            m = self.check(m, off, total, writing=True)  # again: a resize or destroy came?
            self._write_pages(m, off, views, total, p0, p1)

    def _write_pages(
        self,
        m: Mapping,
        off: int,
        views: Sequence[memoryview] | None,
        total: int,
        p0: int,
        p1: int,
    ) -> None:
        """Write (``views`` None: zeros) into pages ``[p0, p1)``, whose stripes are held."""
        seg = m.seg
        if p1 - p0 == 1:
            self._write_page(m, off, views, total, p0)
            return
        ws = snapshot(seg, p0, p1)
        words = seg.words[p0:p1]
        fence = total >= _FENCE_BYTES
        if int(ws.min()) >= _MAPPED:
            # A rewrite of pages that all hold data (the common case).
            words[:] = ws | np.uint32(1)
            if fence:
                _stripes.fence()
            copy_in(m.dv, off, views, total)
            if fence:
                _stripes.fence()
            words[:] = _pagemap.done(ws, _MAPPED)
            return
        fresh = ws < np.uint32(_MAPPED)
        if views is not None and _through_file(seg, off, views, total) and bool(fresh.all()):
            # Whole fresh pages: the file allocates and fills them in one call.
            allocate_map(seg, p0, p1)
            words[:] = ws | np.uint32(1)
            _stripes.fence()
            try:
                write_fresh(seg, off, views, total)
            except BaseException:
                words[:] = ws  # holes again, as they were: nothing of the write stays
                raise
            words[:] = _pagemap.done(ws, _MAPPED)
            return
        self._allocate(m, p0, fresh)
        words[:] = ws | np.uint32(1)
        _stripes.fence()
        # A new page the write does not cover whole: the rest of it must read as before
        # (the base's bytes, or zeros), whatever memory the page had.
        shift, end = seg.shift, off + total
        for p in sorted({p0, p1 - 1}):
            if fresh[p - p0]:
                lo, hi = p << shift, (p + 1) << shift
                for a, b in ((lo, off), (end, hi)):
                    if a < b:
                        self._fill_from_below(m, p, ws[p - p0], a, b)
        copy_in(m.dv, off, views, total)
        _stripes.fence()
        words[:] = _pagemap.done(ws, _MAPPED)

    def _write_page(
        self, m: Mapping, off: int, views: Sequence[memoryview] | None, total: int, p: int
    ) -> None:
        """``_write_pages`` for one page, in plain integers: a first write of 4 KiB (every
        request of a random writer into a fresh disk) is about numpy's fixed costs otherwise."""
        seg = m.seg
        allocate_map(seg, p, p + 1)
        w = int(seg.wv[p])
        fresh = w < _MAPPED
        shift = seg.shift
        if fresh and views is not None and _through_file(seg, off, views, total):
            seg.wv[p] = w | 1
            _stripes.fence()
            try:
                write_fresh(seg, off, views, total)
            except BaseException:
                seg.wv[p] = w  # a hole again, as it was
                raise
            seg.wv[p] = L.word_done(w, _MAPPED)
            return
        if fresh:
            _fallocate(seg, seg.data_offset + (p << shift), 1 << shift, "data")
        seg.wv[p] = w | 1
        _stripes.fence()
        if fresh:
            lo, hi, end = p << shift, (p + 1) << shift, off + total
            for a, b in ((lo, off), (end, hi)):
                if a < b:
                    self._fill_from_below(m, p, w, a, b)
        copy_in(m.dv, off, views, total)
        _stripes.fence()
        seg.wv[p] = L.word_done(w, _MAPPED)

    def _fill_from_below(self, m: Mapping, p: int, w: int, a: int, b: int) -> None:
        """Bytes ``[a, b)`` of page ``p`` as the page read before it was mapped."""
        part = m.dv[a:b]
        if m.base is None:
            zero_view(part)
            return
        runs = sources(m, p, np.array([int(w) & ~1], dtype=np.uint32))
        src = runs[0][2]
        if src is None or src is m:
            zero_view(part)
        else:
            part[:] = src.dv[a:b]

    def _allocate(self, m: Mapping, p0: int, fresh: Any) -> None:
        """Give memory to the pages ``p0 + i`` where ``fresh[i]``, and to their map pages.

        Called before anything is stored: on a full tmpfs this raises DiskFullError and gives
        back what it took, so the failed call leaves nothing behind.
        """
        seg = m.seg
        shift = seg.shift
        done: list[tuple[int, int]] = []
        # The map first: a holder killed after taking data pages then finds their words (and
        # its repair their memory) where the map holds memory.
        allocate_map(seg, p0, p0 + len(fresh))
        try:
            for a, b, kind in _pagemap.kind_runs(fresh.astype(np.int8)):
                if kind:
                    _fallocate(seg, seg.data_offset + ((p0 + a) << shift), (b - a) << shift, "data")
                    done.append((p0 + a, b - a))
                    if b - a >= 4 and m.data is not None:
                        # One call instead of a page fault per page: a first write of 256 KiB
                        # runs about 1.5x faster. Only a hint: old kernels say EINVAL.
                        try:
                            m.data.madvise(
                                _MADV_POPULATE_WRITE, (p0 + a) << shift, (b - a) << shift
                            )
                        except OSError:
                            pass
        except DiskFullError:
            for page, n in done:
                _stripes.punch(seg.fd, seg.data_offset + (page << shift), n << shift)
            raise

    # ------------------------------------------------------------ zeroing and shrinking

    def zero(self, a: int, b: int, unmap: bool) -> None:
        """Bytes ``[a, b)`` read as zeros from now on; ``unmap``: whole pages give memory back."""
        m = self.check(self.m, a, b - a, writing=True)
        if a == b:
            return
        shift = m.seg.shift
        p0, p1 = a >> shift, ((b - 1) >> shift) + 1
        with self.holding(m, stripes_for(p0, p1), (p0, p1 - p0)):
            m = self.check(m, a, b - a, writing=True)
            if not unmap:
                _check_room(m, p0, p1)
                self._write_pages(m, a, None, b - a, p0, p1)
                return
            seg = m.seg
            page = seg.page_size
            # Bytes past the end of the disk are always zero, so a range that reaches the end
            # covers its last page whole.
            full_lo = -(-a // page)
            full_hi = p1 if b == seg.hq[_F_SIZE] * seg.sector_size else b >> shift
            if full_lo >= full_hi:
                parts = [(p, max(a, p << shift), min(b, (p + 1) << shift)) for p in range(p0, p1)]
                self._zero_and_drop(m, parts, p1, p1)
            else:
                parts = []
                if p0 < full_lo:
                    parts.append((p0, a, full_lo << shift))
                if full_hi < p1:
                    parts.append((full_hi, full_hi << shift, b))
                self._zero_and_drop(m, parts, full_lo, full_hi)

    def _zero_and_drop(
        self, m: Mapping, parts: list[tuple[int, int, int]], lo: int, hi: int
    ) -> None:
        """Zero byte ranges ``(page, start, end)`` in place and drop whole pages ``[lo, hi)``.

        The caller holds all these pages. For lock-free readers it must look like one step:
        every page that will change is made odd before any of them changes, and made even only
        when all are done. Dropped pages of an overlay that could read from the base are
        marked ZEROED, so that neither reads nor a later grow show the base there.
        """
        seg = m.seg
        wv, words, shift = seg.wv, seg.words, seg.shift
        base_pages = m.base_pages
        # Partly covered pages that read as something other than zeros ...
        edits = []
        for p, x, y in parts:
            w = int(snapshot(seg, p, p + 1)[0])
            if w >= _MAPPED or (not w & _ZEROED and p < base_pages and _base_has(m, p)):
                edits.append((p, x, y, w))
        for p, _, _, w in edits:
            if w < _MAPPED:  # ... an overlay's base page: copied up, then partly zeroed
                self._allocate(m, p, np.array([True]))
        # ... and the runs of whole pages whose words change: mapped ones, and in an overlay
        # the ones that read data from the base. Pages that read zeros already stay so (a
        # base is frozen), and are not visited: dropping a huge, mostly empty overlay costs
        # no page map for its empty part.
        runs: list[tuple[int, int]] = []
        p = lo
        while p < hi:
            p = self.scan(m, p, hi, True)
            if p >= hi:
                break
            q = self.scan(m, p, hi, False)
            runs.append((p, q))
            p = q
        for p, q in runs:
            if p < base_pages:
                allocate_map(seg, p, q)
        snaps = [(p, q, snapshot(seg, p, q)) for p, q in runs]
        for p, _, _, w in edits:
            wv[p] = w | 1
        for p, q, ws in snaps:
            words[p:q] = ws | np.uint32(1)
        _stripes.fence()
        for p, x, y, w in edits:
            if w < _MAPPED:
                lo_b, hi_b = p << shift, (p + 1) << shift
                self._fill_from_below(m, p, w, lo_b, hi_b)
            zero_view(m.dv[x:y])
        if hi > lo:
            # Every whole page, mapped or not: memory a cut-short first write may have left in
            # an unmapped page is given back too.
            _stripes.punch(seg.fd, seg.data_offset + (lo << shift), (hi - lo) << shift)
        _stripes.fence()
        for p, q, ws in snaps:
            flags = np.zeros(q - p, dtype=np.uint32)
            if p < base_pages:
                flags[: max(0, base_pages - p)] = _ZEROED
            words[p:q] = _pagemap.done(ws, flags)
        for p, _, _, w in edits:
            wv[p] = L.word_done(w, _MAPPED)

    def resize(self, n: int) -> None:
        """Grow (with zeros) or shrink (dropping the tail for good); every process sees it."""
        m = self.check(self.m, 0, 0, writing=True)
        seg = m.seg
        ss, shift, page = seg.sector_size, seg.shift, seg.page_size
        old_bytes = seg.hq[_F_SIZE] * ss
        new_bytes = n * ss
        first = new_bytes >> shift
        count = max(0, -(-old_bytes // page) - first)
        with self.hold_all(intent=(first, count)):
            m = self.check(m, 0, 0, writing=True)
            seg = m.seg
            hq = seg.hq
            old_bytes = hq[_F_SIZE] * ss
            if new_bytes < old_bytes:
                parts = []
                if new_bytes % page:
                    p = new_bytes >> shift
                    parts.append((p, new_bytes, (p + 1) << shift))
                self._zero_and_drop(m, parts, -(-new_bytes // page), -(-old_bytes // page))
            elif new_bytes > m.cap:
                cap = min(seg.max_pages * page, max(L.align_up(new_bytes, page), 2 * m.cap))
                try:
                    os.ftruncate(seg.fd, seg.data_offset + cap)
                except OSError as e:
                    raise UnknownError(
                        e.errno, f"disk {self.name!r}: cannot grow: {e.strerror}"
                    ) from e
                hq[L.F_CAPACITY] = max(cap, hq[L.F_CAPACITY])
            hq[_F_SIZE] = n
            hq[L.F_GENERATION] = (hq[L.F_GENERATION] + 1) & 0xFFFF_FFFF_FFFF_FFFF  # wraps
        self.remap(m)

    def freeze(self) -> None:
        """Make the disk read-only for good, for every handle in every process."""
        m = self.current()
        if m.seg.hq[_F_FROZEN]:
            self.check(m, 0, 0, writing=False)
            return
        with self.hold_all():
            self.check(m, 0, 0, writing=True)
            m.seg.hq[_F_FROZEN] = 1

    # ------------------------------------------------------------ the map

    def mapped_mask(self, m: Mapping, p: int, q: int) -> Any:
        """Which pages of ``[p, q)`` may hold data (here or in a backing disk)."""
        ws = snapshot(m.seg, p, q)
        mask = ws >= np.uint32(_MAPPED)
        if m.base is not None and p < m.base_pages:
            k = min(q, m.base_pages)
            via = (ws[: k - p] & np.uint32(_MAPPED | _ZEROED)) == 0
            if via.any():
                mask[: k - p] |= via & self.mapped_mask(m.base, p, k)
        return mask

    def scan(self, m: Mapping, start: int, end: int, mapped: bool) -> int:
        """First page in ``[start, end)`` that may hold data (``mapped``) or is surely zero."""
        seg = m.seg
        if m.base is None:
            return _pagemap.scan(seg.fd, seg.words, start, end, mapped)
        p = start
        chunk = 1 << 16
        while p < end:
            if mapped:
                # Jump to the first page that could hold data here or below.
                own = _pagemap.scan(seg.fd, seg.words, p, end, True)
                below = (
                    self.scan(m.base, p, min(end, m.base_pages), True) if p < m.base_pages else end
                )
                p = min(own, below if below < min(end, m.base_pages) else end)
                if p >= end:
                    return end
            q = min(end, p + chunk)
            mask = self.mapped_mask(m, p, q)
            hits = np.flatnonzero(mask == mapped)
            if len(hits):
                return p + int(hits[0])
            p = q
        return end

    def count_own(self) -> int:
        """Pages of this disk that hold data of its own (and memory)."""
        m = self.current()
        seg = m.seg
        pages = -(-(self.size_sectors() * seg.sector_size) // seg.page_size)
        return _pagemap.count_mapped_fd(seg.fd, pages)


_ROOM_CHECKED = 64 << 20  # zeroings that may need this much memory look at /dev/shm first


def _allocated(fd: int, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The byte runs of ``[lo, hi)`` where the file holds memory (SEEK_DATA / SEEK_HOLE).

    SEEK_HOLE walks every page of a dense run on tmpfs: fine for a one-off check, not for the
    repair path (which steps by SEEK_DATA alone)."""
    while lo < hi:
        try:
            data = os.lseek(fd, lo, os.SEEK_DATA)
        except OSError:
            return  # ENXIO: no data at or after lo
        if data >= hi:
            return
        hole = min(hi, os.lseek(fd, data, os.SEEK_HOLE))
        yield data, hole
        lo = max(hole, lo + 1)


def _check_room(m: Mapping, p0: int, p1: int) -> None:
    """Refuse at once a zeroing that keeps pages ``[p0, p1)`` allocated when /dev/shm has not
    the room: it would fill the tmpfs on its way to DiskFullError, for every disk on it, and
    the page map it allocates is never given back. Smaller ones just try."""
    seg = m.seg
    shift = seg.shift
    need = (p1 - p0) << shift
    if need < _ROOM_CHECKED:
        return
    base = seg.data_offset
    for lo, hi in _allocated(seg.fd, base + (p0 << shift), base + (p1 << shift)):
        need -= hi - lo
    st = os.fstatvfs(seg.fd)
    if need > st.f_bavail * st.f_frsize:
        raise DiskFullError(
            errno.ENOSPC,
            f"disk {seg.name!r}: zeroing {need} bytes that must stay allocated needs more than "
            f"the {st.f_bavail * st.f_frsize} bytes free in /dev/shm; nothing was written",
        )


def _py_read_below(m: Mapping, p: int, off: int, end: int, buf: Any) -> int:
    """Fill ``buf`` with bytes ``[off, end)`` of page ``p`` from the disks under overlay
    ``m``, for the python engine's one-page read; 1 when the slow path must do it (a page-map
    page not known to hold memory yet). Frozen disks never change, so their words need no
    second look."""
    b = m.base
    while b is not None:
        seg = b.seg
        if not seg.known[p >> _MAP_SHIFT]:
            return 1
        w = seg.wv[p]
        if w & 1:
            return 1
        if w >= _MAPPED:
            buf[:] = b.dv[off:end]
            return 0
        if w & _ZEROED or b.base is None or p >= b.base_pages:
            break
        b = b.base
    zero_view(memoryview(buf))
    return 0


def _chain_lost(m: Mapping) -> bool:
    """Whether a disk under overlay ``m`` was destroyed (then every call raises, as the native
    engine's do: writes to the overlay's own pages too)."""
    b = m.base
    while b is not None:
        if b.seg.hq[_F_GONE]:
            return True
        b = b.base
    return False


def _base_has(m: Mapping, p: int) -> bool:
    """Whether page ``p`` of ``m``'s base chain may hold data."""
    b = m.base
    while b is not None:
        w = int(snapshot(b.seg, p, p + 1)[0])
        if w >= _MAPPED:
            return True
        if w & _ZEROED or p >= b.base_pages:
            return False
        b = b.base
    return False


def _range_message(name: str, off: int, total: int, ss: int, size: int) -> str:
    if off % ss == 0 and total % ss == 0:
        what = f"sectors [{off // ss}, {(off + total) // ss})"
    else:
        what = f"bytes [{off}, {off + total})"
    return f"{what} lie outside disk {name!r} of {size} sectors"


def _reentry_error(name: str) -> ReentrantCallError:
    return ReentrantCallError(
        f"disk {name!r}: this thread is inside another call on this disk "
        "(a signal handler?); a nested call would wait for itself"
    )


def _lock_error(name: str, rc: int) -> Exception:
    if rc == errno.ENOTRECOVERABLE:
        return CorruptSegmentError(
            f"disk {name!r}: a page lock was left unrecoverable (a holder unlocked it without "
            "repairing); destroy and re-create the disk"
        )
    return UnknownError(rc, f"disk {name!r}: taking a page lock failed: {os.strerror(rc)}")
