"""Disk.open: a disk as a standard binary file, checked byte for byte."""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import shmdisk
from shmdisk._fileio import DiskRawIO, open_disk
from shmdisk.testing import unique_name

SS = 512

MakeDisk = Callable[..., shmdisk.Disk]


@pytest.fixture
def make_disk() -> Iterator[MakeDisk]:
    """Create disks with unique names; destroy them all afterwards."""
    names: list[str] = []
    disks: list[shmdisk.Disk] = []

    def make(size_sectors: int = 1024, sector_size: int = SS) -> shmdisk.Disk:
        name = unique_name("fileio")
        names.append(name)
        disk = shmdisk.create(name, size_sectors, sector_size)
        disks.append(disk)
        return disk

    try:
        yield make
    finally:
        for disk in disks:
            disk.disconnect()
        for name in names:
            shmdisk.destroy(name)


def disk_bytes(disk: shmdisk.Disk) -> bytes:
    """The whole disk's content, read through the block API."""
    info = disk.get_info()
    buf = bytearray(info.size_sectors * info.sector_size)
    disk.read(0, buf)
    return bytes(buf)


def test_modes_give_the_standard_buffered_classes(make_disk: MakeDisk) -> None:
    """rb, wb and r+b give BufferedReader, BufferedWriter and BufferedRandom like open()."""
    disk = make_disk()
    expected = {
        "rb": (io.BufferedReader, True, False, "rb"),
        "br": (io.BufferedReader, True, False, "rb"),
        "wb": (io.BufferedWriter, False, True, "wb"),
        "r+b": (io.BufferedRandom, True, True, "rb+"),
        "rb+": (io.BufferedRandom, True, True, "rb+"),
        "w+b": (io.BufferedRandom, True, True, "rb+"),
    }
    for mode, (cls, readable, writable, raw_mode) in expected.items():
        with disk.open(mode) as f:
            assert type(f) is cls, mode
            assert (f.readable(), f.writable(), f.seekable()) == (readable, writable, True)
            assert isinstance(f.raw, DiskRawIO)  # type: ignore[attr-defined]
            assert f.raw.mode == raw_mode  # type: ignore[attr-defined]
            assert f.name == disk.name
            assert not f.isatty()
        assert f.closed
    with disk.open() as f:
        assert type(f) is io.BufferedReader


@pytest.mark.parametrize("mode", ["r", "w", "rt", "r+", "ab", "xb", "a+b", "rbb", "rwb", "b", "z"])
def test_invalid_modes_are_refused(make_disk: MakeDisk, mode: str) -> None:
    """Text, append, exclusive and malformed modes raise ValueError."""
    disk = make_disk(8)
    with pytest.raises(ValueError):
        disk.open(mode)


def test_read_only_handle_refuses_write_modes(make_disk: MakeDisk) -> None:
    """A read-only handle opens rb but refuses wb, r+b and w+b with IsReadOnlyError."""
    disk = make_disk(8)
    disk.write(0, b"\x07" * SS)
    with shmdisk.connect(disk.name, read_only=True, create=False) as ro:
        for mode in ("wb", "r+b", "w+b"):
            with pytest.raises(shmdisk.IsReadOnlyError):
                ro.open(mode)
            with pytest.raises(PermissionError):
                ro.open(mode)
        with ro.open("rb") as f:
            assert f.read(SS) == b"\x07" * SS


def test_wb_does_not_truncate_the_disk(make_disk: MakeDisk) -> None:
    """Opening wb writes from offset 0 but keeps the size and every byte not written."""
    disk = make_disk(16)
    disk.write(0, bytes(range(256)) * 32)
    with disk.open("wb") as f:
        assert f.tell() == 0
        f.write(b"hello")
    assert disk.get_info().size_sectors == 16
    assert disk_bytes(disk) == b"hello" + (bytes(range(256)) * 32)[5:]


def test_read_on_write_only_and_write_on_read_only_files_fail(make_disk: MakeDisk) -> None:
    """A wb file cannot read and an rb file cannot write: io.UnsupportedOperation."""
    disk = make_disk(8)
    with disk.open("wb") as w, pytest.raises(io.UnsupportedOperation):
        w.read(1)
    with disk.open("rb") as r, pytest.raises(io.UnsupportedOperation):
        r.write(b"x")
    with (
        disk.open(
            "wb",
        ) as w,
        pytest.raises(io.UnsupportedOperation),
    ):
        w.raw.readinto(bytearray(1))  # type: ignore[attr-defined]


