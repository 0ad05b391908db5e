"""Permissions: modes close a disk to other users; owners decide whose disks are trusted."""

from __future__ import annotations

import os

import pytest
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to uid 65534")
def test_other_users_modes_and_owners() -> None:
    """Other uids: 0600 refused, 0644 read-only; another user's disk untrusted unless named."""
    r = stress.run_permissions(stress.Options(seed=8))
    assert r.ok, r.problems
    out = r.figures["outcomes"]
    assert r.figures["default_mode"] == "600"
    assert r.figures["as_expected"] == r.figures["calls_as_other_users"]
    assert out["uid 65534: connect 0600"] == "PermissionDeniedError"
    assert out["uid 65534: connect 0600 read_only"] == "PermissionDeniedError"
    assert out["uid 65534: destroy 0600"] == "PermissionDeniedError"
    assert out["uid 65534: destroy 0644"] == "PermissionDeniedError"
    assert out["uid 65534: write via read_only 0644"] == "IsReadOnlyError"
    assert out["root on 65534's disk: connect"] == "UntrustedOwnerError"
    assert out["root on 65534's disk: connect owner=65534"].startswith("ok")
    assert out["uid 65533 on 65534's disk: connect read_only"] == "UntrustedOwnerError"
    assert r.figures["owner_longest_write_then_ms"] < 1000
