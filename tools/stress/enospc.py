"""enospc: in a private mount namespace with a small tmpfs over /dev/shm, write until
DiskFullError; nothing partly written, old data intact, discard gives the space back."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

import stamp

import shmdisk

from . import _engines
from ._common import (
    Options,
    Result,
    unique_name,
)
from ._requests import as_buffer


def enospc_child(duration: float, seed: int) -> dict[str, Any]:
    """Run inside a private mount namespace whose /dev/shm is a small tmpfs.

    Fills the tmpfs through one disk, and checks every failing write on the way.
    """
    rng = random.Random(seed)
    fig: dict[str, Any] = {
        "engine": shmdisk.ENGINE,
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
                            disk.write_at(pos * ss, as_buffer(data))
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
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    t0 = time.monotonic()
    if os.geteuid() != 0:
        r.skipped = "needs root for unshare -m and mount"
        return r
    seed = opt.rng(4).randrange(1 << 30)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from stress import enospc; "
        "print(json.dumps(enospc.enospc_child(float(sys.argv[2]), int(sys.argv[3]))))"
    )
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/, above stress/
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
    # One child per engine of the plan (mixed: native, then python), sharing the duration.
    engines = ["native", "python"] if opt.engines == "mixed" else [opt.engines]
    cmd[-2] = str(opt.duration / len(engines))
    for engine in engines:
        try:
            with _engines.child_env(engine):
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=opt.duration + 120
                )
        except subprocess.TimeoutExpired:
            r.fail(f"the ENOSPC child ({engine}) hung")
            return r
        if proc.returncode != 0:
            r.fail(f"ENOSPC child ({engine}) exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
            return r
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        _merge(r.figures, out["figures"])
        for p in out["problems"]:
            r.fail(f"{engine}: {p}")
    r.seconds = time.monotonic() - t0
    return r


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Add one child's figures to the others': counts add up; other values that differ are
    shown side by side (native / python)."""
    for k, v in new.items():
        if k not in into or into[k] is None:
            into[k] = v
        elif isinstance(v, int) and not isinstance(v, bool) and k != "tmpfs_bytes":
            into[k] += v
        elif into[k] != v:
            into[k] = f"{into[k]} / {v}"
