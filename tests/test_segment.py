"""Segments that are foreign, damaged, of another version or half-made: refused, never mapped."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _helpers import new_name

import shmdisk
from shmdisk import _layout as L
from shmdisk import _segment


@pytest.fixture
def forged() -> Iterator[Callable[[bytes, int], str]]:
    """Write a segment file with our prefix by hand; removed afterwards."""
    names: list[str] = []

    def make(content: bytes, size: int = 0) -> str:
        name = new_name("forged")
        path = shmdisk.segment_path(name)
        with open(path, "wb") as f:
            f.write(content)
            if size > len(content):
                f.truncate(size)
        os.chmod(path, 0o600)
        names.append(name)
        return name

    yield make
    for n in names:
        try:
            os.unlink(shmdisk.segment_path(n))
        except FileNotFoundError:
            pass


def good_header(**changes: int) -> L.Header:
    fields = dict(
        magic=L.MAGIC,
        version=L.VERSION,
        header_size=L.HEADER_SIZE,
        sector_size=512,
        page_size=4096,
        size_sectors=64,
        capacity=32768,
        max_pages=8,
        generation=0,
        destroyed=0,
        created_ns=0,
        creator_pid=1,
        creator_uid=0,
        data_offset=L.data_offset_for(8),
    )
    fields.update(changes)
    return L.Header(**fields)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_size(h: L.Header) -> int:
    return h.data_offset + h.capacity


BAD_HEADERS = {
    "wrong magic": good_header(magic=0x1234),
    "other version": good_header(version=99),
    "header size": good_header(header_size=512),
    "sector size not power of two": good_header(sector_size=700),
    "page size mismatch": good_header(page_size=8192),
    "size beyond capacity": good_header(size_sectors=10**6),
    "capacity beyond map": good_header(capacity=1 << 30),
    "capacity unaligned": good_header(capacity=1000),
    "data offset wrong": good_header(data_offset=4096),
    "huge map": good_header(max_pages=1 << 50, data_offset=L.data_offset_for(1 << 50)),
    "unknown lock kind": good_header(lock_kind=7),
    "lock table elsewhere": good_header(stripes=8),
    "overlay without its base": good_header(base_created_ns=5),
    "frozen flag garbage": good_header(frozen=3),
    "old version": good_header(version=1),
}


def real_lock_table() -> bytes:
    """The lock table of a real disk: what a forged segment needs to be locked."""
    name = new_name("table")
    shmdisk.create(name, 8).disconnect()
    try:
        with open(shmdisk.segment_path(name), "rb") as f:
            return f.read(L.MAP_OFFSET)[L.HEADER_SIZE :]
    finally:
        shmdisk.destroy(name)


def test_forged_good_header_connects(forged: Callable[[bytes, int], str]) -> None:
    """The forging helper itself makes a valid segment (so the bad cases test one field)."""
    h = good_header()
    name = forged(h.pack() + real_lock_table(), file_size(h))
    with shmdisk.connect(name, create=False) as d:
        assert d.get_info().size_sectors == 64
        d.write(63, bytes(512))


@pytest.mark.parametrize("label", list(BAD_HEADERS))
def test_bad_header_refused(forged: Callable[[bytes, int], str], label: str) -> None:
    """Each inconsistent header: CorruptSegmentError on connect, a state from inspect."""
    h = BAD_HEADERS[label]
    name = forged(h.pack(), min(file_size(good_header()), 1 << 20))
    raw_before = read_file(shmdisk.segment_path(name))
    for create in (True, False):
        with pytest.raises(shmdisk.CorruptSegmentError):
            shmdisk.connect(name, create=create)
    info = shmdisk.inspect(name)
    assert info.state in ("corrupt", "unsupported-version", "old-version") and info.problem
    assert read_file(shmdisk.segment_path(name)) == raw_before  # untouched


def test_damaged_lock_table_refused_for_writing(forged: Callable[[bytes, int], str]) -> None:
    """A lock table that was never initialised (or was scribbled over) is never locked: a
    read-write connect is refused, a read-only one (which takes no locks) may read."""
    h = good_header()
    name = forged(h.pack(), file_size(h))
    with pytest.raises(shmdisk.CorruptSegmentError, match="page locks are damaged"):
        shmdisk.connect(name, create=False)
    with shmdisk.connect(name, read_only=True, create=False) as d:
        buf = bytearray(512)
        d.read(0, buf)
        assert buf == bytes(512)


def test_file_shorter_than_header_says(forged: Callable[[bytes, int], str]) -> None:
    """A segment truncated below what its header claims is refused, never mapped (no SIGBUS)."""
    h = good_header()
    name = forged(h.pack(), file_size(h) - 4096)
    with pytest.raises(shmdisk.CorruptSegmentError, match="segment is"):
        shmdisk.connect(name, create=False)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01" * 100, random.Random(7).randbytes(4096), good_header(magic=0).pack()],
    ids=["empty", "short", "random", "no-magic"],
)
def test_garbage_refused_at_once(forged: Callable[[bytes, int], str], content: bytes) -> None:
    """Random, truncated or magic-less contents are refused with a typed error, at once.

    Creation is atomic (a segment gets its name only when complete), so a segment without
    the magic is never one still being made: nothing to wait for.
    """
    name = forged(content, 8192)
    t0 = time.monotonic()
    for create in (False, True):
        with pytest.raises(shmdisk.CorruptSegmentError):
            shmdisk.connect(name, create=create)
    assert time.monotonic() - t0 < 1.0
    assert shmdisk.inspect(name).state == "corrupt"
    shmdisk.destroy(name)  # destroy cleans it up
    assert not os.path.exists(shmdisk.segment_path(name))


def _die_mid_creation(name: str) -> None:
    """Runs in a child: SIGKILL itself in the middle of creating ``name``."""

    def die(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    _segment._init_stripes = die  # type: ignore[assignment]
    shmdisk.create(name, 64)


def test_creator_killed_mid_creation_leaves_nothing(name: str) -> None:
    """A creator SIGKILLed half-way leaves no segment and no wedged name."""
    p = multiprocessing.get_context("fork").Process(target=_die_mid_creation, args=(name,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert not [e for e in os.listdir("/dev/shm") if name in e]  # not even a temporary name
    t0 = time.monotonic()
    with pytest.raises(shmdisk.DiskNotFoundError):
        shmdisk.connect(name, create=False)
    with shmdisk.connect(name) as d:  # a fresh default disk, at once
        assert d.get_info().size_sectors == shmdisk.DEFAULT_SIZE_SECTORS
    assert time.monotonic() - t0 < 1.0


def test_destroyer_killed_after_marking_leaves_no_live_looking_disk(name: str) -> None:
    """A disk marked destroyed but still named (its destroyer died) counts as gone."""
    d = shmdisk.create(name, 64)
    d.write(0, b"old!" * 128)
    d._io.current().seg.hq[L.F_DESTROYED] = 1  # what a destroyer does just before unlinking
    assert shmdisk.inspect(name).state == "destroyed"
    with pytest.raises(shmdisk.DisconnectedError):
        d.flush()
    with pytest.raises(shmdisk.DiskNotFoundError):
        shmdisk.connect(name, create=False)  # ... and it finished the unlink
    assert name not in shmdisk.list_disks()
    with shmdisk.connect(name) as fresh:
        buf = bytearray(512)
        fresh.read(0, buf)
        assert buf == bytes(512)


def test_create_racing_destroy_never_hands_out_an_unlinked_disk(name: str) -> None:
    """Every handle create() returns is on the named segment, or on one marked destroyed."""
    stop = time.monotonic() + 1.5
    bad: list[str] = []
    made = [0]

    def destroyer() -> None:
        while time.monotonic() < stop:
            shmdisk.destroy(name)

    def creator() -> None:
        while time.monotonic() < stop:
            try:
                d = shmdisk.create(name, 8)
            except shmdisk.DiskExistsError:
                continue
            seg = d._io.current().seg
            if os.fstat(seg.fd).st_nlink == 0 and not seg.hq[L.F_DESTROYED]:
                bad.append("handle on an unlinked, unmarked segment")
            made[0] += 1
            d.disconnect()

    threads = [threading.Thread(target=destroyer), threading.Thread(target=creator)]
    threads.append(threading.Thread(target=creator))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert made[0] > 20 and not bad


def test_racing_connects_agree_on_one_device(name: str) -> None:
    """Many threads connecting to a missing name at once all get the same device."""
    barrier = threading.Barrier(8)
    disks: list[shmdisk.Disk] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            barrier.wait()
            disks.append(shmdisk.connect(name))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(disks) == 8
    disks[0].write(0, b"r" * 512)
    for d in disks:
        buf = bytearray(512)
        d.read(0, buf)
        assert buf == b"r" * 512
        d.disconnect()


def test_destroy_recreate_gives_fresh_device(name: str) -> None:
    """destroy then create under the same name never shows the old bytes."""
    for i in range(20):
        with shmdisk.connect(name) as d:
            buf = bytearray(512)
            d.read(0, buf)
            assert buf == bytes(512), i
            d.write(0, b"o" * 512)
        shmdisk.destroy(name)


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_non_regular_entries_refused_then_removed(kind: str, tmp_path: Path) -> None:
    """A FIFO, directory or symlink with our prefix: typed errors, no hang; destroy removes
    it without following it."""
    name = new_name(kind)
    path = shmdisk.segment_path(name)
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        os.mkdir(path, 0o700)
    else:
        os.symlink(target, path)
    try:
        assert shmdisk.inspect(name).state == "corrupt"
        for call in (
            lambda: shmdisk.connect(name, create=False),
            lambda: shmdisk.connect(name, read_only=True, create=False),
            lambda: shmdisk.connect(name),
        ):
            with pytest.raises(shmdisk.CorruptSegmentError):
                call()
        shmdisk.destroy(name)
        assert not os.path.lexists(path)
        assert target.read_bytes() == b"keep me"
    finally:
        if os.path.isdir(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)
