"""Tests sharing one golden disk, each writing to an overlay of its own.

EXAMPLE_FAIL adds a test that fails after writing to its overlay; EXAMPLE_CRASH_TEST adds one
that kills its xdist worker while its overlay exists; EXAMPLE_STRAY (a disk name) adds one
whose child process makes an overlay of the golden disk under that name and leaves it.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
from conftest import SECTOR, SECTORS, record

import shmdisk
from shmdisk import Disk
from shmdisk.testing import DiskFactory


def read_all(disk: Disk) -> bytes:
    """Every byte of the disk."""
    buf = bytearray(disk.get_info().size_sectors * disk.sector_size)
    disk.read(0, buf)
    return bytes(buf)


def mark(n: int) -> bytes:
    """A sector's worth of bytes only test ``n`` writes."""
    return f"overlay of test {n:3}\n".encode().ljust(SECTOR, b"#")


def write_mark(disk: Disk, n: int) -> None:
    """Runs in a child process: the overlay arrived pickled and reconnected by name."""
    disk.write(100, mark(n))
    disk.disconnect()


def test_child_process_writes_to_the_overlay(image: Disk, golden_bytes: bytes) -> None:
    """A worker process of the test writes to the test's overlay; the test sees the write.

    First in the file and asking only for the overlay: in a run without xdist it builds the
    golden disk from inside its leak guard, which must not count the golden disk as a leak.
    """
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=write_mark, args=(image, 99))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    expected = bytearray(golden_bytes)
    expected[100 * SECTOR : 101 * SECTOR] = mark(99)
    assert read_all(image) == expected


@pytest.mark.parametrize("n", range(12))
def test_overlay_reads_golden_and_keeps_its_writes(
    n: int, image: Disk, golden: Disk, golden_bytes: bytes
) -> None:
    """The overlay starts as the golden image; writes land in it alone, never in the golden disk."""
    record(f"overlay={image.name}", f"golden={golden.name}")
    assert image.name != golden.name
    assert (image.get_info().size_sectors, image.sector_size) == (SECTORS, SECTOR)
    assert read_all(golden) == golden_bytes
    assert read_all(image) == golden_bytes
    # Over a golden data sector and over a hole, the same sectors in every test: an overlay
    # shared with any other test would show that test's mark.
    image.write(3, mark(n))
    image.write(150, mark(n))
    expected = bytearray(golden_bytes)
    expected[3 * SECTOR : 4 * SECTOR] = expected[150 * SECTOR : 151 * SECTOR] = mark(n)
    assert read_all(image) == expected
    assert read_all(golden) == golden_bytes


def test_golden_handle_refuses_writes(golden: Disk, golden_bytes: bytes) -> None:
    """Tests get the golden disk read-only."""
    with pytest.raises(shmdisk.IsReadOnlyError):
        golden.write(0, bytes(SECTOR))
    assert read_all(golden) == golden_bytes


@pytest.mark.skipif(not os.environ.get("EXAMPLE_FAIL"), reason="EXAMPLE_FAIL not set")
def test_fails_after_writing(image: Disk) -> None:
    """Fails on purpose: its overlay is destroyed anyway."""
    record(f"overlay={image.name}")
    image.write(0, mark(0))
    raise AssertionError("failing on purpose")


@pytest.mark.skipif(not os.environ.get("EXAMPLE_CRASH_TEST"), reason="EXAMPLE_CRASH_TEST not set")
def test_kills_its_worker(image: Disk) -> None:
    """Kills its xdist worker: no teardown runs, the end of the run must clean up."""
    record(f"overlay={image.name}")
    image.write(0, mark(0))
    os._exit(4)


def test_an_overlay_of_the_overlay(
    image: Disk, shmdisk_factory: DiskFactory, golden_bytes: bytes
) -> None:
    """A test freezes its overlay and stacks another on it with the factory; both are
    destroyed after the test, the upper one first."""
    image.write(7, mark(7))
    image.freeze()
    top = shmdisk_factory(backing=image)
    assert top.backing == image.name and image.frozen
    top.write(8, mark(8))
    expected = bytearray(golden_bytes)
    expected[7 * SECTOR : 8 * SECTOR] = mark(7)
    expected[8 * SECTOR : 9 * SECTOR] = mark(8)
    assert read_all(top) == expected


@pytest.mark.skipif(not os.environ.get("EXAMPLE_STRAY"), reason="EXAMPLE_STRAY not set")
def test_leaves_a_stray_overlay(golden: Disk) -> None:
    """A child process makes an overlay of the golden disk under a name of its own and exits:
    no fixture made it and the leak guard cannot tell it from another program's disk."""
    name = os.environ["EXAMPLE_STRAY"]
    code = f"import shmdisk; shmdisk.create({name!r}, backing={golden.name!r}).disconnect()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
