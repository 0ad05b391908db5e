"""Large writes on glibc's non-temporal copy path never tear a lock-free read."""

from __future__ import annotations

import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)
from _engines_choice import ENGINES


def test_nt_writes_against_lock_free_readers() -> None:
    """2-8 MiB writes and zeroings with NT stores forced in every process: 0 torn reads."""
    r = stress.run_nt_writes(stress.Options(duration=2.0, processes=4, seed=12, engines=ENGINES))
    assert r.ok, r.problems
    f = r.figures
    assert f["nt_threshold_in_children"] == "0x100000"
    assert f["torn_reads"] == 0 and f["corrupt_reads"] == 0
    assert f["reads_checked"] >= 10 and f["writes"] >= 10 and f["zeroings"] >= 1
    assert f["of_them_through_read_only_handles"] >= 1
    if ENGINES == "mixed":
        engines = {k.rsplit("_", 1)[1] for k in f["ops_by_role_and_engine"]}
        assert engines == {"native", "python"}
