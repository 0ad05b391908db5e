"""Functions the overlay and copy tests run in child processes (importable under spawn)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import shmdisk


def read_all(name: str) -> bytes:
    """Every byte of disk ``name``, read by a fresh handle in this process."""
    with shmdisk.connect(name, create=False) as d:
        buf = bytearray(d.size_sectors * d.sector_size)
        d.read(0, buf)
        return bytes(buf)


def read_with_handle(disk: shmdisk.Disk, sector: int, n_bytes: int) -> bytes:
    """Runs in a pool worker: ``disk`` arrived pickled and reconnected by name."""
    buf = bytearray(n_bytes)
    disk.read(sector, buf)
    return bytes(buf)


def write_with_handle(disk: shmdisk.Disk, sector: int, data: bytes) -> None:
    """Runs in a pool worker: a write through a pickled handle."""
    disk.write(sector, data)


def changes_refused(name: str, ready: Any, frozen: Any) -> list[str]:
    """Connect and write (so the handle's fast paths are warm), wait for the parent to freeze
    the disk, then try every change: the names of what each attempt raised."""
    out = []
    with shmdisk.connect(name, create=False) as d:
        ss = d.sector_size
        d.write(0, b"w" * ss)
        ready.set()
        if not frozen.wait(30):
            return ["parent never froze the disk"]
        attempts = [
            lambda: d.write(0, b"x" * ss),  # a rewrite: the fast path
            lambda: d.write(d.size_sectors - 1, b"x" * ss),  # a first write: the slow path
            lambda: d.write_at(1, b"x"),
            lambda: d.discard(0, 1),
            lambda: d.write_zeroes(0, 1, may_unmap=False),
            lambda: d.resize(d.size_sectors + 8),
            lambda: d.resize(1),
        ]
        for attempt in attempts:
            try:
                attempt()
                out.append("no error")
            except shmdisk.ShmdiskError as e:
                out.append(type(e).__name__)
        out.append(f"read_write={d.get_info().read_write} frozen={d.frozen}")
    return out


def error_after_base_lost(name: str, connected: Any, destroyed: Any) -> list[str]:
    """Connect to an overlay and read it, wait for its base to be destroyed, then report what
    a read of an own page, a read of a base page, a write and a new connect raise."""
    d = shmdisk.connect(name, create=False)
    buf = bytearray(d.sector_size)
    d.read(0, buf)
    d.read(d.size_sectors - 1, buf)
    connected.set()
    if not destroyed.wait(30):
        return ["parent never destroyed the base"]
    out = []
    for attempt in (
        lambda: d.read(0, buf),
        lambda: d.read(d.size_sectors - 1, buf),
        lambda: d.write(0, bytes(buf)),
        lambda: shmdisk.connect(name, create=False),
    ):
        try:
            attempt()
            out.append("no error")
        except shmdisk.ShmdiskError as e:
            out.append(type(e).__name__)
    d.disconnect()
    return out


def stamp(writer: int, page: int, ss: int) -> bytes:
    """Two sectors that only ``writer`` writes into ``page``."""
    return f"writer {writer} page {page:6}\n".encode().ljust(2 * ss, b"=")


def copy_up_writer(name: str, writer: int, pages: int, ready: Any, start: Any) -> None:
    """First writes racing for the same pages: sectors [2w, 2w+2) of every page, in one request
    each, so the writers copy the same base pages up at the same time."""
    with shmdisk.connect(name, create=False) as d:
        ss = d.sector_size
        per_page = d.page_size // ss
        ready.set()
        start.wait(30)
        for p in range(pages):
            d.write(p * per_page + 2 * writer, stamp(writer, p, ss))


def copy_up_reader(
    name: str, base_image: bytes, writers: int, pages: int, ready: Any, stop: Any
) -> int:
    """Read all the pages in one request, over and over, while writers copy them up: each
    two-sector slot must read as the base or as its writer's stamp, never zeros, another
    page's bytes or half of each. Returns how many reads were checked; raises on a bad one."""
    reads = 0
    with shmdisk.connect(name, create=False) as d:
        ss, page = d.sector_size, d.page_size
        slot = 2 * ss
        shape = (pages, page // slot, slot)
        was = np.frombuffer(base_image[: pages * page], np.uint8).reshape(shape)[:, :writers]
        stamps = np.array(
            [
                [np.frombuffer(stamp(j, p, ss), np.uint8) for j in range(writers)]
                for p in range(pages)
            ]
        )
        buf = bytearray(pages * page)
        got = np.frombuffer(buf, np.uint8).reshape(shape)[:, :writers]
        ready.set()
        while not stop.is_set():
            d.read(0, buf)
            good = (got == was).all(axis=2) | (got == stamps).all(axis=2)
            if not good.all():
                p, j = (int(x[0]) for x in np.nonzero(~good))
                raise AssertionError(f"page {p} slot {j}: {bytes(got[p, j, :40])!r}")
            reads += 1
    return reads


def own_page_writer(name: str, writer: int, first: int, n_pages: int, seconds: float) -> int:
    """Write pages [first, first + n_pages) over and over in one request, each time one new
    byte value throughout."""
    done = 0
    with shmdisk.connect(name, create=False) as d:
        page = d.page_size
        buf = bytearray(n_pages * page)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            buf[:] = bytes([(writer * 64 + done) % 251 + 1]) * len(buf)
            d.write_at(first * page, buf)
            done += 1
    return done


def mixed_reader(
    name: str, base_part: bytes, own_first: int, own_pages: int, seconds: float
) -> tuple[int, int]:
    """Read a range of own pages (being rewritten) followed by base pages in one request:
    ``(reads, torn)``, torn counting reads whose own part mixes two writes or whose base part
    is not the base's bytes."""
    reads = torn = 0
    with shmdisk.connect(name, create=False) as d:
        page = d.page_size
        own = own_pages * page
        buf = bytearray(own + len(base_part))
        arr = np.frombuffer(buf, dtype=np.uint8)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            d.read_at(own_first * page, buf)
            reads += 1
            if (arr[:own] != arr[0]).any() or buf[own:] != base_part:
                torn += 1
    return reads, torn


def into_queue(out: Any, fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` and put what it returned (or the exception it raised) on ``out``."""
    try:
        out.put(fn(*args))
    except BaseException as e:  # reported to the parent, which re-raises it
        out.put(e)


def count_stamp(writer: int, count: int, ss: int) -> bytes:
    """The sector a stamping writer puts at the start of each of its pages."""
    return f"writer {writer} count {count:12}\n".encode().ljust(ss, b".")


def stamping_writer(
    name: str, writer: int, pages: list[int], counter: Any, ready: Any, stop: Any
) -> int:
    """Round after round, stamp the round's number on each of ``pages`` in ascending order,
    one request per page; ``counter`` says the last round finished. Returns that round.

    At any instant the writer's pages therefore read, in order, some number ``c`` and then
    ``c - 1`` (one point in time); an image that shows a page after a lower-numbered one
    with a higher number was not taken at one point in time."""
    with shmdisk.connect(name, create=False) as d:
        ss, spp = d.sector_size, d.page_size // d.sector_size
        count = 0
        ready.set()
        while not stop.is_set():
            count += 1
            for p in pages:
                d.write(p * spp, count_stamp(writer, count, ss))
            counter.value = count
    return count
