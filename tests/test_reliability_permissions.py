"""Permissions: what another user may do with root's disks of each mode, owner trust, and that
a reader with read access only can never stall the owner."""

from __future__ import annotations

import os

import pytest
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to uid 65534")
def test_other_uid_gets_what_the_mode_grants_and_never_stalls_the_owner() -> None:
    """uid 65534 against root's 0600/0640/0644/0666 disks, root against uid 65534's disk."""
    r = stress.run_permissions(stress.Options(duration=1.0, seed=8))
    assert r.ok, r.problems
    f = r.figures
    assert f["default_mode"] == "600"
    out = f["outcomes"]
    for mode in ("0600", "0640"):
        assert set(out[mode].values()) == {"PermissionDeniedError", "unreadable"}, out[mode]
    assert out["0640 group 65534"]["read"].startswith("ok:")
    assert out["0640 group 65534"]["write"] == "PermissionDeniedError"
    assert out["0644"]["read"].startswith("ok:")
    assert out["0644"]["write through read_only"] == "IsReadOnlyError"
    assert out["0644"]["connect"] == "PermissionDeniedError"
    assert out["0666"]["write"] == "ok"
    assert {o["destroy"] for o in out.values()} == {"PermissionDeniedError"}
    assert f["owner_trust"]["root connect"] == "UntrustedOwnerError"
    assert f["owner_trust"]["root read, owner named"].startswith("ok:")
    assert f["writes_while_reader_stopped"] > 0 and f["torn_reads"] == 0
    assert f["0666_write_while_other_uid_holds"] == "LockTimeoutError"
