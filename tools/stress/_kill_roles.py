"""The processes of the kill scenario: victims (forked by a nursery, killed) and survivors.

Layout of the kill disk, in sectors (``KillLayout``)::

    [0, R)                        survivor region: written by the survivor writer only, checked
                                  strictly by the readers
    R + v*2S + [0, S), [S, 2S)    writer victim v's two slots of S sectors (up to 128 stripes);
                                  it writes a request at one slot's start, alternating, so its
                                  last completed write stays whole in the other slot while the
                                  next one may be killed half-way
    H + [0, 128 units)            the holders' area: a holder takes the stripes of its first N
                                  units (or all 1024), leaves pages there mid-write, and waits
                                  to be killed

Survivor readers read the survivor region (checked strictly) and windows of the writer slots
(never the holders' area), where they meet the victims' pages.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import stamp

import shmdisk
from shmdisk import _layout as L
from shmdisk import _pageio

from . import _engines
from ._nursery import ChildContext, die_with_parent
from ._requests import pick_count, read_request, write_request

# Victim state (int64 words per victim index).
(
    V_STATE,
    V_SEQ_NOW,
    V_SLOT_NOW,
    V_COUNT_NOW,
    V_SEQ_DONE,
    V_SLOT_DONE,
    V_COUNT_DONE,
    V_WRITER,
    V_HELD,
    V_FIELDS,
) = range(10)
IDLE, WRITING, READING, RESIZING, HOLDING = range(5)
# Survivor state (int64 words per survivor).
(
    S_OPS,
    S_BEAT,
    S_GAP,
    S_HELD_GAP,
    S_TORN,
    S_CORRUPT,
    S_CHECKED,
    S_REPAIRED,
    S_ENGINE,
    S_FIELDS,
) = range(10)
# Run-wide flags: stop, a deliberate hold in progress, how many holds began, stalls counted.
F_STOP, F_HOLDING, F_HOLD_EPOCH, F_MEASURE, F_FIELDS = range(5)
SCRIBBLE = b"dead"


@dataclass(frozen=True)
class KillLayout:
    ss: int
    pps: int  # sectors per page
    region: int  # survivor region, sectors
    slot: int  # one writer slot, sectors
    victims: int  # writer victims
    hold_units: int  # units of the holders' area

    @property
    def unit(self) -> int:
        """Sectors per stripe unit (the pages one stripe covers in a row)."""
        return self.pps << L.STRIPE_SHIFT

    @property
    def slot_units(self) -> int:
        return self.slot // self.unit

    @property
    def hold_start(self) -> int:
        return self.region + self.victims * 2 * self.slot

    @property
    def size(self) -> int:
        return self.hold_start + self.hold_units * self.unit

    def slot_start(self, v: int, s: int) -> int:
        return self.region + (2 * v + s) * self.slot

    def page(self, sector: int) -> int:
        return sector // self.pps


def request_units(rng: random.Random, most: int) -> int:
    """Stripe units a victim's write covers: one, a few, many, or all it may (up to 128)."""
    r = rng.random()
    if r < 0.2 or most == 1:
        return 1
    if r < 0.45:
        return rng.randint(2, min(16, most))
    if r < 0.75:
        return rng.randint(min(17, most), most)
    return most


def writer_victim(
    ctx: ChildContext, name: str, v: int, lay: KillLayout, writer: int, seed: int
) -> None:
    """Large stamped writes at a slot's start (1 to 128 stripes), large reads; forever."""
    state = ctx.shared["vstate"]
    rng = random.Random(seed)
    # A handle inherited through fork (every other victim) must work in the child, and the
    # stripes it takes must be the child's own, released by the kernel when the child dies.
    disk = ctx.inherited if ctx.inherited is not None else shmdisk.connect(name, create=False)
    base = v * V_FIELDS
    seq = 0
    slot = 0
    payload = [
        stamp.make_request(writer, 0, lay.slot_start(v, s), lay.slot, lay.ss) for s in (0, 1)
    ]
    big = bytearray((lay.region + lay.slot) * lay.ss)
    while True:
        action = rng.random()
        if action < 0.7:
            seq += 1
            slot ^= 1
            start = lay.slot_start(v, slot)
            units = request_units(rng, lay.slot_units)
            count = max(1, units * lay.unit - rng.randrange(lay.unit))
            # Restamp in place: only the fields that depend on (seq, count) change.
            arr = payload[slot][: count * lay.ss].view(stamp.sector_dtype(lay.ss))
            csum = stamp.request_checksum(writer, seq, start, count)
            arr["seq"] = seq
            arr["count"] = count
            arr["csum"] = csum
            arr["fill"] = stamp._fill(np.full(count, csum, dtype=np.uint64), arr["sector"])[:, None]
            state[base + V_SEQ_NOW] = seq
            state[base + V_SLOT_NOW] = slot
            state[base + V_COUNT_NOW] = count
            state[base + V_STATE] = WRITING
            disk.write(start, payload[slot][: count * lay.ss])
            state[base + V_STATE] = IDLE
            state[base + V_SLOT_DONE] = slot
            state[base + V_COUNT_DONE] = count
            state[base + V_SEQ_DONE] = seq
        elif action < 0.9:
            # A large read of the survivor region and this victim's slot: lock-free, so a
            # victim killed in it holds nothing.
            state[base + V_STATE] = READING
            disk.read(0, big)
            state[base + V_STATE] = IDLE
        else:
            time.sleep(rng.random() * 0.002)


