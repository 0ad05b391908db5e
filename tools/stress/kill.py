"""kill: victims SIGKILLed mid-write, holding up to 128 stripes or all 1024, and mid-resize; the
survivors of both engines must go on (recovery timed, repairs counted, longest stall measured,
hangs counted), completed writes stay whole, and no stripe is left stuck.

The processes (``_kill_roles.py`` has them and the disk's layout):

* writer victims, forked by a nursery of their engine, write stamped requests of 1 to 128
  stripe units and read large ranges; the resize victim grows and shrinks the disk (1024
  stripes); holders take N stripes (1-128) or all 1024 and stay mid-write until killed;
* survivors (spawned): one writer, readers checking every read of the survivor region;
* probes (``_probe.py``), one per engine or two: the callers whose blocked call times recovery.

Kills come in a shuffled cycle of kinds, so a run of any length covers each: at a random
moment, mid large write, mid large read, mid resize, holding N stripes, holding all stripes.
For a holder kill the probes are first sent into calls that need its stripes, and the kill
waits until they are seen asleep on them (``FUTEX_WAITERS``); recovery is the time from the
SIGKILL until a probe's call returned.
"""

from __future__ import annotations

import ctypes
import os
import signal
import statistics
import time
from typing import Any

import stamp

import shmdisk
from shmdisk import _layout as L
from shmdisk import _pageio

from . import _engines, _table
from ._common import FORK, SPAWN, Options, Result, SchedulingDelay, join_all, scratch_disk
from ._kill_roles import (
    F_FIELDS,
    F_HOLD_EPOCH,
    F_HOLDING,
    F_MEASURE,
    F_STOP,
    HOLDING,
    READING,
    RESIZING,
    S_BEAT,
    S_CHECKED,
    S_CORRUPT,
    S_ENGINE,
    S_FIELDS,
    S_GAP,
    S_HELD_GAP,
    S_OPS,
    S_REPAIRED,
    S_TORN,
    SCRIBBLE,
    V_COUNT_DONE,
    V_COUNT_NOW,
    V_FIELDS,
    V_HELD,
    V_SEQ_DONE,
    V_SEQ_NOW,
    V_SLOT_DONE,
    V_SLOT_NOW,
    V_STATE,
    V_WRITER,
    WRITING,
    KillLayout,
    holder,
    resize_victim,
    survivor,
    writer_victim,
)
from ._nursery import Nurseries
from ._probe import Probe

KINDS = ("random", "mid_write", "mid_read", "mid_resize", "holding", "holding_all")


