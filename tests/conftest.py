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

# In CI the machine is ours alone, so a new segment whose creator has exited (a child process
# of the test that leaked it) counts as the test's leak too. Everywhere, a segment whose creator
# is another live process is not ours to judge or remove: other test runs may be at work.
STRICT = bool(os.environ.get("CI"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(name: str) -> bool:
    try:
        info = shmdisk.inspect(name)
    except shmdisk.ShmdiskError:
        return False
    if info.creator_pid == os.getpid():
        return True
    if not STRICT or info.creator_pid is None:
        return STRICT and info.state != "ok" and info.uid == os.geteuid()
    return info.creator_uid == os.geteuid() and not _alive(info.creator_pid)


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
