"""shmdisk.aio: coroutines that never block the event loop, with the blocking API's errors."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

import shmdisk
from shmdisk import aio
from shmdisk.testing import unique_name

SS = 512
T = TypeVar("T")

# struct flock on 64-bit Linux (l_type, l_whence, l_start, l_len, l_pid), 32 bytes.


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop, failing instead of hanging after 60 s."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


@pytest.fixture
def name() -> Iterator[str]:
    """A unique disk name, destroyed afterwards."""
    n = unique_name("aio")
    try:
        yield n
    finally:
        shmdisk.destroy(n)


def test_module_coroutines_mirror_the_blocking_api(name: str) -> None:
    """create, connect, list_disks, inspect and destroy behave as their blocking twins."""

    async def main() -> None:
        disk = await aio.create(name, 64, 1024)
        assert isinstance(disk, aio.AsyncDisk)
        with pytest.raises(shmdisk.DiskExistsError):
            await aio.create(name, 8)
        assert name in await aio.list_disks()
        info = await aio.inspect(name)
        assert (info.state, info.size_sectors, info.sector_size) == ("ok", 64, 1024)
        async with await aio.connect(name, create=False, read_only=True) as ro:
            assert ro.read_only and (await ro.get_info()).read_write is False
        await disk.disconnect()
        await aio.destroy(name)
        await aio.destroy(name)  # a missing name is not an error
        assert name not in await aio.list_disks()
        with pytest.raises(shmdisk.DiskNotFoundError):
            await aio.connect(name, create=False)
        fresh = await aio.connect(name)  # create=True: the default geometry
        info2 = await fresh.get_info()
        assert (info2.size_sectors, info2.sector_size) == (
            shmdisk.DEFAULT_SIZE_SECTORS,
            shmdisk.DEFAULT_SECTOR_SIZE,
        )
        await fresh.disconnect()

    run(main())


def test_every_disk_operation_matches_the_blocking_handle(name: str) -> None:
    """Each AsyncDisk coroutine returns what the same call on a Disk returns."""

    async def main() -> None:
        async with await aio.create(name, 256) as disk:
            sync = disk.disk
            assert (disk.name, disk.sector_size, disk.page_size) == (name, SS, sync.page_size)
            assert not disk.closed and not disk.read_only
            page = disk.page_size
            await disk.write(2, [b"\x01" * SS, b"\x02" * SS])
            await disk.write_at(page * 3 + 7, b"unaligned")
            two = [bytearray(SS), bytearray(SS)]
            await disk.read(2, two)
            assert two == [b"\x01" * SS, b"\x02" * SS]
            buf = bytearray(9)
            await disk.read_at(page * 3 + 7, buf)
            assert buf == b"unaligned"
            assert await disk.mapped_pages() == sync.mapped_pages() == 2
            assert await disk.extents() == sync.extents()
            assert await disk.extents(0, 4) == sync.extents(0, 4)
            assert await disk.seek_mapped(10) == sync.seek_mapped(10)
            assert await disk.seek_unmapped(0) == sync.seek_unmapped(0)
            await disk.write_zeroes(2, 1, may_unmap=False)
            await disk.discard(page * 3 // SS, page // SS)
            out = bytearray(2 * SS)
            await disk.read(2, out)
            assert out == bytes(SS) + b"\x02" * SS
            assert await disk.mapped_pages() == 1
            await disk.resize(512)
            assert (await disk.get_info()).size_sectors == 512 == sync.get_info().size_sectors
            await disk.flush()
        assert disk.closed
        with shmdisk.connect(name, create=False) as again:
            assert again.get_info().size_sectors == 512  # async with disconnected, not destroyed

    run(main())


def test_errors_are_the_blocking_apis_errors(name: str) -> None:
    """Read-only writes, out-of-range sectors, bad buffers and disconnects raise the same errors."""

    async def main() -> None:
        disk = await aio.create(name, 16)
        ro = await aio.connect(name, read_only=True, create=False)
        with pytest.raises(shmdisk.IsReadOnlyError):
            await ro.write(0, bytes(SS))
        with pytest.raises(shmdisk.IsReadOnlyError):
            await ro.resize(8)
        with pytest.raises(shmdisk.OutOfRangeError):
            await disk.read(16, bytearray(SS))
        with pytest.raises(shmdisk.BadBufferError):
            await disk.write(0, bytes(100))
        with pytest.raises(shmdisk.BadBufferError):
            await disk.read(0, bytes(SS))  # not writable
        await ro.disconnect()
        await disk.disconnect()
        await disk.disconnect()  # idempotent
        with pytest.raises(shmdisk.DisconnectedError):
            await disk.read(0, bytearray(SS))
        with pytest.raises(shmdisk.DisconnectedError):
            await disk.flush()

    run(main())


def _hold_whole_lock(name: str, locked: Any, release: Any) -> None:
    """Take every page lock of the disk, as a whole-disk operation does, until released."""
    with shmdisk.connect(name, create=False) as d, d.hold_writes():
        locked.set()
        release.wait(60)


def test_loop_keeps_serving_while_a_write_waits_for_another_process(name: str) -> None:
    """A write blocked by a lock held in another process leaves the loop free; then completes."""
    disk = shmdisk.create(name, 64)
    ctx = multiprocessing.get_context("spawn")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_whole_lock, args=(name, locked, release))
    holder.start()
    try:
        assert locked.wait(60), "the lock holder never took its lock"
        data = bytes(range(256)) * (8 * SS // 256)

        async def main() -> tuple[int, float, float]:
            adisk = aio.AsyncDisk(disk)
            ticks = 0
            worst_gap = 0.0

            async def ticker() -> None:
                nonlocal ticks, worst_gap
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    worst_gap = max(worst_gap, now - last)
                    last = now
                    ticks += 1

            tick_task = asyncio.create_task(ticker())
            write = asyncio.create_task(adisk.write(4, data))
            await asyncio.sleep(0.4)
            assert not write.done(), "the write did not wait for the other process's lock"
            ticks_while_blocked = ticks
            started = time.monotonic()
            release.set()
            await asyncio.wait_for(write, 30)
            waited_after_release = time.monotonic() - started
            tick_task.cancel()
            back = bytearray(len(data))
            await adisk.read(4, back)
            assert back == data
            return ticks_while_blocked, worst_gap, waited_after_release

        ticks, worst_gap, _ = run(main())
        # 0.4 s of 5 ms sleeps: a free loop ticks dozens of times, a blocked one not at all. The
        # bounds leave room for a busy machine, not for a loop stuck behind the lock (>= 0.4 s).
        assert ticks >= 10, ticks
        assert worst_gap < 0.3, worst_gap
    finally:
        release.set()
        holder.join(timeout=30)
        if holder.is_alive():
            holder.kill()
        disk.disconnect()
    assert holder.exitcode == 0


def test_concurrent_tasks_never_see_a_torn_write(name: str) -> None:
    """Many tasks writing and reading one page-crossing range: every read is one write's data."""

    async def main() -> set[int]:
        async with await aio.create(name, 256) as disk:
            offset, length = disk.page_size - 100, 2 * disk.page_size + 200
            seen: set[int] = set()

            async def writer(fill: int) -> None:
                block = bytes([fill]) * length
                for _ in range(40):
                    await disk.write_at(offset, block)

            async def reader() -> None:
                buf = bytearray(length)
                for _ in range(60):
                    await disk.read_at(offset, buf)
                    values = set(buf)
                    assert len(values) == 1, f"torn read: {sorted(values)}"
                    seen.update(values)

            await asyncio.gather(*(writer(f) for f in (1, 2, 3)), reader(), reader())
            return seen

    assert run(main()) <= {0, 1, 2, 3}


