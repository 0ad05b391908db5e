"""A stopped stripe holder: timeouts and wait=False refuse on time, Ctrl-C gets out, SIGCONT on."""

from __future__ import annotations

import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)
from _engines_choice import ENGINES


def test_stopped_holder_timeouts_ctrl_c_and_sigcont() -> None:
    """Every round: refusals on time, reads beside it go on, SIGINT kills a waiter, all resume."""
    r = stress.run_stopped(stress.Options(duration=1.5, seed=11, engines=ENGINES))
    assert r.ok, r.problems
    f = r.figures
    rounds = f["rounds"]
    assert rounds >= 2 and f["rounds_mid_write"] >= 1 and f["rounds_holding_only"] >= 1
    assert f["ctrl_c_interrupted"] == 2 * rounds
    assert f["resumed_after_sigcont"] == 2 * rounds
    assert f["timeout_write"] == 2 * rounds and f["would_block_write"] == 2 * rounds
    assert f["timeout_ro_read"] >= 2 and f["would_block_ro_read"] >= 2
    assert f["beside_read"] > 2 * rounds and f["unchanged_checks"] >= 1
    assert f["timeout_lateness_ms_max"] < 1000 and f["ctrl_c_ms_max"] < 1000
    assert set(f["stuck_stripes_after"].values()) == {0}
    if ENGINES == "mixed":
        assert f["probe_engines"] == ["native", "python"]
