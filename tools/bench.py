#!/usr/bin/env python3
"""Measure shmdisk, both engines, against what a user would use instead: one run, one table.

    python3 tools/bench.py                 # the full table (a minute or two)
    python3 tools/bench.py --quick         # fewer rounds, fewer operations
    python3 tools/bench.py --json          # machine-readable

Compared on the same machine, in the same run, on the same 64 MiB of written data:
  native     Disk.read / Disk.write, the C engine (everything a user gets: checks, locks,
             page map, counters)
  python     the same calls with SHMDISK_NO_EXTENSIONS=1 (the ctypes engine)
  preadv     os.preadv / os.pwritev on a file in /dev/shm (tmpfs)
  mmap       a raw memoryview copy into/out of a shared mmap, no locks, no checks: of the
             disk's own data bytes, so that both columns copy to and from the same memory
             and the ratio is shmdisk's cost alone (two tmpfs files of one size can differ
             by 10-20% in copy speed with where their pages happen to lie)

Every buffer sits 256 bytes past a page boundary and every device offset is page-aligned, for
all columns alike: some CPUs copy 4-64 KiB several times slower when source and destination
are 8 or 16 bytes apart modulo 4096, and a benchmark must not compare such luck. Each engine
runs in a process of its own; within a round the columns are measured one after the other, and
each figure is the median over the rounds, so that noise from the rest of the machine hits
every column alike. Ratios are shmdisk / alternative; the targets are the project's.
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
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

import shmdisk
from shmdisk import _layout as L

PAGE = 4096
OFFSET = 256  # where every buffer starts relative to a page boundary
DEV = 64 << 20
SPAWN = multiprocessing.get_context("spawn")
ENGINES = ("native", "python")

# (label, size, sequential, kind)
WORKLOADS = [
    ("random 4 KiB read", PAGE, False, "read"),
    ("random 4 KiB write", PAGE, False, "write"),
    ("1 MiB seq read", 1 << 20, True, "read"),
    ("1 MiB seq rewrite", 1 << 20, True, "write"),
]
# (workload label, engine, compared with, at least)
TARGETS = [
    ("random 4 KiB write", "native", "preadv", 3.0),
    ("random 4 KiB read", "native", "preadv", 2.0),
    ("1 MiB seq read", "native", "mmap", 0.9),
    ("1 MiB seq rewrite", "native", "mmap", 0.9),
    ("random 4 KiB write", "python", "preadv", 0.6),
    ("random 4 KiB read", "python", "preadv", 0.8),
]


def aligned_buffer(n: int) -> memoryview:
    """A writable n-byte buffer starting OFFSET bytes past a page boundary."""
    raw = mmap.mmap(-1, n + 2 * PAGE)
    return memoryview(raw)[OFFSET : OFFSET + n]


def offsets(size: int, n: int, sequential: bool) -> list[int]:
    if sequential:
        return [i * size % DEV for i in range(n)]
    rng = np.random.default_rng(1)
    return (rng.integers(0, DEV // size, n) * size).tolist()


def rate(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def _shmdisk_rates(name: str, counts: dict[str, int], out: Any) -> None:
    """In a child: ops/s of every workload through Disk.read/write, this process's engine."""
    with shmdisk.connect(name, create=False) as d:
        res = {"engine": shmdisk.ENGINE}
        # Fault in this process's mapping of every page once, as the parent's mmap column
        # is: a first touch costs as much as a 4 KiB request.
        chunk = aligned_buffer(1 << 20)
        for s in range(0, DEV // 512, len(chunk) // 512):
            d.read(s, chunk)
        for label, size, seq, kind in WORKLOADS:
            sectors = [o // 512 for o in offsets(size, counts[label], seq)]
            buf = aligned_buffer(size)
            op = d.read if kind == "read" else d.write
            for s in sectors[:100]:  # warm up: pages and code paths
                op(s, buf)

            def run(op: Any = op, sectors: list[int] = sectors, buf: memoryview = buf) -> int:
                for s in sectors:
                    op(s, buf)
                return len(sectors)

            res[label] = rate(run)
        out.put(res)


def _run_engine(engine: str, name: str, counts: dict[str, int]) -> dict[str, Any]:
    """Start a child with ``engine`` and return its rates."""
    old = os.environ.get("SHMDISK_NO_EXTENSIONS")
    os.environ["SHMDISK_NO_EXTENSIONS"] = "1" if engine == "python" else "0"
    try:
        out = SPAWN.Queue()
        p = SPAWN.Process(target=_shmdisk_rates, args=(name, counts, out))
        p.start()
    finally:
        if old is None:
            del os.environ["SHMDISK_NO_EXTENSIONS"]
        else:
            os.environ["SHMDISK_NO_EXTENSIONS"] = old
    res: dict[str, Any] = out.get(timeout=600)
    p.join(60)
    if res["engine"] != engine:
        raise SystemExit(f"bench: asked for the {engine} engine, the child ran {res['engine']}")
    return res


def _file_rates(fd: int, mv: memoryview, counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """ops/s of every workload through preadv/pwritev on ``fd`` and raw copies in ``mv``."""
    res: dict[str, dict[str, float]] = {"preadv": {}, "mmap": {}}
    for label, size, seq, kind in WORKLOADS:
        offs = offsets(size, counts[label], seq)
        buf = aligned_buffer(size)
        if kind == "read":

            def pv(offs: list[int] = offs, buf: memoryview = buf) -> int:
                for o in offs:
                    os.preadv(fd, [buf], o)
                return len(offs)

            def mm(offs: list[int] = offs, buf: memoryview = buf, size: int = size) -> int:
                for o in offs:
                    buf[:] = mv[o : o + size]
                return len(offs)
        else:

            def pv(offs: list[int] = offs, buf: memoryview = buf) -> int:
                for o in offs:
                    os.pwritev(fd, [buf], o)
                return len(offs)

            def mm(offs: list[int] = offs, buf: memoryview = buf, size: int = size) -> int:
                for o in offs:
                    mv[o : o + size] = buf
                return len(offs)

        res["preadv"][label] = rate(pv)
        res["mmap"][label] = rate(mm)
    return res


def _scaling_worker(
    name: str, part: int, parts: int, kind: str, seconds: float, start: Any, out: Any
) -> None:
    """Random 4 KiB I/O on this worker's own slice of the disk; reports ops/s."""
    with shmdisk.connect(name, create=False) as d:
        pages = DEV // PAGE // parts
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


def scaling(name: str, seconds: float) -> dict[str, dict[str, float]]:
    """Aggregate ops/s of 1 and 2 native processes doing random 4 KiB I/O on disjoint pages."""
    result: dict[str, dict[str, float]] = {}
    for kind in ("read", "write"):
        result[kind] = {}
        for parts in (1, 2):
            start, out = SPAWN.Event(), SPAWN.Queue()
            procs = [
                SPAWN.Process(
                    target=_scaling_worker, args=(name, i, parts, kind, seconds, start, out)
                )
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


def fmt(v: float, label: str) -> str:
    if label.startswith("1 MiB"):
        return f"{v * (1 << 20) / 1e9:7.2f} GB/s"
    return f"{v / 1e3:7.0f} k/s "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 3)")
    ap.add_argument("--seconds", type=float, default=None, help="duration of scaling runs")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    n_small = 20_000 if args.quick else 100_000
    counts = {label: (n_small if size == PAGE else 128 if args.quick else 512)
              for label, size, _, _ in WORKLOADS}  # fmt: skip
    seconds = args.seconds or (1.0 if args.quick else 3.0)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    name = f"bench-{os.getpid()}-{secrets.token_hex(3)}"
    path = f"/dev/shm/{name}.file"
    fill = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    say(f"bench: preparing a {DEV >> 20} MiB disk and a {DEV >> 20} MiB tmpfs file")
    disk = shmdisk.create(name, DEV // 512)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    samples: dict[str, dict[str, list[float]]] = {
        c: {w[0]: [] for w in WORKLOADS} for c in (*ENGINES, "preadv", "mmap")
    }
    try:
        os.ftruncate(fd, DEV)
        for off in range(0, DEV, len(fill)):
            disk.write(off // 512, fill)
            os.pwrite(fd, fill, off)
        # The disk's data bytes, mapped as any process maps them (shmdisk/_layout.py).
        with open(f"/dev/shm/shmdisk.{name}", "r+b") as seg:
            head = L.Header.unpack(seg.read(L.HEADER_SIZE))
            fmap = mmap.mmap(seg.fileno(), DEV, offset=head.data_offset)
        mv = memoryview(fmap)
        warm = aligned_buffer(1 << 20)
        for off in range(0, DEV, len(warm)):
            warm[:] = mv[off : off + len(warm)]  # fault every page in, as the children do
        for r in range(rounds):
            say(f"bench: round {r + 1} of {rounds}")
            for engine in ENGINES:
                res = _run_engine(engine, name, counts)
                for label in samples[engine]:
                    samples[engine][label].append(res[label])
            files = _file_rates(fd, mv, counts)
            for col in ("preadv", "mmap"):
                for label, v in files[col].items():
                    samples[col][label].append(v)
        say("bench: 1 vs 2 processes (native)")
        scale = scaling(name, seconds)
        mv.release()
        fmap.close()
    finally:
        disk.disconnect()
        shmdisk.destroy(name)
        os.close(fd)
        os.unlink(path)

    med = {c: {w: statistics.median(v) for w, v in cols.items()} for c, cols in samples.items()}
    targets = []
    for label, engine, other, least in TARGETS:
        ratio = med[engine][label] / med[other][label]
        targets.append(
            {
                "workload": label,
                "engine": engine,
                "versus": other,
                "target": least,
                "ratio": round(ratio, 2),
                "met": ratio >= least,
            }
        )
    scale_ratio = {k: v["2proc"] / v["1proc"] for k, v in scale.items()}
    for kind, ratio in scale_ratio.items():
        targets.append(
            {
                "workload": f"2 processes, 4 KiB {kind}",
                "engine": "native",
                "versus": "1 process",
                "target": 1.8,
                "ratio": round(ratio, 2),
                "met": ratio >= 1.8,
            }
        )
    report = {
        "version": 1,
        "cpu_count": os.cpu_count(),
        "buffer_page_offset": OFFSET,
        "rounds": rounds,
        "ops_per_s": med,
        "two_process_ops_per_s": scale,
        "targets": targets,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    cols = (*ENGINES, "preadv", "mmap")
    head = f"{'workload':<20}" + "".join(f"{c:>13}" for c in cols)
    print(head + "   native/preadv native/mmap python/preadv")
    for label, *_ in WORKLOADS:
        row = f"{label:<20}" + "".join(f"{fmt(med[c][label], label):>13}" for c in cols)
        n, p = med["native"][label], med["python"][label]
        row += f"   {n / med['preadv'][label]:12.2f}x {n / med['mmap'][label]:10.2f}x"
        row += f" {p / med['preadv'][label]:12.2f}x"
        print(row)
    print()
    print(f"{'2 native processes, disjoint pages':<36}{'1 proc':>11}{'2 procs':>11}{'scaling':>9}")
    for kind in ("read", "write"):
        one, two = scale[kind]["1proc"], scale[kind]["2proc"]
        print(f"{'random 4 KiB ' + kind:<36}{fmt(one, ''):>11}{fmt(two, ''):>11}{two / one:8.2f}x")
    print()
    print("targets")
    for t in targets:
        mark = "met" if t["met"] else "NOT MET"
        print(
            f"  {t['engine']:<7}{t['workload']:<26} vs {t['versus']:<10} >= {t['target']:.1f}x: "
            f"{t['ratio']:.2f}x  {mark}"
        )
    print(
        f"\nbuffers at page offset +{OFFSET}; medians of {rounds} rounds; "
        f"cores: {os.cpu_count()}; load average: {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
