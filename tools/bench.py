#!/usr/bin/env python3
"""Measure shmdisk against what a user would use instead, side by side, in one run.

    python tools/bench.py                 # the full table (about a minute)
    python tools/bench.py --quick         # fewer rounds, smaller sizes
    python tools/bench.py --json          # machine-readable

Compared, on the same machine, in the same run, with the same buffers:
  shmdisk    Disk.read / Disk.write (locks, page map, checks: everything a user gets)
  preadv     os.preadv / os.pwritev on a file in /dev/shm (tmpfs)
  mmap       a raw memoryview copy into/out of a shared mmap of a /dev/shm file, no locks
  shm        multiprocessing.shared_memory, raw memoryview copy, no locks

Every buffer sits 256 bytes past a page boundary and every source/target offset on the device
is page-aligned, for all columns alike: some CPUs copy 4-64 KiB up to 10x slower when source and
destination are 8 or 16 bytes apart modulo 4096, and a benchmark must not compare such luck.
Each figure is the median of several rounds; ratios are shmdisk / alternative.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

import shmdisk

PAGE = 4096
OFFSET = 256  # where every buffer starts relative to a page boundary


def aligned_buffer(n: int) -> memoryview:
    """A writable n-byte buffer starting OFFSET bytes past a page boundary."""
    raw = mmap.mmap(-1, n + 2 * PAGE)
    return memoryview(raw)[OFFSET : OFFSET + n]


def timed(fn: Callable[[], int], rounds: int) -> float:
    """Median operations per second of ``fn`` (which returns how many it did)."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


