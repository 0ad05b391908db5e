"""stopped: a holder SIGSTOPped while it holds a stripe (mid-write or not); waiters with
``timeout=`` must get ``LockTimeoutError`` on time, ``wait=False`` ``WouldBlockError`` at once,
reads of its other pages must go on, a waiter without a timeout must die of Ctrl-C (SIGINT) at
once, and after SIGCONT every waiter must go on.

Each round: a holder of one engine (forked by a nursery) takes the stripe of one page and, in
every other round, leaves that page mid-write (odd counter); the parent stops it. Then:

* Ctrl-C waiters (forked, engines alternating) write the page without a timeout; once they are
  seen asleep on the stripe they get SIGINT, and must raise KeyboardInterrupt and die of it;
* probes (``_probe.py``, one per engine) call in turn: a write with ``wait=False``, a write
  with a random ``timeout=``, the same for reads of the page (read-write and read-only handles:
  blocked only when the page is mid-write), and a read of another page of the same stripe
  (lock-free: never blocked); then a write without a timeout, which waits;
* the holder is continued (SIGCONT) and finishes its write; the waiting writes must complete.

When the page is not mid-write, the parent also reads it while the holder is stopped: every
refused or interrupted write must have changed nothing.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import statistics
import time
from typing import Any

import shmdisk
from shmdisk import _layout as L
from shmdisk import _pageio

from . import _engines, _table
from ._common import SPAWN, Options, Result, scratch_disk
from ._nursery import ChildContext, Nurseries
from ._probe import Outcome, Probe

# Holder state, and per Ctrl-C waiter: inside the call (1), when SIGINT was caught (ns).
_H_STATE, _H_FIELDS = 0, 1
_HOLDING, _RELEASE, _RELEASED = 1, 2, 3
_C_INSIDE, _C_CAUGHT, _C_FIELDS = 0, 1, 2
_DISK_PAGES = 64


def stopped_holder(ctx: ChildContext, name: str, page: int, mid_write: bool) -> None:
    """Hold the stripe of ``page`` (its counter odd if ``mid_write``) until told to let go."""
    state = ctx.shared["hstate"]
    disk = shmdisk.connect(name, create=False)
    io = disk._io
    m = io.current()
    wv = m.seg.wv
    with io.holding(m, _pageio.stripes_for(page, page + 1), (page, 1)):
        old = int(wv[page])
        if mid_write:
            wv[page] = L.word_writing(old)
        state[_H_STATE] = _HOLDING
        while state[_H_STATE] != _RELEASE:
            time.sleep(0.001)
        if mid_write:
            wv[page] = L.word_done(old, old & L.FLAGS)
    state[_H_STATE] = _RELEASED
    disk.disconnect()


def sigint_waiter(ctx: ChildContext, name: str, idx: int, sector: int) -> None:
    """Write ``sector`` without a timeout; Ctrl-C must interrupt the wait, and kill us."""
    words = ctx.shared["cstate"]
    base = idx * _C_FIELDS
    disk = shmdisk.connect(name, create=False)
    buf = b"ctrl-c!!" * (disk.sector_size // 8)
    words[base + _C_INSIDE] = 1
    try:
        disk.write(sector, buf)
    except KeyboardInterrupt:
        words[base + _C_CAUGHT] = time.monotonic_ns()
        # Die of the signal as an interpreter with no handler would.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
    words[base + _C_INSIDE] = 0


class _ProbeHung(Exception):
    """A probe never came back from a call: it can take no more, the run ends."""


class _Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.secs: dict[str, list[float]] = {}

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def time(self, what: str, secs: float) -> None:
        self.secs.setdefault(what, []).append(secs)

    def ms(self, what: str, f: Any) -> float | None:
        xs = self.secs.get(what, [])
        return round(f(xs) * 1e3, 1) if xs else None


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def run_stopped(opt: Options) -> Result:
    """A SIGSTOPped stripe holder: timeouts, wait=False, Ctrl-C and SIGCONT, both engines."""
    r = Result("stopped")
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    rng = opt.rng(7)
    st = _Stats()
    n_sigint = 2
    t0 = time.monotonic()
    with scratch_disk(
        "stopped", _DISK_PAGES * (4096 // opt.sector_size or 1), opt.sector_size
    ) as name:
        disk = shmdisk.connect(name, create=False)
        pps = max(1, disk.page_size // disk.sector_size)
        disk.write(0, bytes(_DISK_PAGES * disk.page_size))  # every page mapped
        hstate = SPAWN.Array(ctypes.c_int64, _H_FIELDS, lock=False)
        cstate = SPAWN.Array(ctypes.c_int64, n_sigint * _C_FIELDS, lock=False)
        nurseries = Nurseries(opt.engines, {"hstate": hstate, "cstate": cstate})
        probes = [Probe(name, _engines.plan(opt.engines, i)) for i in range(2)]
        rounds = 0
        try:
            if not all(p.ready(120) for p in probes):
                r.fail("probes did not start")
                return r
            for i in range(2):
                nurseries.for_child(i)  # both started before the clock runs
            stop_at = time.monotonic() + opt.duration
            hung = False
            while time.monotonic() < stop_at or rounds < 2:
                try:
                    _round(opt, r, st, rng, disk, pps, nurseries, probes, hstate, cstate, rounds)
                except _ProbeHung:
                    hung = True
                    break
                rounds += 1
                if rounds % 5 == 0:
                    opt.say(
                        f"stopped       {time.monotonic() - t0:6.1f}s  rounds {rounds}  "
                        f"problems {len(r.problems)}"
                    )
                if len(r.problems) >= 10 or time.monotonic() > stop_at + 60:
                    break
            stuck = {} if hung else {p.engine: p.ask("stuck", 5.0) for p in probes}
        finally:
            for p in probes:
                p.close()
            nurseries.close()
            disk.disconnect()
    r.seconds = time.monotonic() - t0
    r.figures = {
        "engines": opt.engines,
        "probe_engines": sorted({p.engine for p in probes}),
        "rounds": rounds,
        **{k: v for k, v in sorted(st.counts.items())},
        "timeout_lateness_ms_median": st.ms("timeout_late", statistics.median),
        "timeout_lateness_ms_max": st.ms("timeout_late", max),
        "would_block_ms_max": st.ms("would_block", max),
        "reads_beside_ms_max": st.ms("beside", max),
        "ctrl_c_ms_median": st.ms("ctrl_c", statistics.median),
        "ctrl_c_ms_max": st.ms("ctrl_c", max),
        "resume_after_sigcont_ms_median": st.ms("resume", statistics.median),
        "resume_after_sigcont_ms_max": st.ms("resume", max),
        "stuck_stripes_after": {e: s[0] for e, s in stuck.items()},
        "hold_writes_after": {e: s[1] for e, s in stuck.items()},
    }
    for e, (n, whole, err) in stuck.items():
        if n or not whole:
            r.fail(f"{e}: {n} stripes stuck after the run, hold_writes {whole} {err}")
    if st.counts.get("ctrl_c_interrupted", 0) == 0:
        r.fail("no waiter was interrupted by Ctrl-C")
    return r


def _round(
    opt: Options,
    r: Result,
    st: _Stats,
    rng: random.Random,
    disk: shmdisk.Disk,
    pps: int,
    nurseries: Nurseries,
    probes: list[Probe],
    hstate: Any,
    cstate: Any,
    i: int,
) -> None:
    page = rng.randrange(_DISK_PAGES)
    sector = page * pps
    mid_write = i % 2 == 0
    # Another page of the same stripe: lock-free reads of it never wait for the holder.
    unit0 = page >> L.STRIPE_SHIFT << L.STRIPE_SHIFT
    beside = unit0 + (page - unit0 + 1 + rng.randrange(15)) % 16
    before = bytes([i % 251 + 1]) * disk.page_size
    disk.write(sector, before)
    hstate[0] = 0
    holder_n = nurseries.for_child(i)
    hpid = holder_n.fork(stopped_holder, disk.name, page, mid_write)
    deadline = time.monotonic() + 10
    while hstate[0] != _HOLDING:
        if time.monotonic() > deadline:
            r.fail("the holder did not take its stripe in 10 s")
            os.kill(hpid, signal.SIGKILL)
            holder_n.reap(hpid, 5)
            return
        time.sleep(0.0005)
    os.kill(hpid, signal.SIGSTOP)
    while _process_state(hpid) not in ("T", "t"):
        time.sleep(0.0005)
    st.add("rounds_mid_write" if mid_write else "rounds_holding_only")
    stripe = L.stripe_of(page)
    try:
        # Ctrl-C waiters, forked now so they wait through everything below.
        for k in range(len(cstate) // _C_FIELDS):
            cstate[k * _C_FIELDS + _C_INSIDE] = 0
            cstate[k * _C_FIELDS + _C_CAUGHT] = 0
        sig = [
            (
                nurseries.for_child(i + k),
                nurseries.for_child(i + k).fork(sigint_waiter, disk.name, k, sector),
            )
            for k in range(len(cstate) // _C_FIELDS)
        ]
        # The probes, every call in turn; all must be refused or pass as the holder dictates.
        calls: list[tuple[str, str, int, dict[str, Any], bool]] = [
            ("would_block", "write", sector, {"wait": False}, False),
            ("timeout", "write", sector, {"timeout": rng.uniform(0.05, 0.3)}, False),
            ("beside", "read", beside * pps, {"timeout": 5.0}, False),
            ("beside", "read", beside * pps, {"timeout": 5.0}, True),
        ]
        if mid_write:
            calls += [
                ("would_block", "read", sector, {"wait": False}, False),
                ("would_block", "read", sector, {"wait": False}, True),
                ("timeout", "read", sector, {"timeout": rng.uniform(0.05, 0.3)}, False),
                ("timeout", "read", sector, {"timeout": rng.uniform(0.05, 0.3)}, True),
            ]
        else:
            # Held but not mid-write: reads of the page itself are lock-free too.
            calls.append(("beside", "read", sector, {"timeout": 5.0}, False))
            calls.append(("beside", "read", sector, {"timeout": 5.0}, True))
        for what, op, sec, kw, ro in calls:
            for p in probes:
                p.call(op, sec, pps, read_only=ro, **kw)
            for p in probes:
                _judge(r, st, what, op, ro, kw, p, p.outcome(30))
        if not mid_write:
            buf = bytearray(disk.page_size)
            disk.read(sector, buf, wait=False)  # lock-free: the page is not mid-write
            st.add("unchanged_checks")
            if buf != before:
                r.fail("a refused or interrupted write changed the page")
        # Ctrl-C: once each waiter sleeps on the stripe, SIGINT; it must die of it, at once.
        for k, (n, pid) in enumerate(sig):
            deadline = time.monotonic() + 5
            while not (cstate[k * _C_FIELDS + _C_INSIDE] and _table.has_waiters(disk, stripe)):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0005)
            time.sleep(rng.random() * 0.06)  # anywhere in a wait slice
            t_sig = time.monotonic_ns()
            os.kill(pid, signal.SIGINT)
            code = n.reap(pid, 5)
            caught = cstate[k * _C_FIELDS + _C_CAUGHT]
            if code != -signal.SIGINT or not caught:
                r.fail(
                    f"a {n.engine} waiter got SIGINT and ended with {code}, caught={bool(caught)}"
                )
                if code is None:
                    os.kill(pid, signal.SIGKILL)
                    n.reap(pid, 5)
                continue
            st.add("ctrl_c_interrupted")
            st.time("ctrl_c", (caught - t_sig) / 1e9)
            if (caught - t_sig) / 1e9 > 1.0:
                r.fail(f"Ctrl-C took {(caught - t_sig) / 1e9:.2f} s to interrupt a wait")
        # Patient writers, then SIGCONT: they must go on once the holder lets go.
        for p in probes:
            p.call("write", sector, pps)
        for p in probes:
            p.wait_inside(5)
        hstate[0] = _RELEASE
        t_cont = time.monotonic_ns()
    finally:
        os.kill(hpid, signal.SIGCONT)
    for p in probes:
        out = p.outcome(10)
        if out is None:
            r.fail(f"a {p.engine} write waiting on a stopped holder never went on after SIGCONT")
            raise _ProbeHung("patient write")
        if out.status != "ok":
            r.fail(
                f"a {p.engine} write waiting on a stopped holder did not go on after SIGCONT: {out}"
            )
            continue
        st.add("resumed_after_sigcont")
        st.time("resume", (out.t_done - t_cont) / 1e9)
    code = holder_n.reap(hpid, 10)
    if code != 0:
        r.fail(f"the continued holder ended with {code}")


def _judge(
    r: Result,
    st: _Stats,
    what: str,
    op: str,
    ro: bool,
    kw: dict[str, Any],
    p: Probe,
    out: Outcome | None,
) -> None:
    """Whether one probe call ended as the stopped holder dictates, and how fast."""
    label = f"{p.engine} {'read-only ' if ro else ''}{op} {kw}"
    if out is None:
        r.fail(f"{label} never returned beside a stopped holder")
        raise _ProbeHung(label)
    want = {"would_block": "WouldBlockError", "timeout": "LockTimeoutError", "beside": "ok"}[what]
    if out.status != want:
        r.fail(f"{label} gave {out.status} ({out.detail}), expected {want}")
        return
    st.add(f"{what}_{'ro_' if ro else ''}{op}")
    if what == "timeout":
        late = out.seconds - kw["timeout"]
        st.time("timeout_late", late)
        if late < -0.002 or late > 1.0:
            r.fail(f"{label} timed out after {out.seconds:.3f} s")
    else:
        st.time(what, out.seconds)
        if out.seconds > 0.5:
            r.fail(f"{label} took {out.seconds:.3f} s; it should not wait at all")