def test_async_disk_pickles_by_name(name: str) -> None:
    """A pickled AsyncDisk reconnects to the same disk by name."""

    async def main() -> None:
        async with await aio.create(name, 8) as disk:
            await disk.write(1, b"\x5a" * SS)
            async with pickle.loads(pickle.dumps(disk)) as copy:
                assert isinstance(copy, aio.AsyncDisk) and copy.name == name
                buf = bytearray(SS)
                await copy.read(1, buf)
                assert buf == b"\x5a" * SS
                assert repr(copy).startswith("AsyncDisk(")

    run(main())


def _use_aio_after_fork(name: str) -> None:
    async def main() -> None:
        async with await aio.connect(name, create=False) as disk:
            await disk.write(0, b"\x77" * SS)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_forked_child_gets_a_working_thread_pool(name: str) -> None:
    """After fork the child starts its own pool instead of waiting on the parent's threads."""

    async def warm_up() -> None:
        async with await aio.create(name, 8) as disk:
            await disk.flush()  # the parent's pool now has a thread

    run(warm_up())
    child = multiprocessing.get_context("fork").Process(target=_use_aio_after_fork, args=(name,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    with shmdisk.connect(name, create=False) as disk:
        buf = bytearray(SS)
        disk.read(0, buf)
        assert buf == b"\x77" * SS


def test_set_max_workers(name: str) -> None:
    """The pool size can be changed; requests still run, and nonsense is refused."""
    with pytest.raises(ValueError):
        aio.set_max_workers(0)
    try:
        aio.set_max_workers(1)

        async def main() -> None:
            async with await aio.create(name, 8) as disk:
                await asyncio.gather(*(disk.write(i, bytes([i]) * SS) for i in range(8)))
                for i in range(8):
                    buf = bytearray(SS)
                    await disk.read(i, buf)
                    assert buf == bytes([i]) * SS

        run(main())
    finally:
        aio.set_max_workers(16)
