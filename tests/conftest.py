"""Test-suite plumbing: unique disk names, and a guard that fails any test leaking a segment."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _helpers import new_name

import shmdisk

# Re-exported for test modules that still say `from conftest import new_name`; new code imports
# it from _helpers (importing conftest by name fails under --import-mode=importlib).
__all__ = ["new_name"]

# In CI the machine is ours alone: any new shmdisk segment after a test is a leak. On a
# developer's machine other test runs may create segments concurrently, so there only the
# segments this pytest process created itself count.
STRICT = bool(os.environ.get("CI"))


def _ours(name: str) -> bool:
    if STRICT:
        return True
    try:
        return shmdisk.inspect(name).creator_pid == os.getpid()
    except shmdisk.ShmdiskError:
        return False


@pytest.fixture(autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    before = set(shmdisk.list_disks())
    yield
    leaked = [n for n in set(shmdisk.list_disks()) - before if _ours(n)]
    for name in leaked:
        shmdisk.destroy(name)
    assert not leaked, f"test leaked shmdisk segments: {sorted(leaked)}"


@pytest.fixture
def name() -> Iterator[str]:
    """A unique disk name, destroyed after the test whatever happened."""
    n = new_name()
    yield n
    shmdisk.destroy(n)


@pytest.fixture
def disk(name: str) -> Iterator[shmdisk.Disk]:
    """A fresh 256-sector (128 KiB, 32-page) disk."""
    d = shmdisk.create(name, 256)
    yield d
    d.disconnect()
