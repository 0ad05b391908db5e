"""The page-I/O engines: native and python share disks; kills, stops, fences and re-entry."""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import _workers as w
import pytest

import shmdisk
from shmdisk import _layout as L
from shmdisk import _stripes

SPAWN = multiprocessing.get_context("spawn")
NT_STORES = "glibc.cpu.x86_non_temporal_threshold=0x100000"
HAVE_NATIVE = importlib.util.find_spec("shmdisk._native") is not None


@contextlib.contextmanager
def child_env(**env: str | None) -> Iterator[None]:
    """Spawned children started inside see these environment variables (None: unset)."""
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def procs() -> Iterator[list[multiprocessing.process.BaseProcess]]:
    """Processes a test starts; any still alive at the end are killed (no stragglers)."""
    started: list[multiprocessing.process.BaseProcess] = []
    yield started
    for p in started:
        if p.is_alive():
            os.kill(p.pid or 0, signal.SIGKILL)
        p.join(5)


def test_engine_is_named_and_chosen_by_the_environment() -> None:
    """shmdisk.ENGINE says which engine runs; SHMDISK_NO_EXTENSIONS=1 picks python."""
    assert shmdisk.ENGINE in ("native", "python")
    with child_env(SHMDISK_NO_EXTENSIONS="1"), SPAWN.Pool(1) as pool:
        assert pool.apply(w.engine_of_child) == "python"
    if os.environ.get("SHMDISK_NO_EXTENSIONS", "") in ("", "0"):
        assert ("native" if HAVE_NATIVE else "python") == shmdisk.ENGINE
    else:
        assert shmdisk.ENGINE == "python" and _stripes.native is None


def test_native_and_python_processes_share_a_disk_without_torn_reads(
    disk: shmdisk.Disk,
) -> None:
    """Writers and readers of both engines on one range: every read is one whole write."""
    sector, n_bytes, seconds = 3, 6 * 4096 + 512, 1.5  # 7 pages, 2 stripes, unaligned
    results = []
    for no_ext in ("1", "0"):
        with child_env(SHMDISK_NO_EXTENSIONS=no_ext):
            pool = SPAWN.Pool(2)
        results.append(pool)
    try:
        jobs = []
        for tag, pool in enumerate(results):
            jobs.append(
                pool.apply_async(w.stamp_writes, (disk.name, sector, n_bytes, seconds, tag))
            )
            jobs.append(pool.apply_async(w.hammer_reads, (disk.name, sector, n_bytes, seconds)))
        writes = [jobs[0].get(60), jobs[2].get(60)]
        reads = [jobs[1].get(60), jobs[3].get(60)]
    finally:
        for pool in results:
            pool.terminate()
    assert all(n > 50 for n in writes), writes
    assert sum(r for r, _ in reads) > 100 and sum(t for _, t in reads) == 0, reads


