"""Overlays, freezing and copies used the way users write them; checked by mypy --strict and
run by pytest."""

from __future__ import annotations

import asyncio

import shmdisk
import shmdisk.aio as aio
from shmdisk.testing import unique_name


def _blocking(base: str, ovl: str, copy: str) -> list[shmdisk.LayerExtent]:
    with shmdisk.create(base, 64) as disk:
        disk.write(0, bytes(512))
        disk.freeze()
        frozen: bool = disk.frozen
        assert frozen
    shmdisk.freeze(base)
    with shmdisk.create(ovl, backing=base) as top:
        name: str | None = top.backing
        assert name == base
        with top.hold_writes(timeout=5.0) as held:
            buf = bytearray(512)
            held.read(0, buf)
        layers: list[shmdisk.LayerExtent] = top.layer_extents(0, None)
        seen: list[tuple[int, int]] = []
        with shmdisk.copy(ovl, copy, mode=0o600, timeout=5.0, progress=lambda d, t: None) as c:
            assert c.backing is None
        shmdisk.destroy(copy)
        shmdisk.copy(
            ovl, copy, progress=lambda done, total: seen.append((done, total))
        ).disconnect()
        assert seen[-1] == (32768, 32768)
    try:
        shmdisk.destroy(base)
    except shmdisk.DiskBusyError as e:
        assert isinstance(e, OSError)
    return layers


async def _async(base: str, ovl: str, copy: str) -> list[shmdisk.LayerExtent]:
    async with await aio.create(ovl, backing=base) as top:
        backing: str | None = top.backing
        assert backing == base and not top.frozen
        layers = await top.layer_extents()
        await top.freeze()
    await aio.freeze(ovl)
    async with await aio.copy(ovl, copy, mode=0o600) as c:
        assert c.backing is None
    await aio.destroy(base, force=True)
    return layers


def test_overlay_api_types() -> None:
    """Every overlay and copy call, blocking and async, with typed results."""
    names = [unique_name("typing-ovl") for _ in range(5)]
    base, ovl, copy, ovl2, copy2 = names
    try:
        assert _blocking(base, ovl, copy)[0].layer == 1
        assert asyncio.run(_async(base, ovl2, copy2))[0].layer == 1
    finally:
        for n in (copy2, ovl2, copy, ovl, base):
            shmdisk.destroy(n, force=True)
