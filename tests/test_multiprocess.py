"""The device across real processes and threads: sharing, atomicity, kills, resize, destroy."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import _workers as w
import numpy as np
import pytest

import shmdisk

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def procs() -> Iterator[list[multiprocessing.process.BaseProcess]]:
    """Processes a test starts; any still alive at the end are killed (no stragglers)."""
    started: list[multiprocessing.process.BaseProcess] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)


@pytest.mark.parametrize("ctx", [SPAWN, FORK], ids=["spawn", "fork"])
def test_child_writes_parent_reads_and_back(
    disk: shmdisk.Disk, ctx: multiprocessing.context.BaseContext
) -> None:
    """Bytes written by a child are read by the parent exactly, and the other way round."""
    p = ctx.Process(target=w.write_pattern, args=(disk.name, 3, 3 * 4096, 42))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    buf = bytearray(3 * 4096)
    disk.read(3, buf)
    assert bytes(buf) == w.pattern(3 * 4096, 42)

    disk.write(100, w.pattern(8192, 43))
    with ctx.Pool(1) as pool:
        assert pool.apply_async(w.check_pattern, (disk.name, 100, 8192, 43)).get(60)


def test_disk_handed_to_pool_workers(disk: shmdisk.Disk) -> None:
    """A Disk passed to ProcessPoolExecutor workers reconnects there and reads the same bytes."""
    disk.write(0, w.pattern(256 * 512, 7))
    with ProcessPoolExecutor(2, mp_context=SPAWN) as ex:
        parts = list(ex.map(w.read_with_handle, [disk] * 4, [0, 64, 128, 192], [64 * 512] * 4))
    assert b"".join(parts) == w.pattern(256 * 512, 7)


@pytest.mark.parametrize("ctx", [SPAWN, FORK], ids=["spawn", "fork"])
def test_no_torn_reads_across_processes(
    disk: shmdisk.Disk, ctx: multiprocessing.context.BaseContext
) -> None:
    """Readers never see a mix of two concurrent writes to a multi-page, unaligned range."""
    sector, n_bytes, seconds = 5, 5 * 4096 + 1024, 1.5  # spans 6 pages, neither end aligned
    with ctx.Pool(4) as pool:
        writers = [
            pool.apply_async(w.hammer_writes, (disk.name, i, sector, n_bytes, seconds))
            for i in range(2)
        ]
        readers = [
            pool.apply_async(w.hammer_reads, (disk.name, sector, n_bytes, seconds))
            for _ in range(2)
        ]
        writes = sum(r.get(60) for r in writers)
        results = [r.get(60) for r in readers]
    reads = sum(r for r, _ in results)
    torn = sum(t for _, t in results)
    assert writes > 100 and reads > 100
    assert torn == 0, f"{torn} torn reads of {reads}"


def test_no_torn_reads_across_threads_sharing_a_handle(disk: shmdisk.Disk) -> None:
    """Threads sharing one Disk exclude each other: no torn reads, every write whole."""
    sector, n = 6, 3 * 4096
    stop = time.monotonic() + 1.0
    torn: list[int] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            k = 0
            while time.monotonic() < stop:
                disk.write(sector, bytes([(i * 100 + k) % 250 + 1]) * n)
                k += 1
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            buf = bytearray(n)
            arr = np.frombuffer(buf, dtype=np.uint8)
            while time.monotonic() < stop:
                disk.read(sector, buf)
                if (arr != arr[0]).any():
                    torn.append(1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not torn


def test_killed_lock_holder_never_blocks_others(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A process SIGKILLed mid-write while holding page locks: the others go on at once, and
    the page it left half-written reads as it is, with its counter repaired."""
    disk.write(0, b"o" * 4096)
    ready = SPAWN.Event()
    p = SPAWN.Process(target=w.hold_lock_then_wait, args=(disk.name, ready, 0, 10, True))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    assert w.stripe_holder(disk, 0) not in (0, threading.get_native_id())  # the child has it
    with pytest.raises(shmdisk.WouldBlockError):
        disk.write(0, b"x" * 512, wait=False)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    t0 = time.monotonic()
    buf = bytearray(4096)
    disk.read(0, buf)  # takes the dead holder's stripe: repairs page 0's counter
    assert buf == b"torn!!!!" + b"o" * 4088
    disk.write(0, b"a" * 4096)
    assert time.monotonic() - t0 < 1.0
    disk.read(0, buf)
    assert buf == b"a" * 4096
    assert w.stripe_holder(disk, 0) == 0


