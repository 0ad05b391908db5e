"""asyncio API: the module functions and every ``Disk`` operation as coroutines.

    import shmdisk.aio as aio

    async with await aio.create("scratch", 2048) as disk:
        await disk.write(0, b"x" * 512)
        buf = bytearray(512)
        await disk.read(0, buf)

A request can wait for a lock that another process holds. Each coroutine therefore runs the
blocking call on a small thread pool dedicated to shmdisk, so the event loop keeps serving other
tasks while it waits, and the default executor (used by ``asyncio.to_thread`` and DNS lookups) is
never filled with lock waits. The core gives each thread its own lock file descriptor, which is
what makes running requests of one ``Disk`` on several threads safe; errors and atomicity are
exactly those of the blocking API.

Cancelling the awaiting task does not cancel a request that has started: a lock wait in the
kernel cannot be interrupted from Python, so the request still completes (or fails) in its
thread. Until the awaited call returns, a ``read`` may still fill the buffers and a ``write``
may still copy from them: do not reuse them early.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import shmdisk
from shmdisk.errors import WouldBlockError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType
    from typing import Self

    from shmdisk import Disk, DiskInfo, Extent, LayerExtent, SegmentInfo

    from .disk import Buffer

__all__ = [
    "AsyncDisk",
    "connect",
    "copy",
    "create",
    "destroy",
    "freeze",
    "inspect",
    "list_disks",
    "set_max_workers",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Enough threads that a few requests stuck behind another process's lock do not stall requests
# to other disks, few enough that each thread's per-disk lock fd stays cheap.
_DEFAULT_MAX_WORKERS = 16

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_max_workers = _DEFAULT_MAX_WORKERS


def _forget_pool_after_fork() -> None:
    # A forked child inherits the executor object but none of its threads: submitting to it
    # would hang. Start a fresh pool lazily instead.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _executor() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            pool = _pool
            if pool is None:
                pool = _pool = ThreadPoolExecutor(
                    max_workers=_max_workers, thread_name_prefix="shmdisk-aio"
                )
    return pool


def set_max_workers(n: int) -> None:
    """Set how many shmdisk requests may wait or run in threads at once (default 16).

    Requests beyond that wait in a queue (without blocking the event loop). Requests already
    running keep their threads; the new limit applies to a pool started afresh.
    """
    global _pool, _max_workers
    if n < 1:
        raise ValueError(f"max_workers must be at least 1, got {n}")
    with _pool_lock:
        old, _pool, _max_workers = _pool, None, n
    if old is not None:
        old.shutdown(wait=False)


# Requests up to this size are tried on the loop first (a 256 KiB copy takes ~20 us).
_ON_LOOP_BYTES = 256 * 1024


def _small(buffers: object) -> bool:
    """True for one buffer, or a list of them, of at most _ON_LOOP_BYTES in all."""
    try:
        if isinstance(buffers, (list, tuple)):
            return sum(memoryview(b).nbytes for b in buffers) <= _ON_LOOP_BYTES
        return memoryview(buffers).nbytes <= _ON_LOOP_BYTES  # type: ignore[arg-type]
    except TypeError:
        return False  # not a buffer: the pool call raises the proper error


async def _run(func: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(func, *args, **kwargs))


async def create(
    name: str,
    size_sectors: int | None = None,
    sector_size: int | None = None,
    *,
    mode: int = 0o600,
    max_size_sectors: int | None = None,
    backing: str | None = None,
) -> AsyncDisk:
    """``shmdisk.create`` as a coroutine; same arguments and errors (``backing=BASE``: an
    overlay of the frozen disk ``BASE``)."""
    disk = await _run(
        shmdisk.create,
        name,
        size_sectors,
        sector_size,
        mode=mode,
        max_size_sectors=max_size_sectors,
        backing=backing,
    )
    return AsyncDisk(disk)


async def connect(name: str, *, read_only: bool = False, create: bool = True) -> AsyncDisk:
    """``shmdisk.connect`` as a coroutine; same arguments and errors."""
    return AsyncDisk(await _run(shmdisk.connect, name, read_only=read_only, create=create))


async def destroy(name: str, *, force: bool = False) -> None:
    """``shmdisk.destroy`` as a coroutine: a missing name is not an error; a frozen disk that
    backs overlays raises ``DiskBusyError`` unless ``force``."""
    await _run(shmdisk.destroy, name, force=force)


async def freeze(name: str) -> None:
    """``shmdisk.freeze`` as a coroutine: the disk is read-only for good."""
    await _run(shmdisk.freeze, name)


async def copy(
    src: str,
    dst: str,
    *,
    mode: int | None = None,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AsyncDisk:
    """``shmdisk.copy`` as a coroutine: a point-in-time, sparse copy of ``src`` as the new disk
    ``dst``. ``progress`` is called from the thread that copies."""
    disk = await _run(shmdisk.copy, src, dst, mode=mode, timeout=timeout, progress=progress)
    return AsyncDisk(disk)


async def list_disks() -> list[str]:
    """``shmdisk.list_disks`` as a coroutine."""
    return await _run(shmdisk.list_disks)


async def inspect(name: str) -> SegmentInfo:
    """``shmdisk.inspect`` as a coroutine."""
    return await _run(shmdisk.inspect, name)


class AsyncDisk:
    """A ``Disk`` whose operations are coroutines; ``async with`` disconnects (never destroys).

    Wraps a blocking handle, available as ``.disk`` (for ``open()``, or to hand to a process).
    Pickles as the blocking handle does: the copy reconnects by name.
    """

    __slots__ = ("_disk",)

    def __init__(self, disk: Disk) -> None:
        self._disk = disk

    def __reduce__(self) -> tuple[type[AsyncDisk], tuple[Disk]]:
        return (AsyncDisk, (self._disk,))

    def __repr__(self) -> str:
        return f"AsyncDisk({self._disk!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # -- plain attributes: no I/O, no lock, answered on the loop ---------------------------

    @property
    def disk(self) -> Disk:
        """The blocking handle underneath."""
        return self._disk

    @property
    def name(self) -> str:
        return self._disk.name

    @property
    def read_only(self) -> bool:
        return self._disk.read_only

    @property
    def closed(self) -> bool:
        return self._disk.closed

    @property
    def page_size(self) -> int:
        return self._disk.page_size

    @property
    def sector_size(self) -> int:
        return self._disk.sector_size

    @property
    def frozen(self) -> bool:
        return self._disk.frozen

    @property
    def backing(self) -> str | None:
        return self._disk.backing

    # -- device operations: each one blocking call on the shmdisk thread pool -------------

    async def get_info(self) -> DiskInfo:
        """``Disk.get_info``: read_write, sector_size and the current size_sectors."""
        return await _run(self._disk.get_info)

    # Small requests first try on the loop itself with wait=False: when no other thread or
    # process holds their pages (the usual case) they finish in microseconds instead of a
    # thread-pool round trip; when someone does, WouldBlockError says so before anything was
    # touched and the request goes to the pool, where waiting blocks no loop.

    async def read(self, sector: int, buffers: Buffer | Sequence[Buffer]) -> None:
        """``Disk.read``: fill the buffers (whole sectors each) from ``sector`` on, atomically."""
        if _small(buffers):
            try:
                return self._disk.read(sector, buffers, wait=False)
            except WouldBlockError:
                pass
        await _run(self._disk.read, sector, buffers)

    async def write(self, sector: int, buffers: Buffer | Sequence[Buffer]) -> None:
        """``Disk.write``: copy the buffers (whole sectors each) to ``sector`` on, atomically."""
        if _small(buffers):
            try:
                return self._disk.write(sector, buffers, wait=False)
            except WouldBlockError:
                pass
        await _run(self._disk.write, sector, buffers)

    async def read_at(self, offset: int, buffer: Buffer) -> None:
        """``Disk.read_at``: fill ``buffer`` from byte ``offset``, atomically."""
        if _small(buffer):
            try:
                return self._disk.read_at(offset, buffer, wait=False)
            except WouldBlockError:
                pass
        await _run(self._disk.read_at, offset, buffer)

    async def write_at(self, offset: int, data: Buffer) -> None:
        """``Disk.write_at``: copy ``data`` to byte ``offset``, atomically."""
        if _small(data):
            try:
                return self._disk.write_at(offset, data, wait=False)
            except WouldBlockError:
                pass
        await _run(self._disk.write_at, offset, data)

    async def resize(self, size_sectors: int) -> None:
        """``Disk.resize``: grow with zeros or drop the tail; every process sees the new size."""
        await _run(self._disk.resize, size_sectors)

    async def seek_mapped(self, sector: int) -> int:
        """``Disk.seek_mapped``: the first sector ``>= sector`` that may hold data."""
        return await _run(self._disk.seek_mapped, sector)

    async def seek_unmapped(self, sector: int) -> int:
        """``Disk.seek_unmapped``: the first sector ``>= sector`` that is surely zero."""
        return await _run(self._disk.seek_unmapped, sector)

    async def discard(self, sector: int, n_sectors: int) -> None:
        """``Disk.discard``: the range reads zeros afterwards; whole pages are freed."""
        await _run(self._disk.discard, sector, n_sectors)

    async def write_zeroes(self, sector: int, n_sectors: int, *, may_unmap: bool = True) -> None:
        """``Disk.write_zeroes``: zero the range, unmapping whole pages when allowed."""
        await _run(self._disk.write_zeroes, sector, n_sectors, may_unmap=may_unmap)

    async def extents(self, start: int = 0, end: int | None = None) -> list[Extent]:
        """``Disk.extents``: mapped and unmapped runs covering ``[start, end)``."""
        return await _run(self._disk.extents, start, end)

    async def layer_extents(self, start: int = 0, end: int | None = None) -> list[LayerExtent]:
        """``Disk.layer_extents``: which disk of an overlay chain holds each run."""
        return await _run(self._disk.layer_extents, start, end)

    async def freeze(self) -> None:
        """``Disk.freeze``: the disk is read-only for good, for every handle."""
        await _run(self._disk.freeze)

    async def mapped_pages(self) -> int:
        """``Disk.mapped_pages``: how many pages hold data."""
        return await _run(self._disk.mapped_pages)

    async def flush(self) -> None:
        """``Disk.flush``: succeeds unless the handle is disconnected."""
        await _run(self._disk.flush)

    async def disconnect(self) -> None:
        """``Disk.disconnect``: release this handle; idempotent; the disk stays."""
        await _run(self._disk.disconnect)
