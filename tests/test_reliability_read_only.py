"""Read-only handles beside writers killed mid-write: no stall, no hold on the owner."""

from __future__ import annotations

import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)
from _engines_choice import ENGINES


def test_read_only_readers_beside_dead_writers() -> None:
    """Kills mid-write, readers stopped and continued: reads go past, the owner never waits."""
    r = stress.run_read_only(
        stress.Options(duration=2.0, processes=3, seed=13, engines=ENGINES, min_kills=8)
    )
    assert r.ok, r.problems
    f = r.figures
    assert f["kills"] >= 8 and f["kills_leaving_pages_mid_write"] >= 2
    assert f["probe_reads_past_a_dead_writer"] == 2 * f["kills"]
    assert f["probe_reads_differing_from_repaired"] == 0
    assert f["owner_writes_while_a_reader_was_stopped"] > 0
    assert f["owner_longest_write_ms"] < 1000
    assert f["torn_reads"] == 0 and f["corrupt_reads"] == 0
    assert set(f["stuck_stripes_after"].values()) == {0}