def test_seek_and_tell_with_all_three_whences(make_disk: MakeDisk) -> None:
    """SEEK_SET, SEEK_CUR and SEEK_END move as for a file of size_sectors * sector_size."""
    disk = make_disk(8)
    size = 8 * SS
    disk.write(0, bytes(i % 251 for i in range(size)))
    for buffering in (0, -1):
        with open_disk(disk, "r+b", buffering) as f:
            assert f.seek(100) == 100 and f.tell() == 100
            assert f.read(3) == bytes([100, 101, 102])
            assert f.seek(-10, os.SEEK_CUR) == 93
            assert f.seek(0, os.SEEK_END) == size
            assert f.seek(-1, os.SEEK_END) == size - 1
            assert f.read() == bytes([(size - 1) % 251])
            assert f.read() == b""
            assert f.seek(size + 1000) == size + 1000  # past the end, as for a file
            assert f.read(10) == b""
            with pytest.raises(OSError) as info:
                f.seek(-1)
            assert info.value.errno == errno.EINVAL
            with pytest.raises(OSError) as info:
                f.seek(-size - 1, os.SEEK_END)
            assert info.value.errno == errno.EINVAL
            with pytest.raises(ValueError):
                f.seek(0, 7)
            with pytest.raises(TypeError):
                f.seek(1.5)  # type: ignore[arg-type]


def test_write_at_or_past_the_end_fails_with_enospc(make_disk: MakeDisk) -> None:
    """A write at or past the end raises ENOSPC; one crossing the end is short, like a device."""
    disk = make_disk(2)
    size = 2 * SS
    with open_disk(disk, "r+b", 0) as raw:
        raw.seek(size - 3)
        assert raw.write(b"abcdef") == 3
        assert raw.tell() == size
        with pytest.raises(OSError) as info:
            raw.write(b"x")
        assert info.value.errno == errno.ENOSPC
        assert raw.write(b"") == 0
    assert disk_bytes(disk)[-4:] == b"\x00abc"
    f = disk.open("r+b")
    f.seek(size)
    f.write(b"zz")  # buffered: the error comes with the flush, and again on close
    with pytest.raises(OSError) as info:
        f.flush()
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        f.close()
    assert f.closed
    assert disk.get_info().size_sectors == 2


def test_truncate_is_refused(make_disk: MakeDisk) -> None:
    """truncate raises io.UnsupportedOperation and leaves size and data alone."""
    disk = make_disk(8)
    disk.write(0, b"\x01" * SS)
    for mode in ("r+b", "wb"):
        with disk.open(mode) as f:
            with pytest.raises(io.UnsupportedOperation):
                f.truncate(10)
            with pytest.raises(io.UnsupportedOperation):
                f.truncate()
    assert disk.get_info().size_sectors == 8
    assert disk_bytes(disk)[:SS] == b"\x01" * SS


def test_unaligned_reads_and_writes_match_a_model(make_disk: MakeDisk) -> None:
    """Random unaligned seeks, reads and writes (buffered and raw) agree byte for byte."""
    disk = make_disk(512)  # 256 KiB: many pages, so requests cross page boundaries
    size = 512 * SS
    model = bytearray(size)
    rng = random.Random(5)
    for buffering in (-1, 0, 1000):
        with open_disk(disk, "r+b", buffering) as f:
            for _ in range(300):
                pos = rng.randrange(size)
                f.seek(pos)
                if rng.random() < 0.5:
                    n = min(rng.choice((1, 7, 511, 513, 4095, 4097, 70000)), size - pos)
                    data = rng.randbytes(n)
                    assert f.write(data) == n
                    model[pos : pos + n] = data
                else:
                    n = rng.choice((1, 3, 512, 1000, 9000, 100000))
                    assert f.read(n) == model[pos : pos + n]
                assert f.tell() == min(pos + n, size) or f.tell() == pos + n
        assert disk_bytes(disk) == model


