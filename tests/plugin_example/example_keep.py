"""Failing tests whose disks are kept for inspection (marker) or not (no marker)."""

from __future__ import annotations

import pytest

from shmdisk import Disk


@pytest.mark.shmdisk_keep
def test_kept_when_it_fails(shmdisk: Disk) -> None:
    """Fails on purpose after writing: the disk stays for shmdisk-ls."""
    shmdisk.write(0, b"evidence".ljust(shmdisk.sector_size, b"\0"))
    raise AssertionError("failing on purpose")


@pytest.mark.shmdisk_keep
def test_not_kept_when_it_passes(shmdisk: Disk) -> None:
    """Passes: the marker keeps nothing."""
    shmdisk.write(0, bytes(shmdisk.sector_size))


def test_unmarked_failure(shmdisk: Disk) -> None:
    """Fails on purpose without the marker: kept only with --shmdisk-keep-on-failure."""
    raise AssertionError("failing on purpose")


@pytest.mark.shmdisk_keep
def test_kept_despite_the_leak_guard(shmdisk_no_leaks: None, shmdisk: Disk) -> None:
    """Fails on purpose: a disk kept for inspection is not reported as a leak."""
    raise AssertionError("failing on purpose")