def test_killed_mid_large_write_leaves_disk_usable(
    name: str, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """Writers killed at random moments in 8 MiB writes never leave a lock behind."""
    with shmdisk.create(name, (8 << 20) // 512) as d:
        rng = np.random.default_rng(1)
        for _ in range(3):
            ready = SPAWN.Event()
            p = SPAWN.Process(target=w.big_writes_forever, args=(name, ready))
            procs.append(p)
            p.start()
            assert ready.wait(60)
            time.sleep(float(rng.uniform(0.01, 0.1)))
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            t0 = time.monotonic()
            d.write(0, b"s" * 4096)
            d.read(0, bytearray(8 << 20))  # takes every page lock it needs
            assert time.monotonic() - t0 < 1.0


def test_resize_seen_by_other_process(disk: shmdisk.Disk) -> None:
    """A resize in one process is seen by another, including data past the old capacity."""
    with SPAWN.Pool(1) as pool:
        res = pool.apply_async(w.wait_for_size, (disk.name, 100_000, 30))
        time.sleep(0.5)  # let the child connect at the old size
        disk.resize(100_000)
        disk.write(99_999, b"g" * 512)
        size, last = res.get(60)
    assert size == 100_000
    assert last in (b"g" * 512, bytes(512))  # the child may read before or after the write


def test_destroy_seen_by_other_process(disk: shmdisk.Disk) -> None:
    """After destroy, a connected process's next call raises DisconnectedError."""
    mgr = SPAWN.Manager()
    try:
        connected, destroyed = mgr.Event(), mgr.Event()
        with SPAWN.Pool(1) as pool:
            res = pool.apply_async(w.see_destroy, (disk.name, connected, destroyed))
            assert connected.wait(60)
            shmdisk.destroy(disk.name)
            destroyed.set()
            assert res.get(60) == "DisconnectedError"
    finally:
        mgr.shutdown()


def test_forked_child_does_not_share_parent_locks(disk: shmdisk.Disk) -> None:
    """A child forked while the parent holds a lock must not hold (or release) that lock."""
    with w.hold_pages(disk, 0, 1):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: page 0 must be taken (by the parent), not its own
            try:
                os.close(r)
                try:
                    disk.write(0, bytes(512), wait=False)
                    answer = b"0"
                except shmdisk.WouldBlockError:
                    answer = b"1"
                os.write(wfd, answer)
            finally:
                os._exit(0)
        os.close(wfd)
        answer = os.read(r, 1)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert answer == b"1"
        # ... and the child's exit released nothing of ours.
        assert w.stripe_holder(disk, 0) == threading.get_native_id()
        other = shmdisk.connect(disk.name, create=False)
        try:
            with pytest.raises(shmdisk.WouldBlockError):
                threading_result: list[BaseException] = []
                t = threading.Thread(
                    target=lambda: _catch(threading_result, other.write, 0, bytes(512))
                )
                t.start()
                t.join(10)
                raise threading_result[0]
        finally:
            other.disconnect()


def _catch(out: list[BaseException], fn: object, *args: object) -> None:
    try:
        fn(*args, wait=False)  # type: ignore[operator]
    except BaseException as e:
        out.append(e)


def test_lock_free_read_falls_back_to_lock_while_writer_holds(disk: shmdisk.Disk) -> None:
    """A reader never returns a page a writer is changing: it waits on the writer's lock."""
    disk.write(0, b"1" * 4096)
    other = shmdisk.connect(disk.name, create=False)
    with w.hold_pages(other, 0, 1):
        w0 = w.make_odd(other, 0)  # as a writer in the middle of its copy
        other._io.current().dv[0:4096] = b"2" * 4096
        result: list[bytes] = []

        def read() -> None:
            buf = bytearray(4096)
            disk.read(0, buf)
            result.append(bytes(buf))

        t = threading.Thread(target=read)
        t.start()
        t.join(0.3)
        assert t.is_alive(), "reader did not wait for the writer"
        w.make_even(other, 0, w0)
    t.join(10)
    assert result == [b"2" * 4096]
    other.disconnect()


@pytest.mark.parametrize("op", ["write", "read", "discard", "resize"])
def test_destroy_while_waiting_for_lock_raises_disconnected(disk: shmdisk.Disk, op: str) -> None:
    """A call that finds the disk destroyed once it holds its lock raises DisconnectedError."""
    other = shmdisk.connect(disk.name, create=False)
    calls = {
        "write": lambda: disk.write(0, bytes(512)),
        "read": lambda: disk.read(0, bytearray(4096 * 2)),
        "discard": lambda: disk.discard(0, 1),
        "resize": lambda: disk.resize(8),
    }
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            calls[op]()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    with w.hold_pages(other, 0, 1):
        if op == "read":
            w.make_odd(other, 0)  # as a writer mid-copy: the reader must take the lock
        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)  # the call is now waiting for page 0
        other._io.current().seg.hq[shmdisk._layout.F_DESTROYED] = 1  # type: ignore[attr-defined]
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], shmdisk.DisconnectedError), outcome
    with pytest.raises(shmdisk.DisconnectedError):
        disk.flush()
    assert disk.closed
    other.disconnect()


