"""Uses the shmdisk fixtures the way a multiprocess harness does."""

from __future__ import annotations

import multiprocessing
import os
import pathlib

from shmdisk import Disk
from shmdisk.testing import DiskFactory


def record(name: str) -> None:
    """Leave the disk's name where the outer test can check uniqueness across workers."""
    out = os.environ.get("EXAMPLE_NAMES_DIR")
    if out:
        pathlib.Path(out, name).touch()


def fill(disk: Disk, worker: int) -> None:
    """Runs in a worker process: the Disk arrived pickled and reconnected by name."""
    disk.write(worker, bytes([worker + 1]) * disk.sector_size)
    disk.disconnect()


def test_fixture_disk_is_fresh_and_writable(shmdisk: Disk) -> None:
    """The fixture's disk reads zeros and keeps what is written."""
    record(shmdisk.name)
    buf = bytearray(shmdisk.sector_size)
    shmdisk.read(0, buf)
    assert buf == bytes(len(buf))
    shmdisk.write(0, b"\x42" * shmdisk.sector_size)
    shmdisk.read(0, buf)
    assert buf == b"\x42" * len(buf)


def test_worker_processes_share_the_disk(shmdisk: Disk) -> None:
    """Three spawned workers each fill a sector; the test sees all three."""
    record(shmdisk.name)
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=fill, args=(shmdisk, i)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    for i in range(3):
        buf = bytearray(shmdisk.sector_size)
        shmdisk.read(i, buf)
        assert buf == bytes([i + 1]) * len(buf)


def test_factory_makes_several_disks(shmdisk_factory: DiskFactory) -> None:
    """The factory takes a size and a sector size; every disk has its own name."""
    small = shmdisk_factory(8)
    large = shmdisk_factory(64, 4096)
    record(small.name)
    record(large.name)
    assert small.name != large.name
    assert (small.get_info().size_sectors, small.sector_size) == (8, 512)
    assert (large.get_info().size_sectors, large.sector_size) == (64, 4096)


def test_a_failing_test_still_loses_its_disk(shmdisk: Disk) -> None:
    """Fails on purpose: the fixture destroys the disk anyway."""
    record(shmdisk.name)
    raise AssertionError("failing on purpose")
