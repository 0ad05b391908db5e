#!/usr/bin/env python3
"""Long, configurable reliability runs against real shmdisk disks, printing figures.

Usage::

    python tools/stress.py torture --duration 60 --processes 4
    python tools/stress.py torture --blocks --resize --duration 30   # discards and shrinks
    python tools/stress.py kill --duration 60
    python tools/stress.py resize-destroy --duration 60
    python tools/stress.py enospc --duration 30          # root: needs unshare -m
    python tools/stress.py hostile --examples 5000
    python tools/stress.py permissions                   # root: drops to uid 65534
    python tools/stress.py all --duration 10 --json

Sample output (``torture -d 3 --seed 1``, 2 cores; figures abridged)::

    torture          1.0s  ops 17296  16873/s  torn 0  corrupt 0
    torture          2.0s  ops 45120  22034/s  torn 0  corrupt 0
    torture          3.0s  ops 74528  24375/s  torn 0  corrupt 0
    torture: PASS  (3.5 s)
        processes                                    4
        ops                                          85472
        reads                                        42814
        writes                                       42654
        torn_reads                                   0
        corrupt_reads                                0
        ops_per_s                                    27279

Scenarios (see RELIABILITY.md for what each one proves and the figures of a real run):

- torture: N processes do random reads and writes (1 sector to several pages, overlapping,
  crossing page boundaries); every sector is stamped (tools/stamp.py), every read is checked.
- kill: writers are SIGKILLed at random moments, while holding locks, mid large write; the
  survivors must go on (longest stall measured, hangs counted); completed writes stay whole.
- resize-destroy: one process resizes, one destroys and re-creates, others do I/O; no process
  may die of a signal; operations on destroyed handles raise DisconnectedError.
- enospc: in a private mount namespace with a small tmpfs over /dev/shm, write until
  DiskFullError; nothing partly written, old data intact, discard gives the space back.
- hostile: hypothesis-driven calls with bad arguments against a model, and forged segments
  (bad headers) connected in a child process, so a SIGBUS shows as a failure.
- permissions: a disk made with the default mode is refused to another uid.

Exit status: 0 every scenario passed, 1 a scenario failed, 2 bad usage.
``--json`` prints one object: ``{"schema": 1, "results": [{"scenario", "ok", "figures",
"problems", "seconds"}, ...]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import multiprocessing as mp
import os
import random
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stamp  # a sibling module, found through the line above

import shmdisk

SCHEMA = 1
SCENARIOS = ("torture", "kill", "resize-destroy", "enospc", "hostile", "permissions")
_SPAWN = mp.get_context("spawn")
_FORK = mp.get_context("fork")


# --------------------------------------------------------------------------- common


@dataclass
class Result:
    """The outcome of one scenario: pass/fail, figures, and what went wrong."""

    scenario: str
    ok: bool = True
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    def fail(self, problem: str) -> None:
        self.ok = False
        if len(self.problems) < 20:
            self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "scenario": self.scenario,
            "ok": self.ok,
            "figures": self.figures,
            "problems": self.problems,
            "seconds": round(self.seconds, 2),
        }
        if self.skipped:
            d["skipped"] = self.skipped
        return d


@dataclass
class Options:
    """Knobs shared by the scenarios (the CLI fills them; tests pass small values)."""

    duration: float = 10.0
    processes: int = 4
    seed: int | None = None
    progress: Callable[[str], None] | None = None
    sector_size: int = 512
    disk_pages: int = 64  # torture: a small disk, so requests collide often
    max_pages: int = 4  # torture: the longest request, in pages
    large_mib: float = 4.0  # kill: size of a victim's large write
    hang_after: float = 5.0  # kill: a survivor silent this long counts as a hang
    examples: int = 300  # hostile: hypothesis examples per check
    tmpfs_size: str = "8M"  # enospc
    interval: float = 1.0  # seconds between progress lines
    threads: int = 1  # torture: threads per process, sharing one Disk handle
    window_at: int = 0  # torture: first page of the I/O window (1000: across a page-map page)
    blocks: bool = False  # torture: whole-block writes, discards and zeroings (see _blocks_loop)
    resize: bool = False  # torture --blocks: also shrink to a block boundary and grow back
    discard: bool = True  # torture --blocks: discard and zero blocks (off: --no-discard)
    churn: bool = False  # torture: short-lived threads one after another (see --churn)
    split_writes: bool = False  # torture self-test: non-atomic writes that must be caught

    def rng(self, salt: int = 0) -> random.Random:
        seed = self.seed if self.seed is not None else secrets.randbits(32)
        return random.Random(seed * 1000003 + salt)

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)


def unique_name(tag: str) -> str:
    """A disk name no other run or test will pick."""
    return f"stress-{tag}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def scratch_disk(tag: str, size_sectors: int, sector_size: int = 512, **kw: Any) -> Iterator[str]:
    """Create a disk for a scenario and destroy it afterwards, whatever happens."""
    name = unique_name(tag)
    shmdisk.create(name, size_sectors, sector_size, **kw).disconnect()
    try:
        yield name
    finally:
        shmdisk.destroy(name)


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


def _join_all(procs: list[Any], timeout: float) -> list[Any]:
    """Join processes within ``timeout`` overall; kill and return the ones that did not end."""
    deadline = time.monotonic() + timeout
    stuck = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            stuck.append(p)
    for p in stuck:
        p.kill()
        p.join(5)
    return stuck


def _drain(q: Any, n: int, timeout: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        try:
            out.append(q.get(timeout=max(0.01, deadline - time.monotonic())))
        except Exception:
            break
    return out


def _read_request(
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


def _write_request(disk: shmdisk.Disk, start: int, data: np.ndarray, rng: random.Random) -> None:
    """Write stamped sectors at ``start`` through a randomly chosen API form."""
    form = rng.randrange(3)
    if form == 0:
        disk.write(start, data)
    elif form == 1:
        disk.write(start, split_views(memoryview(data.data), disk.sector_size, rng))
    else:
        disk.write_at(start * disk.sector_size, data)


# --------------------------------------------------------------------------- torture

# Per-worker counters in shared memory, read by the parent for progress lines.
_T_OPS, _T_READS, _T_WRITES, _T_TORN, _T_CORRUPT, _T_OOR, _T_RESIZES, _T_WOULDBLOCK, _T_FIELDS = (
    range(9)
)


def _torture_loop(
    disk: shmdisk.Disk,
    writer: int,
    rng: random.Random,
    stop_at: float,
    max_pages: int,
    split: bool,
    counters: Any,
    slot: int,
    problems: list[str],
    window: int,
) -> None:
    """One thread's random I/O: stamped writes, and reads checked for tearing."""
    base = slot * _T_FIELDS
    c = [counters[base + i] for i in range(_T_FIELDS)]  # go on counting (thread churn)
    ss = disk.sector_size
    pps = disk.page_size // ss
    size = disk.get_info().size_sectors
    lo = size - window  # the I/O window is the end of the disk (see Options.window_at)
    seq = 0
    while time.monotonic() < stop_at:
        for _ in range(32):
            count = min(window, pick_count(rng, pps, max_pages))
            start = rng.randrange(lo, size - count + 1)
            if rng.random() < 0.5:
                seq += 1
                data = stamp.make_request(writer, seq, start, count, ss)
                if split:
                    # Checker self-test: one request as several calls is *not* atomic.
                    off = start
                    for piece in split_views(memoryview(data.data), ss, rng):
                        disk.write(off, piece)
                        off += len(piece) // ss
                elif rng.random() < 0.15:
                    # wait=False: refused when the pages are busy, and then nothing is written.
                    try:
                        disk.write(start, data, wait=False)
                    except shmdisk.WouldBlockError:
                        c[_T_WOULDBLOCK] += 1
                else:
                    _write_request(disk, start, data, rng)
                c[_T_WRITES] += 1
            else:
                if rng.random() < 0.15:
                    buf = bytearray(count * ss)
                    try:
                        disk.read(start, buf, wait=False)
                    except shmdisk.WouldBlockError:
                        c[_T_WOULDBLOCK] += 1
                        c[_T_OPS] += 1
                        continue
                else:
                    buf = _read_request(disk, start, count, rng)
                v = stamp.check_read(buf, start, ss)
                c[_T_READS] += 1
                if v.torn:
                    c[_T_TORN] += 1
                if v.corrupt:
                    c[_T_CORRUPT] += 1
                if not v.ok and len(problems) < 5:
                    problems.append(f"read [{start}, {start + count}): {(v.torn + v.corrupt)[0]}")
            c[_T_OPS] += 1
        for i, value in enumerate(c):
            counters[base + i] = value


def _blocks_loop(
    disk: shmdisk.Disk,
    writer: int,
    rng: random.Random,
    stop_at: float,
    counters: Any,
    slot: int,
    problems: list[str],
    window: int,
    mix: str,
) -> None:
    """Whole-block writes, discards and zeroings, checked by whole-block reads.

    The window is cut into blocks of 2 pages + 3 sectors, starting one sector in, so block
    edges fall inside pages and neighbours share a page: a discard then zeroes part of a page in
    place while a writer may be writing the other part. Every block only ever holds one whole
    request or all zeros, so a read of it must show exactly one of those.
    """
    c = [0] * _T_FIELDS
    base = slot * _T_FIELDS
    ss = disk.sector_size
    pps = disk.page_size // ss
    size = disk.get_info().size_sectors
    blen = 2 * pps + 3
    first = size - window + 1
    nblocks = (window - 1) // blen
    while time.monotonic() < stop_at:
        for _ in range(32):
            b = rng.randrange(nblocks)
            start = first + b * blen
            op = rng.random()
            try:
                _block_op(
                    disk, writer, rng, op, b, start, blen, nblocks, first, size, c, problems, mix
                )
            except shmdisk.OutOfRangeError:
                c[_T_OOR] += 1  # a block past a shrink (only with resizes): legitimately gone
            c[_T_OPS] += 1
        for i, value in enumerate(c):
            counters[base + i] = value


