"""read-only: read-only handles beside writers that are killed mid-write. The readers must
never stall (they read past a dead holder's pages as it left them), and never hold up the
disk's owner, running or SIGSTOPped in the middle of a read.

A read-only handle maps the segment without write access, so it cannot take a mutex: it reads
lock-free, polls while a live writer has the pages, and reads on once the futex word says the
holder died (``shmdisk/_pageio.py``). The processes:

* the owner (spawned): writes stamped requests into its region with a read-write handle,
  timing every write; the longest while a reader is stopped is reported apart;
* read-only readers (spawned, engines alternating): read the owner's region (checked for
  tearing) and the victims' slots (read past whatever a dead writer left), timing every read;
  the parent SIGSTOPs and continues them at random;
* victims (forked by a nursery of their engine): large writes into their own slot, SIGKILLed
  mid-write;
* probes (``_probe.py``), one per engine: right after each kill, before any read-write handle
  has repaired the dead victim's pages, they read its slot through read-only handles; that must
  return at once, and give exactly the bytes a read-write read gives after repairing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import signal
import statistics
import time
from typing import Any

import numpy as np
import stamp

import shmdisk
from shmdisk import _layout as L
from shmdisk import _pageio

from . import _engines, _table
from ._common import SPAWN, Options, Result, SchedulingDelay, join_all, scratch_disk
from ._nursery import ChildContext, Nurseries, die_with_parent
from ._probe import Probe
from ._requests import pick_count, read_request, write_request

_REGION_PAGES = 256  # the owner's region
_SLOT_UNITS = 32  # a victim's slot: 32 stripe units (2 MiB of 4 KiB pages)
# Flags: stop, readers stopped now. Victim state: writing. Per process (owner 0, readers 1..):
_F_STOP, _F_STOPPED, _F_FIELDS = range(3)
_V_WRITING, _V_FIELDS = 0, 1
(
    _P_OPS,
    _P_LONGEST,
    _P_LONGEST_STOPPED,
    _P_WHILE_STOPPED,
    _P_TORN,
    _P_CORRUPT,
    _P_PAST_DEAD,
    _P_ENGINE,
    _P_PAUSES,
    _P_FIELDS,
) = range(10)


def _slot(ss: int, pps: int, v: int) -> tuple[int, int]:
    """Victim ``v``'s slot as (first sector, sectors)."""
    n = _SLOT_UNITS * (pps << L.STRIPE_SHIFT)
    return _REGION_PAGES * pps + v * n, n