def resize_victim(
    ctx: ChildContext, name: str, idx: int, lay: KillLayout, tail: int, seed: int
) -> None:
    """Grow the disk by ``tail`` sectors, fill the tail, shrink it away again; forever.

    A resize takes all 1024 stripes, so every writer waits on it; killed in the middle (its
    shrink half-done), it must leave nothing stuck and its intent repaired.
    """
    state = ctx.shared["vstate"]
    rng = random.Random(seed)
    disk = shmdisk.connect(name, create=False)
    base = idx * V_FIELDS
    fill = bytes([0xA5]) * (tail * lay.ss)
    while True:
        state[base + V_STATE] = RESIZING
        disk.resize(lay.size + tail)
        state[base + V_STATE] = IDLE
        disk.write(lay.size, fill)
        state[base + V_STATE] = RESIZING
        disk.resize(lay.size)
        state[base + V_STATE] = IDLE
        # A pause between cycles: mutexes are not fair, and a resizer taking all 1024 stripes
        # again within a millisecond or two can starve a woken waiter on a busy machine.
        time.sleep(0.005 + rng.random() * 0.015)


def holder(
    ctx: ChildContext,
    name: str,
    idx: int,
    lay: KillLayout,
    mode: str,
    units: int,
    odd: list[int],
    fresh: int,
) -> None:
    """Take stripes and stay in the middle of a write until killed.

    ``mode`` 'stripes': the stripes of the first ``units`` units of the holders' area; 'all':
    every stripe (as resize does); both with the intent recorded, the pages ``odd`` left with odd
    counters and their first bytes scribbled, and page ``fresh`` (unmapped) given memory and
    bytes while its word still says unmapped, as a first write cut short. 'hold_writes': every
    stripe through the public ``Disk.hold_writes`` (no page changed).
    """
    state = ctx.shared["vstate"]
    disk = shmdisk.connect(name, create=False)
    base = idx * V_FIELDS
    if mode == "hold_writes":
        with disk.hold_writes():
            state[base + V_HELD] = L.STRIPES
            state[base + V_STATE] = HOLDING
            time.sleep(3600)
        return
    io = disk._io
    m = io.current()
    seg = m.seg
    page = disk.page_size
    p0 = lay.page(lay.hold_start)
    n_pages = units << L.STRIPE_SHIFT
    stripes = list(range(L.STRIPES)) if mode == "all" else _pageio.stripes_for(p0, p0 + n_pages)
    with io.holding(m, stripes, (p0, lay.hold_units << L.STRIPE_SHIFT)):
        for p in odd:
            seg.wv[p] = L.word_writing(int(seg.wv[p]))
        _pageio.allocate_map(seg, fresh, fresh + 1)
        os.posix_fallocate(seg.fd, seg.data_offset + fresh * page, page)
        seg.wv[fresh] = L.word_writing(int(seg.wv[fresh]))
        m.dv[fresh * page : (fresh + 1) * page] = b"OLD!" * (page // 4)
        for p in odd:
            m.dv[p * page : p * page + len(SCRIBBLE)] = SCRIBBLE
        state[base + V_HELD] = len(stripes)
        state[base + V_STATE] = HOLDING
        time.sleep(3600)


def survivor(name: str, idx: int, lay: KillLayout, seed: int, shared: Any, flags: Any) -> None:
    """idx 0 writes small stamped requests into the survivor region; the others read."""
    die_with_parent()
    rng = random.Random(seed)
    disk = shmdisk.connect(name, create=False)
    base = idx * S_FIELDS
    shared[base + S_ENGINE] = _engines.code(_engines.running())
    last = time.monotonic_ns()
    epoch = flags[F_HOLD_EPOCH]
    shared[base + S_BEAT] = last
    seq = 0
    ops = 0
    measuring = flags[F_MEASURE]
    while not flags[F_STOP]:
        if idx == 0:
            count = pick_count(rng, lay.pps, 4)
            start = rng.randrange(0, lay.region - count + 1)
            seq += 1
            write_request(disk, start, stamp.make_request(1, seq, start, count, lay.ss), rng)
        elif rng.random() < 0.6:
            # The survivor region, now and then reaching into the first writer slot: checked
            # strictly up to the region's end.
            start = rng.randrange(0, lay.region)
            end = min(lay.hold_start, start + pick_count(rng, lay.pps, 8))
            buf = read_request(disk, start, end - start, rng, lay.size)
            upto = min(end, lay.region) - start
            v = stamp.check_read(memoryview(buf)[: upto * lay.ss], start, lay.ss)
            shared[base + S_CHECKED] += 1
            if v.torn:
                shared[base + S_TORN] += 1
            if v.corrupt:
                shared[base + S_CORRUPT] += 1
        else:
            # A window of the writers' slots (up to 2 MiB), not checked: a killed write leaves
            # a partial request, and pages a dead writer left odd make this read-write handle
            # take their stripes and repair them.
            start = rng.randrange(lay.region, lay.hold_start)
            count = rng.randint(1, min(lay.hold_start - start, (2 << 20) // lay.ss))
            read_request(disk, start, count, rng, lay.size)
        ops += 1
        now = time.monotonic_ns()
        gap = now - last
        last = now
        # A gap that overlaps a deliberate hold (a holder kept alive until the probes were
        # seen waiting) is reported apart: it measures the scenario, not the library.
        now_epoch = flags[F_HOLD_EPOCH]
        field = S_HELD_GAP if (now_epoch != epoch or flags[F_HOLDING]) else S_GAP
        epoch = now_epoch
        if gap > shared[base + field] and measuring:
            shared[base + field] = gap
        measuring = flags[F_MEASURE]  # a gap counts if it began after the kills began
        shared[base + S_BEAT] = now
        shared[base + S_OPS] = ops
    shared[base + S_REPAIRED] = _engines.repaired_pages()
    disk.disconnect()
