"""Looking at a disk's lock table from outside: who holds which stripe, who waits, what is stuck.

The stress scenarios judge the protocol (``shmdisk/_pageio.py``) by what it leaves in shared
memory, so they read the table the way the kernel does: the first u32 of each stripe's mutex is
its futex word (the holder's thread id, ``FUTEX_WAITERS`` when someone sleeps on it,
``FUTEX_OWNER_DIED`` once the kernel found its holder dead). Reading needs no lock; taking a
stripe goes through the protocol's own ``holding`` so that a dead holder's stripe is repaired
exactly as a caller would repair it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import shmdisk
from shmdisk import _layout as L
from shmdisk import _pageio

_WORDS_PER_SLOT = L.SLOT_SIZE // 4


def futex_words(disk: shmdisk.Disk) -> Any:
    """A copy of the 1024 stripes' futex words (numpy uint32)."""
    seg = disk._io.current().seg
    table = np.frombuffer(
        seg.meta, dtype=np.uint32, count=L.STRIPES * _WORDS_PER_SLOT, offset=L.LOCK_OFFSET
    )
    return table[::_WORDS_PER_SLOT].copy()


def held_by(disk: shmdisk.Disk, tid: int) -> int:
    """How many stripes thread ``tid`` (a single-threaded process: its pid) holds now."""
    return int(np.count_nonzero((futex_words(disk) & L.FUTEX_TID_MASK) == tid))


def has_waiters(disk: shmdisk.Disk, stripe: int) -> bool:
    """Whether someone sleeps in the kernel on ``stripe`` (its FUTEX_WAITERS bit)."""
    return bool(futex_words(disk)[stripe] & L.FUTEX_WAITERS)


def stripe_of_sector(disk: shmdisk.Disk, sector: int) -> int:
    return L.stripe_of(sector * disk.sector_size // disk.page_size)


def stripes_of(disk: shmdisk.Disk, sector: int, count: int) -> list[int]:
    """The stripes a request of ``count`` sectors at ``sector`` takes."""
    ss, page = disk.sector_size, disk.page_size
    p0 = sector * ss // page
    p1 = ((sector + count) * ss - 1) // page + 1
    return _pageio.stripes_for(p0, p1)


def odd_pages(disk: shmdisk.Disk, p0: int, p1: int) -> int:
    """How many pages of ``[p0, p1)`` have an odd counter now (a writer there, or a dead one)."""
    seg = disk._io.current().seg
    return int(np.count_nonzero(_pageio.snapshot(seg, p0, p1) & np.uint32(1)))


def stuck_stripes(disk: shmdisk.Disk, patience: float = 2.0) -> list[int]:
    """Stripes that cannot be taken with ``wait=False`` even after ``patience`` seconds of
    retries: with nobody else at work, every stripe must be free or left by a dead holder
    (which taking it repairs). Call it when no other process should hold anything."""
    io = disk._io
    busy = list(range(L.STRIPES))
    deadline = time.monotonic() + patience
    while busy:
        still = []
        for s in busy:
            try:
                with io.holding(io.current(), [s], (0, 0), wait=False):
                    pass
            except shmdisk.WouldBlockError:
                still.append(s)
            except shmdisk.ShmdiskError:
                still.append(s)  # ENOTRECOVERABLE and the like: stuck for good
        busy = still
        if not busy or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return busy


def whole_disk_held_within(disk: shmdisk.Disk, timeout: float) -> bool:
    """The public proof that no stripe is stuck: ``hold_writes`` takes all 1024 in time."""
    try:
        with disk.hold_writes(timeout=timeout):
            return True
    except shmdisk.LockTimeoutError:
        return False
