"""Killed in the middle: SIGKILLed writers never stall or wedge the survivors."""

from __future__ import annotations

import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


def test_kill_writers_mid_write_survivors_go_on() -> None:
    """Writers killed mid large write and holding locks: no hang, stall < 1 s, disk usable."""
    r = stress.run_kill(stress.Options(duration=3.0, processes=4, seed=3, large_mib=2.0))
    assert r.ok, r.problems
    f = r.figures
    assert f["hangs"] == 0
    assert f["kills"] >= 10
    assert f["kills_mid_large_write"] >= 1
    assert f["longest_stall_ms"] < 1000
    assert f["completed_writes_not_whole"] == 0
    assert f["survivor_torn_reads"] == 0 and f["survivor_corrupt_reads"] == 0
    assert f["disk_usable_after"] is True