def victim(ctx: ChildContext, name: str, v: int, seed: int) -> None:
    """Large writes into this victim's slot, forever (until SIGKILL)."""
    state = ctx.shared["vstate"]
    rng = random.Random(seed)
    disk = shmdisk.connect(name, create=False)
    ss = disk.sector_size
    start, n = _slot(ss, max(1, disk.page_size // ss), v)
    data = bytearray(n * ss)
    while True:
        count = rng.randint(1, n)
        data[:8] = os.urandom(8)
        state[v * _V_FIELDS + _V_WRITING] = 1
        disk.write(start, memoryview(data)[: count * ss])
        state[v * _V_FIELDS + _V_WRITING] = 0


def owner(name: str, seed: int, flags: Any, stats: Any) -> None:
    """Stamped writes into the owner's region; each write timed (see the module text)."""
    die_with_parent()
    rng = random.Random(seed)
    disk = shmdisk.connect(name, create=False)
    stats[_P_ENGINE] = _engines.code(_engines.running())
    ss = disk.sector_size
    pps = max(1, disk.page_size // ss)
    region = _REGION_PAGES * pps
    seq = 0
    while not flags[_F_STOP]:
        count = pick_count(rng, pps, 16)
        start = rng.randrange(0, region - count + 1)
        seq += 1
        data = stamp.make_request(1, seq, start, count, ss)
        stopped = flags[_F_STOPPED]
        t = time.monotonic_ns()
        write_request(disk, start, data, rng)
        t = time.monotonic_ns() - t
        stopped = stopped or flags[_F_STOPPED]
        stats[_P_OPS] += 1
        stats[_P_LONGEST] = max(stats[_P_LONGEST], t)
        if stopped:
            stats[_P_WHILE_STOPPED] += 1
            stats[_P_LONGEST_STOPPED] = max(stats[_P_LONGEST_STOPPED], t)
    disk.disconnect()


def reader(name: str, idx: int, seed: int, victims: int, flags: Any, stats: Any) -> None:
    """Read-only reads of the owner's region (checked) and of the victims' slots (timed)."""
    die_with_parent()
    rng = random.Random(seed)
    disk = shmdisk.connect(name, read_only=True, create=False)
    base = idx * _P_FIELDS
    stats[base + _P_ENGINE] = _engines.code(_engines.running())
    seg = disk._io.current().seg
    ss = disk.sector_size
    pps = max(1, disk.page_size // ss)
    region = _REGION_PAGES * pps
    end = _slot(ss, pps, victims)[0]
    while not flags[_F_STOP]:
        if rng.random() < 0.5:
            count = pick_count(rng, pps, 16)
            start = rng.randrange(0, region - count + 1)
        else:
            start = rng.randrange(region, end)
            count = rng.randint(1, min(end - start, (1 << 20) // ss))
        p0, p1 = start // pps, (start + count - 1) // pps + 1
        ws = _pageio.snapshot(seg, p0, p1)
        odd = np.flatnonzero(ws & np.uint32(1))
        words = _table.futex_words(disk)
        past_dead = any(not words[L.stripe_of(p0 + int(i))] & L.FUTEX_TID_MASK for i in odd)
        pauses = stats[base + _P_PAUSES]
        t = time.monotonic_ns()
        buf = read_request(disk, start, count, rng, end)
        t = time.monotonic_ns() - t
        stats[base + _P_OPS] += 1
        stats[base + _P_PAST_DEAD] += past_dead
        if pauses == stats[base + _P_PAUSES]:  # a read this reader was stopped in is no stall
            stats[base + _P_LONGEST] = max(stats[base + _P_LONGEST], t)
        if start < region:
            v = stamp.check_read(buf, start, ss)
            stats[base + _P_TORN] += bool(v.torn)
            stats[base + _P_CORRUPT] += bool(v.corrupt)
    disk.disconnect()


def run_read_only(opt: Options) -> Result:
    """Read-only readers beside writers killed mid-write: no stall, no hold on the owner."""
    r = Result("read-only")
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    rng = opt.rng(9)
    ss = opt.sector_size
    pps = max(1, 4096 // ss)
    victims = 2
    n_readers = max(2, opt.processes - 1)
    size = _slot(ss, pps, victims)[0]
    t0 = time.monotonic()
    kills = kills_held = kills_odd = 0
    probe_reads: list[float] = []
    mismatches = 0
    stops = 0
    with scratch_disk("ro", size, ss) as name:
        disk = shmdisk.connect(name, create=False)
        disk.write(0, bytes(size * ss))  # every page mapped: rewrites only
        flags = SPAWN.Array(ctypes.c_int64, _F_FIELDS, lock=False)
        stats = SPAWN.Array(ctypes.c_int64, (1 + n_readers) * _P_FIELDS, lock=False)
        vstate = SPAWN.Array(ctypes.c_int64, victims * _V_FIELDS, lock=False)
        nurseries = Nurseries(opt.engines, {"vstate": vstate})
        procs = [SPAWN.Process(target=owner, args=(name, rng.randrange(1 << 30), flags, stats))]
        procs += [
            SPAWN.Process(
                target=reader,
                args=(name, 1 + i, rng.randrange(1 << 30), victims, flags, stats),
            )
            for i in range(n_readers)
        ]
        probes: list[Probe] = []
        paused: dict[int, float] = {}  # reader pid -> when to continue it
        delay = SchedulingDelay()
        try:
            _engines.start(procs[0], _engines.plan(opt.engines, 0))
            for i, p in enumerate(procs[1:]):
                _engines.start(p, _engines.plan(opt.engines, i))
            probes = [Probe(name, _engines.plan(opt.engines, i)) for i in range(2)]
            gen = 0
            pids: list[tuple[int, Any]] = []
            for v in range(victims):
                gen += 1
                n = nurseries.for_child(gen)
                pids.append((n.fork(victim, name, v, rng.randrange(1 << 30)), n))
            ready_by = time.monotonic() + 120
            while any(stats[i * _P_FIELDS + _P_OPS] == 0 for i in range(1 + n_readers)):
                if time.monotonic() > ready_by:
                    r.fail("the owner or readers did not start")
                    break
                time.sleep(0.01)
            if not all(p.ready(120) for p in probes):
                r.fail("probes did not start")
            for i in range(1 + n_readers):  # count from now on, not while processes started
                stats[i * _P_FIELDS + _P_LONGEST] = 0
            t_run = time.monotonic()
            hung = False
            delay.reset()
            hard_stop = t_run + max(3 * opt.duration, opt.duration + 30)
            while True:
                # Past the duration, go on until min_kills, a quarter of them mid-write.
                now = time.monotonic()
                enough = kills >= opt.min_kills and 4 * kills_odd >= opt.min_kills
                if now >= hard_stop or (now >= t_run + opt.duration and enough):
                    break
                stops += _pause_readers(rng, procs[1:], paused, flags, stats)
                v = rng.randrange(victims)
                pid, n = pids[v]
                until = time.monotonic() + 1.0
                while not vstate[v * _V_FIELDS + _V_WRITING] and time.monotonic() < until:
                    time.sleep(0.0002)
                time.sleep(rng.random() * 0.002)
                held = _table.held_by(disk, pid)
                os.kill(pid, signal.SIGKILL)
                if n.reap(pid, 10) != -signal.SIGKILL:
                    r.fail(f"victim {pid} did not die of SIGKILL")
                kills += 1
                kills_held += held > 0
                start, count = _slot(ss, pps, v)
                p0, p1 = start // pps, (start + count) // pps
                kills_odd += _table.odd_pages(disk, p0, p1) > 0
                # Read-only probes first (nobody repaired the dead writer's pages yet), then a
                # read-write read, which repairs: the same bytes either way.
                for pr in probes:
                    pr.call("read", start, count, read_only=True, timeout=5.0)
                buf = bytearray(count * ss)
                outs = [pr.outcome(30) for pr in probes]
                disk.read(start, buf)
                digest = hashlib.blake2b(buf, digest_size=16).hexdigest()
                if None in outs:
                    r.fail("a read-only read past a dead writer never returned")
                    hung = True
                    break
                for pr, out in zip(probes, outs, strict=True):
                    if out is None or out.status != "ok":
                        r.fail(f"a {pr.engine} read-only read past a dead writer: {out}")
                        continue
                    probe_reads.append(out.seconds)
                    if out.digest != digest:
                        mismatches += 1
                        r.fail("a read-only read past a dead writer differs from a repaired read")
                gen += 1
                n = nurseries.for_child(gen)
                pids[v] = (n.fork(victim, name, v, rng.randrange(1 << 30)), n)
                if len(r.problems) >= 10:
                    break
            for pid, n in pids:
                os.kill(pid, signal.SIGKILL)
                n.reap(pid, 10)
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            paused.clear()
            flags[_F_STOPPED] = 0
            flags[_F_STOP] = 1
            stuck = {} if hung else {p.engine: p.ask("stuck", 5.0) for p in probes}
            stragglers = join_all(procs, 30)
            sched = delay.worst_ms()
        finally:
            delay.stop()
            flags[_F_STOP] = 1
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            for pr in probes:
                pr.close()
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            nurseries.close()
            disk.disconnect()
    r.seconds = time.monotonic() - t0

    def col(f: int, rows: range) -> list[int]:
        return [stats[i * _P_FIELDS + f] for i in rows]

    readers = range(1, 1 + n_readers)
    r.figures = {
        "engines": opt.engines,
        "reader_engines": sorted({_engines.name_of(e) for e in col(_P_ENGINE, readers)}),
        "readers": n_readers,
        "kills": kills,
        "kills_with_stripes_held": kills_held,
        "kills_leaving_pages_mid_write": kills_odd,
        "read_only_reads": sum(col(_P_OPS, readers)),
        "read_only_reads_past_a_dead_writer": sum(col(_P_PAST_DEAD, readers)),
        "longest_read_only_read_ms": round(max(col(_P_LONGEST, readers)) / 1e6, 1),
        "probe_reads_past_a_dead_writer": len(probe_reads),
        "probe_read_ms_median": round(statistics.median(probe_reads) * 1e3, 2)
        if probe_reads
        else None,
        "probe_read_ms_max": round(max(probe_reads) * 1e3, 2) if probe_reads else None,
        "probe_reads_differing_from_repaired": mismatches,
        "reader_stops": stops,
        "owner_writes": stats[_P_OPS],
        "owner_writes_while_a_reader_was_stopped": stats[_P_WHILE_STOPPED],
        "owner_longest_write_ms": round(stats[_P_LONGEST] / 1e6, 1),
        "owner_longest_write_while_a_reader_was_stopped_ms": round(
            stats[_P_LONGEST_STOPPED] / 1e6, 1
        ),
        "machine_scheduling_delay_ms_max": round(sched, 1),
        "torn_reads": sum(col(_P_TORN, readers)),
        "corrupt_reads": sum(col(_P_CORRUPT, readers)),
        "stuck_stripes_after": {e: s[0] for e, s in stuck.items()},
    }
    f = r.figures
    if stragglers:
        r.fail(f"{len(stragglers)} processes hung")
    for p in procs:
        if p.exitcode != 0 and p not in stragglers:
            r.fail(f"{p.name} ended with {p.exitcode}")
    if f["torn_reads"] or f["corrupt_reads"]:
        r.fail(f"{f['torn_reads']} torn and {f['corrupt_reads']} corrupt reads")
    # 1 s (2 s for reads), or three times the longest a process that only sleeps was kept off
    # the CPU, if that is more: a loaded machine stalls everyone, the owner included.
    write_limit, read_limit = max(1000, 3 * sched), max(2000, 3 * sched)
    if f["owner_longest_write_ms"] > write_limit:
        r.fail(
            f"the owner's longest write took {f['owner_longest_write_ms']} ms "
            f"(limit {write_limit:.0f})"
        )
    if f["longest_read_only_read_ms"] > read_limit:
        r.fail(
            f"a read-only read took {f['longest_read_only_read_ms']} ms (limit {read_limit:.0f})"
        )
    for e, (n_stuck, whole, err) in stuck.items():
        if n_stuck or not whole:
            r.fail(f"{e}: {n_stuck} stripes stuck after the run, hold_writes {whole} {err}")
    if kills == 0 or f["owner_writes_while_a_reader_was_stopped"] == 0:
        r.fail("no kills, or no owner write while a reader was stopped")
    return r


def _pause_readers(
    rng: random.Random, readers: list[Any], paused: dict[int, float], flags: Any, stats: Any
) -> int:
    """Continue readers whose pause is over; stop one more now and then. How many stopped."""
    now = time.monotonic()
    for pid, due in list(paused.items()):
        if now >= due:
            os.kill(pid, signal.SIGCONT)
            del paused[pid]
    started = 0
    if rng.random() < 0.5:
        i = rng.randrange(len(readers))
        p = readers[i]
        if p.pid not in paused and p.is_alive():
            stats[(1 + i) * _P_FIELDS + _P_PAUSES] += 1  # first: the reader's read is excused
            os.kill(p.pid, signal.SIGSTOP)
            paused[p.pid] = now + rng.uniform(0.02, 0.3)
            started = 1
    flags[_F_STOPPED] = len(paused)
    return started
