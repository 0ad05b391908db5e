"""The page map: which pages hold data, and the per-page sequence counters.

Pure functions over arrays of page-map words (see ``_layout.py`` for the word format), plus the
two scans that also consult the file's holes. Why the holes: the page map is itself sparse in
tmpfs, and *reading* a hole through a shared mapping makes the kernel allocate it. A never-written
stretch of the map is a hole in the file, so ``lseek(SEEK_DATA/SEEK_HOLE)`` tells us where it is
all-unmapped without touching (and thereby allocating) it.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import numpy.typing as npt

from . import _layout as L

Words = npt.NDArray[np.uint32]

_CHUNK = 1 << 16  # words scanned per numpy call: bounded temporary memory


def mapped_mask(words: Words) -> npt.NDArray[np.bool_]:
    return words >= L.MAPPED


def runs(words: Words) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, mapped)`` of equally-mapped pages, in order."""
    n = len(words)
    if n == 0:
        return []
    mask = mapped_mask(words)
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    bounds = [0, *edges.tolist(), n]
    return [(bounds[i], bounds[i + 1], bool(mask[bounds[i]])) for i in range(len(bounds) - 1)]


def kind_runs(kinds: npt.NDArray[np.int8]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, end, kind)`` of equal values, in order."""
    n = len(kinds)
    if n == 0:
        return []
    edges = np.flatnonzero(kinds[1:] != kinds[:-1]) + 1
    bounds = [0, *edges.tolist(), n]
    return [(bounds[i], bounds[i + 1], int(kinds[bounds[i]])) for i in range(len(bounds) - 1)]


def first(words: Words, mapped: bool) -> int:
    """Index of the first word whose mapped flag equals ``mapped``, or -1."""
    if len(words) == 0:
        return -1
    mask = mapped_mask(words)
    if not mapped:
        mask = ~mask
    i = int(mask.argmax())
    return i if mask[i] else -1


def writing(words: Words) -> Words:
    """The words a writer stores before it changes the pages: the counters made odd."""
    return words | np.uint32(1)


def done(words: Words, flags: Words | int) -> Words:
    """The words a writer stores when done: counters one past odd, with ``flags``."""
    seq = ((words | np.uint32(1)) + np.uint32(1)) & np.uint32(L.SEQ_MASK)
    return seq | np.asarray(flags, dtype=np.uint32)


def _seek(fd: int, offset: int, whence: int) -> int | None:
    try:
        return os.lseek(fd, offset, whence)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at or after offset
            return None
        raise


def scan(fd: int, words: Words, start: int, end: int, mapped: bool) -> int:
    """First page in ``[start, end)`` whose mapped flag is ``mapped``; ``end`` if none.

    ``words`` is the page map as mapped in memory; ``fd`` the segment, to find the map's holes.
    """
    p = start
    base = L.MAP_OFFSET
    while p < end:
        off = base + p * L.MAP_WORD_SIZE
        if mapped:
            data = _seek(fd, off, os.SEEK_DATA)
            if data is None:
                return end
            p = max(p, (data - base) // L.MAP_WORD_SIZE)
            if p >= end:
                return end
            off = base + p * L.MAP_WORD_SIZE
        hole = _seek(fd, off, os.SEEK_HOLE)
        stop = end if hole is None else min(end, (hole - base) // L.MAP_WORD_SIZE)
        if stop <= p:
            if not mapped:
                return p  # p's word lies in a hole: never written, so unmapped
            p += 1  # rounding at a hole's edge; cannot normally happen
            continue
        stop = min(stop, p + _CHUNK)
        i = first(words[p:stop], mapped)
        if i >= 0:
            return p + i
        p = stop
    return end


def count_mapped_fd(fd: int, pages: int) -> int:
    """Mapped pages among the first ``pages``, read with pread (allocates nothing)."""
    total = 0
    base = L.MAP_OFFSET
    end = base + pages * L.MAP_WORD_SIZE
    off = base
    while off < end:
        data = _seek(fd, off, os.SEEK_DATA)
        if data is None or data >= end:
            break
        hole = _seek(fd, data, os.SEEK_HOLE)
        stop = end if hole is None else min(end, hole)
        pos = data - (data - base) % L.MAP_WORD_SIZE
        while pos < stop:
            n = min(stop - pos, _CHUNK * L.MAP_WORD_SIZE)
            raw = os.pread(fd, n, pos)
            if not raw:
                break
            chunk = np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.uint32)
            total += int(np.count_nonzero(chunk >= L.MAPPED))
            pos += len(raw)
        off = stop
    return total
