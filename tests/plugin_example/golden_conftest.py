"""conftest.py of the golden-disk example: one image built per run, one overlay per test.

Driven by environment variables: EXAMPLE_BUILDS (a file counting builds, required),
EXAMPLE_NAMES_DIR (where tests leave the names of their disks), EXAMPLE_CRASH_FIRST_BUILD (the
first build kills its worker halfway).
"""

from __future__ import annotations

import os
import pathlib

import pytest

from shmdisk import Disk
from shmdisk.testing import golden_disk, overlay_disk

SECTOR = 512
SECTORS = 256  # 128 KiB: 32 pages
# Mapped runs of the image; every other sector stays a hole.
DATA_RUNS = [(0, 16), (64, 16), (200, 3)]


def golden_image() -> bytes:
    """The bytes build_image writes: each mapped sector tells its own number."""
    image = bytearray(SECTORS * SECTOR)
    for start, count in DATA_RUNS:
        for s in range(start, start + count):
            line = f"golden sector {s:4}\n".encode()
            image[s * SECTOR : (s + 1) * SECTOR] = (line * 32)[:SECTOR]
    return bytes(image)


def log_build(event: str) -> int:
    """Append ``event`` to the build log; return how many builds have started so far."""
    log = pathlib.Path(os.environ["EXAMPLE_BUILDS"])
    with log.open("a") as f:
        f.write(f"{event} {os.getpid()} {os.environ.get('PYTEST_XDIST_WORKER', '-')}\n")
    return log.read_text().split().count("start")


def build_image(disk: Disk) -> None:
    """The expensive step the plugin runs once per run."""
    started = log_build("start")
    image = golden_image()
    for start, count in DATA_RUNS:
        disk.write(start, image[start * SECTOR : (start + count) * SECTOR])
        if started == 1 and os.environ.get("EXAMPLE_CRASH_FIRST_BUILD"):
            os._exit(3)  # the worker dies halfway through the build, holding the build lock
    log_build("done")


golden = golden_disk(build_image, SECTORS, SECTOR)
image = overlay_disk("golden")


@pytest.fixture
def golden_bytes() -> bytes:
    """What every reader of the golden disk must see."""
    return golden_image()


@pytest.fixture(autouse=True)
def _no_leaked_disks(shmdisk_no_leaks: None) -> None:
    """Every test is guarded: the run's golden disk is not a leak of the test that built it."""


def record(*names: str) -> None:
    """Leave disk names where the outer test can check them after the run."""
    out = os.environ.get("EXAMPLE_NAMES_DIR")
    for name in names:
        if out:
            pathlib.Path(out, name).touch()