class Targets:
    """The four devices, each DEV_BYTES long and fully written."""

    def __init__(self, dev_bytes: int) -> None:
        tag = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
        self.dev_bytes = dev_bytes
        self.disk_name = tag
        self.disk = shmdisk.create(tag, dev_bytes // 512)
        self.path = f"/dev/shm/{tag}.file"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, dev_bytes)
        self.map = mmap.mmap(self.fd, dev_bytes)
        self.mv = memoryview(self.map)
        self.shm = shared_memory.SharedMemory(create=True, size=dev_bytes)
        self.shmv = self.shm.buf
        fill = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        for off in range(0, dev_bytes, len(fill)):
            self.disk.write(off // 512, fill)
            self.mv[off : off + len(fill)] = fill
            self.shmv[off : off + len(fill)] = fill

    def close(self) -> None:
        self.disk.disconnect()
        shmdisk.destroy(self.disk_name)
        self.mv.release()
        self.map.close()
        os.close(self.fd)
        os.unlink(self.path)
        self.shmv.release()
        self.shm.close()
        self.shm.unlink()


def device_io(
    t: Targets, size: int, n: int, rounds: int, sequential: bool
) -> dict[str, dict[str, float]]:
    """ops/s of page-aligned reads and writes of ``size`` bytes, random or sequential."""
    if sequential:
        offs = [i * size % t.dev_bytes for i in range(n)]
    else:
        rng = np.random.default_rng(1)
        offs = (rng.integers(0, t.dev_bytes // size, n) * size).tolist()
    sectors = [o // 512 for o in offs]
    buf = aligned_buffer(size)
    disk, fd, mv, shmv = t.disk, t.fd, t.mv, t.shmv
    read, write, preadv, pwritev = disk.read, disk.write, os.preadv, os.pwritev

    def d_read() -> int:
        for s in sectors:
            read(s, buf)
        return n

    def d_write() -> int:
        for s in sectors:
            write(s, buf)
        return n

    def p_read() -> int:
        for o in offs:
            preadv(fd, [buf], o)
        return n

    def p_write() -> int:
        for o in offs:
            pwritev(fd, [buf], o)
        return n

    def m_read(src: memoryview = mv) -> int:
        for o in offs:
            buf[:] = src[o : o + size]
        return n

    def m_write(dst: memoryview = mv) -> int:
        for o in offs:
            dst[o : o + size] = buf
        return n

    return {
        "read": {
            "shmdisk": timed(d_read, rounds),
            "preadv": timed(p_read, rounds),
            "mmap": timed(m_read, rounds),
            "shm": timed(lambda: m_read(shmv), rounds),
        },
        "write": {
            "shmdisk": timed(d_write, rounds),
            "preadv": timed(p_write, rounds),
            "mmap": timed(m_write, rounds),
            "shm": timed(lambda: m_write(shmv), rounds),
        },
    }


def _worker(
    name: str, part: int, parts: int, kind: str, seconds: float, start: Any, out: Any
) -> None:
    """Random 4 KiB I/O on this worker's own slice of the disk; reports ops done."""
    with shmdisk.connect(name, create=False) as d:
        pages = d.get_info().size_sectors * 512 // PAGE // parts
        rng = np.random.default_rng(part)
        sectors = ((rng.integers(0, pages, 100_000) + part * pages) * (PAGE // 512)).tolist()
        buf = aligned_buffer(PAGE)
        op = d.read if kind == "read" else d.write
        start.wait()
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for s in sectors[n % 99_000 : n % 99_000 + 1000]:
                op(s, buf)
            n += 1000
        out.put(n / seconds)


def scaling(t: Targets, seconds: float) -> dict[str, dict[str, float]]:
    """Aggregate ops/s of 1 and 2 processes doing random 4 KiB I/O on disjoint pages."""
    ctx = multiprocessing.get_context("spawn")
    result: dict[str, dict[str, float]] = {}
    for kind in ("read", "write"):
        result[kind] = {}
        for parts in (1, 2):
            start, out = ctx.Event(), ctx.Queue()
            procs = [
                ctx.Process(target=_worker, args=(t.disk_name, i, parts, kind, seconds, start, out))
                for i in range(parts)
            ]
            for p in procs:
                p.start()
            time.sleep(1.0)  # let them import and connect
            start.set()
            total = sum(out.get(timeout=60 + seconds) for _ in procs)
            for p in procs:
                p.join(30)
            result[kind][f"{parts}proc"] = total
    return result


def fmt_rate(v: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{v / 1e9:8.2f} GB/s"
    return f"{v / 1e3:8.0f} k/s "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--seconds", type=float, default=None, help="duration of scaling runs")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else 7
    n_small = 20_000 if args.quick else 100_000
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    dev = 64 << 20

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    say(f"bench: preparing four {dev >> 20} MiB devices")
    t = Targets(dev)
    try:
        say("bench: random 4 KiB I/O")
        small = device_io(t, 4096, n_small, rounds, sequential=False)
        say("bench: sequential 1 MiB I/O")
        big = device_io(t, 1 << 20, 64 if args.quick else 256, rounds, sequential=True)
        say("bench: 1 vs 2 processes")
        scale = scaling(t, seconds)
    finally:
        t.close()

    report = {
        "version": 1,
        "cpu_count": os.cpu_count(),
        "lock_free_reads": shmdisk._locks.LOCK_FREE_READS,
        "random_4k_ops_per_s": small,
        "seq_1m_bytes_per_s": {
            k: {c: v * (1 << 20) for c, v in cols.items()} for k, cols in big.items()
        },
        "two_process_ops_per_s": scale,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    cols = ("shmdisk", "preadv", "mmap", "shm")
    print(
        f"{'workload':<22}" + "".join(f"{c:>14}" for c in cols) + "   shmdisk/preadv  shmdisk/mmap"
    )
    for label, table, unit in (
        ("random 4 KiB read", small["read"], "ops"),
        ("random 4 KiB write", small["write"], "ops"),
        ("1 MiB seq read", report["seq_1m_bytes_per_s"]["read"], "GB/s"),
        ("1 MiB seq write", report["seq_1m_bytes_per_s"]["write"], "GB/s"),
    ):
        row = f"{label:<22}" + "".join(f"{fmt_rate(table[c], unit):>14}" for c in cols)
        vs_p, vs_m = table["shmdisk"] / table["preadv"], table["shmdisk"] / table["mmap"]
        row += f"   {vs_p:12.2f}x  {vs_m:10.2f}x"
        print(row)
    print()
    print(f"{'2 processes, disjoint pages':<30}{'1 proc':>12}{'2 procs':>12}{'scaling':>10}")
    for kind in ("read", "write"):
        one, two = scale[kind]["1proc"], scale[kind]["2proc"]
        print(
            f"{'random 4 KiB ' + kind:<30}{fmt_rate(one, 'ops'):>12}{fmt_rate(two, 'ops'):>12}"
            f"{two / one:9.2f}x"
        )
    print(
        f"\nbuffers at page offset +{OFFSET}; medians of {rounds} rounds; "
        f"lock-free reads: {shmdisk._locks.LOCK_FREE_READS}; cores: {os.cpu_count()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
