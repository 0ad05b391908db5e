"""kill: writers SIGKILLed at random moments, mid large write and holding locks; the survivors
must go on (longest stall measured, hangs counted) and completed writes stay whole."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import stamp

import shmdisk

from ._common import (
    FORK,
    SPAWN,
    Options,
    Result,
    join_all,
    scratch_disk,
)
from ._requests import pick_count, read_request, write_request

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
            write_request(disk, start, stamp.make_request(1, seq, start, count, lay.ss), rng)
        else:
            # Reach into the victims' slots (to wait on their locks) from somewhere in the
            # survivor region; only the survivor region is checked strictly.
            start = rng.randrange(0, lay.region)
            end = min(lay.size, lay.region + rng.randrange(1, 2 * lay.victims * lay.slot))
            if rng.random() < 0.5:
                end = min(end, start + pick_count(rng, lay.pps, 8))
            buf = read_request(disk, start, end - start, rng, lay.size)
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


def _write_lock_held(disk: shmdisk.Disk, page0: int, pages: int) -> bool:
    """Does anyone hold a stripe of pages [page0, page0+pages)? (their futex words)"""
    from shmdisk import _layout, _pageio

    seg = disk._io.current().seg
    tid = _layout.FUTEX_TID_MASK
    return any(
        seg.li[s * (_layout.SLOT_SIZE // 4)] & tid
        for s in _pageio.stripes_for(page0, page0 + pages)
    )


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
        state = FORK.Array(ctypes.c_int64, (victims + 1) * _V_FIELDS, lock=False)
        shared = SPAWN.Array(ctypes.c_int64, n_surv * _S_FIELDS, lock=False)
        stop_at = time.monotonic() + opt.duration + 2.0
        survivors = [
            SPAWN.Process(
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
                p = FORK.Process(
                    target=_resize_victim,
                    args=(name, v, lay, tail, rng.randrange(1 << 30), state),
                )
                p.start()
                return p
            p = FORK.Process(
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
            held = _write_lock_held(disk, first, 2 * slot // pps)
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
        stuck = join_all(survivors, max(10.0, stop_at - time.monotonic() + 10))
        # The disk must still be fully usable: one write over all of it, read back whole.
        usable = _whole_disk_check(name, lay.size, ss, timeout=30)
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
