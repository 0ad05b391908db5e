"""Permissions: a disk made with the default mode is closed to other users."""

from __future__ import annotations

import os

import pytest
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to uid 65534")
def test_other_uid_is_refused() -> None:
    """A forked child as uid 65534 gets PermissionDeniedError on connect and destroy."""
    r = stress.run_permissions(stress.Options(seed=8))
    assert r.ok, r.problems
    out = r.figures["outcomes"]
    assert r.figures["default_mode"] == "600"
    assert out["connect 0600"] == "PermissionDeniedError"
    assert out["connect 0600 read_only"] == "PermissionDeniedError"
    assert out["destroy 0600"] == "PermissionDeniedError"
    assert out["destroy 0644"] == "PermissionDeniedError"
    assert out["write via read_only 0644"] == "IsReadOnlyError"