def test_readinto_fills_numpy_arrays(make_disk: MakeDisk) -> None:
    """readinto writes into numpy arrays of any dtype from an unaligned offset."""
    disk = make_disk(256)
    data = random.Random(1).randbytes(256 * SS)
    disk.write(0, data)
    with disk.open("rb") as f:
        f.seek(3)
        words = np.zeros(1000, dtype=np.uint32)
        assert f.readinto(words) == 4000  # type: ignore[attr-defined]
        assert words.tobytes() == data[3:4003]
        assert np.array_equal(words, np.frombuffer(data[3:4003], dtype=np.uint32))
        # Larger than the file's buffer: goes straight to one raw read.
        big = np.zeros((10, 1000), dtype=np.float64)
        assert f.readinto(big) == 80000  # type: ignore[attr-defined]
        assert big.tobytes() == data[4003:84003]
        tail = np.zeros(100, dtype=np.uint8)
        f.seek(-40, os.SEEK_END)
        assert f.readinto(tail) == 40  # type: ignore[attr-defined]
        assert tail[:40].tobytes() == data[-40:] and not tail[40:].any()


def test_copyfileobj_round_trip(make_disk: MakeDisk) -> None:
    """shutil.copyfileobj into the disk and back out returns the same bytes, zeros after."""
    disk = make_disk(1024)
    data = random.Random(2).randbytes(300_001)
    with disk.open("wb") as f:
        shutil.copyfileobj(io.BytesIO(data), f)
        assert f.tell() == len(data)
    out = io.BytesIO()
    with disk.open("rb") as f:
        shutil.copyfileobj(f, out)
    assert out.getvalue() == data + bytes(1024 * SS - len(data))


def test_tarfile_round_trip(make_disk: MakeDisk) -> None:
    """A tar archive written onto the disk reads back with every member intact."""
    disk = make_disk(2048)
    rng = random.Random(3)
    members = {"a.bin": rng.randbytes(100_000), "empty": b"", "dir/b.txt": b"hello tar\n" * 77}
    for write_mode, read_mode in (("w", "r"), ("w|gz", "r|gz")):
        with disk.open("wb") as f, tarfile.open(fileobj=f, mode=write_mode) as tar:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        with disk.open("rb") as f, tarfile.open(fileobj=f, mode=read_mode) as tar:
            got = {}
            for member in tar:
                extracted = tar.extractfile(member)
                assert extracted is not None
                got[member.name] = extracted.read()
        assert got == members


