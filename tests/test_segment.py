"""Segments that are foreign, damaged, of another version or half-made: refused, never mapped."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator

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
}


def test_forged_good_header_connects(forged: Callable[[bytes, int], str]) -> None:
    """The forging helper itself makes a valid segment (so the bad cases test one field)."""
    h = good_header()
    name = forged(h.pack(), file_size(h))
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
    assert info.state in ("corrupt", "unsupported-version") and info.problem
    assert read_file(shmdisk.segment_path(name)) == raw_before  # untouched


def test_file_shorter_than_header_says(forged: Callable[[bytes, int], str]) -> None:
    """A segment truncated below what its header claims is refused, never mapped (no SIGBUS)."""
    h = good_header()
    name = forged(h.pack(), file_size(h) - 4096)
    with pytest.raises(shmdisk.CorruptSegmentError, match="segment is"):
        shmdisk.connect(name, create=False)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01" * 100, random.Random(7).randbytes(4096)],
    ids=["empty", "short", "random"],
)
def test_garbage_refused(
    forged: Callable[[bytes, int], str], content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random or truncated contents are refused with a typed error."""
    monkeypatch.setattr(_segment, "READY_TIMEOUT", 0.3)  # the empty one looks half-made
    name = forged(content, 0)
    with pytest.raises(shmdisk.CorruptSegmentError):
        shmdisk.connect(name, create=False)


def test_half_made_segment_is_waited_for_then_refused(
    forged: Callable[[bytes, int], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment without its magic (creator died) is reported as incomplete, not hung on."""
    monkeypatch.setattr(_segment, "READY_TIMEOUT", 0.3)
    name = forged(good_header(magic=0).pack(), 8192)
    t0 = time.monotonic()
    with pytest.raises(shmdisk.CorruptSegmentError, match="incomplete"):
        shmdisk.connect(name, create=False)
    assert time.monotonic() - t0 < 5
    assert shmdisk.inspect(name).state == "incomplete"
    shmdisk.destroy(name)  # destroy cleans it up
    assert not os.path.exists(shmdisk.segment_path(name))


def test_connect_waits_for_creator_to_publish(forged: Callable[[bytes, int], str]) -> None:
    """A connector that arrives mid-creation waits for the magic instead of reading garbage."""
    h = good_header()
    name = forged(good_header(magic=0).pack(), file_size(h))
    path = shmdisk.segment_path(name)

    def publish() -> None:
        time.sleep(0.3)
        with open(path, "r+b") as f:
            f.write(struct.pack("<Q", L.MAGIC))

    t = threading.Thread(target=publish)
    t.start()
    with shmdisk.connect(name, create=False) as d:
        assert d.get_info().size_sectors == 64
    t.join()


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
def test_non_regular_entries_refused_without_hanging(kind: str) -> None:
    """A FIFO, directory or symlink with our prefix: typed errors, no hang, inspect says so."""
    name = new_name(kind)
    path = shmdisk.segment_path(name)
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        os.mkdir(path, 0o700)
    else:
        os.symlink("/dev/null", path)
    try:
        assert shmdisk.inspect(name).state == "corrupt"
        for call in (
            lambda: shmdisk.connect(name, create=False),
            lambda: shmdisk.connect(name, read_only=True, create=False),
            lambda: shmdisk.connect(name),
            lambda: shmdisk.destroy(name),
        ):
            with pytest.raises(shmdisk.CorruptSegmentError):
                call()
    finally:
        if kind == "directory":
            os.rmdir(path)
        else:
            os.unlink(path)