def _block_op(
    disk: shmdisk.Disk,
    writer: int,
    rng: random.Random,
    op: float,
    b: int,
    start: int,
    blen: int,
    nblocks: int,
    first: int,
    size: int,
    c: list[int],
    problems: list[str],
    mix: str,
) -> None:
    ss = disk.sector_size
    if "r" in mix and op < 0.01:
        # Shrink to a block boundary (so whole blocks go) and grow back: the dropped blocks
        # must read as zeros afterwards, and a read racing the shrink must not see half of it.
        cut = first + rng.randrange(nblocks // 2, nblocks) * blen
        disk.resize(cut)
        disk.resize(size)
        c[_T_RESIZES] += 1
    elif op < 0.35:
        seq = c[_T_WRITES] + 1  # strictly increasing per writer, as the checker expects
        _write_request(disk, start, stamp.make_request(writer, seq, start, blen, ss), rng)
        c[_T_WRITES] += 1
    elif op < 0.5 and "d" in mix:
        if rng.random() < 0.5:
            disk.discard(start, blen)
        else:
            disk.write_zeroes(start, blen, may_unmap=rng.random() < 0.5)
        c[_T_WRITES] += 1
    else:
        n = min(rng.randint(1, 3), nblocks - b)
        buf = _read_request(disk, start, n * blen, rng)
        c[_T_READS] += 1
        v = stamp.parse(buf, start, ss)
        bad = v.corrupt[:1]
        for k in range(n):
            labels = set(v.labels[k * blen : (k + 1) * blen].tolist())
            if labels == {-1}:
                continue
            if len(labels) == 1:
                (lab,) = labels
                if lab >= 0 and v.keys[lab][2:] == (start + k * blen, blen):
                    continue
            bad.append(f"block at {start + k * blen} is neither one request nor zeros")
        if bad:
            c[_T_TORN if not v.corrupt else _T_CORRUPT] += 1
            if len(problems) < 5:
                problems.append(bad[0])


def _torture_worker(
    name: str,
    wid: int,
    seed: int,
    duration: float,
    max_pages: int,
    split: bool,
    threads: int,
    window: int,
    blocks: bool,
    mix: str,
    counters: Any,
    out: Any,
) -> None:
    """One process: ``threads`` threads share one Disk handle (the handle is thread-safe)."""
    res: dict[str, Any] = {"wid": wid, "problems": [], "error": None}
    t_start = t_end = time.monotonic()
    errors: list[str] = []
    try:
        disk = shmdisk.connect(name, create=False)
        # Spawned children start one by one; each runs for the full duration once it is up.
        t_start = time.monotonic()
        stop_at = t_start + duration

        def run(t: int) -> None:
            try:
                if blocks:
                    _blocks_loop(
                        disk,
                        wid * threads + t + 1,
                        random.Random(seed * 131 + t),
                        stop_at,
                        counters,
                        wid * threads + t,
                        res["problems"],
                        window,
                        mix,
                    )
                    return
                if "c" not in mix:
                    _torture_loop(
                        disk,
                        wid * threads + t + 1,
                        random.Random(seed * 131 + t),
                        stop_at,
                        max_pages,
                        split,
                        counters,
                        wid * threads + t,
                        res["problems"],
                        window,
                    )
                    return
                # Thread churn: short-lived threads, one after another, on the shared handle;
                # each ends after a moment, and its lock descriptor is closed when it does.
                rng = random.Random(seed * 131 + t)
                gen = 0
                while time.monotonic() < stop_at:
                    gen += 1
                    th = threading.Thread(
                        target=_torture_loop,
                        args=(
                            disk,
                            (gen << 12) | (wid * threads + t + 1),
                            random.Random(rng.randrange(1 << 30)),
                            min(stop_at, time.monotonic() + rng.uniform(0.01, 0.1)),
                            max_pages,
                            split,
                            counters,
                            wid * threads + t,
                            res["problems"],
                            window,
                        ),
                    )
                    th.start()
                    th.join()
                res["threads_started"] = res.get("threads_started", 0) + gen
            except BaseException:
                errors.append(traceback.format_exc(limit=4))

        fds0 = len(os.listdir("/proc/self/fd"))
        pool = [threading.Thread(target=run, args=(t,)) for t in range(1, threads)]
        for th in pool:
            th.start()
        run(0)
        for th in pool:
            th.join()
        t_end = time.monotonic()
        res["fd_growth"] = len(os.listdir("/proc/self/fd")) - fds0
        disk.disconnect()
    except BaseException:
        errors.append(traceback.format_exc(limit=4))
    res["error"] = "\n".join(errors) or None
    res["counts"] = [
        sum(counters[(wid * threads + t) * _T_FIELDS + i] for t in range(threads))
        for i in range(_T_FIELDS)
    ]
    res["span"] = (t_start, t_end)
    out.put(res)


def run_torture(opt: Options) -> Result:
    """N processes of random overlapping reads and writes; every read checked for tearing."""
    r = Result("torture")
    ss = opt.sector_size
    rng = opt.rng(1)
    pps = 4096 // ss if ss < 4096 else 1
    window = opt.disk_pages * pps
    size = opt.window_at * pps + window
    n = opt.processes
    t0 = time.monotonic()
    with scratch_disk("torture", size, ss) as name:
        slots = n * opt.threads
        counters = _SPAWN.Array(ctypes.c_int64, slots * _T_FIELDS, lock=False)
        out = _SPAWN.Queue()
        procs = [
            _SPAWN.Process(
                target=_torture_worker,
                args=(
                    name,
                    w,
                    rng.randrange(1 << 30),
                    opt.duration,
                    opt.max_pages,
                    opt.split_writes,
                    opt.threads,
                    window,
                    opt.blocks,
                    ("d" if opt.discard else "")
                    + ("r" if opt.resize else "")
                    + ("c" if opt.churn else ""),
                    counters,
                    out,
                ),
            )
            for w in range(n)
        ]
        for p in procs:
            p.start()
        _progress_loop(opt, "torture", procs, None, lambda: _torture_line(counters, slots, t0))
        results = _drain(out, n, timeout=30)
        stuck = _join_all(procs, 10)
    r.seconds = time.monotonic() - t0
    totals = [
        sum(res.get("counts", [0] * _T_FIELDS)[i] for res in results) for i in range(_T_FIELDS)
    ]
    spans = [res["span"] for res in results if "span" in res]
    busy = max(0.001, max(e for _, e in spans) - min(b for b, _ in spans)) if spans else 1.0
    r.figures = {
        "processes": n,
        "threads_per_process": opt.threads,
        "mode": _mode(opt),
        "disk_sectors": size,
        "io_window_sectors": [size - window, size],
        "sector_size": ss,
        "max_request_sectors": opt.max_pages * pps,
        "ops": totals[_T_OPS],
        "reads": totals[_T_READS],
        "writes": totals[_T_WRITES],
        "torn_reads": totals[_T_TORN],
        "wait_false_refused": totals[_T_WOULDBLOCK],
        "short_lived_threads": sum(res.get("threads_started", 0) for res in results),
        "open_fds_added_per_process": max((res.get("fd_growth", 0) for res in results), default=0),
        "resizes": totals[_T_RESIZES],
        "out_of_range_after_shrink": totals[_T_OOR],
        "corrupt_reads": totals[_T_CORRUPT],
        "ops_per_s": round(totals[_T_OPS] / busy),
        "seconds_of_io": round(busy, 1),
    }
    for res in results:
        if res["error"]:
            r.fail(f"worker {res['wid']} crashed: {res['error']}")
        for prob in res["problems"]:
            r.fail(f"worker {res['wid']}: {prob}")
    if len(results) < n:
        r.fail(f"only {len(results)} of {n} workers reported")
    for p in procs:
        if p.exitcode != 0:
            r.fail(f"worker pid {p.pid} exit code {p.exitcode}")
    if stuck:
        r.fail(f"{len(stuck)} workers hung")
    if totals[_T_TORN] or totals[_T_CORRUPT]:
        r.fail(f"{totals[_T_TORN]} torn and {totals[_T_CORRUPT]} corrupt reads")
    if r.figures["open_fds_added_per_process"] > opt.threads + 2:
        r.fail(f"{r.figures['open_fds_added_per_process']} descriptors left open by threads")
    if opt.split_writes:
        # The checker's self-test: tearing was provoked on purpose and must have been seen.
        r.figures["self_test_split_writes"] = True
        r.ok = totals[_T_TORN] > 0 and totals[_T_CORRUPT] == 0
        r.problems = [] if r.ok else ["split writes were not detected as torn reads"]
    if totals[_T_READS] == 0 or totals[_T_WRITES] == 0:
        r.fail("no reads or no writes were done")
    return r


def _mode(opt: Options) -> str:
    if not opt.blocks:
        return "random requests"
    parts = (
        ["write"] + (["discard/zero"] if opt.discard else []) + (["resize"] if opt.resize else [])
    )
    return "whole blocks: " + ", ".join(parts)


def _torture_line(counters: Any, n: int, t0: float) -> str:
    ops = sum(counters[w * _T_FIELDS + _T_OPS] for w in range(n))
    torn = sum(counters[w * _T_FIELDS + _T_TORN] for w in range(n))
    bad = sum(counters[w * _T_FIELDS + _T_CORRUPT] for w in range(n))
    el = time.monotonic() - t0
    return f"ops {ops}  {ops / max(el, 1e-3):.0f}/s  torn {torn}  corrupt {bad}"


def _progress_loop(
    opt: Options, label: str, procs: list[Any], stop_at: float | None, line: Callable[[], str]
) -> None:
    """Print a progress line every interval until ``stop_at`` or until every process ended."""
    t0 = time.monotonic()
    nxt = t0 + opt.interval
    while any(p.is_alive() for p in procs) and (stop_at is None or time.monotonic() < stop_at):
        time.sleep(0.05)
        if time.monotonic() >= nxt:
            opt.say(f"{label:<14}{time.monotonic() - t0:6.1f}s  {line()}")
            nxt += opt.interval


# --------------------------------------------------------------------------- kill
#
# Layout of the kill disk, in sectors:
#   [0, R)                         survivor region: written by the survivor writer only,
#                                  checked strictly by the readers
#   R + v*2L + [0, L), [L, 2L)     victim v's two slots; it writes one whole slot per request,
#                                  alternating, so the last completed write stays intact in the
#                                  other slot while the next one may be killed half-way.
# Readers' requests span the survivor region and the slots, so they wait on the victims' locks;
# victims also do large reads over the survivor region, so the survivor writer waits on their
# shared locks. A killed victim's locks must vanish with it.

# Shared state of a victim (int64 words).
_V_STATE, _V_SEQ_NOW, _V_SLOT_NOW, _V_SEQ_DONE, _V_SLOT_DONE, _V_WRITER, _V_FIELDS = range(7)
_IDLE, _WRITING, _READING = 0, 1, 2
# Per-survivor shared state: ops, last heartbeat (ns), longest gap (ns), torn, corrupt, checked.
_S_OPS, _S_BEAT, _S_GAP, _S_TORN, _S_CORRUPT, _S_CHECKED, _S_FIELDS = range(7)


@dataclass(frozen=True)
class _KillLayout:
    ss: int
    pps: int
    region: int  # survivor region, sectors
    slot: int  # one victim slot, sectors
    victims: int

    @property
    def size(self) -> int:
        return self.region + self.victims * 2 * self.slot

    def slot_start(self, v: int, s: int) -> int:
        return self.region + (2 * v + s) * self.slot


def _victim(
    name: str,
    v: int,
    lay: _KillLayout,
    writer: int,
    seed: int,
    state: Any,
    inherited: shmdisk.Disk | None,
) -> None:
    rng = random.Random(seed)
    # Every other victim uses the handle it inherited from the parent through fork. Its locks
    # must be the child's own: were they taken on the parent's open file description, they
    # would outlive the killed child (the parent keeps that description open) and hang all.
    disk = inherited if inherited is not None else shmdisk.connect(name, create=False)
    base = v * _V_FIELDS
    seq = 0
    slot = 0
    payload = [
        stamp.make_request(writer, 0, lay.slot_start(v, s), lay.slot, lay.ss) for s in (0, 1)
    ]
    big = bytearray(lay.region * lay.ss + lay.slot * lay.ss)
    while True:
        action = rng.random()
        if action < 0.65:
            seq += 1
            slot ^= 1
            start = lay.slot_start(v, slot)
            # Restamp in place: only the header fields change between requests.
            data = payload[slot]
            arr = data.view(stamp.sector_dtype(lay.ss))
            csum = stamp.request_checksum(writer, seq, start, lay.slot)
            arr["seq"] = seq
            arr["csum"] = csum
            arr["fill"] = stamp._fill(np.full(lay.slot, csum, dtype=np.uint64), arr["sector"])[
                :, None
            ]
            state[base + _V_SEQ_NOW] = seq
            state[base + _V_SLOT_NOW] = slot
            state[base + _V_STATE] = _WRITING
            disk.write(start, data)
            state[base + _V_STATE] = _IDLE
            state[base + _V_SLOT_DONE] = slot
            state[base + _V_SEQ_DONE] = seq
        elif action < 0.9:
            # A large read from the survivor region into this victim's slot: holds shared locks.
            state[base + _V_STATE] = _READING
            disk.read(0, big)
            state[base + _V_STATE] = _IDLE
        else:
            time.sleep(rng.random() * 0.002)


_RESIZING = 3


def _resize_victim(name: str, idx: int, lay: _KillLayout, tail: int, seed: int, state: Any) -> None:
    """Grow the disk by ``tail`` sectors, fill the tail, shrink it away again; forever.

    resize takes the whole lock space exclusively, so every survivor waits on it; killed in
    the middle, its lock must vanish like any other.
    """
    rng = random.Random(seed)
    disk = shmdisk.connect(name, create=False)
    base = idx * _V_FIELDS
    fill = bytes([0xA5]) * (tail * lay.ss)
    while True:
        state[base + _V_STATE] = _RESIZING
        disk.resize(lay.size + tail)
        state[base + _V_STATE] = _IDLE
        disk.write(lay.size, fill)
        state[base + _V_STATE] = _RESIZING
        disk.resize(lay.size)
        state[base + _V_STATE] = _IDLE
        time.sleep(rng.random() * 0.002)


def _survivor(
    name: str, idx: int, lay: _KillLayout, seed: int, stop_at: float, shared: Any, slots: Any
) -> None:
    """idx 0 writes small stamped requests into the survivor region; the others read."""
    rng = random.Random(seed)
    disk = shmdisk.connect(name, create=False)
    base = idx * _S_FIELDS
    last = time.monotonic_ns()
    shared[base + _S_BEAT] = last
    seq = 0
    ops = 0
    while time.monotonic() < stop_at:
        if idx == 0:
            count = pick_count(rng, lay.pps, 4)
            start = rng.randrange(0, lay.region - count + 1)
            seq += 1
            _write_request(disk, start, stamp.make_request(1, seq, start, count, lay.ss), rng)
        else:
            # Reach into the victims' slots (to wait on their locks) from somewhere in the
            # survivor region; only the survivor region is checked strictly.
            start = rng.randrange(0, lay.region)
            end = min(lay.size, lay.region + rng.randrange(1, 2 * lay.victims * lay.slot))
            if rng.random() < 0.5:
                end = min(end, start + pick_count(rng, lay.pps, 8))
            buf = _read_request(disk, start, end - start, rng, lay.size)
            upto = min(end, lay.region) - start
            v = stamp.check_read(memoryview(buf)[: upto * lay.ss], start, lay.ss)
            shared[base + _S_CHECKED] += 1
            if v.torn:
                shared[base + _S_TORN] += 1
            if v.corrupt:
                shared[base + _S_CORRUPT] += 1
        ops += 1
        now = time.monotonic_ns()
        gap = now - last
        last = now
        if gap > shared[base + _S_GAP]:
            shared[base + _S_GAP] = gap
        shared[base + _S_BEAT] = now
        shared[base + _S_OPS] = ops
    disk.disconnect()


def _write_lock_held(fd: int, page0: int, pages: int) -> bool:
    """Does anyone hold a write lock on lock-space pages [page0, page0+pages)? (F_OFD_GETLK)"""
    flock = struct.pack("=hh4xqqi4x", fcntl.F_RDLCK, 0, page0, pages, 0)
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock)
    kind: int = struct.unpack("=hh4xqqi4x", res)[0]
    return kind != fcntl.F_UNLCK