def test_zipfile_round_trip(make_disk: MakeDisk) -> None:
    """A zip archive written onto the disk reads back once the disk is sized to fit it."""
    disk = make_disk(2048)
    rng = random.Random(4)
    members = {f"m{i}.bin": rng.randbytes(rng.randrange(1, 50_000)) for i in range(5)}
    members["text.txt"] = b"zip " * 10_000
    with disk.open("r+b") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, payload in members.items():
                zf.writestr(name, payload)
        end = f.tell()
    # A zip's directory is found from the end of the file, so shrink the disk to hold just the
    # archive (plus < 1 sector of zeros); the open file sees the new size at once.
    disk.resize(-(-end // SS))
    with disk.open("rb") as f, zipfile.ZipFile(f) as zf:
        assert zf.testzip() is None
        assert {n: zf.read(n) for n in zf.namelist()} == members
        f.seek(0, os.SEEK_END)


def test_hashlib_file_digest(make_disk: MakeDisk) -> None:
    """hashlib.file_digest over the file equals the digest of the disk's bytes."""
    disk = make_disk(256)
    disk.write_at(12345, random.Random(6).randbytes(50_000))
    with disk.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    assert digest.hexdigest() == hashlib.sha256(disk_bytes(disk)).hexdigest()


def test_text_wrapper_round_trip(make_disk: MakeDisk) -> None:
    """io.TextIOWrapper over an r+b file writes and reads text."""
    disk = make_disk(8)
    with disk.open("r+b") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        text.write("grüße\nline two\n")
        text.flush()
        text.seek(0)
        assert text.readline() == "grüße\n"
        text.detach()
    assert disk_bytes(disk)[:20] == "grüße\nline two\n".encode() + bytes(3)


def test_seek_data_and_hole_follow_the_page_map(make_disk: MakeDisk) -> None:
    """SEEK_DATA and SEEK_HOLE find written pages; ENXIO at the end, as lseek does."""
    disk = make_disk(1024)
    page = disk.page_size
    disk.write_at(3 * page + 10, b"x" * 20)
    size = 1024 * SS
    with disk.open("rb") as f:
        assert f.seek(0, os.SEEK_DATA) == 3 * page
        assert f.seek(3 * page + 5, os.SEEK_DATA) == 3 * page + 5
        assert f.seek(3 * page, os.SEEK_HOLE) == 4 * page
        assert f.seek(0, os.SEEK_HOLE) == 0
        with pytest.raises(OSError) as info:
            f.seek(4 * page, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        with pytest.raises(OSError) as info:
            f.seek(size, os.SEEK_HOLE)
        assert info.value.errno == errno.ENXIO


def test_closing_the_file_keeps_the_disk_connected(make_disk: MakeDisk) -> None:
    """Closing the file leaves the handle usable; a closed file raises ValueError."""
    disk = make_disk(8)
    f = disk.open("r+b")
    f.write(b"abc")
    f.close()
    assert disk_bytes(disk)[:3] == b"abc"
    with pytest.raises(ValueError):
        f.read(1)
    with pytest.raises(ValueError):
        f.seek(0)
    assert "closed" in repr(f.raw)  # type: ignore[attr-defined]


def test_disconnected_disk_raises_disconnected(make_disk: MakeDisk) -> None:
    """open() on a disconnected handle, or I/O after disconnect, raises DisconnectedError."""
    disk = make_disk(8)
    f = open_disk(disk, "r+b", 0)
    disk.disconnect()
    with pytest.raises(shmdisk.DisconnectedError):
        disk.open("rb")
    with pytest.raises(shmdisk.DisconnectedError):
        f.read(1)
    with pytest.raises(shmdisk.DisconnectedError):
        f.write(b"x")
    f.close()


def _resize_in_child(name: str, size_sectors: int) -> None:
    with shmdisk.connect(name, create=False) as disk:
        disk.resize(size_sectors)


def test_size_follows_a_resize_in_another_process(make_disk: MakeDisk) -> None:
    """An open file sees a resize made by another process at its next size-dependent call."""
    disk = make_disk(8)
    disk.write(0, b"\xaa" * 8 * SS)
    ctx = multiprocessing.get_context("spawn")
    with disk.open(
        "rb",
    ) as f:
        assert f.seek(0, os.SEEK_END) == 8 * SS
        for new_size in (16, 4):
            child = ctx.Process(target=_resize_in_child, args=(disk.name, new_size))
            child.start()
            child.join(timeout=60)
            assert child.exitcode == 0
            assert f.seek(0, os.SEEK_END) == new_size * SS
        f.seek(0)
        assert f.read() == b"\xaa" * 4 * SS


def _hammer(name: str, fill: int, offset: int, length: int, seconds: float) -> None:
    disk = shmdisk.connect(name, create=False)
    with disk.open(
        "r+b",
    ) as f:
        deadline = time.monotonic() + seconds
        block = bytes([fill]) * length
        while time.monotonic() < deadline:
            f.seek(offset)
            f.write(block)
            f.flush()
    disk.disconnect()


def test_concurrent_unaligned_writers_are_never_torn(make_disk: MakeDisk) -> None:
    """Two processes overwrite the same unaligned, page-crossing range; reads are never mixed."""
    disk = make_disk(1024)
    offset, length = disk.page_size - 333, 2 * disk.page_size + 777
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_hammer, args=(disk.name, fill, offset, length, 0.5))
        for fill in (0x11, 0x22)
    ]
    for child in children:
        child.start()
    seen = set()
    try:
        with open_disk(disk, "rb", 0) as f:
            deadline = time.monotonic() + 30
            while any(c.is_alive() for c in children) and time.monotonic() < deadline:
                f.seek(offset)
                got = f.read(length)
                assert got is not None
                values = set(got)
                assert len(values) == 1, f"torn read: {sorted(values)}"
                seen |= values
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    assert [c.exitcode for c in children] == [0, 0]
    assert seen & {0x11, 0x22}