class _Run:
    """The parent's view of one kill run: processes, counters, and the checks after a kill."""

    def __init__(self, opt: Options, r: Result, name: str, lay: KillLayout) -> None:
        self.opt, self.r, self.name, self.lay = opt, r, name, lay
        self.rng = opt.rng(2)
        self.disk = shmdisk.connect(name, create=False)
        self.resizer = lay.victims  # victim index of the resizer
        self.hold_idx = lay.victims + 1  # victim index of the holders
        self.vstate = SPAWN.Array(ctypes.c_int64, (lay.victims + 2) * V_FIELDS, lock=False)
        self.flags = SPAWN.Array(ctypes.c_int64, F_FIELDS, lock=False)
        self.nurseries = Nurseries(opt.engines, {"vstate": self.vstate})
        self.victims: list[tuple[int, Any]] = []  # (pid, nursery) per victim index
        self.gen = 0
        self.kills = dict.fromkeys(KINDS, 0)
        self.held_at_kill: list[int] = []  # stripes the victim held just before each kill
        self.partial_left = 0
        self.completed_checked = 0
        self.completed_bad = 0
        self.recovery: dict[str, list[float]] = {}  # engine -> seconds
        self.recovery_all: list[float] = []  # holding all 1024 stripes
        self.probes_not_blocked = 0
        self.probes_not_seen_waiting = 0
        self.hung = False  # a probe never returned: it cannot take more calls
        self.holder_pages_checked = 0
        self.fresh_pages_checked = 0
        self.tail = max(lay.pps, (1 << 20) // lay.ss)  # the resizer's 1 MiB

    # ------------------------------------------------------------ victims

    def spawn_victim(self, v: int) -> None:
        self.gen += 1
        nursery = self.nurseries.for_child(self.gen)
        base = v * V_FIELDS
        for f in range(V_FIELDS):
            self.vstate[base + f] = 0
        seed = self.rng.randrange(1 << 30)
        if v == self.resizer:
            pid = nursery.fork(resize_victim, self.name, v, self.lay, self.tail, seed)
        else:
            writer = (self.gen << 8) | (v + 2)  # writer 1 is the survivor writer
            self.vstate[base + V_WRITER] = writer
            inherit = self.name if self.gen % 2 else None
            pid = nursery.fork(writer_victim, self.name, v, self.lay, writer, seed, inherit=inherit)
        if v < len(self.victims):
            self.victims[v] = (pid, nursery)
        else:
            self.victims.append((pid, nursery))

    def kill(self, pid: int, nursery: Any) -> int:
        """SIGKILL ``pid`` and reap it; the stripes it held just before (from futex words)."""
        held = _table.held_by(self.disk, pid)
        os.kill(pid, signal.SIGKILL)
        code = nursery.reap(pid, 10)
        if code != -signal.SIGKILL:
            self.r.fail(f"victim {pid} did not die of SIGKILL (exit {code})")
        self.held_at_kill.append(held)
        return held

    def wait_state(self, v: int, want: int, timeout: float) -> bool:
        until = time.monotonic() + timeout
        while self.vstate[v * V_FIELDS + V_STATE] != want:
            if time.monotonic() >= until:
                return False
            time.sleep(0.0002)
        return True

    def kill_victim(self, kind: str) -> None:
        """A writer or resize victim killed at a random moment or in the state ``kind`` names."""
        lay = self.lay
        v = self.resizer if kind == "mid_resize" else self.rng.randrange(lay.victims)
        if kind == "random" and self.rng.random() < 0.25:
            v = self.resizer
        pid, nursery = self.victims[v]
        vb = v * V_FIELDS
        if kind == "random":
            time.sleep(self.rng.random() * 0.05)
        else:
            want = {"mid_write": WRITING, "mid_read": READING, "mid_resize": RESIZING}[kind]
            if not self.wait_state(v, want, 1.0):
                kind = "random"  # the victim never got there in time (a loaded machine)
            else:
                time.sleep(self.rng.random() * 0.003)
        writer = self.vstate[vb + V_WRITER]
        self.kill(pid, nursery)
        self.kills[kind] += 1
        if v != self.resizer:
            self.check_slots(v, writer)
        self.spawn_victim(v)

    def check_slots(self, v: int, writer: int) -> None:
        """The last completed write is whole in its slot; the killed one may be partial."""
        lay, ss, vb = self.lay, self.lay.ss, v * V_FIELDS
        seq_done = self.vstate[vb + V_SEQ_DONE]
        if seq_done:
            start = lay.slot_start(v, self.vstate[vb + V_SLOT_DONE])
            count = self.vstate[vb + V_COUNT_DONE]
            buf = bytearray(count * ss)
            self.disk.read(start, buf)
            got = stamp.count_of(buf, ss, (writer, seq_done, start, count))
            self.completed_checked += 1
            if got != count:
                self.completed_bad += 1
                self.r.fail(f"completed write {writer}/{seq_done} has only {got}/{count} sectors")
        seq_now = self.vstate[vb + V_SEQ_NOW]
        if seq_now and seq_now != seq_done:
            start = lay.slot_start(v, self.vstate[vb + V_SLOT_NOW])
            count = self.vstate[vb + V_COUNT_NOW]
            buf = bytearray(count * ss)
            self.disk.read(start, buf)
            got = stamp.count_of(buf, ss, (writer, seq_now, start, count))
            self.partial_left += 0 < got < count

    # ------------------------------------------------------------ holders

    def kill_holder(self, kind: str, probes: list[Probe]) -> None:
        """A holder of N stripes (or all) killed while probes of both engines wait on it."""
        lay, rng = self.lay, self.rng
        if kind == "holding":
            mode = "stripes"
            units = rng.choice([1, rng.randint(2, 16), rng.randint(17, 127), 128])
            units = min(units, lay.hold_units)
        else:
            mode = rng.choice(["all", "hold_writes"])
            units = lay.hold_units
        h0 = lay.page(lay.hold_start)
        unit_pages = 1 << L.STRIPE_SHIFT
        # One page of each held unit for the probes and the odd pages, never its last page:
        # the last page of one held unit is the fresh page, which nobody else writes.
        pages = [h0 + u * unit_pages + rng.randrange(unit_pages - 1) for u in range(units)]
        rng.shuffle(pages)
        odd = sorted(pages[: min(4, len(pages))])
        fresh = h0 + rng.randrange(units) * unit_pages + unit_pages - 1
        # The fresh page must start unmapped: a first write into it is what the holder fakes.
        self.disk.discard(fresh * lay.pps, lay.pps)
        self.flags[F_HOLD_EPOCH] += 1
        self.flags[F_HOLDING] = 1
        try:
            self.gen += 1
            nursery = self.nurseries.for_child(self.gen)
            vb = self.hold_idx * V_FIELDS
            self.vstate[vb + V_STATE] = 0
            if mode == "hold_writes":
                odd = []
            pid = nursery.fork(holder, self.name, self.hold_idx, lay, mode, units, odd, fresh)
            if not self.wait_state(self.hold_idx, HOLDING, 10.0):
                code = nursery.reap(pid, 0.1)
                if code is None:
                    os.kill(pid, signal.SIGKILL)
                    nursery.reap(pid, 5)
                self.r.fail(f"a holder ({mode}, {units} units) could not take its stripes in 10 s")
                return
            # Each probe calls into a page the holder holds: a read of a page it left odd
            # (waits for the stripe: the page is mid-write) or a write of a held page.
            targets = []
            # Writes go to held pages that are not mid-write, so that the mid-write pages
            # keep what the holder left (with 4 KiB sectors a write covers a whole page).
            writable = [p for p in pages if p not in odd]
            for i, probe in enumerate(probes):
                if odd and (i % 2 == 0 or not writable):
                    page, op = odd[i % len(odd)], "read"
                else:
                    page, op = rng.choice(writable), "write"
                sector = page * lay.pps + lay.pps - 1
                probe.call(op, sector, 1)
                targets.append(_table.stripe_of_sector(self.disk, sector))
            asleep = self.wait_asleep(probes, targets)
            time.sleep(rng.random() * 0.005)
            t_kill = time.monotonic_ns()
            held = self.kill(pid, nursery)
            if held != self.vstate[vb + V_HELD]:
                self.r.fail(
                    f"a holder said it held {self.vstate[vb + V_HELD]} stripes, its "
                    f"futex words say {held}"
                )
            self.kills[kind] += 1
            self.collect(probes, asleep, t_kill, mode)
            self.check_holder_pages(odd, fresh, mode)
        finally:
            self.flags[F_HOLDING] = 0

    def wait_asleep(self, probes: list[Probe], targets: list[int]) -> list[bool]:
        """Until every probe is inside its call and asleep on its stripe (at most 5 s); which
        ones were seen so."""
        deadline = time.monotonic() + 5.0
        seen = []
        for probe, s in zip(probes, targets, strict=True):
            ok = False
            while not ok and time.monotonic() < deadline:
                ok = probe.inside() and _table.has_waiters(self.disk, s)
                if not ok:
                    time.sleep(0.0005)
            seen.append(ok)
        return seen

    def collect(self, probes: list[Probe], asleep: list[bool], t_kill: int, mode: str) -> None:
        """Each probe's call must return after the kill; recovery counts the ones that were
        seen asleep on the stripe when it came."""
        for probe, seen in zip(probes, asleep, strict=True):
            out = probe.outcome(self.opt.hang_after)
            if out is None:
                self.hung = True
                self.r.fail(
                    f"a {probe.engine} probe's call did not return {self.opt.hang_after} s "
                    "after its stripes' holder was killed"
                )
                continue
            if out.status != "ok":
                self.r.fail(f"a {probe.engine} probe's call raised {out.status}: {out.detail}")
                continue
            if out.t_done < t_kill:
                # It never waited: the holder did not really hold what it said it held.
                self.probes_not_blocked += 1
                self.r.fail(f"a {probe.engine} probe's call returned while its stripe was held")
                continue
            if not seen:
                self.probes_not_seen_waiting += 1  # a very loaded machine: not a sample
                continue
            secs = (out.t_done - t_kill) / 1e9
            self.recovery.setdefault(probe.engine, []).append(secs)
            if mode != "stripes":
                self.recovery_all.append(secs)

    def check_holder_pages(self, odd: list[int], fresh: int, mode: str) -> None:
        """A dead holder's pages: readable at once, as it left them; a cut-short first write
        reads as zeros and holds no memory once repaired."""
        lay, disk = self.lay, self.disk
        page = disk.page_size
        for p in odd:
            buf = bytearray(page)
            try:
                disk.read(p * lay.pps, buf, timeout=5)
            except shmdisk.LockTimeoutError:
                self.r.fail(f"page {p} of a dead holder still locked 5 s after the kill")
                continue
            self.holder_pages_checked += 1
            if buf[: len(SCRIBBLE)] != SCRIBBLE:
                self.r.fail(f"page {p} of a dead holder does not read as it was left")
        if mode == "hold_writes":
            return
        buf = bytearray(page)
        disk.read(fresh * lay.pps, buf, timeout=5)
        self.fresh_pages_checked += 1
        if any(buf):
            self.r.fail(f"page {fresh}, unmapped, reads non-zero after its writer died")
        # The read above may have gone lock-free past a repair still in progress (the counter
        # is made even before the memory is punched): the stripe, taken, says it is done.
        io = disk._io
        m = io.current()
        seg = m.seg
        off = seg.data_offset + fresh * page
        with io.holding(m, _pageio.stripes_for(fresh, fresh + 1), (fresh, 0)):
            try:
                holds_memory = os.lseek(seg.fd, off, os.SEEK_DATA) == off
            except OSError:
                holds_memory = False  # ENXIO: no data after it
        if holds_memory:
            self.r.fail(f"page {fresh}, unmapped, still holds memory after its writer died")

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        self.nurseries.close()
        self.disk.disconnect()


def _layout_for(opt: Options) -> KillLayout:
    ss = opt.sector_size
    pps = max(1, 4096 // ss)
    unit = pps << L.STRIPE_SHIFT
    victims = max(1, opt.processes // 2)
    slot_units = max(1, min(128, round(opt.large_mib * (1 << 20) / (unit * ss))))
    return KillLayout(ss, pps, 16 * unit, slot_units * unit, victims, 128)


def run_kill(opt: Options) -> Result:
    """SIGKILL victims mid-write and holding stripes (up to all 1024); survivors go on."""
    r = Result("kill")
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    lay = _layout_for(opt)
    readers = max(1, opt.processes - lay.victims)
    n_surv = readers + 1
    t0 = time.monotonic()
    with scratch_disk("kill", lay.size, lay.ss) as name:
        run = _Run(opt, r, name, lay)
        # The holders' area holds data, so that a dead holder's pages have something to show.
        run.disk.write(lay.hold_start, bytes(lay.hold_units * lay.unit * lay.ss))
        shared = SPAWN.Array(ctypes.c_int64, n_surv * S_FIELDS, lock=False)
        survivors = [
            SPAWN.Process(
                target=survivor,
                args=(name, i, lay, run.rng.randrange(1 << 30), shared, run.flags),
                daemon=True,
            )
            for i in range(n_surv)
        ]
        n_probes = 2  # two callers on one stripe: the kernel wakes one, the unlock the other
        probes: list[Probe] = []
        delay = SchedulingDelay()
        stuck_reports: list[tuple[str, int, bool, str]] = []
        try:
            for i, p in enumerate(survivors):
                _engines.start(p, _engines.plan(opt.engines, i))
            probes = [Probe(name, _engines.plan(opt.engines, i)) for i in range(n_probes)]
            for v in range(lay.victims + 1):  # the writers, then the resizer
                run.spawn_victim(v)
            # Spawned interpreters take a while: the clock starts when everyone is at work.
            ready_by = time.monotonic() + 120
            while any(shared[i * S_FIELDS + S_OPS] == 0 for i in range(n_surv)):
                if time.monotonic() > ready_by or not all(p.is_alive() for p in survivors):
                    r.fail("survivors did not start")
                    break
                time.sleep(0.01)
            if not all(pr.ready(120) for pr in probes):
                r.fail("probes did not start")
            t_kills = time.monotonic()
            run.flags[F_MEASURE] = 1  # stalls count from now on, not while processes start
            delay.reset()
            stop_kills = t_kills + opt.duration
            hard_stop = t_kills + max(3 * opt.duration, opt.duration + 30)
            nxt_line = t_kills + opt.interval
            cycle: list[str] = []
            hangs = 0
            while True:
                now = time.monotonic()
                total = sum(run.kills.values())
                if now >= hard_stop or (now >= stop_kills and total >= opt.min_kills):
                    break
                if not cycle:
                    cycle = list(KINDS)
                    run.rng.shuffle(cycle)
                kind = cycle.pop()
                if kind.startswith("holding"):
                    run.kill_holder(kind, probes)
                else:
                    run.kill_victim(kind)
                hangs += _hang_watch(opt, r, shared, survivors, run.flags)
                if hangs or run.hung:
                    break
                if time.monotonic() >= nxt_line:
                    nxt_line += opt.interval
                    opt.say(
                        f"kill          {time.monotonic() - t_kills:6.1f}s  "
                        f"kills {sum(run.kills.values())}  "
                        f"longest stall {_max(shared, n_surv, S_GAP) * 1e3:.0f} ms  hangs {hangs}"
                    )
            kill_seconds = time.monotonic() - t_kills
            for pid, nursery in run.victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                nursery.reap(pid, 10)
            run.flags[F_STOP] = 1
            stuck = join_all(survivors, 30)
            # Nobody else holds anything now: every stripe must be free or its holder dead
            # (taking it repairs), in each engine, and hold_writes must get all 1024.
            for pr in probes if not run.hung else []:
                n, whole, err = pr.ask("stuck", 5.0)
                stuck_reports.append((pr.engine, n, whole, err))
            parent_stuck = _table.stuck_stripes(run.disk)
            stuck_reports.append(
                (
                    _engines.running() + " (parent)",
                    len(parent_stuck),
                    _table.whole_disk_held_within(run.disk, 5.0),
                    "",
                )
            )
            repaired = {pr.engine: 0 for pr in probes}
            for pr in probes if not run.hung else []:
                repaired[pr.engine] = repaired.get(pr.engine, 0) + int(pr.ask("repaired"))
            for i in range(n_surv):
                eng = _engines.name_of(shared[i * S_FIELDS + S_ENGINE])
                repaired[eng] = repaired.get(eng, 0) + shared[i * S_FIELDS + S_REPAIRED]
            parent_eng = _engines.running()
            repaired[parent_eng] = repaired.get(parent_eng, 0) + _engines.repaired_pages()
            usable = _whole_disk_check(name, lay.size, lay.ss, timeout=30)
            sched = (delay.worst_ms(), delay.limit_ms(1000))
        finally:
            delay.stop()
            run.flags[F_STOP] = 1
            for pr in probes:
                pr.close()
            for p in survivors:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            run.close()  # the nurseries' handles go before the disk does
    r.seconds = time.monotonic() - t0
    _figures(
        r,
        run,
        lay,
        shared,
        n_surv,
        kill_seconds,
        stuck,
        hangs,
        stuck_reports,
        repaired,
        usable,
        sched,
    )
    return r


def _hang_watch(opt: Options, r: Result, shared: Any, survivors: list[Any], flags: Any) -> int:
    """A survivor silent for ``hang_after`` seconds (outside a deliberate hold) is stuck."""
    if flags[F_HOLDING]:
        return 0
    now = time.monotonic_ns()
    hangs = 0
    for i, p in enumerate(survivors):
        beat = shared[i * S_FIELDS + S_BEAT]
        if beat and now - beat > opt.hang_after * 1e9 and p.is_alive():
            hangs += 1
            r.fail(f"survivor {i} made no progress for {(now - beat) / 1e9:.1f} s")
    return hangs


def _max(shared: Any, n: int, field: int) -> float:
    return float(max(shared[i * S_FIELDS + field] for i in range(n))) / 1e9


def _ms(xs: list[float], f: Any) -> float | None:
    return round(f(xs) * 1e3, 2) if xs else None


def _figures(
    r: Result,
    run: _Run,
    lay: KillLayout,
    shared: Any,
    n_surv: int,
    kill_seconds: float,
    stuck: list[Any],
    hangs: int,
    stuck_reports: list[tuple[str, int, bool, str]],
    repaired: dict[str, int],
    usable: str | None,
    sched: tuple[float, float],
) -> None:
    def tot(f: int) -> int:
        return sum(shared[i * S_FIELDS + f] for i in range(n_surv))

    held = run.held_at_kill
    everything = [x for xs in run.recovery.values() for x in xs]
    engines = sorted({_engines.name_of(shared[i * S_FIELDS + S_ENGINE]) for i in range(n_surv)})
    r.figures = {
        "engines": run.opt.engines,
        "survivor_engines": engines,
        "writer_victims": lay.victims,
        "survivors": n_surv,
        "largest_write_stripes": lay.slot_units,
        "kills": sum(run.kills.values()),
        "kills_per_s": round(sum(run.kills.values()) / max(kill_seconds, 1e-3), 1),
        **{f"kills_{k}": v for k, v in run.kills.items()},
        "kills_with_stripes_held": sum(1 for h in held if h),
        "kills_holding_2_to_128_stripes": sum(1 for h in held if 2 <= h <= 128),
        "kills_holding_all_1024_stripes": sum(1 for h in held if h == L.STRIPES),
        "most_stripes_held_at_a_kill": max(held, default=0),
        "recovery_samples": len(everything),
        "probes_not_seen_waiting_in_time": run.probes_not_seen_waiting,
        "recovery_ms_median": _ms(everything, statistics.median),
        "recovery_ms_max": _ms(everything, max),
        **{
            f"recovery_ms_median_{e}": _ms(xs, statistics.median)
            for e, xs in sorted(run.recovery.items())
        },
        **{f"recovery_ms_max_{e}": _ms(xs, max) for e, xs in sorted(run.recovery.items())},
        "recovery_ms_max_after_1024_stripe_holder": _ms(run.recovery_all, max),
        "pages_repaired": dict(sorted(repaired.items())),
        "dead_holder_pages_read_as_left": run.holder_pages_checked,
        "cut_short_first_writes_reading_zero_without_memory": run.fresh_pages_checked,
        "killed_writes_left_partial": run.partial_left,
        "completed_writes_checked": run.completed_checked,
        "completed_writes_not_whole": run.completed_bad,
        "survivor_ops": tot(S_OPS),
        "survivor_reads_checked": tot(S_CHECKED),
        "survivor_torn_reads": tot(S_TORN),
        "survivor_corrupt_reads": tot(S_CORRUPT),
        "longest_stall_ms": round(_max(shared, n_surv, S_GAP) * 1e3, 1),
        "longest_wait_behind_a_deliberate_holder_ms": round(
            _max(shared, n_surv, S_HELD_GAP) * 1e3, 1
        ),
        "machine_scheduling_delay_ms_max": round(sched[0], 1),
        "stall_limit_ms": round(sched[1]),
        "hangs": hangs + len(stuck),
        "stuck_stripes_after": {e: n for e, n, _, _ in stuck_reports},
        "hold_writes_after": {e: w for e, _, w, _ in stuck_reports},
        "disk_usable_after": usable is None,
    }
    if stuck:
        r.fail(f"{len(stuck)} survivors hung at the end")
    torn, corrupt = tot(S_TORN), tot(S_CORRUPT)
    if torn or corrupt:
        r.fail(f"survivors saw {torn} torn and {corrupt} corrupt reads")
    for e, n, whole, err in stuck_reports:
        if n or not whole:
            r.fail(f"{e}: {n} stripes stuck after the run, hold_writes {whole} {err}")
    if usable is not None:
        r.fail(f"disk not usable after the run: {usable}")
    if r.figures["longest_stall_ms"] > sched[1]:
        # 1 s, or three times the longest a process that only sleeps was kept off the CPU.
        r.fail(f"a survivor stalled {r.figures['longest_stall_ms']} ms (limit {sched[1]:.0f})")
    if r.figures["kills"] == 0:
        r.fail("no kills were done")


def _whole_disk_worker(name: str, size: int, ss: int, out: Any) -> None:
    try:
        with shmdisk.connect(name, create=False) as disk:
            disk.resize(size)  # the resizer may have died with the disk grown
            data = stamp.make_request(0xFFFF, 1, 0, size, ss)
            disk.write(0, data)
            buf = bytearray(size * ss)
            disk.read(0, buf)
            out.put(None if buf == data.tobytes() else "read back differs")
    except BaseException as e:
        out.put(repr(e))


def _whole_disk_check(name: str, size: int, ss: int, timeout: float) -> str | None:
    """Write and read back the whole disk in a child, within ``timeout``; None if fine."""
    q = FORK.Queue()
    p = FORK.Process(target=_whole_disk_worker, args=(name, size, ss, q))
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