def run_kill(opt: Options) -> Result:
    """SIGKILL writers at random moments, mid large write and holding locks; others go on."""
    r = Result("kill")
    rng = opt.rng(2)
    ss = opt.sector_size
    pps = max(1, 4096 // ss)
    victims = max(1, opt.processes // 2)
    readers = max(1, opt.processes - victims)  # plus one survivor writer
    slot = max(pps, int(opt.large_mib * (1 << 20)) // ss // pps * pps)
    lay = _KillLayout(ss, pps, 256 * pps, slot, victims)
    n_surv = readers + 1
    t0 = time.monotonic()
    kills = {"random": 0, "mid_write": 0, "mid_read": 0, "mid_resize": 0}
    tail = max(pps, (1 << 20) // ss)  # the resizer grows and shrinks the disk by 1 MiB
    lock_held_at_kill = 0
    partial_left = 0
    completed_checked = 0
    completed_bad = 0
    hangs = 0
    respawn_s = 0.0
    with scratch_disk("kill", lay.size, ss) as name:
        disk = shmdisk.connect(name, create=False)
        probe = os.open(shmdisk.segment_path(name), os.O_RDONLY | os.O_CLOEXEC)
        state = _FORK.Array(ctypes.c_int64, (victims + 1) * _V_FIELDS, lock=False)
        shared = _SPAWN.Array(ctypes.c_int64, n_surv * _S_FIELDS, lock=False)
        stop_at = time.monotonic() + opt.duration + 2.0
        survivors = [
            _SPAWN.Process(
                target=_survivor,
                args=(name, i, lay, rng.randrange(1 << 30), stop_at, shared, None),
            )
            for i in range(n_surv)
        ]
        for p in survivors:
            p.start()
        gen = 0

        def spawn_victim(v: int) -> Any:
            nonlocal gen
            gen += 1
            writer = (gen << 8) | (v + 2)  # writer 1 is the survivor writer
            state[v * _V_FIELDS + _V_WRITER] = writer
            for f in (_V_STATE, _V_SEQ_NOW, _V_SEQ_DONE):
                state[v * _V_FIELDS + f] = 0
            # fork, not spawn: a victim must be replaceable many times a second; it also
            # exercises the fork-safety of a Disk the parent holds open.
            if v == victims:
                p = _FORK.Process(
                    target=_resize_victim,
                    args=(name, v, lay, tail, rng.randrange(1 << 30), state),
                )
                p.start()
                return p
            p = _FORK.Process(
                target=_victim,
                args=(
                    name,
                    v,
                    lay,
                    writer,
                    rng.randrange(1 << 30),
                    state,
                    disk if gen % 2 else None,
                ),
            )
            p.start()
            return p

        procs = [spawn_victim(v) for v in range(victims + 1)]  # the last one resizes
        # Wait until every survivor has started (spawned interpreters take a while).
        while any(shared[i * _S_FIELDS + _S_OPS] == 0 for i in range(n_surv)):
            if time.monotonic() > stop_at or not all(p.is_alive() for p in survivors):
                break
            time.sleep(0.01)
        nxt_line = time.monotonic() + opt.interval
        stop_kills = stop_at - 0.5
        while time.monotonic() < stop_kills:
            v = rng.randrange(victims + 1)
            p = procs[v]
            vb = v * _V_FIELDS
            if v == victims:
                mode = rng.choice(("random", "mid_resize", "mid_resize"))
            else:
                mode = rng.choice(("random", "mid_write", "mid_write", "mid_read"))
            if mode == "random":
                time.sleep(rng.random() * 0.05)
            else:
                want = {"mid_write": _WRITING, "mid_read": _READING}.get(mode, _RESIZING)
                until = time.monotonic() + 1.0
                while state[vb + _V_STATE] != want and time.monotonic() < until:
                    time.sleep(0.0002)
                if state[vb + _V_STATE] != want:
                    mode = "random"
                else:
                    time.sleep(rng.random() * 0.003)
            writer = state[vb + _V_WRITER]
            first = lay.slot_start(v, 0) // pps
            held = _write_lock_held(probe, first, 2 * slot // pps)
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
            if p.is_alive() or p.exitcode != -signal.SIGKILL:
                r.fail(f"victim {p.pid} did not die of SIGKILL (exit {p.exitcode})")
            kills[mode] += 1
            lock_held_at_kill += held
            # The last completed write must be whole in its slot; the killed one may be partial.
            seq_done = state[vb + _V_SEQ_DONE]
            if seq_done:
                s = state[vb + _V_SLOT_DONE]
                start = lay.slot_start(v, s)
                buf = bytearray(slot * ss)
                disk.read(start, buf)
                got = stamp.count_of(buf, ss, (writer, seq_done, start, slot))
                completed_checked += 1
                if got != slot:
                    completed_bad += 1
                    r.fail(f"completed write {writer}/{seq_done} has only {got}/{slot} sectors")
            seq_now = state[vb + _V_SEQ_NOW]
            if seq_now and seq_now != seq_done:
                s = state[vb + _V_SLOT_NOW]
                start = lay.slot_start(v, s)
                buf = bytearray(slot * ss)
                disk.read(start, buf)
                got = stamp.count_of(buf, ss, (writer, seq_now, start, slot))
                partial_left += 0 < got < slot
            t_sp = time.monotonic()
            procs[v] = spawn_victim(v)
            respawn_s = max(respawn_s, time.monotonic() - t_sp)
            # Hang watch: a survivor silent for hang_after seconds is stuck.
            now = time.monotonic_ns()
            for i in range(n_surv):
                beat = shared[i * _S_FIELDS + _S_BEAT]
                if beat and now - beat > opt.hang_after * 1e9 and survivors[i].is_alive():
                    hangs += 1
                    r.fail(f"survivor {i} made no progress for {(now - beat) / 1e9:.1f} s")
            if hangs:
                break
            if time.monotonic() >= nxt_line:
                nxt_line += opt.interval
                opt.say(
                    f"kill          {time.monotonic() - t0:6.1f}s  kills {sum(kills.values())}  "
                    f"longest stall {_max_gap(shared, n_surv) * 1e3:.0f} ms  hangs {hangs}"
                )
        for p in procs:
            p.kill()
            p.join(5)
        stuck = _join_all(survivors, max(10.0, stop_at - time.monotonic() + 10))
        # The disk must still be fully usable: one write over all of it, read back whole.
        usable = _whole_disk_check(name, lay.size, ss, timeout=30)
        os.close(probe)
        disk.disconnect()
    r.seconds = time.monotonic() - t0
    ops = sum(shared[i * _S_FIELDS + _S_OPS] for i in range(n_surv))
    torn = sum(shared[i * _S_FIELDS + _S_TORN] for i in range(n_surv))
    corrupt = sum(shared[i * _S_FIELDS + _S_CORRUPT] for i in range(n_surv))
    r.figures = {
        "victims": victims,
        "survivors": n_surv,
        "large_write_mib": round(slot * ss / (1 << 20), 2),
        "kills": sum(kills.values()),
        "kills_random": kills["random"],
        "kills_mid_large_write": kills["mid_write"],
        "kills_mid_large_read": kills["mid_read"],
        "kills_mid_resize": kills["mid_resize"],
        "kills_with_write_lock_held": lock_held_at_kill,
        "killed_writes_left_partial": partial_left,
        "completed_writes_checked": completed_checked,
        "completed_writes_not_whole": completed_bad,
        "survivor_ops": ops,
        "survivor_torn_reads": torn,
        "survivor_corrupt_reads": corrupt,
        "longest_stall_ms": round(_max_gap(shared, n_surv) * 1e3, 1),
        "hangs": hangs + len(stuck),
        "disk_usable_after": usable is None,
        "longest_respawn_ms": round(respawn_s * 1e3, 1),
    }
    if stuck:
        r.fail(f"{len(stuck)} survivors hung at the end")
    for p in survivors:
        if p.exitcode != 0:
            r.fail(f"survivor pid {p.pid} exit code {p.exitcode}")
    if torn or corrupt:
        r.fail(f"survivors saw {torn} torn and {corrupt} corrupt reads")
    if usable is not None:
        r.fail(f"disk not usable after the run: {usable}")
    if r.figures["longest_stall_ms"] > 1000:
        r.fail(f"a survivor stalled {r.figures['longest_stall_ms']} ms (limit 1000)")
    if r.figures["kills"] == 0:
        r.fail("no kills were done")
    return r


def _max_gap(shared: Any, n: int) -> float:
    return float(max(shared[i * _S_FIELDS + _S_GAP] for i in range(n))) / 1e9


def _whole_disk_worker(name: str, size: int, ss: int, out: Any) -> None:
    try:
        with shmdisk.connect(name, create=False) as disk:
            data = stamp.make_request(0xFFFF, 1, 0, size, ss)
            disk.write(0, data)
            buf = bytearray(size * ss)
            disk.read(0, buf)
            out.put(None if buf == data.tobytes() else "read back differs")
    except BaseException as e:
        out.put(repr(e))


def _whole_disk_check(name: str, size: int, ss: int, timeout: float) -> str | None:
    """Write and read back the whole disk in a child, within ``timeout``; None if fine."""
    q = _FORK.Queue()
    p = _FORK.Process(target=_whole_disk_worker, args=(name, size, ss, q))
    p.start()
    try:
        res: str | None = q.get(timeout=timeout)
    except Exception:
        res = f"no answer within {timeout} s (a lock left behind?)"
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    return res


# --------------------------------------------------------------------------- resize-destroy

_R_OPS, _R_OOR, _R_DISC, _R_NOTFOUND, _R_CORRUPT, _R_STALE, _R_UNTYPED, _R_FIELDS = range(8)


def _rd_worker(name: str, idx: int, seed: int, stop_at: float, gen: Any, counts: Any) -> None:
    """Random I/O that survives its disk being resized, destroyed and re-created."""
    rng = random.Random(seed)
    base = idx * _R_FIELDS
    disk: shmdisk.Disk | None = None
    floor = 0  # the generation this handle's disk has at least
    my_gen = 0  # the generation stamped into what this handle writes
    seq = 0
    while time.monotonic() < stop_at:
        if disk is None:
            floor = gen.value
            try:
                disk = shmdisk.connect(name, create=False)
            except shmdisk.DiskNotFoundError:
                counts[base + _R_NOTFOUND] += 1
                time.sleep(0.001)
                continue
            my_gen = gen.value
        try:
            size = disk.get_info().size_sectors
            ss = disk.sector_size
            count = max(1, min(size, rng.randint(1, 24)))
            start = rng.randrange(0, max(1, size - count + 1))
            op = rng.random()
            if op < 0.45:
                seq += 1
                writer = (my_gen << 8) | (idx + 1)
                _write_request(disk, start, stamp.make_request(writer, seq, start, count, ss), rng)
            elif op < 0.9:
                buf = _read_request(disk, start, count, rng)
                v = stamp.parse(buf, start, ss)
                if v.corrupt:
                    counts[base + _R_CORRUPT] += 1
                if any((w >> 8) < floor for (w, _, _, _) in v.keys):
                    counts[base + _R_STALE] += 1
            elif op < 0.95:
                disk.discard(start, count)
            else:
                disk.extents()
            counts[base + _R_OPS] += 1
        except shmdisk.OutOfRangeError:
            counts[base + _R_OOR] += 1  # the disk shrank between get_info and the request
        except shmdisk.DisconnectedError:
            counts[base + _R_DISC] += 1
            disk.disconnect()
            disk = None
        except Exception as e:
            # Anything but our typed errors breaks the promise; count it, report it, go on.
            counts[base + _R_UNTYPED] += 1
            if counts[base + _R_UNTYPED] == 1:
                print(f"io worker {idx}: untyped {e!r}", file=sys.stderr)
            disk.disconnect()
            disk = None
    if disk is not None:
        disk.disconnect()


def _resizer(name: str, seed: int, stop_at: float, lo: int, hi: int, counts: Any) -> None:
    rng = random.Random(seed)
    disk: shmdisk.Disk | None = None
    while time.monotonic() < stop_at:
        try:
            if disk is None:
                disk = shmdisk.connect(name, create=False)
            old = disk.get_info().size_sectors
            new = rng.randint(lo, hi)
            disk.resize(new)
            counts[0 if new >= old else 1] += 1
        except shmdisk.DiskNotFoundError:
            time.sleep(0.001)
        except shmdisk.DisconnectedError:
            counts[2] += 1
            if disk is not None:
                disk.disconnect()
            disk = None
        except Exception as e:
            counts[3] += 1
            if counts[3] == 1:
                print(f"resizer: untyped {e!r}", file=sys.stderr)
            if disk is not None:
                disk.disconnect()
            disk = None
        time.sleep(rng.random() * 0.005)
    if disk is not None:
        disk.disconnect()


def _destroyer(
    name: str, seed: int, stop_at: float, size: int, max_size: int, gen: Any, counts: Any
) -> None:
    """Destroy and re-create; every operation on the old handle must raise DisconnectedError."""
    rng = random.Random(seed)
    buf = bytearray(512)
    ops: list[tuple[str, Callable[[shmdisk.Disk], object]]] = [
        ("read", lambda d: d.read(0, buf)),
        ("write", lambda d: d.write(0, bytes(512))),
        ("read_at", lambda d: d.read_at(1, buf)),
        ("write_at", lambda d: d.write_at(1, b"x")),
        ("get_info", lambda d: d.get_info()),
        ("resize", lambda d: d.resize(8)),
        ("discard", lambda d: d.discard(0, 1)),
        ("write_zeroes", lambda d: d.write_zeroes(0, 1)),
        ("seek_mapped", lambda d: d.seek_mapped(0)),
        ("seek_unmapped", lambda d: d.seek_unmapped(0)),
        ("extents", lambda d: d.extents()),
        ("mapped_pages", lambda d: d.mapped_pages()),
        ("flush", lambda d: d.flush()),
    ]
    while time.monotonic() < stop_at:
        time.sleep(0.02 + rng.random() * 0.08)
        try:
            old = shmdisk.connect(name, create=False)
        except shmdisk.DiskNotFoundError:
            old = None
        gen.value += 1
        shmdisk.destroy(name)
        counts[0] += 1
        if old is not None:
            label, fn = rng.choice(ops)
            try:
                fn(old)
                counts[2] += 1
                print(f"destroyer: {label} on a destroyed disk did not fail", file=sys.stderr)
            except shmdisk.DisconnectedError:
                counts[3] += 1
            except Exception as e:
                counts[2] += 1
                print(f"destroyer: {label} on a destroyed disk raised {e!r}", file=sys.stderr)
            old.disconnect()
        shmdisk.create(name, size, max_size_sectors=max_size).disconnect()
        counts[1] += 1


_D_ROUNDS, _D_OK, _D_DISC, _D_UNTYPED, _D_HANGS, _D_FIELDS = range(6)


def _disconnector(seed: int, stop_at: float, counts: Any, errors: Any) -> None:
    """Threads do I/O on one handle while the main thread disconnects it under them.

    A call racing ``disconnect`` must complete or raise ``DisconnectedError``; anything else
    (a closed descriptor, an unmapped view) is a broken promise. Uses a disk of its own.
    """
    rng = random.Random(seed)
    name = unique_name("disc")
    base = shmdisk.create(name, 4096)
    seen: set[str] = set()
    try:
        base.write(0, os.urandom(4096 * 512))
        while time.monotonic() < stop_at:
            d = shmdisk.connect(name, create=False)
            stop = threading.Event()

            def io(seed: int, d: shmdisk.Disk = d, stop: threading.Event = stop) -> None:
                trng = random.Random(seed)
                buf = bytearray(64 * 512)
                while not stop.is_set():
                    s = trng.randrange(0, 4096 - 64)
                    op = trng.random()
                    try:
                        if op < 0.4:
                            d.read(s, buf)
                        elif op < 0.8:
                            d.write(s, buf)
                        elif op < 0.9:
                            d.discard(s, 64)
                        else:
                            d.extents(s, s + 64)
                        counts[_D_OK] += 1
                    except shmdisk.DisconnectedError:
                        counts[_D_DISC] += 1
                        return
                    except Exception as e:
                        counts[_D_UNTYPED] += 1
                        msg = f"{type(e).__name__}: {e}"[:120]
                        if msg not in seen and len(seen) < 5:
                            seen.add(msg)
                            errors.put(msg)
                        return

            threads = [
                threading.Thread(target=io, args=(rng.randrange(1 << 30),)) for _ in range(3)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.random() * 0.01)
            d.disconnect()
            stop.set()
            for t in threads:
                t.join(10)
                counts[_D_HANGS] += t.is_alive()
            counts[_D_ROUNDS] += 1
    finally:
        base.disconnect()
        shmdisk.destroy(name)


def run_resize_destroy(opt: Options) -> Result:
    """Resize and destroy/re-create under I/O: no signal deaths, typed errors only."""
    r = Result("resize-destroy")
    rng = opt.rng(3)
    n_io = max(2, opt.processes - 2)
    lo, hi, max_size = 8, 4096, 8192
    t0 = time.monotonic()
    name = unique_name("rd")
    shmdisk.create(name, 1024, max_size_sectors=max_size).disconnect()
    gen = _SPAWN.Value(ctypes.c_int64, 1, lock=True)
    counts = _SPAWN.Array(ctypes.c_int64, n_io * _R_FIELDS, lock=False)
    rcounts = _SPAWN.Array(ctypes.c_int64, 4, lock=False)
    dcounts = _SPAWN.Array(ctypes.c_int64, 32, lock=False)
    stop_at = time.monotonic() + opt.duration + 2.0
    procs = [
        _SPAWN.Process(
            target=_rd_worker, args=(name, i, rng.randrange(1 << 30), stop_at, gen, counts)
        )
        for i in range(n_io)
    ]
    procs.append(
        _SPAWN.Process(
            target=_resizer, args=(name, rng.randrange(1 << 30), stop_at, lo, hi, rcounts)
        )
    )
    discounts = _SPAWN.Array(ctypes.c_int64, _D_FIELDS, lock=False)
    diserrors = _SPAWN.Queue()
    procs.append(
        _SPAWN.Process(
            target=_disconnector, args=(rng.randrange(1 << 30), stop_at, discounts, diserrors)
        )
    )
    procs.append(
        _SPAWN.Process(
            target=_destroyer,
            args=(name, rng.randrange(1 << 30), stop_at, 1024, max_size, gen, dcounts),
        )
    )
    try:
        for p in procs:
            p.start()

        def line() -> str:
            ops = sum(counts[i * _R_FIELDS + _R_OPS] for i in range(n_io))
            return (
                f"ops {ops}  resizes {rcounts[0] + rcounts[1]}  destroys {dcounts[0]}  "
                f"disconnected {sum(counts[i * _R_FIELDS + _R_DISC] for i in range(n_io))}"
            )

        _progress_loop(opt, "resize-destroy", procs, stop_at, line)
        stuck = _join_all(procs, 30)
    finally:
        shmdisk.destroy(name)
    r.seconds = time.monotonic() - t0

    def tot(f: int) -> int:
        return sum(counts[i * _R_FIELDS + f] for i in range(n_io))

    r.figures = {
        "io_processes": n_io,
        "io_ops": tot(_R_OPS),
        "grows": rcounts[0],
        "shrinks": rcounts[1],
        "destroys": dcounts[0],
        "recreates": dcounts[1],
        "destroyed_handle_ops_raising_disconnected": dcounts[3],
        "destroyed_handle_ops_wrong": dcounts[2],
        "io_disconnected_errors": tot(_R_DISC),
        "io_out_of_range_after_shrink": tot(_R_OOR),
        "reconnects_waiting_for_recreate": tot(_R_NOTFOUND),
        "untyped_errors": tot(_R_UNTYPED) + rcounts[3],
        "corrupt_sectors_seen": tot(_R_CORRUPT),
        "stale_data_seen": tot(_R_STALE),
        "disconnect_races": discounts[_D_ROUNDS],
        "disconnect_race_calls_ok": discounts[_D_OK],
        "disconnect_race_calls_disconnected": discounts[_D_DISC],
        "disconnect_race_untyped_errors": discounts[_D_UNTYPED],
        "signal_deaths": sum(1 for p in procs if (p.exitcode or 0) < 0 and p not in stuck),
        "hangs": len(stuck),
    }
    for p in procs:
        if p.exitcode != 0 and p not in stuck:
            code = p.exitcode or 0
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            r.fail(f"process {p.name} ended with {how}")
    if stuck:
        r.fail(f"{len(stuck)} processes hung")
    if discounts[_D_UNTYPED] or discounts[_D_HANGS]:
        msgs: list[str] = []
        with contextlib.suppress(Exception):
            while len(msgs) < 5:
                msgs.append(diserrors.get(timeout=0.2))
        r.fail(
            f"{discounts[_D_UNTYPED]} calls racing disconnect() raised untyped errors, "
            f"{discounts[_D_HANGS]} hung: {msgs}"
        )
    if tot(_R_UNTYPED) + rcounts[3]:
        r.fail(f"{tot(_R_UNTYPED) + rcounts[3]} operations raised an untyped error")
    if dcounts[2]:
        r.fail(f"{dcounts[2]} operations on destroyed handles did not raise DisconnectedError")
    if tot(_R_CORRUPT) or tot(_R_STALE):
        r.fail(f"{tot(_R_CORRUPT)} corrupt and {tot(_R_STALE)} stale reads")
    if dcounts[0] == 0 or rcounts[0] + rcounts[1] == 0:
        r.fail("no destroy or no resize happened")
    return r


# --------------------------------------------------------------------------- enospc


def enospc_child(duration: float, seed: int) -> dict[str, Any]:
    """Run inside a private mount namespace whose /dev/shm is a small tmpfs.

    Fills the tmpfs through one disk, and checks every failing write on the way.
    """
    rng = random.Random(seed)
    fig: dict[str, Any] = {
        "rounds": 0,
        "disk_full_errors": 0,
        "failed_writes_left_data": 0,
        "blocks_kept_by_failed_writes": 0,
        "write_zeroes_when_full": None,
        "failed_write_zeroes_changed_data": 0,
        "old_data_damaged": 0,
        "writes_into_mapped_pages_when_full": 0,
        "rewrites_after_discard": 0,
        "create_when_full": None,
        "leftover_segments": 0,
        "bytes_written_before_full": 0,
    }
    problems: list[str] = []
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    name = unique_name("enospc")
    ss = 512
    disk = shmdisk.create(name, 4 * total // ss)
    pps = disk.page_size // ss
    writer = 1
    seq = 0
    written: list[tuple[int, int, int]] = []  # (seq, start, count)
    pos = 0
    t_end = time.monotonic() + duration

    def expect_unchanged(start: int, count: int, before: bytes, what: str) -> None:
        buf = bytearray(count * ss)
        disk.read(start, buf)
        if buf != before:
            fig["failed_writes_left_data"] += 1
            problems.append(f"{what} at {start}+{count} changed the disk although it failed")

    try:
        while True:
            fig["rounds"] += 1
            # Fill with 64 KiB writes, then ever smaller ones, until even one sector fails.
            for count in (32 * pps, 8 * pps, pps, 1):
                while True:
                    if pos + count > disk.get_info().size_sectors:
                        break
                    seq += 1
                    data = stamp.make_request(writer, seq, pos, count, ss)
                    before = bytearray(count * ss)
                    disk.read(pos, before)
                    free = os.statvfs("/dev/shm").f_bfree
                    try:
                        if rng.random() < 0.5:
                            disk.write(pos, data)
                        else:
                            disk.write_at(pos * ss, data)
                    except shmdisk.DiskFullError as e:
                        fig["disk_full_errors"] += 1
                        if e.errno != errno.ENOSPC:
                            problems.append(f"DiskFullError errno {e.errno}, not ENOSPC")
                        expect_unchanged(pos, count, bytes(before), f"write of {count}")
                        lost = free - os.statvfs("/dev/shm").f_bfree
                        if lost > 0:
                            fig["blocks_kept_by_failed_writes"] += lost
                            problems.append(f"a failed write of {count} kept {lost} blocks")
                        # Next, a short write that starts in the page already written.
                        if count == 1:
                            break
                        pos = -(-pos // pps) * pps
                        break
                    _record(written, seq, pos, count)
                    if fig["rounds"] == 1:
                        fig["bytes_written_before_full"] = (pos + count) * ss
                    pos += count
            # Full now. Old data intact, reads work, and pages already mapped take writes.
            for s, start, count in written:
                buf = bytearray(count * ss)
                disk.read(start, buf)
                if stamp.count_of(buf, ss, (writer, s, start, count)) != count:
                    fig["old_data_damaged"] += 1
                    problems.append(f"request {s} at {start}+{count} damaged after ENOSPC")
            if written:
                _, start, count = written[0]
                seq += 1
                try:
                    disk.write(start, stamp.make_request(writer, seq, start, count, ss))
                    written[0] = (seq, start, count)
                    fig["writes_into_mapped_pages_when_full"] += 1
                except shmdisk.DiskFullError:
                    problems.append("a write into already mapped pages failed with ENOSPC")
            # write_zeroes without unmapping needs memory for pages that have none: over
            # written pages and on into fresh ones, it must fail whole, zeroing nothing.
            if written:
                s_last, start, count = max(written, key=lambda w: w[1])
                end = -(-(start + count) // pps) * pps + 2 * pps
                if end <= disk.get_info().size_sectors:
                    try:
                        disk.write_zeroes(start, end - start, may_unmap=False)
                        fig["write_zeroes_when_full"] = "succeeded"
                        _record(written, seq + 1, start, 0)  # forget what it zeroed
                        written[:] = [w for w in written if w[2]]
                    except shmdisk.DiskFullError:
                        fig["write_zeroes_when_full"] = "DiskFullError"
                        buf = bytearray(count * ss)
                        disk.read(start, buf)
                        if stamp.count_of(buf, ss, (writer, s_last, start, count)) != count:
                            fig["failed_write_zeroes_changed_data"] += 1
                            problems.append("a write_zeroes that failed with ENOSPC zeroed data")
                            written[:] = [w for w in written if w[0] != s_last]  # counted once
            if fig["create_when_full"] is None:
                other = unique_name("enospc-other")
                try:
                    with shmdisk.create(other, 1 << 20) as d2:
                        d2.write(0, bytes(64 * 1024))
                    fig["create_when_full"] = "created and wrote (space was left)"
                    shmdisk.destroy(other)
                except shmdisk.ShmdiskError as e:
                    fig["create_when_full"] = type(e).__name__
                    shmdisk.destroy(other)
                if os.path.exists(shmdisk.segment_path(other)):
                    problems.append("a failed create left its segment behind")
            # Discard the first half of what was written: the space must come back.
            free_before = os.statvfs("/dev/shm").f_bfree
            half = written[: len(written) // 2]
            for _, start, count in half:
                disk.discard(start, count)
            freed = (os.statvfs("/dev/shm").f_bfree - free_before) * st.f_frsize
            fig["bytes_freed_by_discard"] = freed
            if half and freed <= 0:
                problems.append("discard gave no space back")
            for _, start, count in half:
                buf = bytearray(count * ss)
                disk.read(start, buf)
                if any(buf):
                    problems.append(f"discarded range {start}+{count} does not read zero")
                    break
            del written[: len(half)]
            # ... and a write that failed before now succeeds: rewrite the discarded area.
            for _, start, count in half[:8]:
                seq += 1
                data = stamp.make_request(writer, seq, start, count, ss)
                try:
                    disk.write(start, data)
                except shmdisk.DiskFullError:
                    problems.append("write failed after discard freed space")
                    break
                buf = bytearray(count * ss)
                disk.read(start, buf)
                if buf != data.tobytes():
                    problems.append("rewrite after discard reads back wrong")
                _record(written, seq, start, count)
                fig["rewrites_after_discard"] += 1
            if time.monotonic() > t_end:
                break
            # Next round fills from where the rewrites stopped; wrap to reuse freed pages.
            pos = max(start + count for _, start, count in written) if written else 0
            if pos + 32 * pps > disk.get_info().size_sectors:
                pos = 0
    finally:
        disk.disconnect()
        shmdisk.destroy(name)
    fig["leftover_segments"] = len(shmdisk.list_disks())
    if fig["leftover_segments"]:
        problems.append(f"segments left in /dev/shm: {shmdisk.list_disks()}")
    if fig["disk_full_errors"] == 0:
        problems.append("the tmpfs never filled up")
    fig["tmpfs_bytes"] = total
    return {"figures": fig, "problems": problems}


def _record(written: list[tuple[int, int, int]], seq: int, start: int, count: int) -> None:
    """Remember a completed write; forget older ones it overwrote (they are no longer whole)."""
    written[:] = [w for w in written if w[1] + w[2] <= start or start + count <= w[1]]
    written.append((seq, start, count))


def run_enospc(opt: Options) -> Result:
    """Fill a private small tmpfs over /dev/shm (unshare -m) and check every ENOSPC."""
    r = Result("enospc")
    t0 = time.monotonic()
    if os.geteuid() != 0:
        r.skipped = "needs root for unshare -m and mount"
        return r
    seed = opt.rng(4).randrange(1 << 30)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import stress; "
        "print(json.dumps(stress.enospc_child(float(sys.argv[2]), int(sys.argv[3]))))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    inner = (
        f"mount -t tmpfs -o size={opt.tmpfs_size},mode=1777 tmpfs /dev/shm && "
        f'exec "$0" -c "$1" "$2" "$3" "$4"'
    )
    cmd = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        inner,
        sys.executable,
        script,
        here,
        str(opt.duration),
        str(seed),
    ]
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        r.skipped = f"unshare -m not permitted here: {probe.stderr.strip()}"
        return r
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opt.duration + 120)
    except subprocess.TimeoutExpired:
        r.fail("the ENOSPC child hung")
        return r
    r.seconds = time.monotonic() - t0
    if proc.returncode != 0:
        r.fail(f"ENOSPC child exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return r
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    r.figures = out["figures"]
    for p in out["problems"]:
        r.fail(p)
    return r


# --------------------------------------------------------------------------- hostile

_RESIZE_LIMIT = 1 << 40  # the default growth limit of a small disk (shmdisk's DEFAULT_MAX_BYTES)
HOSTILE_NAMES = [
    "",
    "/",
    ".",
    "..",
    "a/b",
    "../etc",
    "x" * 201,
    "a\x00b",
    "sp ace",
    "é",
    "a\nb",
    "shm/../x",
    None,
    5,
    1.5,
    b"bytes",
    ["list"],
]


def hostile_api(examples: int, seed: int) -> dict[str, Any]:
    """Hypothesis-driven bad calls against a disk and a model of its bytes.

    Every call is predicted: valid calls must succeed and match the model; invalid ones must
    raise a ShmdiskError and leave the device byte-for-byte unchanged.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    ss = 512
    size = 40  # not a whole number of pages: the last page is partial
    name = unique_name("hostile")
    disk = shmdisk.create(name, size)
    ro = shmdisk.connect(name, read_only=True, create=False)
    gone = shmdisk.connect(name, create=False)
    gone.disconnect()
    model = bytearray(os.urandom(size * ss))
    disk.write(0, model)
    fig = {"calls": 0, "rejected_typed": 0, "accepted": 0, "device_checks": 0}
    problems: list[str] = []

    def device() -> bytes:
        buf = bytearray(len(model))
        disk.read(0, buf)
        return bytes(buf)

    def note(msg: str) -> None:
        if len(problems) < 20:
            problems.append(msg)

    # Weighted towards calls that are nearly right: those reach deepest before a check fails.
    near = st.integers(0, size - 1)
    ints = st.one_of(
        near,
        near,
        near,
        st.integers(-3, size + 3),
        st.integers(0, size * ss),
        st.integers(-(2**70), 2**70),
        st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63), size * ss, 2**62 // ss]),
    )
    junk = st.sampled_from([None, "0", 1.0, 2.5, [0], object(), True, False, np.int64(3)])
    sectors = st.one_of(ints, ints, ints, junk)

    def as_bytes(n: int) -> st.SearchStrategy[Any]:
        return st.sampled_from(["bytes", "bytearray", "mv", "u2", "f8", "2d", "strided"]).map(
            lambda kind: _make_buffer(kind, n)
        )

    whole = st.integers(1, 4).map(lambda k: k * ss)
    lengths = st.one_of(whole, whole, whole, st.integers(0, 3 * ss), st.just(size * ss), st.just(0))
    single = lengths.flatmap(as_bytes)
    buffers = st.one_of(
        single,
        single,
        single,
        st.lists(single, max_size=3),
        st.sampled_from(["text", 7, None, [b"x" * ss, "no"], (bytearray(ss), 3)]),
    )

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hseed(seed)
    @given(
        handle=st.sampled_from(["rw", "rw", "rw", "ro", "gone"]),
        op=st.sampled_from(
            [
                "read",
                "write",
                "read_at",
                "write_at",
                "discard",
                "write_zeroes",
                "seek_mapped",
                "seek_unmapped",
                "extents",
                "resize",
            ]
        ),
        a=sectors,
        b=sectors,
        bufs=buffers,
    )
    def one(handle: str, op: str, a: Any, b: Any, bufs: Any) -> None:
        d = {"rw": disk, "ro": ro, "gone": gone}[handle]
        fig["calls"] += 1
        expect, apply = _predict(op, handle, a, b, bufs, ss, len(model) // ss)
        if expect == "skip":
            return
        before = device()
        if before != bytes(model):
            note(f"device differs from the model before {op}")
            model[:] = before
        try:
            ret = _call(d, op, a, b, bufs)
        except shmdisk.ShmdiskError as e:
            fig["rejected_typed"] += 1
            if expect == "ok":
                note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) rejected: {e!r}")
            fig["device_checks"] += 1
            if device() != bytes(model):
                note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) failed but changed the disk")
                model[:] = device()
            return
        except Exception as e:
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) raised untyped {e!r}")
            model[:] = device()
            return
        fig["accepted"] += 1
        if expect == "error":
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) succeeded, expected an error")
            model[:] = device()
            return
        problem = apply(model, ret, bufs)
        if problem:
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}): {problem}")
        if device() != bytes(model):
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) left the disk unlike the model")
            model[:] = device()

    try:
        one()
        # Names: every bad one is refused by every entry point with a typed error.
        for bad in HOSTILE_NAMES:
            entry_points: tuple[tuple[str, Callable[[Any], object]], ...] = (
                ("create", lambda n: shmdisk.create(n, 8)),
                ("connect", lambda n: shmdisk.connect(n)),
                ("connect(create=False)", lambda n: shmdisk.connect(n, create=False)),
                ("destroy", lambda n: shmdisk.destroy(n)),
                ("inspect", lambda n: shmdisk.inspect(n)),
                ("segment_path", lambda n: shmdisk.segment_path(n)),
            )
            for fn_name, fn in entry_points:
                fig["calls"] += 1
                try:
                    fn(bad)
                    note(f"{fn_name}({bad!r}) accepted a bad name")
                except shmdisk.ShmdiskError:
                    fig["rejected_typed"] += 1
                except Exception as e:
                    note(f"{fn_name}({bad!r}) raised untyped {e!r}")
    except Exception as e:  # hypothesis re-raises what it could not shrink away
        note(f"hostile API run stopped: {e!r}")
    finally:
        ro.disconnect()
        disk.disconnect()
        shmdisk.destroy(name)
    return {"figures": fig, "problems": problems}


def _make_buffer(kind: str, n: int) -> Any:
    raw = os.urandom(n)
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "mv":
        return memoryview(bytearray(raw))
    if kind == "u2":
        return np.frombuffer(bytearray(raw[: n - n % 2]), dtype="<u2").copy()
    if kind == "f8":
        return np.frombuffer(bytearray(raw[: n - n % 8]), dtype="<f8").copy()
    if kind == "2d":
        return (
            np.frombuffer(bytearray(raw[: n - n % 2]), dtype=np.uint8).reshape(-1, 2).copy()
            if (n >= 2)
            else bytearray(raw)
        )
    # strided: every other byte of a twice-as-long buffer; not C-contiguous
    return memoryview(bytearray(os.urandom(2 * n)))[::2]


def _nbytes(b: Any) -> int:
    return memoryview(b).nbytes


def _desc(bufs: Any) -> str:
    if isinstance(bufs, (list, tuple)):
        return "[" + ", ".join(_desc(b) for b in bufs) + "]"
    try:
        m = memoryview(bufs)
        return f"<{type(bufs).__name__} {m.nbytes} B{' ro' if m.readonly else ''}>"
    except TypeError:
        return repr(bufs)[:40]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _buf_ok(b: Any, writable: bool, ss: int | None) -> bool:
    """Is ``b`` a buffer the contract accepts (C-contiguous, whole sectors if ``ss``)?"""
    try:
        m = memoryview(b)
    except TypeError:
        return False
    if writable and m.readonly:
        return False
    if ss is not None and not m.c_contiguous:
        return False
    return ss is None or m.nbytes % ss == 0


def _predict(
    op: str, handle: str, a: Any, b: Any, bufs: Any, ss: int, size: int
) -> tuple[str, Callable[[bytearray, Any, Any], str | None]]:
    """('ok' | 'error', how the model changes on success) for one call."""

    def nothing(model: bytearray, ret: Any, bufs: Any) -> str | None:
        return None

    if handle == "gone":
        return "error", nothing
    items = list(bufs) if isinstance(bufs, (list, tuple)) else [bufs]
    writes = op in ("write", "write_at", "discard", "write_zeroes", "resize")
    if handle == "ro" and writes:
        return "error", nothing
    if op in ("read", "write"):
        if not _is_int(a) or not all(_buf_ok(x, op == "read", ss) for x in items):
            if (
                op == "write"
                and _is_int(a)
                and not isinstance(bufs, (list, tuple))
                and _buf_ok(bufs, False, None)
                and _nbytes(bufs) % ss == 0
                and 0 <= int(a) * ss <= size * ss - _nbytes(bufs)
            ):
                # Not C-contiguous but otherwise fine: refusing is allowed, and so is copying
                # it correctly (the core's fast path for 1-D byte memoryviews does).
                return "either", _apply_io(op, int(a) * ss, items)
            return "error", nothing
        total = sum(_nbytes(x) for x in items)
        off = int(a) * ss
        if off < 0 or off + total > size * ss:
            return "error", nothing
        return "ok", _apply_io(op, off, items)
    if op in ("read_at", "write_at"):
        if isinstance(bufs, (list, tuple)):
            return "error", nothing
        if not _is_int(a) or not _buf_ok(bufs, op == "read_at", None):
            return "error", nothing
        if not memoryview(bufs).c_contiguous:
            return "error", nothing
        off, total = int(a), _nbytes(bufs)
        if off < 0 or off + total > size * ss:
            return "error", nothing
        return "ok", _apply_io(op, off, items)
    if op in ("discard", "write_zeroes"):
        if not (_is_int(a) and _is_int(b)):
            return "error", nothing
        s, n = int(a), int(b)
        if s < 0 or n < 0 or s + n > size:
            return "error", nothing

        def zero(model: bytearray, ret: Any, bufs: Any) -> str | None:
            model[s * ss : (s + n) * ss] = bytes(n * ss)
            return None

        return "ok", zero
    if op in ("seek_mapped", "seek_unmapped"):
        if not _is_int(a) or int(a) < 0:
            return "error", nothing
        s = int(a)

        def seek(model: bytearray, ret: Any, bufs: Any) -> str | None:
            if s >= size:
                return None if ret == s else f"returned {ret}, expected {s} past the end"
            if not s <= ret <= size:
                return f"returned {ret} outside [{s}, {size}]"
            if op == "seek_mapped" and any(model[s * ss : ret * ss]):
                return f"skipped data: sectors [{s}, {ret}) are not all zero"
            if op == "seek_unmapped" and ret < size and any(model[ret * ss : (ret + 1) * ss]):
                return f"sector {ret} holds data, not 'certainly zero'"
            return None

        return "ok", seek
    if op == "extents":
        if not _is_int(a) or not (b is None or _is_int(b)):
            return "error", nothing
        lo = int(a)
        hi = size if b is None else int(b)
        if not 0 <= lo <= hi <= size:
            return "error", nothing

        def ext(model: bytearray, ret: Any, bufs: Any) -> str | None:
            s = lo
            for e in ret:
                if e.sector != s or e.n_sectors <= 0:
                    return f"extents not contiguous at {s}: {e}"
                if not e.mapped and any(model[e.sector * ss : (e.sector + e.n_sectors) * ss]):
                    return f"extent {e} called zero holds data"
                s += e.n_sectors
            return None if s == hi else f"extents end at {s}, not {hi}"

        return "ok", ext
    if op == "resize":
        # The model keeps one size, so a valid resize is only tried to the current size; other
        # valid sizes are skipped (a resize to 2**31 sectors is legal, and reading that disk
        # back after every call is not). Negative, huge and non-int sizes must be refused.
        if not _is_int(a) or int(a) < 0 or int(a) > _RESIZE_LIMIT // ss:
            return "error", nothing
        return ("ok" if int(a) == size else "skip"), nothing
    raise AssertionError(op)


def _apply_io(op: str, off: int, items: list[Any]) -> Callable[[bytearray, Any, Any], str | None]:
    def apply(model: bytearray, ret: Any, bufs: Any) -> str | None:
        o = off
        for x in items:
            data = memoryview(x).tobytes()  # any shape, any strides: the bytes in C order
            n = len(data)
            if op.startswith("write"):
                model[o : o + n] = data
            elif data != bytes(model[o : o + n]):
                return f"read bytes [{o}, {o + n}) differ from the model"
            o += n
        return None

    return apply


def _call(d: shmdisk.Disk, op: str, a: Any, b: Any, bufs: Any) -> Any:
    if op in ("read", "write", "read_at", "write_at"):
        return getattr(d, op)(a, bufs)
    if op in ("discard", "write_zeroes"):
        return getattr(d, op)(a, b)
    if op in ("seek_mapped", "seek_unmapped", "resize"):
        return getattr(d, op)(a)
    if op == "extents":
        return d.extents(a, b)
    raise AssertionError(op)


# --------------------------------------------------------------------------- forged segments


def _template() -> tuple[bytes, int]:
    """The header and file size of a real, small disk (max 64 sectors: a 40 KiB file)."""
    name = unique_name("tmpl")
    shmdisk.create(name, 64, max_size_sectors=64).disconnect()
    try:
        path = shmdisk.segment_path(name)
        with open(path, "rb") as f:
            raw = f.read(4096)
        return raw, os.stat(path).st_size
    finally:
        shmdisk.destroy(name)


def forged_case(i: int, seed: int, tmpl: bytes, size: int) -> tuple[str, str, bytes, int]:
    """Case ``i``: (label, kind, header bytes, file size); kind is 'file', 'dir' or 'fifo'."""
    from shmdisk import _layout as lay

    words = list(struct.unpack_from("<16Q", tmpl))
    fixed: list[tuple[str, int, int]] = [
        ("wrong magic", lay.F_MAGIC, 0x0123456789ABCDEF),
        ("no magic (never finished)", lay.F_MAGIC, 0),
        ("version + 1", lay.F_VERSION, lay.VERSION + 1),
        ("version 0", lay.F_VERSION, 0),
        ("header size 0", lay.F_HEADER_SIZE, 0),
        ("sector size 0", lay.F_SECTOR_SIZE, 0),
        ("sector size 513", lay.F_SECTOR_SIZE, 513),
        ("sector size 2**63", lay.F_SECTOR_SIZE, 1 << 63),
        ("page size 0", lay.F_PAGE_SIZE, 0),
        ("page size 1", lay.F_PAGE_SIZE, 1),
        ("size beyond capacity", lay.F_SIZE_SECTORS, 65),
        ("size 2**64-1", lay.F_SIZE_SECTORS, 2**64 - 1),
        ("capacity beyond the file", lay.F_CAPACITY, 1 << 30),
        ("capacity not whole pages", lay.F_CAPACITY, 4097),
        ("max pages 2**40", lay.F_MAX_PAGES, 1 << 40),
        ("max pages 0", lay.F_MAX_PAGES, 0),
        ("data offset 0", lay.F_DATA_OFFSET, 0),
        ("data offset past the file", lay.F_DATA_OFFSET, 1 << 40),
        ("destroyed flag set", lay.F_DESTROYED, 1),
        ("generation 2**64-1", lay.F_GENERATION, 2**64 - 1),
    ]
    specials: list[tuple[str, str, bytes, int]] = [
        ("empty file", "file", b"", 0),
        ("7 bytes", "file", tmpl[:7], 7),
        ("header cut at 100 bytes", "file", tmpl[:100], 100),
        ("header only, no map or data", "file", tmpl, 4096),
        ("file one page short", "file", tmpl, size - 4096),
        ("file one byte short", "file", tmpl, size - 1),
        ("a directory", "dir", b"", 0),
        ("a FIFO", "fifo", b"", 0),
    ]
    if i < len(fixed):
        label, f, value = fixed[i]
        w = list(words)
        w[f] = value
        return label, "file", struct.pack("<16Q", *w) + tmpl[128:], size
    i -= len(fixed)
    if i < len(specials):
        return specials[i]
    rng = random.Random(seed * 7919 + i)
    kind = rng.randrange(5)
    if kind == 4:  # a valid header over a garbage page map: odd, mapped, huge counters
        words = [rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)])
                 for _ in range(64)]  # fmt: skip
        return "garbage page map", "file", tmpl + struct.pack("<64I", *words), size
    if kind == 0:  # random bytes, random length
        n = rng.choice([rng.randrange(0, 200), rng.randrange(0, 8192)])
        return f"random {n} bytes", "file", rng.randbytes(n), n
    if kind == 1:  # a valid header, then one word set to a random or boundary value
        w = list(words)
        f = rng.randrange(16)
        w[f] = rng.choice(
            [
                0,
                1,
                2**63,
                2**64 - 1,
                rng.getrandbits(64),
                w[f] + 1,
                w[f] - 1 & 0xFFFF_FFFF_FFFF_FFFF,
            ]
        )
        return f"word {f} = {w[f]:#x}", "file", struct.pack("<16Q", *w) + tmpl[128:], size
    if kind == 2:  # a valid header with random bytes flipped
        b = bytearray(tmpl[:128])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(128)] ^= 1 << rng.randrange(8)
        return "bit flips in the header", "file", bytes(b) + tmpl[128:], size
    cut = rng.randrange(0, size + 1)  # truncated anywhere
    return f"truncated to {cut} bytes", "file", tmpl[: min(cut, 4096)], cut


def _make_forged(path: str, kind: str, raw: bytes, size: int) -> None:
    if kind == "dir":
        os.mkdir(path, 0o700)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def _remove_forged(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)


def _forged_worker(first: int, count: int, seed: int, tag: str, out: Any) -> None:
    """Try every entry point on forged segments; report each case before touching it."""
    from shmdisk import _layout as lay
    from shmdisk import _segment

    # A segment without its magic is "being created": connect waits for its creator. The
    # default wait is seconds; a short one keeps hundreds of such cases fast and still tested.
    _segment.READY_TIMEOUT = 0.2
    tmpl, size = _template()
    for i in range(first, first + count):
        label, kind, raw, fsize = forged_case(i, seed, tmpl, size)
        name = f"{tag}-{i}"
        path = shmdisk.segment_path(name)
        out.send(("case", i, label))
        res: dict[str, Any] = {"i": i, "label": label, "problems": [], "tried": 0, "typed": 0}
        _make_forged(path, kind, raw, fsize)
        ino = os.lstat(path).st_ino

        def replaced(path: str = path, ino: int = ino) -> bool:
            # A leak guard in a concurrent test run may destroy a segment it cannot attribute
            # (a bad header names no creator); connect() then makes a new disk. Not our finding.
            try:
                return os.lstat(path).st_ino != ino
            except FileNotFoundError:
                return True

        try:
            header_ok = False
            if kind == "file" and fsize >= 128 and len(raw) >= 128:
                h = lay.Header.unpack(raw[:128])
                header_ok = h.problem(fsize) is None
            try:
                info = shmdisk.inspect(name)
                res["tried"] += 1
                if not header_ok and info.state == "ok":
                    res["problems"].append(f"inspect says ok for a bad header ({info})")
            except shmdisk.ShmdiskError:
                res["tried"] += 1
                res["typed"] += 1
            except Exception as e:
                res["problems"].append(f"inspect raised untyped {e!r}")
            for how, kw in (
                ("connect(create=False)", {"create": False}),
                ("connect(read_only=True)", {"read_only": True, "create": False}),
                ("connect()", {}),
            ):
                res["tried"] += 1
                try:
                    d = shmdisk.connect(name, **kw)
                except shmdisk.ShmdiskError:
                    res["typed"] += 1
                    continue
                except Exception as e:
                    res["problems"].append(f"{how} raised untyped {e!r}")
                    continue
                try:
                    if not header_ok and replaced():
                        res["disturbed"] = True
                    elif not header_ok:
                        res["problems"].append(f"{how} accepted a bad header")
                    _exercise(d)
                except shmdisk.ShmdiskError:
                    pass
                except Exception as e:
                    res["problems"].append(f"{how}: I/O on the handle raised untyped {e!r}")
                finally:
                    d.disconnect()
            if kind == "file" and not header_ok and not replaced():
                with open(path, "rb") as f:
                    if f.read(len(raw)) != raw:
                        res["problems"].append("a bad segment was modified by connect")
            res["tried"] += 1
            try:
                shmdisk.destroy(name)
            except shmdisk.ShmdiskError:
                res["typed"] += 1
            except Exception as e:
                res["problems"].append(f"destroy raised untyped {e!r}")
        finally:
            _remove_forged(path)
        out.send(("done", i, res))
    out.send(("end", first + count, None))


def _exercise(d: shmdisk.Disk) -> None:
    """Use an accepted handle everywhere it could fault: first and last sector, both ways."""
    info = d.get_info()
    buf = bytearray(info.sector_size)
    if info.size_sectors:
        d.read(0, buf)
        d.read(info.size_sectors - 1, buf)
        if info.read_write:
            d.write(info.size_sectors - 1, buf)
    d.extents()
    d.mapped_pages()


def hostile_segments(cases: int, seed: int, timeout: float = 60.0) -> dict[str, Any]:
    """Forge ``cases`` segments and feed them to a child; a crash or hang there is a failure."""
    tag = unique_name("forged")
    fig = {
        "segments": 0,
        "entry_point_calls": 0,
        "typed_errors": 0,
        "crashes": 0,
        "hangs": 0,
        "disturbed_by_other_processes": 0,
    }
    problems: list[str] = []
    i = 0
    while i < cases:
        parent, child = _SPAWN.Pipe(duplex=False)
        p = _SPAWN.Process(target=_forged_worker, args=(i, cases - i, seed, tag, child))
        p.start()
        child.close()
        current = (i, "(starting)")
        deadline = time.monotonic() + timeout
        ended = False
        while time.monotonic() < deadline:
            if not parent.poll(0.1):
                if not p.is_alive() and not parent.poll(0):
                    break
                continue
            try:
                what, j, payload = parent.recv()
            except EOFError:
                break
            if what == "case":
                current = (j, payload)
                deadline = time.monotonic() + 10  # one case may take at most this long
            elif what == "done":
                fig["segments"] += 1
                fig["entry_point_calls"] += payload["tried"]
                fig["typed_errors"] += payload["typed"]
                fig["disturbed_by_other_processes"] += bool(payload.get("disturbed"))
                for prob in payload["problems"]:
                    problems.append(f"case {j} ({payload['label']}): {prob}")
                i = j + 1
            else:
                ended = True
                break
        if not ended:
            if p.is_alive():
                fig["hangs"] += 1
                problems.append(f"case {current[0]} ({current[1]}): hung")
                p.kill()
            p.join(5)
            if p.exitcode is not None and p.exitcode < 0 and p.exitcode != -signal.SIGKILL:
                fig["crashes"] += 1
                problems.append(f"case {current[0]} ({current[1]}): died of signal {-p.exitcode}")
            _remove_forged(shmdisk.segment_path(f"{tag}-{current[0]}"))
            i = current[0] + 1  # go on with the next case in a fresh child
        else:
            p.join(10)
        parent.close()
    return {"figures": fig, "problems": problems}


def run_hostile(opt: Options) -> Result:
    """Bad arguments against a model, and forged segments in a child process."""
    r = Result("hostile")
    t0 = time.monotonic()
    seed = opt.rng(5).randrange(1 << 30)
    api = hostile_api(opt.examples, seed)
    opt.say(f"hostile       {time.monotonic() - t0:6.1f}s  API calls {api['figures']['calls']}")
    seg = hostile_segments(max(40, opt.examples // 4), seed)
    r.seconds = time.monotonic() - t0
    r.figures = {
        "api_calls": api["figures"]["calls"],
        "api_rejected_typed": api["figures"]["rejected_typed"],
        "api_accepted_and_matched_model": api["figures"]["accepted"],
        "api_unchanged_checks": api["figures"]["device_checks"],
        "forged_segments": seg["figures"]["segments"],
        "forged_entry_point_calls": seg["figures"]["entry_point_calls"],
        "forged_typed_errors": seg["figures"]["typed_errors"],
        "forged_disturbed_by_other_processes": seg["figures"]["disturbed_by_other_processes"],
        "crashes": seg["figures"]["crashes"],
        "hangs": seg["figures"]["hangs"],
        "seed": seed,
    }
    for prob in api["problems"] + seg["problems"]:
        r.fail(prob)
    return r


# --------------------------------------------------------------------------- permissions

NOBODY = 65534


def _as_other_user(fn: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534; its (call, outcome) list."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            res = fn()
            os.write(wfd, json.dumps(res).encode())
        except BaseException:
            os.write(wfd, json.dumps([("child", traceback.format_exc())]).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        b = os.read(rfd, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status):
        return [("child", f"died: status {status}")]
    return [(str(a), str(b)) for a, b in json.loads(b"".join(chunks) or b"[]")]


def _outcome(fn: Callable[[], object]) -> str:
    try:
        v = fn()
        if isinstance(v, shmdisk.Disk):
            v.disconnect()
            return "ok"
        return "ok" if v is None or not isinstance(v, (bytes, bytearray)) else "ok:" + v.hex()[:16]
    except shmdisk.ShmdiskError as e:
        return type(e).__name__
    except Exception as e:
        return "untyped " + repr(e)


def run_permissions(opt: Options) -> Result:
    """A 0600 disk refuses another uid; a 0644 disk lets it read, never write or destroy."""
    r = Result("permissions")
    t0 = time.monotonic()
    if os.geteuid() != 0:
        r.skipped = "needs root to drop to another uid"
        return r
    private, shared = unique_name("perm600"), unique_name("perm644")
    d1 = shmdisk.create(private, 64)
    d2 = shmdisk.create(shared, 64, mode=0o644)
    try:
        payload = bytes(range(256)) * 2
        d1.write(0, payload)
        d2.write(0, payload)
        modes = {
            "default": os.stat(shmdisk.segment_path(private)).st_mode & 0o777,
            "0644": os.stat(shmdisk.segment_path(shared)).st_mode & 0o777,
        }
        if modes["default"] != 0o600:
            r.fail(f"default mode is {modes['default']:o}, not 600")
        if modes["0644"] != 0o644:
            r.fail(f"mode=0o644 gave {modes['0644']:o}")

        def other() -> list[tuple[str, str]]:
            def read_shared() -> bytes:
                with shmdisk.connect(shared, read_only=True, create=False) as d:
                    buf = bytearray(512)
                    d.read(0, buf)
                    return bytes(buf)

            def write_shared() -> None:
                with shmdisk.connect(shared, read_only=True, create=False) as d:
                    d.write(0, bytes(512))

            return [
                ("connect 0600", _outcome(lambda: shmdisk.connect(private))),
                (
                    "connect 0600 create=False",
                    _outcome(lambda: shmdisk.connect(private, create=False)),
                ),
                (
                    "connect 0600 read_only",
                    _outcome(lambda: shmdisk.connect(private, read_only=True, create=False)),
                ),
                ("inspect 0600", _outcome(lambda: shmdisk.inspect(private))),
                ("destroy 0600", _outcome(lambda: shmdisk.destroy(private))),
                ("create over 0600", _outcome(lambda: shmdisk.create(private, 8))),
                ("connect 0644 rw", _outcome(lambda: shmdisk.connect(shared, create=False))),
                ("read 0644 read_only", _outcome(read_shared)),
                ("write via read_only 0644", _outcome(write_shared)),
                ("destroy 0644", _outcome(lambda: shmdisk.destroy(shared))),
            ]

        got = dict(_as_other_user(other))
        expected = {
            "connect 0600": "PermissionDeniedError",
            "connect 0600 create=False": "PermissionDeniedError",
            "connect 0600 read_only": "PermissionDeniedError",
            "inspect 0600": "ok|PermissionDeniedError",
            "destroy 0600": "PermissionDeniedError",
            "create over 0600": "DiskExistsError|PermissionDeniedError",
            "connect 0644 rw": "PermissionDeniedError",
            "read 0644 read_only": "ok:" + payload.hex()[:16],
            "write via read_only 0644": "IsReadOnlyError",
            "destroy 0644": "PermissionDeniedError",
        }
        for call, want in expected.items():
            if got.get(call) not in want.split("|"):
                r.fail(f"as uid {NOBODY}: {call} gave {got.get(call)!r}, expected {want}")
        if "child" in got:
            r.fail(f"child: {got['child']}")
        # Nothing the other user did may have changed or removed the disks.
        for d in (d1, d2):
            buf = bytearray(512)
            d.read(0, buf)
            if buf != payload:
                r.fail(f"disk {d.name} changed under another user's calls")
        r.figures = {
            "default_mode": f"{modes['default']:o}",
            "calls_as_other_uid": len(expected),
            "refused_as_expected": sum(
                1 for c, w in expected.items() if got.get(c) in w.split("|")
            ),
            "outcomes": got,
        }
    finally:
        d1.disconnect()
        d2.disconnect()
        shmdisk.destroy(private)
        shmdisk.destroy(shared)
    r.seconds = time.monotonic() - t0
    return r


# --------------------------------------------------------------------------- CLI

RUNNERS: dict[str, Callable[[Options], Result]] = {
    "torture": run_torture,
    "kill": run_kill,
    "resize-destroy": run_resize_destroy,
    "enospc": run_enospc,
    "hostile": run_hostile,
    "permissions": run_permissions,
}


def _summary(r: Result) -> str:
    status = "SKIP" if r.skipped else ("PASS" if r.ok else "FAIL")
    lines = [f"{r.scenario}: {status}  ({r.seconds:.1f} s)"]
    if r.skipped:
        lines.append(f"    {r.skipped}")
    for k, v in r.figures.items():
        lines.append(f"    {k:<44} {v}")
    for p in r.problems:
        lines.append(f"    problem: {p}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="stress.py",
        description="Reliability stress runs for shmdisk: each scenario prints figures and "
        "exits 1 if the library broke a promise. See RELIABILITY.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n"
        "  torture         random overlapping reads/writes, every read checked for tearing\n"
        "  kill            SIGKILL writers mid-write and holding locks; survivors must go on\n"
        "  resize-destroy  resize and destroy/re-create under I/O; no signal deaths\n"
        "  enospc          fill a private small tmpfs over /dev/shm (root, unshare -m)\n"
        "  hostile         bad arguments vs a model; forged segment headers (child process)\n"
        "  permissions     a 0600 disk refuses uid 65534 (root)\n"
        "  all             every scenario in turn\n\n"
        "example: python tools/stress.py torture --duration 60 --processes 4",
    )
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"], help="what to run")
    ap.add_argument(
        "-d", "--duration", type=float, default=10.0, help="seconds per timed scenario (default 10)"
    )
    ap.add_argument(
        "-p",
        "--processes",
        type=int,
        default=4,
        help="processes (default 4). torture: workers; kill: half are victims, the rest "
        "read, plus one writer and one resizer; resize-destroy: N-2 (at least 2) do I/O "
        "besides the resizer and the destroyer",
    )
    ap.add_argument("--seed", type=int, help="random seed (default: a fresh one)")
    ap.add_argument(
        "--window-at",
        type=int,
        default=0,
        help="torture: first page of the I/O window of --disk-pages pages (default 0; "
        "1000 makes requests cross the 1024-page boundary of the page map's own pages)",
    )
    ap.add_argument(
        "--blocks",
        action="store_true",
        help="torture: write, discard and zero whole blocks (2 pages + 3 sectors, edges "
        "inside pages); every block must read as one whole request or all zeros",
    )
    ap.add_argument(
        "--resize",
        action="store_true",
        help="torture --blocks: now and then shrink the disk to a block boundary and grow it "
        "back; dropped blocks must read zero, never half-dropped",
    )
    ap.add_argument(
        "--no-discard",
        dest="discard",
        action="store_false",
        help="torture --blocks: no discards or zeroings (to look at --resize alone)",
    )
    ap.add_argument(
        "--churn",
        action="store_true",
        help="torture: each of --threads runs short-lived threads one after another on the "
        "shared handle (a thread's lock descriptor is closed when it ends)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torture: threads per process sharing one handle (default 1)",
    )
    ap.add_argument(
        "--sector-size",
        type=int,
        default=512,
        help="torture, kill: sector size of the test disk (default 512)",
    )
    ap.add_argument(
        "--disk-pages",
        type=int,
        default=64,
        help="torture: disk size in 4 KiB pages (default 64: many collisions)",
    )
    ap.add_argument(
        "--max-pages", type=int, default=4, help="torture: longest request in pages (default 4)"
    )
    ap.add_argument(
        "--large-mib",
        type=float,
        default=4.0,
        help="kill: size of each victim's large write in MiB (default 4)",
    )
    ap.add_argument(
        "--examples",
        type=int,
        default=2000,
        help="hostile: hypothesis examples (default 2000; forged segments: 1/4)",
    )
    ap.add_argument(
        "--tmpfs-size", default="8M", help="enospc: size of the private tmpfs (default 8M)"
    )
    ap.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout (progress goes to stderr)",
    )
    ap.add_argument(
        "--split-writes",
        action="store_true",
        help="torture self-test: issue each request as several writes, which must be "
        "reported as torn reads (proves the checker can see tearing)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.processes < 2:
        ap.error("--duration must be > 0 and --processes at least 2")
    stream = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    opt = Options(
        duration=args.duration,
        processes=args.processes,
        seed=args.seed,
        progress=None if args.quiet else say,
        disk_pages=args.disk_pages,
        max_pages=args.max_pages,
        large_mib=args.large_mib,
        examples=args.examples,
        tmpfs_size=args.tmpfs_size,
        split_writes=args.split_writes,
        threads=args.threads,
        window_at=args.window_at,
        blocks=args.blocks,
        resize=args.resize,
        discard=args.discard,
        churn=args.churn,
        sector_size=args.sector_size,
    )
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    for n in names:
        t0 = time.monotonic()
        res = RUNNERS[n](opt)
        res.seconds = res.seconds or time.monotonic() - t0
        results.append(res)
        if not args.json:
            print(_summary(res), flush=True)
    if args.json:
        print(json.dumps({"schema": SCHEMA, "results": [x.as_dict() for x in results]}, indent=2))
    return 0 if all(x.ok for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
