"""Random requests through every form of the API: lengths, buffer lists, sector and byte
offsets, so each scenario exercises all of them."""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, cast

import numpy as np

import shmdisk

if TYPE_CHECKING:
    from typing_extensions import Buffer


def pick_count(rng: random.Random, pps: int, max_pages: int) -> int:
    """A request length in sectors: mostly short, often a page or two, sometimes long."""
    r = rng.random()
    if r < 0.35:
        return rng.randint(1, pps)
    if r < 0.75:
        return rng.randint(1, 2 * pps)
    return rng.randint(1, max_pages * pps)


def split_views(data: memoryview, sector_size: int, rng: random.Random) -> list[memoryview]:
    """Cut a buffer into a list of whole-sector pieces (the list form of read/write)."""
    n = len(data) // sector_size
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 3)))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [data[a * sector_size : b * sector_size] for a, b in itertools.pairwise(bounds)]


def read_request(
    disk: shmdisk.Disk, start: int, count: int, rng: random.Random, limit: int | None = None
) -> bytearray:
    """Read sectors [start, start+count) through a randomly chosen API form.

    The unaligned form reads a little around the sectors, never past sector ``limit``
    (default: the disk's current size).
    """
    ss = disk.sector_size
    buf = bytearray(count * ss)
    form = rng.randrange(4)
    if form == 0:
        disk.read(start, buf)
    elif form == 1:
        disk.read(start, split_views(memoryview(buf), ss, rng))
    elif form == 2:
        disk.read_at(start * ss, buf)
    else:
        # An unaligned read_at that covers the sectors; the ragged ends are cut off after.
        size = disk.get_info().size_sectors if limit is None else limit
        lead = rng.randrange(1, ss) if start > 0 else 0
        tail = rng.randrange(1, ss) if start + count < size else 0
        big = bytearray(lead + count * ss + tail)
        disk.read_at(start * ss - lead, big)
        buf[:] = big[lead : lead + count * ss]
    return buf


def as_buffer(array: np.ndarray) -> Buffer:
    """The array itself, typed as the buffer it is at run time: numpy's stubs declare
    ``ndarray.__buffer__`` only from Python 3.12 on, and the project's target is 3.11."""
    return cast("Buffer", array)


def write_request(disk: shmdisk.Disk, start: int, data: np.ndarray, rng: random.Random) -> None:
    """Write stamped sectors at ``start`` through a randomly chosen API form."""
    form = rng.randrange(3)
    if form == 0:
        disk.write(start, data)
    elif form == 1:
        disk.write(start, split_views(memoryview(data.data), disk.sector_size, rng))
    else:
        disk.write_at(start * disk.sector_size, as_buffer(data))
