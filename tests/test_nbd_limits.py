"""What clients can make the server hold: threads."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from _helpers import new_name
from test_nbd_protocol import Client

import shmdisk
from shmdisk.nbd import NBDServer
from shmdisk.nbd._workers import ThreadCache

MiB = 1 << 20
TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nbdl", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    """A 16 MiB disk, written all over (reads copy data rather than answer holes)."""
    name = new_name("nbdl")
    d = shmdisk.create(name, 16 * MiB // 512)
    d.write_at(0, os.urandom(MiB) * 16)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


def wait_until(cond: object, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# --- threads ---------------------------------------------------------------------------------


def test_thread_cache_keeps_a_few_spares_and_lets_idle_ones_end() -> None:
    """After a burst of 20 jobs at once, at most `spare` threads stay; they end when idle."""
    cache = ThreadCache("t", spare=3, idle_timeout=0.3)
    gate = threading.Event()
    done = threading.Semaphore(0)

    def job() -> None:
        gate.wait(TIMEOUT)
        done.release()

    for _ in range(20):
        cache.run(job)
    assert cache.threads() == 20
    gate.set()
    for _ in range(20):
        assert done.acquire(timeout=TIMEOUT)
    assert wait_until(lambda: cache.threads() <= 3)
    cache.run(done.release)  # a spare takes new work
    assert done.acquire(timeout=TIMEOUT)
    assert wait_until(lambda: cache.threads() == 0)
    cache.stop(time.monotonic() + TIMEOUT)


def test_connection_threads_end_with_their_connections(disk: shmdisk.Disk, sockdir: str) -> None:
    """30 clients at once, then none: the server's threads go back to a few spares."""
    path = os.path.join(sockdir, "t")
    with NBDServer([disk], socket_path=path) as srv:
        clients = [Client(path) for _ in range(30)]
        for c in clients:
            c.start()
        assert wait_until(lambda: srv._threads.threads() >= 30)
        for c in clients:
            c.close()
        assert wait_until(lambda: srv._threads.threads() <= 4)
