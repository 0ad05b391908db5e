"""nt-writes: writes of 2 to 8 MiB on glibc's non-temporal copy path, against lock-free readers.

Every process runs with ``GLIBC_TUNABLES=glibc.cpu.x86_non_temporal_threshold=0x100000``, so
each copy above 1 MiB (memcpy, and memset where glibc has the NT path for it) uses non-temporal
stores, which may pass the ordinary stores of the page counters around them unless a fence
stands between (``shmdisk/_pageio.py``). Writers and readers alternate engines with
``--engines mixed``; readers use a read-write and a read-only handle, in turn at random.

Two regions of one disk:

* requests: stamped writes of 2-8 MiB at any sector; reads of 2-8 MiB at any sector, each
  checked whole for tearing (``tools/stamp.py``);
* blocks of 2 MiB + 3 sectors: each only ever holds one whole write or zeros
  (``write_zeroes`` without unmapping: zero-filling of the same size, or with unmapping), and a
  read of 1-3 blocks must show exactly that for each.
"""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import time
import traceback
from typing import Any

import stamp

import shmdisk

from . import _engines
from ._common import SPAWN, Options, Result, drain, join_all, progress_loop, scratch_disk
from ._requests import read_request, write_request
from .torture import judge_blocks

_OPS, _READS, _RO_READS, _WRITES, _ZEROINGS, _BYTES, _TORN, _CORRUPT, _FIELDS = range(9)
_MIB = 1 << 20


