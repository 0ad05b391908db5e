"""Resize and destroy under load: typed errors only, no process dies of a signal."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable

import pytest
import stress  # tools/stress, on pytest's pythonpath (pyproject.toml)
from _engines_choice import ENGINES

import shmdisk

OPS: dict[str, Callable[[shmdisk.Disk], object]] = {
    "read": lambda d: d.read(0, bytearray(512)),
    "write": lambda d: d.write(0, bytes(512)),
    "read_at": lambda d: d.read_at(3, bytearray(7)),
    "write_at": lambda d: d.write_at(3, b"x" * 7),
    "get_info": lambda d: d.get_info(),
    "resize": lambda d: d.resize(16),
    "discard": lambda d: d.discard(0, 8),
    "write_zeroes": lambda d: d.write_zeroes(0, 8),
    "seek_mapped": lambda d: d.seek_mapped(0),
    "seek_unmapped": lambda d: d.seek_unmapped(0),
    "extents": lambda d: d.extents(),
    "mapped_pages": lambda d: d.mapped_pages(),
    "flush": lambda d: d.flush(),
}


def test_resize_and_destroy_under_load() -> None:
    """Resizer, destroyer and I/O processes for 3 s: no signal deaths, no untyped errors."""
    r = stress.run_resize_destroy(
        stress.Options(duration=3.0, processes=4, seed=4, engines=ENGINES)
    )
    assert r.ok, r.problems
    f = r.figures
    assert f["signal_deaths"] == 0 and f["hangs"] == 0 and f["untyped_errors"] == 0
    assert f["destroys"] > 0 and f["grows"] + f["shrinks"] > 0
    assert f["destroyed_handle_ops_wrong"] == 0
    assert f["corrupt_sectors_seen"] == 0 and f["stale_data_seen"] == 0
    assert f["disconnect_races"] > 0 and f["disconnect_race_untyped_errors"] == 0


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_on_a_destroyed_handle_raises_disconnected(op: str) -> None:
    """After destroy() by name, each operation on a handle still open raises DisconnectedError."""
    name = stress.unique_name("gone")
    d = shmdisk.create(name, 64)
    try:
        d.write(0, b"\x01" * 512)
        shmdisk.destroy(name)
        with pytest.raises(shmdisk.DisconnectedError):
            OPS[op](d)
        fresh = shmdisk.connect(name)  # the name is free again: a new, empty device
        buf = bytearray(512)
        fresh.read(0, buf)
        assert buf == bytes(512)
        fresh.disconnect()
    finally:
        d.disconnect()
        shmdisk.destroy(name)


def _destroy_in_child(name: str) -> None:
    shmdisk.destroy(name)


def test_destroy_from_another_process_disconnects_handles() -> None:
    """A destroy in another (spawned) process makes this process's next read Disconnected."""
    name = stress.unique_name("gone2")
    d = shmdisk.create(name, 64)
    try:
        p = mp.get_context("spawn").Process(target=_destroy_in_child, args=(name,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        with pytest.raises(shmdisk.DisconnectedError):
            d.read(0, bytearray(512))
        assert d.closed
    finally:
        d.disconnect()
        shmdisk.destroy(name)
