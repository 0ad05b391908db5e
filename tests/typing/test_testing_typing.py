"""shmdisk.testing helpers as typed test code uses them: checked by mypy --strict, run by pytest."""

from __future__ import annotations

from typing import Any

import shmdisk
from shmdisk.testing import DiskFactory, LeakedSegmentsError, assert_no_leaks, unique_name


def _make(
    size_sectors: int = 8, sector_size: int = 512, *, name: str | None = None, **kwargs: Any
) -> shmdisk.Disk:
    return shmdisk.create(
        name or unique_name("typing-testing"), size_sectors, sector_size, **kwargs
    )


def _uses_a_factory(factory: DiskFactory) -> shmdisk.Disk:
    return factory(16, 4096, mode=0o600)


def test_helpers_are_typed() -> None:
    """A function with the factory's signature is a DiskFactory; the leak guard is typed."""
    name: str = unique_name("typing")
    try:
        with assert_no_leaks(ignore=lambda n: n == name, cleanup=True):
            disk = _uses_a_factory(_make)
            disk.disconnect()
            shmdisk.destroy(disk.name)
            shmdisk.create(name, 1).disconnect()
    except LeakedSegmentsError as e:
        leaked: list[str] = e.names
        raise AssertionError(leaked) from e
    finally:
        shmdisk.destroy(name)
