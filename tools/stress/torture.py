"""torture: N processes of random overlapping reads and writes; every sector is stamped
(tools/stamp.py) and every read is checked for tearing. With ``--engines mixed`` the processes
alternate between the native and the python engine on one disk."""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time
import traceback
from typing import Any

import stamp

import shmdisk

from . import _engines, _table
from ._common import (
    SPAWN,
    Options,
    Result,
    drain,
    join_all,
    progress_loop,
    scratch_disk,
)
from ._requests import pick_count, read_request, split_views, write_request

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
                    write_request(disk, start, data, rng)
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
                    buf = read_request(disk, start, count, rng)
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
    size: int,
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
        write_request(disk, start, stamp.make_request(writer, seq, start, blen, ss), rng)
        c[_T_WRITES] += 1
    elif op < 0.5 and "d" in mix:
        if rng.random() < 0.5:
            disk.discard(start, blen)
        else:
            disk.write_zeroes(start, blen, may_unmap=rng.random() < 0.5)
        c[_T_WRITES] += 1
    else:
        n = min(rng.randint(1, 3), nblocks - b)
        buf = read_request(disk, start, n * blen, rng)
        c[_T_READS] += 1
        bad, corrupt = judge_blocks(buf, start, blen, n, ss)
        if bad:
            c[_T_CORRUPT if corrupt else _T_TORN] += 1
            if len(problems) < 5:
                problems.append(bad[0])


def judge_blocks(buf: bytearray, start: int, blen: int, n: int, ss: int) -> tuple[list[str], bool]:
    """What is wrong with a read of ``n`` blocks of ``blen`` sectors from sector ``start``, each
    of which may only ever hold one whole request or zeros; and whether a sector was corrupt."""
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
    return bad, bool(v.corrupt)


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
    size: int,
    mix: str,
    counters: Any,
    out: Any,
) -> None:
    """One process: ``threads`` threads share one Disk handle (the handle is thread-safe).

    ``size`` is the disk's full size: with resizes on, what get_info() says at any moment may
    be a shrink in progress, and blocks laid out from that would straddle everyone else's.
    """
    res: dict[str, Any] = {
        "wid": wid,
        "problems": [],
        "error": None,
        "engine": _engines.running(),
    }
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
                        size,
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
                # Thread churn: short-lived threads, one after another, on the shared handle.
                # A mutex belongs to a thread (its robust list, its thread id in the futex
                # word), so each thread that ends must leave nothing held and nothing open.
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
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    ss = opt.sector_size
    rng = opt.rng(1)
    pps = 4096 // ss if ss < 4096 else 1
    window = opt.disk_pages * pps
    size = opt.window_at * pps + window
    n = opt.processes
    t0 = time.monotonic()
    with scratch_disk("torture", size, ss) as name:
        slots = n * opt.threads
        counters = SPAWN.Array(ctypes.c_int64, slots * _T_FIELDS, lock=False)
        out = SPAWN.Queue()
        procs = [
            SPAWN.Process(
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
                    size,
                    ("d" if opt.discard else "")
                    + ("r" if opt.resize else "")
                    + ("c" if opt.churn else ""),
                    counters,
                    out,
                ),
            )
            for w in range(n)
        ]
        planned = [_engines.resolve(_engines.plan(opt.engines, w)) for w in range(n)]
        for w, p in enumerate(procs):
            _engines.start(p, planned[w])
        progress_loop(opt, "torture", procs, None, lambda: _torture_line(counters, slots, t0))
        results = drain(out, n, timeout=30)
        stuck = join_all(procs, 10)
        # Everyone is gone: no stripe may be left held (by a thread that ended, say).
        with shmdisk.connect(name, create=False) as d:
            left_held = len(_table.stuck_stripes(d, patience=0.5))
    r.seconds = time.monotonic() - t0
    totals = [
        sum(res.get("counts", [0] * _T_FIELDS)[i] for res in results) for i in range(_T_FIELDS)
    ]
    spans = [res["span"] for res in results if "span" in res]
    busy = max(0.001, max(e for _, e in spans) - min(b for b, _ in spans)) if spans else 1.0
    ops_by_engine: dict[str, int] = {}
    for res in results:
        e = res["engine"]
        ops_by_engine[e] = ops_by_engine.get(e, 0) + res.get("counts", [0] * _T_FIELDS)[_T_OPS]
        if e != planned[res["wid"]]:
            r.fail(f"worker {res['wid']} runs the {e} engine, not {planned[res['wid']]}")
    r.figures = {
        "processes": n,
        "engines": opt.engines,
        "ops_by_engine": dict(sorted(ops_by_engine.items())),
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
        "stripes_left_held": left_held,
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
    if left_held:
        r.fail(f"{left_held} stripes still held after every worker ended")
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
