"""Overlays and copies against what a user would do instead, side by side, in one run.

    python benchmarks/bench_overlay.py                # the table (about a minute)
    python benchmarks/bench_overlay.py --quick        # fewer rounds and reads
    python benchmarks/bench_overlay.py --json         # machine-readable

Compared, on the same machine, in the same run, with the same data:

* A writable copy of a disk, from a 1 GiB base full of data and from a 64 GiB base holding
  1 GiB (16 MiB at the start of every GiB): ``shmdisk.create(name, backing=BASE)`` (an
  overlay), ``shmdisk.copy(BASE, name)``, and ``cp --sparse=always`` of a tmpfs file holding
  the same bytes (the command a user of plain files would run). Times; the ratio is how many
  times faster shmdisk is.
* Random 4 KiB reads (page-aligned offsets, one read per call) through an overlay of a full
  1 GiB base that has written every other 64 KiB itself, so that half of the pages come from
  the base, against the same reads of a plain disk with the same bytes, in alternating
  batches of 5000; under both engines (the python one in a child process with
  ``SHMDISK_NO_EXTENSIONS=1``). Target: 0.8x.
* ``shmdisk.copy`` of a 1 GiB disk holding 256 MiB (4 MiB at the start of every 16 MiB)
  against ``cp --sparse=always`` of a tmpfs file with the same bytes. Target: 1.0x.

Every buffer sits 256 bytes past a page boundary (some CPUs copy up to 10x slower when source
and destination are a few bytes apart modulo 4096: a benchmark must not compare such luck).
Each figure is the median of ``--rounds`` rounds. Disks and files are removed at the end, also
after an error or Ctrl-C; the tmpfs files live in a directory of their own in /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

import shmdisk

PAGE = 4096
OFFSET = 256  # where every buffer starts relative to a page boundary
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SS = 512


def aligned_buffer(n: int) -> memoryview:
    """A writable n-byte buffer starting OFFSET bytes past a page boundary."""
    raw = mmap.mmap(-1, n + 2 * PAGE)
    return memoryview(raw)[OFFSET : OFFSET + n]


class Scratch:
    """Names of disks and a tmpfs directory for one run; ``close`` removes everything."""

    def __init__(self) -> None:
        self.tag = f"bench-ovl-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/dev/shm")
        self.names: list[str] = []
        self.block = aligned_buffer(16 * MiB)
        self.block[:] = np.random.default_rng(0).integers(0, 256, 16 * MiB, np.uint8).tobytes()

    def name(self, what: str) -> str:
        self.names.append(f"{self.tag}-{what}-{len(self.names)}")
        return self.names[-1]

    def path(self, what: str) -> str:
        return os.path.join(self.dir, what)

    def disk_with(self, size: int, runs: list[tuple[int, int]]) -> shmdisk.Disk:
        """A disk of ``size`` bytes holding random bytes in ``runs`` (offset, length)."""
        disk = shmdisk.create(self.name("disk"), size // SS)
        for off, n in runs:
            for at in range(off, off + n, len(self.block)):
                k = min(len(self.block), off + n - at)
                disk.write_at(at, self.block[:k])
        return disk

    def file_with(self, size: int, runs: list[tuple[int, int]]) -> str:
        """A sparse tmpfs file with the same bytes as ``disk_with(size, runs)``."""
        path = self.path(f"file-{len(os.listdir(self.dir))}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            for off, n in runs:
                for at in range(off, off + n, len(self.block)):
                    k = min(len(self.block), off + n - at)
                    os.pwrite(fd, self.block[:k], at)
        finally:
            os.close(fd)
        return path

    def close(self) -> None:
        for name in reversed(self.names):  # overlays before their bases
            shmdisk.destroy(name, force=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def scratch() -> Iterator[Scratch]:
    s = Scratch()
    try:
        yield s
    finally:
        s.close()


def cp_sparse(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


# ------------------------------------------------------------------ the workloads


def writable_copies(
    s: Scratch, size: int, runs: list[tuple[int, int]], rounds: int
) -> dict[str, float]:
    """Seconds to get a writable copy of a frozen disk: overlay, shmdisk.copy, cp --sparse,
    alternating within each round so that noise from other work hits them alike."""
    base = s.disk_with(size, runs)
    base.freeze()
    src = s.file_with(size, runs)
    dst = s.path("cp-dst")

    def once(make: Callable[[str], shmdisk.Disk]) -> float:
        name = s.name("copy")
        t0 = time.perf_counter()
        make(name).disconnect()
        took = time.perf_counter() - t0
        shmdisk.destroy(name)
        return took

    def cp_once() -> float:
        t0 = time.perf_counter()
        cp_sparse(src, dst)
        took = time.perf_counter() - t0
        os.unlink(dst)
        return took

    times: dict[str, list[float]] = {"overlay": [], "copy": [], "cp": []}
    for _ in range(rounds):
        times["overlay"].append(once(lambda n: shmdisk.create(n, backing=base.name)))
        times["copy"].append(once(lambda n: shmdisk.copy(base.name, n)))
        times["cp"].append(cp_once())
    base.disconnect()
    shmdisk.destroy(base.name)
    os.unlink(src)
    return {k: statistics.median(v) for k, v in times.items()}


def read_rates(rounds: int, n: int) -> dict[str, float]:
    """Random 4 KiB reads per second: an overlay with half its pages from its base, and a
    plain disk with the same bytes."""
    with scratch() as s:
        base = s.disk_with(GiB, [(0, GiB)])
        base.freeze()
        ovl = shmdisk.create(s.name("ovl"), backing=base.name)
        other = aligned_buffer(64 * KiB)
        other[:] = bytes(reversed(bytes(s.block[: 64 * KiB])))
        for off in range(0, GiB, 128 * KiB):  # every other 64 KiB is the overlay's own
            ovl.write_at(off, other)
        plain = shmdisk.copy(ovl.name, s.name("plain"))
        rng = np.random.default_rng(1)
        offs = (rng.integers(0, GiB // PAGE, n) * PAGE).tolist()
        buf = aligned_buffer(PAGE)

        # Batches of the two alternate, so that noise from other work on the machine (which
        # comes and goes within a second) hits both alike; a round's time is the sum of its
        # batches.
        batches = [offs[i : i + 5000] for i in range(0, n, 5000)]
        times: dict[str, list[float]] = {"overlay": [], "plain": []}
        for _ in range(rounds):
            spent = {"overlay": 0.0, "plain": 0.0}
            for batch in batches:
                for label, disk in (("overlay", ovl), ("plain", plain)):
                    read_at = disk.read_at
                    t0 = time.perf_counter()
                    for o in batch:
                        read_at(o, buf)
                    spent[label] += time.perf_counter() - t0
            for label, took in spent.items():
                times[label].append(took)
        check = bytearray(PAGE)
        for o in offs[:1000]:  # the same bytes through both
            ovl.read_at(o, buf)
            plain.read_at(o, check)
            assert bytes(buf) == bytes(check)
        for d in (plain, ovl, base):
            d.disconnect()
        return {k: n / statistics.median(v) for k, v in times.items()}


def copy_rates(rounds: int) -> dict[str, float]:
    """Bytes of data per second: shmdisk.copy of a 1 GiB disk holding 256 MiB, and cp
    --sparse=always of a tmpfs file with the same bytes, alternating."""
    runs = [(off, 4 * MiB) for off in range(0, GiB, 16 * MiB)]
    data = sum(n for _, n in runs)
    with scratch() as s:
        src = s.disk_with(GiB, runs)
        path = s.file_with(GiB, runs)
        dst = s.path("cp-dst")
        times: dict[str, list[float]] = {"copy": [], "cp": []}
        for _ in range(rounds):
            name = s.name("copy")
            t0 = time.perf_counter()
            shmdisk.copy(src.name, name).disconnect()
            times["copy"].append(time.perf_counter() - t0)
            shmdisk.destroy(name)
            t0 = time.perf_counter()
            cp_sparse(path, dst)
            times["cp"].append(time.perf_counter() - t0)
            os.unlink(dst)
        src.disconnect()
        return {k: data / statistics.median(v) for k, v in times.items()}


def python_engine_reads(rounds: int, n: int) -> dict[str, float] | None:
    """``read_rates`` under the python engine, in a child process (the engine is chosen when
    shmdisk is imported)."""
    env = {**os.environ, "SHMDISK_NO_EXTENSIONS": "1"}
    args = [sys.executable, os.path.abspath(__file__), "--reads-only", "--rounds", str(rounds)]
    args += ["--reads", str(n)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    result: dict[str, float] = json.loads(done.stdout)
    return result


# ------------------------------------------------------------------ the table


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def kops(per_second: float) -> str:
    return f"{per_second / 1000:.0f} k/s"


def gbs(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e9:.2f} GB/s"


Row = tuple[str, str, str, str, float, float | None]


def table_rows(results: dict[str, Any]) -> list[Row]:
    """(workload, shmdisk figure, compared with, its figure, ratio, target) for each row."""
    rows: list[Row] = []
    for key, label in (("copies_1g", "1 GiB base, full"), ("copies_64g", "64 GiB base, 1 GiB")):
        r = results[key]
        for how, key2 in (("overlay", "overlay"), ("shmdisk.copy", "copy")):
            label2 = f"writable copy of a {label}: {how}"
            rows.append((label2, ms(r[key2]), "cp --sparse", ms(r["cp"]), r["cp"] / r[key2], None))
    for key, engine in (("reads_native", "native"), ("reads_python", "python")):
        r = results.get(key)
        if r:
            label = f"random 4 KiB read, half from the base ({engine} engine)"
            rows.append(
                (
                    label,
                    kops(r["overlay"]),
                    "plain disk",
                    kops(r["plain"]),
                    r["overlay"] / r["plain"],
                    0.8,
                )
            )
    r = results["copy_256m"]
    label = "shmdisk.copy of a 1 GiB disk holding 256 MiB"
    rows.append((label, gbs(r["copy"]), "cp --sparse", gbs(r["cp"]), r["copy"] / r["cp"], 1.0))
    return rows


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    width = max(len(row[0]) for row in rows)
    print(
        f"overlays and copies, median of {results['rounds']} round(s);"
        " ratio: how many times faster shmdisk is"
    )
    head = f"{'workload':<{width}}  {'shmdisk':>10}  {'compared with':<13} {'':>10}  {'ratio':>8}"
    print(head + "  target")
    for label, a, other, b, ratio, target in rows:
        mark = "" if target is None else f"{target:.1f}x" + ("" if ratio >= target else " (below)")
        print(f"{label:<{width}}  {a:>10}  {other:<13} {b:>10}  {ratio:>7.2f}x  {mark}".rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure (median)")
    parser.add_argument("--reads", type=int, default=200_000, help="random reads per round")
    parser.add_argument("--quick", action="store_true", help="1 round, 50000 reads")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--reads-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.reads = 1, 50_000
    if args.reads_only:
        print(json.dumps(read_rates(args.rounds, args.reads)))
        return 0
    results: dict[str, Any] = {"engine": shmdisk.ENGINE, "rounds": args.rounds}
    with scratch() as s:
        results["copies_1g"] = writable_copies(s, GiB, [(0, GiB)], args.rounds)
    with scratch() as s:
        spread = [(g * GiB, 16 * MiB) for g in range(64)]
        results["copies_64g"] = writable_copies(s, 64 * GiB, spread, args.rounds)
    if shmdisk.ENGINE == "native":
        results["reads_native"] = read_rates(args.rounds, args.reads)
    results["reads_python"] = python_engine_reads(args.rounds, args.reads)
    results["copy_256m"] = copy_rates(args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
