"""Full /dev/shm: writes fail cleanly, old data stays, discard gives the space back."""

from __future__ import annotations

import os

import pytest
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: unshare -m and mount tmpfs")
def test_fill_private_tmpfs_until_enospc() -> None:
    """In a private 8 MiB tmpfs: DiskFullError each time, nothing partly written, space back."""
    r = stress.run_enospc(stress.Options(duration=1.0, seed=5))
    if r.skipped:
        pytest.skip(r.skipped)
    assert r.ok, r.problems
    f = r.figures
    assert f["disk_full_errors"] > 0
    assert f["failed_writes_left_data"] == 0 and f["blocks_kept_by_failed_writes"] == 0
    assert f["old_data_damaged"] == 0
    assert f["write_zeroes_when_full"] == "DiskFullError"
    assert f["failed_write_zeroes_changed_data"] == 0
    assert f["writes_into_mapped_pages_when_full"] > 0
    assert f["rewrites_after_discard"] > 0 and f["bytes_freed_by_discard"] > 0
    assert f["create_when_full"] == "DiskFullError"
    assert f["leftover_segments"] == 0