def _worker(
    name: str,
    idx: int,
    writer: bool,
    seed: int,
    duration: float,
    req_sectors: int,
    blen: int,
    nblocks: int,
    counters: Any,
    out: Any,
) -> None:
    """One writer or reader until ``duration`` has passed since it connected."""
    res: dict[str, Any] = {"idx": idx, "problems": [], "error": None}
    res["engine"] = _engines.running()
    res["tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    rng = random.Random(seed)
    base = idx * _FIELDS
    c = [0] * _FIELDS
    try:
        rw = shmdisk.connect(name, create=False)
        ro = None if writer else shmdisk.connect(name, read_only=True, create=False)
        ss = rw.sector_size
        lo, hi = 2 * _MIB // ss, 8 * _MIB // ss
        stop_at = time.monotonic() + duration
        seq = 0
        while time.monotonic() < stop_at:
            count = rng.randint(lo, hi)
            blocks = rng.random() < 0.3
            disk = rw if ro is None or rng.random() < 0.5 else ro
            if not writer:
                c[_RO_READS] += disk is ro
            if writer:
                seq += 1
                if blocks:
                    b = rng.randrange(nblocks)
                    start = req_sectors + b * blen
                    if rng.random() < 0.5:
                        data = stamp.make_request(idx + 1, seq, start, blen, ss)
                        write_request(disk, start, data, rng)
                        c[_WRITES] += 1
                    else:
                        disk.write_zeroes(start, blen, may_unmap=rng.random() < 0.3)
                        c[_ZEROINGS] += 1
                    c[_BYTES] += blen * ss
                else:
                    start = rng.randrange(0, req_sectors - count + 1)
                    write_request(
                        disk, start, stamp.make_request(idx + 1, seq, start, count, ss), rng
                    )
                    c[_WRITES] += 1
                    c[_BYTES] += count * ss
            elif blocks:
                n = rng.randint(1, nblocks)
                b = rng.randrange(nblocks - n + 1)
                start = req_sectors + b * blen
                buf = read_request(disk, start, n * blen, rng)
                bad, corrupt = judge_blocks(buf, start, blen, n, ss)
                c[_READS] += 1
                if bad:
                    c[_CORRUPT if corrupt else _TORN] += 1
                    if len(res["problems"]) < 5:
                        res["problems"].append(bad[0])
            else:
                start = rng.randrange(0, req_sectors - count + 1)
                buf = read_request(disk, start, count, rng, req_sectors)
                v = stamp.check_read(buf, start, ss)
                c[_READS] += 1
                if v.torn:
                    c[_TORN] += 1
                if v.corrupt:
                    c[_CORRUPT] += 1
                if not v.ok and len(res["problems"]) < 5:
                    res["problems"].append(
                        f"read [{start}, {start + count}): {(v.torn + v.corrupt)[0]}"
                    )
            c[_OPS] += 1
            for i, value in enumerate(c):
                counters[base + i] = value
        rw.disconnect()
        if ro is not None:
            ro.disconnect()
    except BaseException:
        res["error"] = traceback.format_exc(limit=4)
    res["counts"] = c
    out.put(res)


def nt_threshold() -> str:
    """What glibc's dynamic loader says the NT threshold is under the tunable we set."""
    env = dict(os.environ, GLIBC_TUNABLES=_engines.NT_TUNABLE)
    for ld in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        if os.path.exists(ld):
            try:
                got = subprocess.run(
                    [ld, "--list-tunables"], env=env, capture_output=True, text=True, timeout=10
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in got.stdout.splitlines():
                if "x86_non_temporal_threshold" in line:
                    return line.split(":", 1)[1].split()[0]
    return "unknown"


def run_nt_writes(opt: Options) -> Result:
    """2-8 MiB writes with non-temporal stores forced, against lock-free readers."""
    r = Result("nt-writes")
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    rng = opt.rng(8)
    ss = opt.sector_size
    req_sectors = 24 * _MIB // ss
    blen = 2 * _MIB // ss + 3
    nblocks = 4
    size = req_sectors + nblocks * blen
    n_writers = max(1, opt.processes // 2)
    n = max(n_writers + 1, opt.processes)
    t0 = time.monotonic()
    with scratch_disk("nt", size, ss) as name:
        counters = SPAWN.Array(ctypes.c_int64, n * _FIELDS, lock=False)
        out = SPAWN.Queue()
        procs = []
        roles = []
        for i in range(n):
            writer = i < n_writers
            roles.append("writer" if writer else "reader")
            p = SPAWN.Process(
                target=_worker,
                args=(
                    name,
                    i,
                    writer,
                    rng.randrange(1 << 30),
                    opt.duration,
                    req_sectors,
                    blen,
                    nblocks,
                    counters,
                    out,
                ),
            )
            # Writers and readers each alternate engines.
            k = i if writer else i - n_writers
            _engines.start(p, _engines.plan(opt.engines, k), nt_stores=True)
            procs.append(p)

        def line() -> str:
            tot = [sum(counters[i * _FIELDS + f] for i in range(n)) for f in range(_FIELDS)]
            return f"reads {tot[_READS]}  writes {tot[_WRITES]}  torn {tot[_TORN]}"

        progress_loop(opt, "nt-writes", procs, None, line)
        results = drain(out, n, timeout=60)
        stuck = join_all(procs, 30)
    r.seconds = time.monotonic() - t0
    tot = [sum(res["counts"][f] for res in results) for f in range(_FIELDS)]
    by: dict[str, int] = {}
    for res in results:
        key = f"{roles[res['idx']]}s_{res['engine']}"
        by[key] = by.get(key, 0) + res["counts"][_OPS]
    r.figures = {
        "engines": opt.engines,
        "nt_threshold_in_children": nt_threshold(),
        "writers": n_writers,
        "readers": n - n_writers,
        "request_mib": [2, 8],
        "block_mib": round(blen * ss / _MIB, 3),
        "ops_by_role_and_engine": dict(sorted(by.items())),
        "reads_checked": tot[_READS],
        "of_them_through_read_only_handles": tot[_RO_READS],
        "writes": tot[_WRITES],
        "zeroings": tot[_ZEROINGS],
        "gib_written": round(tot[_BYTES] / (1 << 30), 2),
        "torn_reads": tot[_TORN],
        "corrupt_reads": tot[_CORRUPT],
    }
    for res in results:
        if res["error"]:
            r.fail(f"worker {res['idx']} crashed: {res['error']}")
        for prob in res["problems"]:
            r.fail(f"worker {res['idx']}: {prob}")
        if _engines.NT_TUNABLE not in res["tunables"]:
            r.fail(f"worker {res['idx']} ran without the NT tunable")
    if len(results) < n:
        r.fail(f"only {len(results)} of {n} workers reported")
    if stuck:
        r.fail(f"{len(stuck)} workers hung")
    if tot[_TORN] or tot[_CORRUPT]:
        r.fail(f"{tot[_TORN]} torn and {tot[_CORRUPT]} corrupt reads")
    if tot[_READS] == 0 or tot[_WRITES] == 0:
        r.fail("no reads or no writes were done")
    return r
