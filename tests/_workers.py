"""Functions that run in child processes of the multiprocess tests (importable under spawn)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import shmdisk
from shmdisk import _layout, _pageio


def write_pattern(name: str, sector: int, n_bytes: int, seed: int) -> None:
    with shmdisk.connect(name, create=False) as d:
        d.write(sector, pattern(n_bytes, seed))


def check_pattern(name: str, sector: int, n_bytes: int, seed: int) -> bool:
    with shmdisk.connect(name, create=False) as d:
        buf = bytearray(n_bytes)
        d.read(sector, buf)
        return bytes(buf) == pattern(n_bytes, seed)


def read_with_handle(disk: shmdisk.Disk, sector: int, n_bytes: int) -> bytes:
    """Runs in a pool worker: ``disk`` arrived pickled and reconnected by name."""
    buf = bytearray(n_bytes)
    disk.read(sector, buf)
    return bytes(buf)


def pattern(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def hammer_writes(name: str, writer: int, sector: int, n_bytes: int, seconds: float) -> int:
    """Write the same range over and over, each time filled with one new byte value."""
    done = 0
    with shmdisk.connect(name, create=False) as d:
        end = time.monotonic() + seconds
        buf = bytearray(n_bytes)
        while time.monotonic() < end:
            buf[:] = bytes([(writer * 64 + done) % 251 + 1]) * n_bytes
            d.write(sector, buf)
            done += 1
    return done


def hammer_reads(name: str, sector: int, n_bytes: int, seconds: float) -> tuple[int, int]:
    """Read the range over and over; count reads that mix bytes of two writes (torn)."""
    reads = torn = 0
    with shmdisk.connect(name, create=False) as d:
        end = time.monotonic() + seconds
        buf = bytearray(n_bytes)
        arr = np.frombuffer(buf, dtype=np.uint8)
        while time.monotonic() < end:
            d.read(sector, buf)
            reads += 1
            if (arr != arr[0]).any():
                torn += 1
    return reads, torn


def hold_pages(d: shmdisk.Disk, p0: int, p1: int) -> Any:
    """Take the stripes of pages [p0, p1) through the disk's own protocol, as a writer does
    (intent recorded); a context manager."""
    io = d._io
    return io.holding(io.current(), _pageio.stripes_for(p0, p1), (p0, p1 - p0))


def make_odd(d: shmdisk.Disk, page: int) -> int:
    """Do what a writer does before it changes ``page``: its counter made odd. The old word."""
    wv = d._io.current().seg.wv
    w = int(wv[page])
    wv[page] = _layout.word_writing(w)
    return w


def make_even(d: shmdisk.Disk, page: int, old: int, mapped: bool = True) -> None:
    """Finish what ``make_odd`` began, as the writer would."""
    d._io.current().seg.wv[page] = _layout.word_done(old, _layout.MAPPED if mapped else 0)


def stripe_holder(d: shmdisk.Disk, page: int) -> int:
    """The thread id holding the stripe of ``page`` (0 when free), from its futex word."""
    seg = d._io.current().seg
    return int(seg.li[_layout.stripe_of(page) * (_layout.SLOT_SIZE // 4)] & _layout.FUTEX_TID_MASK)


def hold_lock_then_wait(name: str, ready: Any, start: int, length: int, odd: bool = False) -> None:
    """Take the stripes of pages [start, start + length) and never let go (``odd``: with the
    first page's counter odd, as if killed mid-write)."""
    d = shmdisk.connect(name, create=False)
    with hold_pages(d, start, start + length):
        if odd:
            make_odd(d, start)
            d._io.current().dv[start * d.page_size : start * d.page_size + 8] = b"torn!!!!"
        ready.set()
        time.sleep(3600)


def big_writes_forever(name: str, ready: Any) -> None:
    """Large writes back to back: a SIGKILL lands inside one (holding its lock) most of the time."""
    with shmdisk.connect(name, create=False) as d:
        buf = bytearray(d.get_info().size_sectors * d.sector_size)
        ready.set()
        i = 0
        while True:
            buf[:1] = bytes([i % 256])
            d.write(0, buf)
            i += 1


def wait_for_size(name: str, size: int, timeout: float) -> tuple[int, bytes]:
    """Connect, then poll get_info until another process resizes the disk."""
    with shmdisk.connect(name, create=False) as d:
        end = time.monotonic() + timeout
        while d.get_info().size_sectors != size and time.monotonic() < end:
            time.sleep(0.005)
        info = d.get_info()
        buf = bytearray(512)
        d.read(info.size_sectors - 1, buf)
        return info.size_sectors, bytes(buf)


def see_destroy(name: str, connected: Any, destroyed: Any) -> str:
    """Connect, wait until the parent destroyed the disk, report what the next call raises."""
    d = shmdisk.connect(name, create=False)
    connected.set()
    destroyed.wait(30)
    try:
        d.read(0, bytearray(512))
    except shmdisk.DisconnectedError:
        return "DisconnectedError"
    except Exception as e:  # reported, so the parent can show what went wrong
        return type(e).__name__
    return "no error"


def child_exit_code_after(fn: Any, *args: Any) -> None:
    try:
        ok = fn(*args)
    except BaseException:
        os._exit(2)
    os._exit(0 if ok else 1)


def engine_of_child() -> str | None:
    """The engine a child process runs (the parent picks it with SHMDISK_NO_EXTENSIONS)."""
    return shmdisk.ENGINE


def stamp_writes(name: str, sector: int, n_bytes: int, seconds: float, tag: int) -> int:
    """Write the range over and over; every write is one byte value repeated (tag-dependent)."""
    done = 0
    with shmdisk.connect(name, create=False) as d:
        end = time.monotonic() + seconds
        buf = bytearray(n_bytes)
        while time.monotonic() < end:
            buf[:] = bytes([(tag * 37 + done) % 251 + 1]) * n_bytes
            d.write(sector, buf)
            done += 1
    return done


def hold_all_then_die(name: str, ready: Any, odd_pages: list[int]) -> None:
    """Take every stripe of the disk (as resize does), leave pages odd as a writer killed in
    the middle would, with their first bytes scribbled, and wait to be killed."""
    d = shmdisk.connect(name, create=False)
    io = d._io
    m = io.current()
    with io.holding(m, list(range(_layout.STRIPES)), (0, m.seg.max_pages)):
        for p in odd_pages:
            make_odd(d, p)
            m.dv[p * d.page_size : p * d.page_size + 4] = b"dead"
        ready.set()
        time.sleep(3600)


def die_mid_first_write(name: str, ready: Any, page: int) -> None:
    """A first write into ``page`` killed after its data landed but before its word said so:
    the page holds bytes (and memory) while the map calls it unmapped."""
    d = shmdisk.connect(name, create=False)
    io = d._io
    m = io.current()
    seg = m.seg
    with io.holding(m, _pageio.stripes_for(page, page + 1), (page, 1)):
        _pageio.allocate_map(seg, page, page + 1)
        os.posix_fallocate(seg.fd, seg.data_offset + page * d.page_size, d.page_size)
        make_odd(d, page)
        m.dv[page * d.page_size : (page + 1) * d.page_size] = b"OLD!" * (d.page_size // 4)
        ready.set()
        time.sleep(3600)


def hold_page_and_stop(name: str, ready: Any, page: int) -> None:
    """Take a page's stripe, then stop (SIGSTOP) while holding it."""
    d = shmdisk.connect(name, create=False)
    with hold_pages(d, page, page + 1):
        ready.set()
        os.kill(os.getpid(), 19)  # SIGSTOP
        time.sleep(3600)


def read_only_reader(name: str, ready: Any, stop: Any) -> int:
    """A read-only handle reading the start of the disk in a loop."""
    reads = 0
    with shmdisk.connect(name, read_only=True, create=False) as d:
        buf = bytearray(8 * 4096)
        ready.set()
        while not stop.is_set():
            d.read(0, buf)
            reads += 1
    return reads
