"""Hostile input: bad calls and forged segments get typed errors and change nothing."""

from __future__ import annotations

import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


def test_hostile_calls_against_a_model() -> None:
    """Hypothesis: wrong types, bad sectors, odd buffers, ro/disconnected handles, bad names."""
    res = stress.hostile_api(examples=400, seed=6)
    assert res["problems"] == []
    assert res["figures"]["rejected_typed"] > 100
    assert res["figures"]["accepted"] > 10


def test_forged_segments_in_a_child() -> None:
    """Forged headers, truncations, a directory and a FIFO: typed errors, no crash, no hang."""
    res = stress.hostile_segments(cases=60, seed=7)
    assert res["problems"] == []
    f = res["figures"]
    assert f["segments"] == 60
    assert f["crashes"] == 0 and f["hangs"] == 0
    assert f["typed_errors"] > 60
