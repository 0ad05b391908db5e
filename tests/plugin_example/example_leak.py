"""A test that leaks a disk, caught by the shmdisk_no_leaks fixture."""

from __future__ import annotations

import os

import shmdisk
from shmdisk.testing import unique_name


def test_leaks_a_disk(shmdisk_no_leaks: None) -> None:
    """Creates a disk and never destroys it: the fixture reports an error in teardown."""
    prefix = os.environ.get("EXAMPLE_PREFIX", "example")
    shmdisk.create(unique_name(f"{prefix}-leaky"), 8).disconnect()


def test_cleans_up(shmdisk_no_leaks: None) -> None:
    """Creates and destroys a disk: nothing to report."""
    name = unique_name("tidy")
    shmdisk.create(name, 8).disconnect()
    shmdisk.destroy(name)
