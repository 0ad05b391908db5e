"""Functions that run in child processes of the multiprocess tests (importable under spawn)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import shmdisk
from shmdisk import _locks


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


def hold_lock_then_wait(name: str, ready: Any, start: int, length: int) -> None:
    """Take an exclusive page-range lock through the disk's own protocol and never let go."""
    d = shmdisk.connect(name, create=False)
    fd = d._lock_fd()
    _locks.lock(fd, _locks.WRLCK, start, length)
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