def test_short_lived_threads_do_not_pile_up_descriptors(disk: shmdisk.Disk) -> None:
    """Each thread's lock descriptor is closed when the thread ends, not kept until disconnect."""

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    disk.write(0, bytes(512))  # this thread's own descriptor exists before we count
    before = fds()
    for _ in range(40):
        t = threading.Thread(target=disk.write, args=(0, bytes(512)))
        t.start()
        t.join(10)
    assert fds() <= before + 1
    disk.disconnect()
    assert fds() < before


def test_wait_false_refuses_instead_of_waiting(disk: shmdisk.Disk) -> None:
    """With wait=False a locked page raises WouldBlockError at once and nothing changes."""
    disk.write(0, b"o" * 4096)
    other = shmdisk.connect(disk.name, create=False)
    outcomes: list[str] = []

    def attempts() -> None:
        t0 = time.monotonic()
        for call in (
            lambda: disk.write(0, b"n" * 4096, wait=False),
            lambda: disk.read(0, bytearray(4096), wait=False),
            lambda: disk.write_at(10, b"n", wait=False),
        ):
            try:
                call()
                outcomes.append("done")
            except BlockingIOError as e:
                outcomes.append(type(e).__name__)
        disk.write(128, b"p" * 512, wait=False)  # page 16: another stripe, free
        outcomes.append(f"fast={time.monotonic() - t0 < 0.5}")

    with w.hold_pages(other, 0, 1):
        w0 = w.make_odd(other, 0)  # a writer mid-copy: readers must not go lock-free
        t = threading.Thread(target=attempts)
        t.start()
        t.join(10)
        w.make_even(other, 0, w0)
    other.disconnect()
    assert outcomes == ["WouldBlockError"] * 3 + ["fast=True"]
    buf = bytearray(4096)
    disk.read(0, buf, wait=False)
    assert buf == b"o" * 4096


def test_disconnect_while_threads_are_inside_calls(name: str) -> None:
    """Other threads' calls racing disconnect finish or raise DisconnectedError, nothing else."""
    shmdisk.create(name, 512).disconnect()
    for round_ in range(30):
        d = shmdisk.connect(name, create=False)
        outcomes: list[str] = []
        stop = threading.Event()

        def hammer(
            i: int,
            d: shmdisk.Disk = d,
            outcomes: list[str] = outcomes,
            stop: threading.Event = stop,
        ) -> None:
            buf = bytearray(4096 * (1 + i % 3))
            try:
                while not stop.is_set():
                    (d.write if i % 2 else d.read)(8 * (i % 4), buf)
                    d.seek_mapped(0)
                    d.discard(64, 8)
            except shmdisk.DisconnectedError:
                outcomes.append("disconnected")
            except BaseException as e:
                outcomes.append(repr(e))

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.002 * (round_ % 5))
        d.disconnect()
        stop.set()
        for t in threads:
            t.join(10)
        assert set(outcomes) <= {"disconnected"}, outcomes
        assert d.closed
