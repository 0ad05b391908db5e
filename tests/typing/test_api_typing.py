"""The core API used the way users write it; checked by mypy --strict (and run by pytest)."""

from __future__ import annotations

import os
import secrets

import numpy as np

import shmdisk


def test_core_api_types() -> None:
    """Every public call type-checks with ordinary arguments and returns what it says."""
    name = f"typing-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        disk: shmdisk.Disk = shmdisk.create(name, 64, 512, mode=0o600, max_size_sectors=128)
        with disk:
            info: shmdisk.DiskInfo = disk.get_info()
            rw: bool = info.read_write
            size: int = info.size_sectors
            disk.write(0, bytearray(512))
            disk.write(1, [b"\0" * 512, memoryview(bytearray(512))])
            disk.read(0, np.zeros(128, dtype=np.uint32))
            disk.read(0, [bytearray(512), bytearray(512)])
            disk.write_at(3, b"xyz")
            disk.read_at(3, bytearray(3))
            disk.resize(size + 8)
            first: int = disk.seek_mapped(0)
            hole: int = disk.seek_unmapped(first)
            disk.discard(0, 8)
            disk.write_zeroes(0, 8, may_unmap=False)
            extents: list[shmdisk.Extent] = disk.extents()
            pages: int = disk.mapped_pages()
            disk.flush()
            assert rw and hole >= 0 and pages >= 0 and extents
        with shmdisk.connect(name, read_only=True, create=False) as ro:
            try:
                ro.write(0, bytes(512))
            except shmdisk.IsReadOnlyError as e:
                assert isinstance(e, PermissionError)
        seg: shmdisk.SegmentInfo = shmdisk.inspect(name)
        names: list[str] = shmdisk.list_disks()
        path: str = shmdisk.segment_path(name)
        assert seg.state == "ok" and name in names and path.endswith(name)
    finally:
        shmdisk.destroy(name)
