"""shmdisk.aio as typed async code uses it: checked by mypy --strict, and run by pytest."""

from __future__ import annotations

import asyncio

import shmdisk
import shmdisk.aio as aio
from shmdisk.testing import unique_name


async def _session(name: str) -> list[shmdisk.Extent]:
    disk: aio.AsyncDisk = await aio.create(name, 64, 512, max_size_sectors=128)
    async with disk:
        await disk.write(0, [bytearray(512), b"\x01" * 512])
        await disk.write_at(3, memoryview(b"xyz"))
        buf = bytearray(512)
        await disk.read(1, buf)
        await disk.read_at(0, memoryview(buf)[:10])
        info: shmdisk.DiskInfo = await disk.get_info()
        await disk.resize(info.size_sectors * 2)
        first: int = await disk.seek_mapped(0)
        hole: int = await disk.seek_unmapped(first)
        await disk.discard(hole, 1)
        await disk.write_zeroes(0, 1, may_unmap=False)
        pages: int = await disk.mapped_pages()
        assert pages >= 0
        await disk.flush()
        extents = await disk.extents(0, None)
    names: list[str] = await aio.list_disks()
    seg: shmdisk.SegmentInfo = await aio.inspect(name)
    assert name in names and seg.name == name
    other = await aio.connect(name, read_only=True, create=False)
    sync: shmdisk.Disk = other.disk
    assert sync.read_only
    await other.disconnect()
    await aio.destroy(name)
    return extents


def test_aio_api_types() -> None:
    """Every AsyncDisk coroutine and module coroutine, awaited with typed results."""
    name = unique_name("typing-aio")
    try:
        extents = asyncio.run(_session(name))
        assert all(isinstance(e, shmdisk.Extent) for e in extents)
    finally:
        shmdisk.destroy(name)
