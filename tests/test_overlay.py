"""Copy-on-write overlays and frozen disks, across real processes: bytes, extents, errors, memory.

Every check compares the disk with a model (``_overlay_model.Layer``) byte for byte and extent
for extent; the child processes read and write through their own handles.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import _overlay_workers as w
import numpy as np
import pytest
from _helpers import new_name
from _overlay_model import Layer, pattern, random_ops

import shmdisk
import shmdisk.aio as aio

SPAWN = multiprocessing.get_context("spawn")
SS = 512
MiB = 1 << 20
GiB = 1 << 30

Names = Callable[[str], str]


@pytest.fixture
def names() -> Iterator[Names]:
    """Unique disk names for one test; all destroyed afterwards, the last made first (overlays
    before their bases), whatever the test left."""
    made: list[str] = []

    def new(tag: str = "ovl") -> str:
        made.append(new_name(tag))
        return made[-1]

    yield new
    for n in reversed(made):
        shmdisk.destroy(n, force=True)


def read_all(disk: shmdisk.Disk) -> bytes:
    buf = bytearray(disk.size_sectors * disk.sector_size)
    disk.read(0, buf)
    return bytes(buf)


def in_child(fn: Callable[..., object], *args: object) -> object:
    """Run ``fn(*args)`` in a spawned process (its own handles, its own engine) and return
    what it returned."""
    with SPAWN.Pool(1) as pool:
        return pool.apply_async(fn, args).get(60)


class Child:
    """A spawned process running ``fn(*args)``; ``result()`` waits for what it returned (the
    events and queues it gets must be passed at start, as they are here)."""

    def __init__(self, fn: Callable[..., object], *args: object) -> None:
        self.out = SPAWN.Queue()
        self.proc = SPAWN.Process(target=w.into_queue, args=(self.out, fn, *args))
        self.proc.start()

    def result(self, timeout: float = 60) -> object:
        try:
            value = self.out.get(timeout=timeout)
        finally:
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        if isinstance(value, BaseException):
            raise value
        return value


def make_base(name: str, sectors: int = 2048, sector_size: int = SS) -> tuple[shmdisk.Disk, Layer]:
    """A frozen base of 256 pages (for 512-byte sectors): data with two 10-page holes, one
    page discarded back to a hole and one written with zeros."""
    disk = shmdisk.create(name, sectors, sector_size)
    model = Layer.empty(name, sectors, sector_size)
    page = model.page_size
    pages = sectors * sector_size // page
    for a, b in ((0, 10), (20, pages * 100 // 256), (pages * 110 // 256, pages)):
        blob = pattern((b - a) * page, a)
        disk.write_at(a * page, blob)
        model.write(a * page, blob)
    spp = page // sector_size
    disk.discard(30 * spp, spp)
    model.zero(30 * page, 31 * page, unmap=True)
    disk.write_zeroes(31 * spp, spp, may_unmap=False)
    model.zero(31 * page, 32 * page, unmap=False)
    disk.freeze()
    return disk, model


def check(disk: shmdisk.Disk, model: Layer, child: bool = False) -> None:
    """The disk holds the model's bytes and extents (and, with ``child``, so it does in a
    spawned process)."""
    assert disk.size_sectors == model.size_sectors
    got = read_all(disk)
    if got != model.data:
        diff = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(model.data, np.uint8))
        raise AssertionError(f"{disk.name}: {len(diff)} bytes differ, first at {diff[0]}")
    assert disk.extents() == model.extents()
    assert disk.layer_extents() == model.layer_extents()
    assert disk.mapped_pages() == model.own_pages()
    if child:
        assert in_child(w.read_all, disk.name) == model.data


def check_pages(disk: shmdisk.Disk, model: Layer) -> None:
    """One-page reads (the engines' fast paths), whole and in part, match the model."""
    page = model.page_size
    buf = bytearray(page)
    part = bytearray(700)
    for p in range(model.pages):
        n = min(page, len(model.data) - p * page)
        disk.read_at(p * page, memoryview(buf)[:n])
        assert buf[:n] == model.data[p * page : p * page + n], p
        if n > 1000:
            disk.read_at(p * page + 300, part)
            assert part == model.data[p * page + 300 : p * page + 1000], p


# ------------------------------------------------------------------ creation


def test_overlay_reads_as_its_base_until_written(names: Names) -> None:
    """A new overlay holds the base's bytes and holes, here and in another process, and costs
    only its header."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    assert ovl.get_info() == shmdisk.DiskInfo(True, SS, 2048)
    assert (ovl.backing, ovl.frozen, base.backing, base.frozen) == (base.name, False, None, True)
    check(ovl, model, child=True)
    assert ovl.extents() == base.extents()
    info = shmdisk.inspect(ovl.name)
    assert info.backing == base.name
    assert info.backing_created_ns == shmdisk.inspect(base.name).created_ns
    assert info.mapped_pages == 0
    assert info.allocated_bytes <= 128 * 1024  # header and lock table: no data, no page map
    assert repr(ovl).endswith(f"rw over {base.name!r}>")


def test_creating_an_overlay_takes_constant_time_whatever_the_base_size(names: Names) -> None:
    """An overlay of a 64 GiB base is made as fast as an empty disk (within a generous bound)
    and reads the base's data at its far end."""
    big = shmdisk.create(names("big"), 64 * GiB // SS)
    tail = pattern(MiB, 1)
    big.write(0, pattern(MiB, 2))
    big.write((64 * GiB - MiB) // SS, tail)
    big.freeze()
    small, _ = make_base(names("small"))

    def timed(make: Callable[[str], shmdisk.Disk]) -> float:
        runs = []
        for _ in range(5):
            n = new_name("t")
            t0 = time.perf_counter()
            d = make(n)
            runs.append(time.perf_counter() - t0)
            d.disconnect()
            shmdisk.destroy(n)
        return statistics.median(runs)

    empty = timed(lambda n: shmdisk.create(n, 64 * GiB // SS))
    over_small = timed(lambda n: shmdisk.create(n, backing=small.name))
    over_big = timed(lambda n: shmdisk.create(n, backing=big.name))
    # Generous: a loaded machine may slow any one of them; a copy of 2 MiB of data alone, let
    # alone a walk of the base's 64 GiB page map, would not fit.
    assert over_big <= 5 * empty + 0.02, (empty, over_small, over_big)
    assert over_big <= 5 * over_small + 0.02, (empty, over_small, over_big)
    ovl = shmdisk.create(names("ovl"), backing=big.name)
    buf = bytearray(MiB)
    ovl.read((64 * GiB - MiB) // SS, buf)
    assert buf == tail
    assert ovl.seek_mapped(MiB // SS) == (64 * GiB - MiB) // SS
    assert shmdisk.inspect(ovl.name).allocated_bytes <= 128 * 1024


def test_overlay_geometry_must_fit_its_base(names: Names) -> None:
    """A different sector size, a smaller size, an unfrozen or missing base are refused with
    typed errors, and no disk is left under the new name."""
    base, _ = make_base(names("base"))
    plain = shmdisk.create(names("plain"), 2048)
    new = names("new")
    with pytest.raises(shmdisk.InvalidGeometryError, match="sector size 4096 differs"):
        shmdisk.create(new, sector_size=4096, backing=base.name)
    with pytest.raises(shmdisk.InvalidGeometryError, match="smaller than backing disk"):
        shmdisk.create(new, 2047, backing=base.name)
    with pytest.raises(shmdisk.NotFrozenError, match="not frozen"):
        shmdisk.create(new, backing=plain.name)
    with pytest.raises(shmdisk.DiskNotFoundError):
        shmdisk.create(new, backing=new_name("missing"))
    with pytest.raises(shmdisk.InvalidNameError):
        shmdisk.create(new, backing="no/slashes")
    with pytest.raises(shmdisk.InvalidGeometryError, match="size_sectors is needed"):
        shmdisk.create(new)
    assert not os.path.lexists(shmdisk.segment_path(new))
    with shmdisk.create(new, 2048, 512, backing=base.name) as same:  # explicit and equal: fine
        assert same.get_info().size_sectors == 2048


def test_a_4k_sector_base_gives_4k_sector_overlays(names: Names) -> None:
    """The overlay takes the base's sector size; one-sector writes copy up a whole page."""
    base, bm = make_base(names("base"), sectors=512, sector_size=4096)
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    assert ovl.sector_size == 4096
    random_ops(model, ovl, seed=4, count=40)
    check(ovl, model)


# ------------------------------------------------------------------ copy-up


def test_first_write_copies_up_and_keeps_the_rest_of_the_page(names: Names) -> None:
    """Partial first writes keep the base's bytes around them (or zeros, over base holes and
    discarded pages); the base never changes."""
    base, bm = make_base(names("base"))
    base_bytes = read_all(base)
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    page = model.page_size
    cases = [
        (3 * SS, b"a" * SS),  # one sector inside a base data page
        (30 * page + 4000, b"b" * 200),  # a few bytes across two pages (a hole, then zeros)
        (12 * page + 700, b"c" * 3),  # three bytes in a base hole
        (40 * page + 100, pattern(5 * page, 3)),  # part, four whole pages, part
        (255 * page + 4095, b"d"),  # the very last byte
    ]
    for off, blob in cases:
        ovl.write_at(off, blob)
        model.write(off, blob)
        check(ovl, model)
    # A page discarded in the overlay reads zeros, also around a later one-sector write.
    ovl.discard(50 * 8, 8)
    model.zero(50 * page, 51 * page, unmap=True)
    ovl.write(50 * 8 + 2, b"e" * SS)
    model.write(50 * page + 2 * SS, b"e" * SS)
    check(ovl, model, child=True)
    check_pages(ovl, model)
    assert read_all(base) == base_bytes
    assert ovl.mapped_pages() == 1 + 2 + 1 + 6 + 1 + 1


def test_discard_and_write_zeroes_read_zeros_not_the_base(names: Names) -> None:
    """Discarded and zeroed sectors read as zeros, whole discarded pages cost no memory, and
    later reads, writes and other processes never see the base there again."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    page, spp = model.page_size, model.page_size // SS
    ops: list[tuple[int, int, bool]] = [
        (60 * spp, 4 * spp, True),  # four whole base pages
        (70 * spp + 3, 1, True),  # one sector of a base page: copied up, then zeroed
        (5 * spp + 7, 3 * spp, True),  # part, two whole, part
        (12 * spp, spp, True),  # a base hole: stays a hole
        (80 * spp, 2 * spp, False),  # written zeros: the pages are the overlay's own
        (90 * spp + 1, 2, False),
    ]
    before = shmdisk.inspect(ovl.name).allocated_bytes
    for s, n, unmap in ops[:1]:
        ovl.discard(s, n)
        model.zero(s * SS, (s + n) * SS, unmap)
    # Dropping whole base pages marks the page map only.
    assert shmdisk.inspect(ovl.name).allocated_bytes - before <= 8192
    for s, n, unmap in ops[1:]:
        ovl.write_zeroes(s, n, may_unmap=unmap)
        model.zero(s * SS, (s + n) * SS, unmap)
        check(ovl, model)
    ovl.discard(0, ovl.size_sectors)  # the whole disk
    model.zero(0, len(model.data), unmap=True)
    check(ovl, model, child=True)
    assert shmdisk.inspect(ovl.name).allocated_bytes - before <= 16384
    ovl.write(61 * spp + 1, b"f" * SS)  # a first write into a discarded base page
    model.write(61 * page + SS, b"f" * SS)
    check(ovl, model)


def test_random_operations_match_the_model(names: Names) -> None:
    """Hundreds of random writes, discards and zero-writes at any alignment: byte for byte and
    extent for extent what the model says, in this process and another."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), 3000, backing=base.name)
    model = Layer.over(ovl.name, bm, 3000)
    for seed in range(5):
        random_ops(model, ovl, seed=seed, count=60)
        check(ovl, model)
    check(ovl, model, child=True)


def test_a_larger_overlay_reads_zeros_past_the_base(names: Names) -> None:
    """Past the end of a base (even one ending mid-page, after a shrink) an overlay reads
    zeros, and its first writes there keep the base's last sectors."""
    base = shmdisk.create(names("base"), 16)
    base.write(0, pattern(16 * SS, 5))
    base.resize(9)  # ends one sector into its second page
    base.freeze()
    bm = Layer.empty(base.name, 9)
    bm.write(0, pattern(16 * SS, 5)[: 9 * SS])
    ovl = shmdisk.create(names("ovl"), 40, backing=base.name)
    model = Layer.over(ovl.name, bm, 40)
    check(ovl, model)
    assert read_all(ovl)[9 * SS :] == bytes(31 * SS)
    ovl.write(12, b"g" * SS)  # same page as the base's last sector
    model.write(12 * SS, b"g" * SS)
    ovl.write(30, b"h" * SS)
    model.write(30 * SS, b"h" * SS)
    check(ovl, model, child=True)


# ------------------------------------------------------------------ freeze


def changes(d: shmdisk.Disk) -> list[Callable[[], object]]:
    """Every kind of change to ``d``: rewrites and first writes, discards, resizes."""
    return [
        lambda: d.write(6, b"m" * SS),
        lambda: d.write(d.size_sectors - 1, b"m" * SS),
        lambda: d.write_at(7, b"m"),
        lambda: d.discard(0, 8),
        lambda: d.write_zeroes(0, 8),
        lambda: d.resize(d.size_sectors * 2),
    ]


@pytest.mark.parametrize("kind", ["plain", "overlay"])
def test_freeze_refuses_changes_from_every_handle_in_every_process(names: Names, kind: str) -> None:
    """After freeze, writes, discards and resizes raise IsReadOnlyError from handles opened
    before and after, here and in another process; reads go on, and the bytes never change."""
    if kind == "plain":
        disk = shmdisk.create(names("plain"), 64)
    else:
        base, _ = make_base(names("base"))
        disk = shmdisk.create(names("ovl"), backing=base.name)
    disk.write(5, b"k" * SS)
    other = shmdisk.connect(disk.name, create=False)
    other.write(6, b"l" * SS)  # warm: the next write would take the fast path
    ready, frozen = SPAWN.Event(), SPAWN.Event()
    child = Child(w.changes_refused, disk.name, ready, frozen)
    assert ready.wait(60)
    before = read_all(disk)
    shmdisk.freeze(disk.name)
    frozen.set()
    refused = child.result()
    assert refused == ["IsReadOnlyError"] * 7 + ["read_write=False frozen=True"]
    late = shmdisk.connect(disk.name, create=False)
    for d in (disk, other, late):
        assert d.frozen and d.get_info().read_write is False and not d.read_only
        for change in changes(d):
            with pytest.raises(shmdisk.IsReadOnlyError, match="frozen"):
                change()
        assert read_all(d) == before
    assert shmdisk.inspect(disk.name).frozen
    disk.freeze()  # again: nothing to do
    with shmdisk.connect(disk.name, read_only=True, create=False) as ro:
        with pytest.raises(shmdisk.IsReadOnlyError):
            ro.freeze()
        assert ro.frozen
    other.disconnect()
    late.disconnect()


def test_freeze_through_a_read_only_handle_is_refused(names: Names) -> None:
    """Only a read-write handle may freeze a disk; the disk stays writable."""
    disk = shmdisk.create(names("plain"), 8)
    with (
        shmdisk.connect(disk.name, read_only=True, create=False) as ro,
        pytest.raises(shmdisk.IsReadOnlyError, match="read-only"),
    ):
        ro.freeze()
    disk.write(0, b"n" * SS)
    assert not disk.frozen
    with pytest.raises(shmdisk.DiskNotFoundError):
        shmdisk.freeze(new_name("missing"))


# ------------------------------------------------------------------ destroy and lost bases


def test_destroying_a_base_with_overlays_is_refused_naming_them(names: Names) -> None:
    """destroy() of a base raises DiskBusyError naming its overlays and changes nothing; once
    they are gone it works without force."""
    base, bm = make_base(names("base"))
    ovls = sorted([names("ovl"), names("ovl")])
    for n in ovls:
        shmdisk.create(n, backing=base.name).disconnect()
    with pytest.raises(shmdisk.DiskBusyError) as info:
        shmdisk.destroy(base.name)
    assert info.value.errno == 16 and isinstance(info.value, OSError)
    assert sorted(info.value.overlays) == ovls  # type: ignore[attr-defined]
    assert all(n in str(info.value) for n in ovls)
    assert read_all(base) == bm.data
    # An overlay of an overlay keeps its own base busy, not the base under it.
    mid = shmdisk.connect(ovls[0], create=False)
    mid.freeze()
    top = shmdisk.create(names("top"), backing=mid.name)
    with pytest.raises(shmdisk.DiskBusyError) as info:
        shmdisk.destroy(mid.name)
    assert info.value.overlays == [top.name]  # type: ignore[attr-defined]
    top.disconnect()
    shmdisk.destroy(top.name)
    mid.disconnect()
    for n in ovls:
        shmdisk.destroy(n)
    shmdisk.destroy(base.name)
    assert base.name not in shmdisk.list_disks()


def test_forced_destroy_leaves_overlays_a_typed_error_everywhere(names: Names) -> None:
    """destroy(force=True) removes a busy base; every handle of its overlays, in every process,
    then raises BackingLostError (never a crash or wrong data), and the overlays can be
    destroyed."""
    base, _ = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    ovl.write(0, b"o" * SS)  # one own page; the last page still reads the base
    connected, destroyed = SPAWN.Event(), SPAWN.Event()
    child = Child(w.error_after_base_lost, ovl.name, connected, destroyed)
    assert connected.wait(60)
    shmdisk.destroy(base.name, force=True)
    destroyed.set()
    assert child.result() == ["BackingLostError"] * 4
    assert base.name not in shmdisk.list_disks()
    buf = bytearray(SS)
    for attempt in (
        lambda: ovl.read(0, buf),
        lambda: ovl.read(ovl.size_sectors - 1, buf),
        lambda: ovl.read_at(1, buf),
        lambda: ovl.write(0, bytes(buf)),
        lambda: ovl.discard(0, 1),
        lambda: ovl.extents(),
        lambda: shmdisk.connect(ovl.name, create=False),
        lambda: shmdisk.copy(ovl.name, new_name("cp")),
    ):
        with pytest.raises(shmdisk.BackingLostError):
            attempt()
    assert isinstance(shmdisk.BackingLostError("x"), shmdisk.DisconnectedError)
    assert shmdisk.inspect(ovl.name).backing == base.name
    ovl.disconnect()
    shmdisk.destroy(ovl.name)
    assert ovl.name not in shmdisk.list_disks()


def test_a_base_re_created_under_its_name_is_not_taken_for_the_old_one(names: Names) -> None:
    """An overlay whose base was destroyed and made again under the same name (same size,
    same bytes, frozen) raises BackingLostError, on connect and on open handles."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    base.disconnect()
    shmdisk.destroy(base.name, force=True)
    again = shmdisk.create(base.name, bm.size_sectors)
    again.write(0, bytes(bm.data))
    again.freeze()
    with pytest.raises(shmdisk.BackingLostError, match="another disk now"):
        shmdisk.connect(ovl.name, create=False)
    with pytest.raises(shmdisk.BackingLostError):
        ovl.read(0, bytearray(SS))
    # The new base is not held busy by the old one's overlay.
    again.disconnect()
    shmdisk.destroy(again.name)


# ------------------------------------------------------------------ chains


def test_a_chain_of_four_layers_reads_each_layer_exactly(names: Names) -> None:
    """base <- l1 <- l2 <- l3 (larger) <- l4, each frozen in turn after random changes: every
    layer reads its model in this process and another, extents say which layer holds what,
    and destroy refuses a middle layer."""
    base, model = make_base(names("base"))
    layers = [base]
    models = [model]
    for depth in range(1, 5):
        size = 2600 if depth == 3 else None
        d = shmdisk.create(names(f"l{depth}"), size, backing=layers[-1].name)
        m = Layer.over(d.name, models[-1], size)
        check(d, m)
        random_ops(m, d, seed=10 + depth, count=50)
        check(d, m)
        if depth < 4:
            d.freeze()
        layers.append(d)
        models.append(m)
    for d, m in zip(layers, models, strict=True):
        check(d, m, child=d is layers[-1])
        check_pages(d, m)
    top = layers[-1].layer_extents()
    assert {x.layer for x in top} == {None, 0, 1, 2, 3, 4}
    assert {x.disk for x in top if x.layer is not None} == {d.name for d in layers}
    with pytest.raises(shmdisk.DiskBusyError) as info:
        shmdisk.destroy(layers[2].name)
    assert info.value.overlays == [layers[3].name]  # type: ignore[attr-defined]


def test_a_chain_deeper_than_the_limit_is_refused(names: Names) -> None:
    """Overlays may stack 16 deep; the 17th is refused with a clear error and leaves nothing."""
    top = shmdisk.create(names("l0"), 8)
    top.write(0, b"p" * SS)
    for depth in range(1, 17):
        top.freeze()
        top.disconnect()
        top = shmdisk.create(names(f"l{depth}"), backing=top.name)
    assert bytes(read_all(top)[:SS]) == b"p" * SS
    top.freeze()
    new = names("l17")
    with pytest.raises(shmdisk.ShmdiskError, match="deeper than 16"):
        shmdisk.create(new, backing=top.name)
    assert not os.path.lexists(shmdisk.segment_path(new))
    top.disconnect()


# ------------------------------------------------------------------ concurrency


def test_requests_over_own_and_base_pages_are_atomic_across_processes(names: Names) -> None:
    """Reads spanning pages being rewritten and pages read from the base never show half of a
    write, nor anything but the base's bytes where the base shows through."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    page, first, n = bm.page_size, 40, 6
    ovl.write_at(first * page, bytes(n * page))
    base_part = bytes(bm.data[(first + n) * page : (first + n + 4) * page])
    seconds = 1.5
    with SPAWN.Pool(4) as pool:
        writers = [
            pool.apply_async(w.own_page_writer, (ovl.name, i, first, n, seconds)) for i in range(2)
        ]
        readers = [
            pool.apply_async(w.mixed_reader, (ovl.name, base_part, first, n, seconds))
            for _ in range(2)
        ]
        writes = sum(r.get(60) for r in writers)
        results = [r.get(60) for r in readers]
    reads, torn = sum(r for r, _ in results), sum(t for _, t in results)
    assert writes > 50 and reads > 50, (writes, reads)
    assert torn == 0, f"{torn} torn reads of {reads}"


def test_racing_first_writes_copy_each_page_up_once_and_atomically(names: Names) -> None:
    """Four processes make first writes into the same base pages at once while another reads
    them: no write is lost, and no read sees zeros or half a write where the base was."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    pages, writers = 256, 4
    start, stop = SPAWN.Event(), SPAWN.Event()
    ready = [SPAWN.Event() for _ in range(writers + 1)]
    reader = Child(w.copy_up_reader, ovl.name, bytes(bm.data), writers, pages, ready[0], stop)
    children = [
        Child(w.copy_up_writer, ovl.name, j, pages, ready[j + 1], start) for j in range(writers)
    ]
    try:
        assert all(e.wait(60) for e in ready)
        start.set()
        for c in children:
            c.result()
    finally:
        stop.set()
    reads = reader.result()
    assert isinstance(reads, int) and reads > 0
    for p in range(pages):
        for j in range(writers):
            model.write(p * model.page_size + 2 * j * SS, w.stamp(j, p, SS))
    check(ovl, model)


# ------------------------------------------------------------------ the map, resize


def expected_seek(model: Layer, s: int, mapped: bool) -> int:
    """What seek_mapped (``mapped``) or seek_unmapped says at sector ``s``, from the model."""
    for x in model.extents():
        if x.sector + x.n_sectors > s and x.mapped == mapped:
            return max(s, x.sector)
    return model.size_sectors


def test_seeks_and_extents_see_through_to_the_base(names: Names) -> None:
    """seek_mapped and seek_unmapped at every sector, and extents over any range, count the
    base's data and not what the overlay discarded."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), 2300, backing=base.name)
    model = Layer.over(ovl.name, bm, 2300)
    random_ops(model, ovl, seed=21, count=40)
    for s in range(0, model.size_sectors + 2):
        if s >= model.size_sectors:
            assert ovl.seek_mapped(s) == ovl.seek_unmapped(s) == s
            continue
        assert ovl.seek_mapped(s) == expected_seek(model, s, True), s
        assert ovl.seek_unmapped(s) == expected_seek(model, s, False), s
    full = model.extents()
    for a, b in ((0, 2300), (5, 5), (7, 1999), (1000, 1001)):
        got = ovl.extents(a, b)
        assert sum(x.n_sectors for x in got) == b - a
        for x in got:
            assert all(
                x.mapped == f.mapped
                for f in full
                if f.sector < x.sector + x.n_sectors and x.sector < f.sector + f.n_sectors
            )


def test_seeks_jump_the_holes_of_a_64_gib_chain_quickly(names: Names) -> None:
    """Over a 64 GiB base with data only at its ends, an overlay's seeks and extents find the
    far data at once, and discarding part or all of it costs no data memory, nor a page map
    for the 64 GiB."""
    size = 64 * GiB // SS
    base = shmdisk.create(names("base"), size)
    base.write(0, pattern(MiB, 8))
    base.write(size - 2048, pattern(MiB, 9))
    base.freeze()
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    ovl.write(size // 2, b"t" * SS)
    t0 = time.perf_counter()
    assert ovl.seek_mapped(2048) == size // 2
    assert ovl.seek_mapped(size // 2 + 8) == size - 2048
    assert ovl.seek_unmapped(0) == 2048
    assert [tuple(x) for x in ovl.extents()] == [
        (0, 2048, True),
        (2048, size // 2 - 2048, False),
        (size // 2, 8, True),
        (size // 2 + 8, size // 2 - 2048 - 8, False),
        (size - 2048, 2048, True),
    ]
    assert time.perf_counter() - t0 < 5.0
    ovl.discard(0, 2048)
    assert ovl.seek_mapped(0) == size // 2
    assert shmdisk.inspect(ovl.name).allocated_bytes <= 256 * 1024
    # Dropping all of it marks only the pages that read data: no page map for the 64 GiB.
    t0 = time.perf_counter()
    ovl.discard(0, size)
    assert time.perf_counter() - t0 < 5.0
    assert ovl.extents() == [shmdisk.Extent(0, size, False)]
    assert shmdisk.inspect(ovl.name).allocated_bytes <= 256 * 1024
    buf = bytearray(MiB)
    ovl.read(size - 2048, buf)
    assert buf == bytes(MiB)
    ovl.resize(0)
    ovl.resize(size)
    assert ovl.seek_mapped(0) == size


def test_resizing_an_overlay_never_shows_the_base_again(names: Names) -> None:
    """Growing reads zeros past the base; after a shrink (mid-page or on a page boundary) and a
    grow, the dropped range reads zeros, never the base's old bytes."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    for size in (3000, 1001, 2048, 640, 2500, 0, 2048):
        ovl.resize(size)
        model.resize(size)
        check(ovl, model)
        if size:
            ovl.write(size - 1, b"u" * SS)
            model.write((size - 1) * SS, b"u" * SS)
    check(ovl, model, child=True)
    assert read_all(base) == bm.data


# ------------------------------------------------------------------ everything else on overlays


def test_an_overlay_handle_pickles_to_pool_workers(names: Names) -> None:
    """A Disk of an overlay handed to ProcessPoolExecutor workers reads the base and its own
    pages there, and writes land in the overlay only."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    random_ops(model, ovl, seed=31, count=20)
    with ProcessPoolExecutor(2, mp_context=SPAWN) as ex:
        starts = [0, 512, 1024, 1536]
        parts = list(ex.map(w.read_with_handle, [ovl] * 4, starts, [512 * SS] * 4))
        assert b"".join(parts) == model.data
        writes = [(100, b"v" * SS), (1000, b"x" * 2 * SS)]
        list(ex.map(w.write_with_handle, [ovl] * 2, *zip(*writes, strict=True)))
    for s, blob in writes:
        model.write(s * SS, blob)
    check(ovl, model)
    assert read_all(base) == bm.data


@pytest.mark.skipif(not shutil.which("nbdinfo"), reason="needs nbdinfo")
def test_nbd_block_status_and_reads_of_an_overlay(names: Names) -> None:
    """Served over NBD, an overlay's base:allocation (nbdinfo --map) reports its data and the
    base's, not what it discarded, and nbdcopy reads its bytes; once its base is gone, requests
    fail with EIO and the server goes on."""
    from shmdisk.nbd import NBDServer

    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), 2600, backing=base.name)
    model = Layer.over(ovl.name, bm, 2600)
    random_ops(model, ovl, seed=41, count=30)
    sockdir = tempfile.mkdtemp(prefix="nbd", dir="/tmp")  # socket paths are short
    try:
        with NBDServer([ovl.name], socket_path=os.path.join(sockdir, "s")) as srv:
            out = subprocess.run(
                ["nbdinfo", "--map", "--json", srv.uri()], capture_output=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            data = [(e["offset"], e["length"]) for e in json.loads(out.stdout) if e["type"] == 0]
            want = [(x.sector * SS, x.n_sectors * SS) for x in model.extents() if x.mapped]
            assert data == want
            image = os.path.join(sockdir, "out.img")
            if shutil.which("nbdcopy"):
                done = subprocess.run(
                    ["nbdcopy", srv.uri(), image], capture_output=True, timeout=60
                )
                assert done.returncode == 0, done.stderr
                with open(image, "rb") as f:
                    assert f.read() == model.data
            # The base destroyed by force: requests fail with an error, the server lives on.
            shmdisk.destroy(base.name, force=True)
            lost = subprocess.run(
                ["nbdinfo", "--map", srv.uri()], capture_output=True, timeout=60, text=True
            )
            assert lost.returncode != 0 and "Input/output error" in lost.stderr, lost
            alive = subprocess.run(
                ["nbdinfo", "--size", srv.uri()], capture_output=True, timeout=60, text=True
            )
            assert alive.returncode == 0 and int(alive.stdout) == len(model.data), alive
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def data_ranges(path: str) -> list[tuple[int, int]]:
    """The byte ranges of a file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, end))
            pos = end
    return out


def test_export_of_an_overlay_is_one_flat_image_with_its_holes(
    names: Names, tmp_path: object
) -> None:
    """`shmdisk export` of an overlay writes its bytes as one raw image, base included, with
    holes where neither it nor the base has data."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), 2600, backing=base.name)
    model = Layer.over(ovl.name, bm, 2600)
    ovl.discard(0, 80)  # ten base pages
    model.zero(0, 80 * SS, unmap=True)
    random_ops(model, ovl, seed=51, count=20)
    image = os.path.join(str(tmp_path), "ovl.img")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(shmdisk.__file__))}
    done = subprocess.run(
        [sys.executable, "-m", "shmdisk", "export", "--json", ovl.name, image],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    with open(image, "rb") as f:
        assert f.read() == model.data
    holes = [x for x in model.extents() if not x.mapped]
    for a, b in data_ranges(image):
        assert not any(a < (x.sector + x.n_sectors) * SS and x.sector * SS < b for x in holes), (
            a,
            b,
        )
    summary = json.loads(done.stdout)
    assert summary["image_bytes"] == len(model.data)


def test_the_file_view_and_aio_work_on_an_overlay(names: Names) -> None:
    """Disk.open and shmdisk.aio read an overlay as its base until written, write at any offset
    keeping the base's bytes around, and seek holes and data through to the base."""
    base, bm = make_base(names("base"))
    ovl = shmdisk.create(names("ovl"), backing=base.name)
    model = Layer.over(ovl.name, bm)
    page = model.page_size
    with ovl.open("r+b") as f:
        f.seek(page - 3)
        f.write(b"across a page boundary")
        f.seek(15 * page + 1)  # inside a base hole
        f.write(b"in a hole")
    model.write(page - 3, b"across a page boundary")
    model.write(15 * page + 1, b"in a hole")
    with ovl.open("rb") as f:
        assert f.read() == model.data
        assert f.seek(0, os.SEEK_HOLE) == 10 * page
        assert f.seek(10 * page, os.SEEK_DATA) == 15 * page
        assert f.seek(16 * page, os.SEEK_DATA) == 20 * page

    async def main() -> None:
        copy_name = names("aio")
        async with await aio.create(copy_name, backing=base.name) as adisk:
            assert adisk.backing == base.name and not adisk.frozen
            buf = bytearray(len(bm.data))
            await adisk.read(0, buf)
            assert buf == bm.data
            await adisk.write(3, b"y" * SS)
            await adisk.discard(64 * 8, 8)
            await adisk.write_at(7 * page + 5, b"z" * 9000)
            am = Layer.over(copy_name, bm)
            am.write(3 * SS, b"y" * SS)
            am.zero(64 * page, 65 * page, unmap=True)
            am.write(7 * page + 5, b"z" * 9000)
            await adisk.read(0, buf)
            assert buf == am.data
            assert await adisk.layer_extents() == am.layer_extents()
            assert await adisk.extents() == am.extents()
            await adisk.freeze()
            assert adisk.frozen
            with pytest.raises(shmdisk.IsReadOnlyError):
                await adisk.write(3, b"y" * SS)
        with pytest.raises(shmdisk.DiskBusyError):
            top = await aio.create(names("aio"), backing=copy_name)
            await aio.destroy(copy_name)
        await top.disconnect()
        await aio.destroy(copy_name, force=True)

    asyncio.run(main())


# ------------------------------------------------------------------ memory


def test_eight_overlays_of_a_1_gib_base_cost_what_they_write(names: Names) -> None:
    """Eight overlays of a full 1 GiB base, each writing 1% of its pages (whole pages and
    single sectors), take no more than the base plus 10% of memory in all."""
    base = shmdisk.create(names("base"), GiB // SS)
    chunk = bytearray(pattern(32 * MiB, 10))
    for i, off in enumerate(range(0, GiB, 32 * MiB)):
        chunk[:8] = i.to_bytes(8, "little")
        base.write_at(off, chunk)
    base.freeze()
    page = base.page_size
    pages = GiB // page
    rng = np.random.default_rng(11)
    overlays = []
    for i in range(8):
        ovl = shmdisk.create(names("ovl"), backing=base.name)
        touched = rng.choice(pages, pages // 100, replace=False)
        for k, p in enumerate(touched.tolist()):
            if k % 2:
                ovl.write_at(p * page, bytes([i + 1]) * page)
            else:
                ovl.write_at(p * page + 1024, bytes([i + 1]) * SS)  # copies the page up
        overlays.append((ovl, touched))
    base_mem = shmdisk.inspect(base.name).allocated_bytes
    assert base_mem >= GiB
    own = [shmdisk.inspect(o.name).allocated_bytes for o, _ in overlays]
    for mem, (_, touched) in zip(own, overlays, strict=True):
        # The pages written, and at most a full page map (1 MiB) and the header.
        assert mem <= len(touched) * page + MiB + 128 * 1024, mem
    assert base_mem + sum(own) <= base_mem * 1.10, (base_mem, own)
    # The bytes are right, in the pages written and around them.
    expected = bytearray(page)
    got = bytearray(page)
    for i, (ovl, touched) in enumerate(overlays):
        for k, p in enumerate(touched[:64].tolist()):
            base.read_at(p * page, expected)
            if k % 2:
                expected[:] = bytes([i + 1]) * page
            else:
                expected[1024 : 1024 + SS] = bytes([i + 1]) * SS
            ovl.read_at(p * page, got)
            assert got == expected
        assert ovl.mapped_pages() == len(touched)
