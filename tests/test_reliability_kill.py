"""Killed in the middle: SIGKILLed writers and stripe holders never stall or wedge the others."""

from __future__ import annotations

import multiprocessing
import os
import signal

import _workers as w
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)
from _engines_choice import ENGINES
from stress import _engines

import shmdisk


def test_kill_victims_holding_stripes_survivors_recover() -> None:
    """Victims killed mid-write, holding N and all 1024 stripes: timed recovery, nothing stuck."""
    # The run goes on past its 2 s until 12 kills (two of each kind) were done: a loaded
    # machine takes longer, and the counts below still hold.
    r = stress.run_kill(
        stress.Options(duration=2.0, processes=4, seed=3, engines=ENGINES, min_kills=12)
    )
    assert r.ok, r.problems
    f = r.figures
    assert f["hangs"] == 0
    assert f["kills"] >= 12
    assert f["kills_holding"] >= 2 and f["kills_holding_all"] >= 2
    assert f["kills_holding_all_1024_stripes"] >= 2
    assert f["recovery_samples"] >= 8 and f["recovery_ms_max"] is not None
    assert sum(f["pages_repaired"].values()) > 0
    assert f["dead_holder_pages_read_as_left"] > 0
    assert set(f["stuck_stripes_after"].values()) == {0}
    assert all(f["hold_writes_after"].values())
    assert f["completed_writes_not_whole"] == 0
    assert f["survivor_torn_reads"] == 0 and f["survivor_corrupt_reads"] == 0
    assert f["disk_usable_after"] is True
    if ENGINES == "mixed":
        assert f["survivor_engines"] == ["native", "python"]
        assert {"recovery_ms_max_native", "recovery_ms_max_python"} <= set(f)


def test_repairs_are_counted(disk: shmdisk.Disk) -> None:
    """The page counter a dead writer left odd is repaired by the next caller, and counted."""
    disk.write(0, b"r" * 4096)
    ready = multiprocessing.get_context("spawn").Event()
    p = multiprocessing.get_context("spawn").Process(
        target=w.hold_lock_then_wait, args=(disk.name, ready, 0, 1, True)
    )
    p.start()
    try:
        assert ready.wait(60)
    finally:
        os.kill(p.pid or 0, signal.SIGKILL)
        p.join(10)
    before = _engines.repaired_pages()
    buf = bytearray(4096)
    disk.read(0, buf)  # the odd page makes this read-write handle take the stripe: repaired
    assert buf == b"torn!!!!" + b"r" * 4088
    assert _engines.repaired_pages() == before + 1