@pytest.mark.parametrize("no_ext", ["0", "1"], ids=["native-reader", "python-reader"])
def test_large_writes_with_non_temporal_stores_never_tear(disk: shmdisk.Disk, no_ext: str) -> None:
    """2-3 MiB writes forced onto glibc's non-temporal copy path, against lock-free readers."""
    if no_ext == "0" and not HAVE_NATIVE:
        pytest.skip("the native engine is not built here")
    disk.resize((4 << 20) // 512)
    sector, n_bytes = 1, (2 << 20) + 4096 * 5 + 512  # unaligned, > the forced threshold
    with child_env(GLIBC_TUNABLES=NT_STORES, SHMDISK_NO_EXTENSIONS=no_ext), SPAWN.Pool(3) as pool:
        writers = [
            pool.apply_async(w.stamp_writes, (disk.name, sector, n_bytes, 1.5, t)) for t in range(2)
        ]
        reader = pool.apply_async(w.hammer_reads, (disk.name, sector, n_bytes, 1.5))
        writes = sum(j.get(90) for j in writers)
        reads, torn = reader.get(90)
    assert writes > 10 and reads > 10
    assert torn == 0, f"{torn} torn reads of {reads}"


def test_holder_of_every_stripe_killed_others_recover_at_once(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A process killed holding all 1024 stripes, pages left odd: the next caller repairs
    and goes on in well under a second; the torn pages read as they were left."""
    disk.write(0, b"a" * 4096 * 32)
    ready = SPAWN.Event()
    p = SPAWN.Process(target=w.hold_all_then_die, args=(disk.name, ready, [0, 17, 31]))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    with pytest.raises(shmdisk.WouldBlockError):
        disk.write(200, b"x" * 512, wait=False)
    os.kill(p.pid or 0, signal.SIGKILL)
    p.join(10)
    t0 = time.monotonic()
    disk.resize(256)  # takes every stripe: repairs all of them
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, elapsed
    buf = bytearray(4096 * 32)
    disk.read(0, buf, wait=False)  # no page is left odd
    expect = bytearray(b"a" * 4096 * 32)
    for page in (0, 17, 31):
        expect[page * 4096 : page * 4096 + 4] = b"dead"
    assert buf == expect
    seg = disk._io.current().seg
    assert not (seg.words[:32] & 1).any()


def test_killed_first_write_leaves_a_page_that_reads_zero_and_frees_its_memory(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A first write killed after its bytes landed: the page the map calls unmapped reads as
    zeros, a later one-sector write never brings the old rest back, and its memory goes."""
    page = 5
    ready = SPAWN.Event()
    p = SPAWN.Process(target=w.die_mid_first_write, args=(disk.name, ready, page))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    os.kill(p.pid or 0, signal.SIGKILL)
    p.join(10)
    path = shmdisk.segment_path(disk.name)
    disk.write(page * 8 + 1, b"n" * 512)  # one sector: repairs, then a fresh first write
    buf = bytearray(4096)
    disk.read(page * 8, buf)
    assert buf == bytes(512) + b"n" * 512 + bytes(3072)
    allocated = os.stat(path).st_blocks * 512
    disk.discard(page * 8, 8)
    assert os.stat(path).st_blocks * 512 <= allocated - 4096
    disk.read(page * 8, buf)
    assert buf == bytes(4096)


def test_killed_discard_leaves_zeros_and_no_memory(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A discard killed after it unmapped a page but before it punched it: repaired to a hole."""
    disk.write(0, b"d" * 4096 * 4)
    path = shmdisk.segment_path(disk.name)
    before = os.stat(path).st_blocks
    ready = SPAWN.Event()
    p = SPAWN.Process(target=w.hold_lock_then_wait, args=(disk.name, ready, 0, 4))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    # What the discard had done when it died: page 2's word odd and no longer mapped.
    seg = disk._io.current().seg
    seg.wv[2] = (seg.wv[2] & L.SEQ_MASK) | 1
    os.kill(p.pid or 0, signal.SIGKILL)
    p.join(10)
    buf = bytearray(4096 * 4)
    disk.read(0, buf)  # odd word: takes the stripe, repairs
    assert buf == b"d" * 8192 + bytes(4096) + b"d" * 4096
    assert os.stat(path).st_blocks <= before - 8
    disk.write(2 * 8 + 3, b"z" * 512)  # a sector in the repaired page: the rest stays zero
    disk.read(0, buf)
    assert buf[8192:12288] == bytes(1536) + b"z" * 512 + bytes(2048)


def test_stopped_holder_blocks_until_timeout_and_ctrl_c_gets_through(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A SIGSTOPped holder: timeout= raises LockTimeoutError, wait=False WouldBlockError, and
    a process waiting without a timeout still dies of Ctrl-C (SIGINT) at once."""
    ready = SPAWN.Event()
    p = SPAWN.Process(target=w.hold_page_and_stop, args=(disk.name, ready, 0))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    try:
        t0 = time.monotonic()
        with pytest.raises(shmdisk.LockTimeoutError):
            disk.write(0, b"t" * 512, timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 2
        with pytest.raises(shmdisk.WouldBlockError):
            disk.write(0, b"t" * 512, wait=False)
        code = textwrap.dedent(
            f"""
            import shmdisk, sys
            d = shmdisk.connect({disk.name!r}, create=False)
            print("waiting", flush=True)
            try:
                d.write(0, b"w" * 512)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(3)
            """
        )
        waiter = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        assert waiter.stdout is not None
        assert waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        assert waiter.poll() is None  # really waiting
        t0 = time.monotonic()
        waiter.send_signal(signal.SIGINT)
        out, _ = waiter.communicate(timeout=10)
        assert waiter.returncode == 3 and "interrupted" in out
        assert time.monotonic() - t0 < 1.0
    finally:
        os.kill(p.pid or 0, signal.SIGKILL)
        p.join(10)
    disk.write(0, b"after" + bytes(507))  # the dead holder's stripe is free again


def test_read_only_handle_never_stalls_the_owner(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A read-only reader stopped in the middle of its reads holds nothing: writes go on."""
    ready, stop = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=w.read_only_reader, args=(disk.name, ready, stop))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    try:
        for _ in range(5):
            os.kill(p.pid or 0, signal.SIGSTOP)
            for i in range(50):
                disk.write(i % 64, bytes([i + 1]) * 512, timeout=1.0)
            os.kill(p.pid or 0, signal.SIGCONT)
            time.sleep(0.01)
    finally:
        os.kill(p.pid or 0, signal.SIGCONT)
        stop.set()
        p.join(10)


def test_read_only_handle_reads_past_a_dead_writer(
    disk: shmdisk.Disk, procs: list[multiprocessing.process.BaseProcess]
) -> None:
    """A writer dies mid-write: a read-only handle sees the holder died and reads the page as
    it was left (it cannot repair it), instead of waiting forever."""
    disk.write(0, b"r" * 4096)
    ready = SPAWN.Event()
    p = SPAWN.Process(target=w.hold_lock_then_wait, args=(disk.name, ready, 0, 1, True))
    procs.append(p)
    p.start()
    assert ready.wait(60)
    ro = shmdisk.connect(disk.name, read_only=True, create=False)
    try:
        with pytest.raises(shmdisk.WouldBlockError):
            ro.read(0, bytearray(4096), wait=False)  # holder alive: a writer is at work
        with pytest.raises(shmdisk.LockTimeoutError):
            ro.read(0, bytearray(4096), timeout=0.1)
        os.kill(p.pid or 0, signal.SIGKILL)
        p.join(10)
        buf = bytearray(4096)
        t0 = time.monotonic()
        ro.read(0, buf, timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert buf == b"torn!!!!" + b"r" * 4088
    finally:
        ro.disconnect()


def test_read_racing_disconnect_never_resizes_the_callers_buffer(name: str) -> None:
    """Reads racing disconnect() finish or raise DisconnectedError; the buffer keeps its size."""
    shmdisk.create(name, 64).disconnect()
    for _ in range(40):
        d = shmdisk.connect(name, create=False)
        bad: list[str] = []
        stop = threading.Event()

        def reader(d: shmdisk.Disk = d, bad: list[str] = bad, stop: threading.Event = stop) -> None:
            buf = bytearray(4096)
            while not stop.is_set():
                try:
                    d.read(0, buf)
                except shmdisk.DisconnectedError:
                    pass
                except BaseException as e:
                    bad.append(repr(e))
                if len(buf) != 4096:
                    bad.append(f"buffer resized to {len(buf)}")
                    return

        ts = [threading.Thread(target=reader) for _ in range(3)]
        for t in ts:
            t.start()
        time.sleep(0.001)
        d.disconnect()
        time.sleep(0.001)
        stop.set()
        for t in ts:
            t.join(10)
        assert not bad, bad


def test_write_from_a_signal_handler_during_a_write_is_refused_or_safe(name: str) -> None:
    """A signal handler writing to the disk while the interrupted code is inside a write on
    it: the nested write raises ReentrantCallError or completes; never a deadlock, never a
    torn page, and the outer write lands whole."""
    d = shmdisk.create(name, 2048)
    outcomes: dict[str, int] = {}
    page_bytes = 4096 * 16  # a first write of 16 pages: allocation runs in Python, locked

    def handler(signum: int, frame: object) -> None:
        try:
            d.write(0, b"h" * 512)
            outcomes["done"] = outcomes.get("done", 0) + 1
        except shmdisk.ReentrantCallError:
            outcomes["refused"] = outcomes.get("refused", 0) + 1

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        for i in range(300):
            data = bytes([i % 250 + 1]) * page_bytes
            d.write(0, data)
            buf = bytearray(page_bytes)
            d.read(0, buf)
            assert buf[512:] == data[512:]  # the handler may have rewritten sector 0 after
            d.discard(0, 128)  # so that the next write is a first write again
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        d.disconnect()
    assert sum(outcomes.values()) > 0, outcomes


@pytest.mark.parametrize("nested", ["write", "read"])
def test_a_signal_handler_inside_a_one_page_rewrite_is_refused_or_safe(
    name: str, nested: str
) -> None:
    """The one-page rewrite (the python engine's fast path holds its stripe across several
    bytecodes) interrupted by a handler that writes or reads the same page: the nested call
    raises ReentrantCallError or completes, nothing deadlocks, and the interrupted write still
    holds its stripe to the end (another process never sees a torn page)."""
    d = shmdisk.create(name, 64)
    d.write(0, b"\0" * 4096)  # mapped: every later write of the page is a rewrite
    outcomes: dict[str, int] = {}
    seen = bytearray(4096)

    def handler(signum: int, frame: object) -> None:
        try:
            if nested == "write":
                d.write(0, b"h" * 4096)
            else:
                d.read(0, seen)
                assert len(set(seen)) == 1, "a torn page"
            outcomes["done"] = outcomes.get("done", 0) + 1
        except shmdisk.ReentrantCallError:
            outcomes["refused"] = outcomes.get("refused", 0) + 1

    pool = SPAWN.Pool(1)
    try:
        reads = pool.apply_async(w.hammer_reads, (name, 0, 4096, 2.5))
        old = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
        try:
            deadline = time.monotonic() + 2.0
            i = 0
            while time.monotonic() < deadline:
                d.write(0, bytes([i % 250 + 1]) * 4096)
                i += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        n_reads, torn = reads.get(60)
    finally:
        pool.terminate()
    # The stripe is free again: a wait=False write from this thread goes through.
    d.write(0, b"z" * 4096, wait=False)
    buf = bytearray(4096)
    d.read(0, buf)
    assert buf == b"z" * 4096
    d.disconnect()
    assert sum(outcomes.values()) > 0, outcomes
    assert n_reads > 100 and torn == 0, (n_reads, torn)


def test_a_short_write_through_the_file_goes_on_after_the_bytes_it_wrote() -> None:
    """What write_fresh hands pwritev again after a short write: the buffers less the bytes
    already written, across buffer boundaries, and nothing when all is written."""
    from shmdisk._pageio import _after

    views = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"hi")]
    for skip in range(10):
        assert b"".join(bytes(v) for v in _after(views, skip)) == b"abcdefghi"[skip:]
    assert _after(views, 0) is views
