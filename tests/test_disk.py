"""The device in one process: the mirage semantics, sparseness and strict errors."""

from __future__ import annotations

import mmap
import os
import pickle
import time

import numpy as np
import pytest
from _helpers import new_name

import shmdisk
from shmdisk import _layout as L


def pattern(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def snapshot(d: shmdisk.Disk) -> bytes:
    buf = bytearray(d.get_info().size_sectors * d.sector_size)
    d.read(0, buf)
    return bytes(buf)


# ------------------------------------------------------------------ lifecycle


def test_create_is_zero_and_reports_geometry(name: str) -> None:
    """A new disk reads as zeros and reports its size, sector size and writability."""
    with shmdisk.create(name, 100, 1024) as d:
        assert d.get_info() == shmdisk.DiskInfo(True, 1024, 100)
        assert snapshot(d) == bytes(100 * 1024)
        assert d.page_size == 4096 and d.sector_size == 1024


def test_create_existing_name_refused(disk: shmdisk.Disk) -> None:
    """create() of a taken name raises DiskExistsError and leaves the disk alone."""
    disk.write(0, b"x" * 512)
    with pytest.raises(shmdisk.DiskExistsError):
        shmdisk.create(disk.name, 10)
    with pytest.raises(FileExistsError):
        shmdisk.create(disk.name, 10)
    buf = bytearray(512)
    disk.read(0, buf)
    assert buf == b"x" * 512


def test_connect_missing_creates_default(name: str) -> None:
    """connect() of a missing name makes mirage's default disk; create=False refuses."""
    with pytest.raises(shmdisk.DiskNotFoundError):
        shmdisk.connect(name, create=False)
    with shmdisk.connect(name) as d:
        assert d.get_info() == shmdisk.DiskInfo(True, 512, 32768)


def test_connect_read_only_missing_creates_default(name: str) -> None:
    """A read-only connect of a missing name still gets the default disk, read-only."""
    with shmdisk.connect(name, read_only=True) as d:
        assert d.get_info() == shmdisk.DiskInfo(False, 512, 32768)


def test_two_handles_see_same_bytes(disk: shmdisk.Disk) -> None:
    """A second handle on the same name sees the first one's writes."""
    data = pattern(4096, 1)
    disk.write(3, data)
    with shmdisk.connect(disk.name, create=False) as other:
        buf = bytearray(4096)
        other.read(3, buf)
        assert buf == data


def test_destroy_disconnects_handles_and_frees_name(disk: shmdisk.Disk) -> None:
    """After destroy, old handles raise DisconnectedError; a new connect starts empty."""
    disk.write(0, b"\x01" * 512)
    shmdisk.destroy(disk.name)
    assert not os.path.exists(shmdisk.segment_path(disk.name))
    with pytest.raises(shmdisk.DisconnectedError):
        disk.read(0, bytearray(512))
    assert disk.closed
    with shmdisk.connect(disk.name) as fresh:
        buf = bytearray(512)
        fresh.read(0, buf)
        assert buf == bytes(512)


def test_destroy_missing_is_fine(name: str) -> None:
    """destroy() of a name that does not exist is not an error."""
    shmdisk.destroy(name)


def test_disconnect_is_idempotent_and_final(disk: shmdisk.Disk) -> None:
    """disconnect() twice is fine; every later call raises DisconnectedError."""
    disk.disconnect()
    disk.disconnect()
    for call in (
        lambda: disk.read(0, bytearray(512)),
        lambda: disk.write(0, bytes(512)),
        disk.get_info,
        disk.flush,
        lambda: disk.resize(1),
        lambda: disk.seek_mapped(0),
        lambda: disk.seek_unmapped(0),
        lambda: disk.discard(0, 1),
    ):
        with pytest.raises(shmdisk.DisconnectedError):
            call()
    assert "disconnected" in repr(disk)


def test_disconnect_leaves_disk_and_others(disk: shmdisk.Disk) -> None:
    """Disconnecting one handle leaves the device and the other handles working."""
    other = shmdisk.connect(disk.name, create=False)
    other.write(0, b"k" * 512)
    other.disconnect()
    buf = bytearray(512)
    disk.read(0, buf)
    assert buf == b"k" * 512


def test_context_manager_disconnects_not_destroys(name: str) -> None:
    """Leaving the with-block disconnects; the disk stays for others."""
    with shmdisk.create(name, 8) as d:
        d.write(0, b"z" * 512)
    assert d.closed
    with shmdisk.connect(name, create=False) as again:
        buf = bytearray(512)
        again.read(0, buf)
        assert buf == b"z" * 512


def test_pickle_reconnects_by_name(disk: shmdisk.Disk) -> None:
    """A pickled Disk reconnects to the same device, with the same read-only flag."""
    disk.write(1, b"p" * 512)
    with pickle.loads(pickle.dumps(disk)) as clone:
        assert clone.name == disk.name and not clone.read_only
        buf = bytearray(512)
        clone.read(1, buf)
        assert buf == b"p" * 512
    ro = shmdisk.connect(disk.name, read_only=True, create=False)
    with ro, pickle.loads(pickle.dumps(ro)) as ro2:
        assert ro2.read_only


def test_flush_succeeds(disk: shmdisk.Disk) -> None:
    """flush() is a successful no-op on a live handle."""
    assert disk.flush() is None


def test_repr_shows_name_and_geometry(disk: shmdisk.Disk) -> None:
    """repr names the disk, its size and mode."""
    assert repr(disk) == f"<shmdisk.Disk {disk.name!r} 256 x 512 B rw>"


# ------------------------------------------------------------------ data path


@pytest.mark.parametrize(
    "make",
    [
        bytearray,
        lambda n: memoryview(bytearray(n)),
        lambda n: np.zeros(n // 8, dtype=np.float64),
        lambda n: np.zeros((n // 512, 128), dtype=np.uint32),
        lambda n: mmap.mmap(-1, n),
    ],
    ids=["bytearray", "memoryview", "numpy-f8", "numpy-2d", "mmap"],
)
def test_buffer_kinds_round_trip(disk: shmdisk.Disk, make: object) -> None:
    """Every buffer-protocol kind reads back exactly what was written."""
    data = pattern(8192, 2)
    disk.write(5, data)
    buf = make(8192)  # type: ignore[operator]
    disk.read(5, buf)
    assert bytes(memoryview(buf).cast("B")) == data


def test_scatter_gather_buffers_are_consecutive(disk: shmdisk.Disk) -> None:
    """A list of buffers covers consecutive sectors, in both directions."""
    parts = [pattern(512, 3), pattern(1536, 4), pattern(4096, 5)]
    disk.write(7, parts)
    whole = bytearray(sum(map(len, parts)))
    disk.read(7, whole)
    assert whole == b"".join(parts)
    outs = [bytearray(1024), bytearray(512), bytearray(4608)]
    disk.read(7, outs)
    assert b"".join(outs) == b"".join(parts)


def test_unaligned_sectors_across_pages(disk: shmdisk.Disk) -> None:
    """Writes that start and end mid-page change exactly their sectors."""
    before = bytearray(snapshot(disk))
    data = pattern(512 * 11, 6)
    disk.write(6, data)  # bytes 3072..8704: three pages, neither end aligned
    before[3072 : 3072 + len(data)] = data
    assert snapshot(disk) == before


def test_read_of_mixed_mapped_and_holes(disk: shmdisk.Disk) -> None:
    """A read spanning written pages and holes returns data and zeros in place."""
    disk.write(8, b"a" * 512)  # page 1
    disk.write(30, b"b" * 1024)  # page 3, sectors 30-31
    buf = bytearray(40 * 512)
    disk.read(0, [memoryview(buf)[: 512 * 9], memoryview(buf)[512 * 9 :]])
    expect = bytearray(40 * 512)
    expect[8 * 512 : 9 * 512] = b"a" * 512
    expect[30 * 512 : 32 * 512] = b"b" * 1024
    assert buf == expect


def test_empty_requests(disk: shmdisk.Disk) -> None:
    """Empty lists and empty buffers are fine for 0 <= sector <= size."""
    disk.write(0, [])
    disk.read(256, [])
    disk.write(256, bytearray(0))
    with pytest.raises(shmdisk.OutOfRangeError):
        disk.read(257, [])
    with pytest.raises(shmdisk.OutOfRangeError):
        disk.read(-1, [])


def test_write_copies_not_references(disk: shmdisk.Disk) -> None:
    """Changing the caller's buffer after write() does not change the disk."""
    src = bytearray(b"q" * 512)
    disk.write(0, src)
    src[:] = b"r" * 512
    buf = bytearray(512)
    disk.read(0, buf)
    assert buf == b"q" * 512


def test_read_at_write_at_any_alignment(disk: shmdisk.Disk) -> None:
    """Byte-granular read_at/write_at touch exactly the bytes asked for."""
    disk.write(0, pattern(256 * 512, 7))
    before = bytearray(snapshot(disk))
    disk.write_at(4093, b"hello, pages")
    before[4093 : 4093 + 12] = b"hello, pages"
    assert snapshot(disk) == before
    out = bytearray(12)
    disk.read_at(4093, out)
    assert out == b"hello, pages"
    with pytest.raises(shmdisk.OutOfRangeError):
        disk.read_at(256 * 512 - 1, bytearray(2))


# ------------------------------------------------------------------ bad input


def bad_calls(d: shmdisk.Disk) -> list[tuple[str, object, type[Exception]]]:
    size = d.get_info().size_sectors
    return [
        ("negative sector", lambda: d.write(-1, bytes(512)), shmdisk.OutOfRangeError),
        ("past end", lambda: d.write(size, bytes(512)), shmdisk.OutOfRangeError),
        ("straddles end", lambda: d.write(size - 1, bytes(1024)), shmdisk.OutOfRangeError),
        ("huge sector", lambda: d.write(2**70, bytes(512)), shmdisk.OutOfRangeError),
        ("partial sector", lambda: d.write(0, bytes(100)), shmdisk.BadBufferError),
        (
            "second buffer partial",
            lambda: d.write(0, [bytes(512), bytes(513)]),
            shmdisk.BadBufferError,
        ),
        ("not a buffer", lambda: d.write(0, "text"), shmdisk.BadBufferError),
        ("not a buffer in list", lambda: d.write(0, [bytes(512), 3]), shmdisk.BadBufferError),
        ("read into bytes", lambda: d.read(0, bytes(512)), shmdisk.BadBufferError),
        (
            "non-contiguous",
            lambda: d.read(0, np.zeros((2, 512), dtype=np.uint8)[:, ::2]),
            shmdisk.BadBufferError,
        ),
        ("float sector", lambda: d.write(1.0, bytes(512)), shmdisk.InvalidArgumentError),
        ("str sector", lambda: d.read("0", bytearray(512)), shmdisk.InvalidArgumentError),
        ("bool sector", lambda: d.read(True, bytearray(512)), shmdisk.InvalidArgumentError),
        ("discard negative count", lambda: d.discard(0, -1), shmdisk.OutOfRangeError),
        ("discard past end", lambda: d.discard(size - 1, 2), shmdisk.OutOfRangeError),
        ("resize negative", lambda: d.resize(-1), shmdisk.InvalidGeometryError),
        ("resize beyond limit", lambda: d.resize(2**60), shmdisk.InvalidGeometryError),
        ("resize str", lambda: d.resize("9"), shmdisk.InvalidArgumentError),
        ("seek negative", lambda: d.seek_mapped(-5), shmdisk.OutOfRangeError),
    ]


def test_bad_input_raises_typed_error_and_changes_nothing(disk: shmdisk.Disk) -> None:
    """Every bad call raises its typed error and leaves every byte as it was."""
    disk.write(0, pattern(256 * 512, 8))
    disk.discard(100, 50)
    before = snapshot(disk)
    mapped_before = disk.mapped_pages()
    for label, call, err in bad_calls(disk):
        with pytest.raises(err):
            call()  # type: ignore[operator]
        assert snapshot(disk) == before, label
        assert disk.get_info().size_sectors == 256, label
        assert disk.mapped_pages() == mapped_before, label


@pytest.mark.parametrize("op", ["read", "write"])
def test_calls_of_the_wrong_shape_name_the_method_and_change_nothing(
    disk: shmdisk.Disk, op: str
) -> None:
    """read/write called with missing, extra, repeated or unknown arguments: a TypeError that
    names the method the caller called, and nothing read or written; every right shape works."""
    data = pattern(512, 3)
    disk.write(0, data)
    buf = bytearray(512)
    call = getattr(disk, op)
    wrong: list[tuple[tuple[object, ...], dict[str, object]]] = [
        ((), {}),
        ((0,), {}),
        ((0, buf, True), {}),
        ((0, buf, True, None, 1, 2, 3, 4, 5, 6), {}),
        ((0, buf), {"bogus": 1}),
        ((0, buf), {"sector": 0}),
        ((0,), {"sector": 0, "buffers": buf}),
        ((), {"buffers": buf}),
    ]
    for args, kwargs in wrong:
        with pytest.raises(TypeError, match=rf"\b{op}\(\)"):
            call(*args, **kwargs)
        assert snapshot(disk)[:512] == data and buf == bytes(512), (args, kwargs)
    right: list[tuple[tuple[object, ...], dict[str, object]]] = [
        ((0, buf), {}),
        ((0,), {"buffers": buf}),
        ((), {"sector": 0, "buffers": buf}),
        ((0, buf), {"wait": False}),
        ((0, buf), {"timeout": None}),
        ((0, buf), {"timeout": 5.0, "wait": True}),
        ((0, [buf]), {}),
    ]
    source = bytearray(data)
    for args, kwargs in right:
        buf[:] = data if op == "write" else bytes(512)
        call(*args, **kwargs)
        assert buf == source and snapshot(disk)[:512] == data, (args, kwargs)


def test_read_only_handle_refuses_changes(disk: shmdisk.Disk) -> None:
    """A read-only handle reads, and refuses write, resize, discard with IsReadOnlyError."""
    disk.write(0, b"w" * 512)
    before = snapshot(disk)
    with shmdisk.connect(disk.name, read_only=True, create=False) as ro:
        assert ro.get_info().read_write is False
        for call in (
            lambda: ro.write(0, bytes(512)),
            lambda: ro.write_at(0, b"x"),
            lambda: ro.resize(10),
            lambda: ro.discard(0, 1),
            lambda: ro.write_zeroes(0, 1),
        ):
            with pytest.raises(shmdisk.IsReadOnlyError):
                call()
        assert snapshot(ro) == before
    assert snapshot(disk) == before


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "x" * 201, "sp ace", "ü", "a\0b", 5, None])
def test_bad_names_refused(bad: object) -> None:
    """Names outside [A-Za-z0-9._-]{1,200} raise InvalidNameError everywhere."""
    for call in (
        lambda: shmdisk.create(bad, 1),  # type: ignore[arg-type]
        lambda: shmdisk.connect(bad),  # type: ignore[arg-type]
        lambda: shmdisk.destroy(bad),  # type: ignore[arg-type]
        lambda: shmdisk.segment_path(bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(shmdisk.InvalidNameError):
            call()


@pytest.mark.parametrize(
    ("size", "sector_size"),
    [(-1, 512), (10, 0), (10, 256), (10, 1000), (10, 131072), (2**50, 512), (1.5, 512)],
)
def test_bad_geometry_refused(name: str, size: object, sector_size: object) -> None:
    """Bad sizes and sector sizes raise InvalidGeometryError and create nothing."""
    with pytest.raises(shmdisk.InvalidGeometryError):
        shmdisk.create(name, size, sector_size)  # type: ignore[arg-type]
    assert not os.path.exists(shmdisk.segment_path(name))


@pytest.mark.parametrize("sector_size", [512, 1024, 4096, 8192, 65536])
def test_every_sector_size_round_trips(name: str, sector_size: int) -> None:
    """Each allowed sector size reads back what it wrote; size 0 is legal too."""
    with shmdisk.create(name, 9, sector_size) as d:
        data = pattern(sector_size * 3, sector_size)
        d.write(5, data)
        buf = bytearray(sector_size * 3)
        d.read(5, buf)
        assert buf == data
        assert d.seek_mapped(0) <= 5 and d.seek_unmapped(5) >= 8
    shmdisk.destroy(name)
    with shmdisk.create(name, 0, sector_size) as empty:
        assert empty.get_info().size_sectors == 0
        empty.read(0, [])


# ------------------------------------------------------------------ sparseness


def allocated(name: str) -> int:
    return os.stat(shmdisk.segment_path(name)).st_blocks * 512


def test_terabyte_disk_is_instant_and_sparse(name: str) -> None:
    """A 1 TiB disk is created in well under a second and costs almost no memory."""
    t0 = time.monotonic()
    d = shmdisk.create(name, (1 << 40) // 512)
    assert time.monotonic() - t0 < 1.0
    assert allocated(name) <= L.MAP_OFFSET + 16384  # header, lock table, a page of map
    d.write((1 << 40) // 512 - 8, pattern(4096, 9))
    assert d.seek_mapped(0) == (1 << 40) // 512 - 8
    d.disconnect()


def test_reading_holes_allocates_nothing(name: str) -> None:
    """Reading 64 MiB of never-written sectors returns zeros without allocating them."""
    with shmdisk.create(name, (64 << 20) // 512) as d:
        base = allocated(name)
        buf = bytearray(1 << 20)
        for i in range(64):
            d.read(i * 2048, buf)
            assert not any(buf[::4096])
        assert allocated(name) - base <= 4096


def test_usage_grows_with_written_pages_and_discard_gives_back(name: str) -> None:
    """/dev/shm usage follows written pages; discard of whole pages returns them."""
    with shmdisk.create(name, (16 << 20) // 512) as d:
        base = allocated(name)
        d.write(0, bytes(1 << 20))  # zeros still count as written data
        grown = allocated(name) - base
        assert (1 << 20) <= grown <= (1 << 20) + 8192
        assert d.mapped_pages() == 256
        d.discard(0, 2048)
        assert allocated(name) - base <= 8192
        assert d.mapped_pages() == 0
        assert d.extents() == [shmdisk.Extent(0, (16 << 20) // 512, False)]


# ------------------------------------------------------------------ seek, discard, resize


def test_seek_mapped_and_unmapped(disk: shmdisk.Disk) -> None:
    """seek_* follow mirage: page granularity, size when none, s itself past the end."""
    assert disk.seek_mapped(0) == 256
    assert disk.seek_unmapped(0) == 0
    disk.write(19, b"d" * 512)  # page 2 = sectors 16..23
    assert disk.seek_mapped(0) == 16
    assert disk.seek_mapped(17) == 17
    assert disk.seek_mapped(24) == 256
    assert disk.seek_unmapped(16) == 24
    assert disk.seek_unmapped(3) == 3
    assert disk.seek_mapped(300) == 300 and disk.seek_unmapped(300) == 300
    disk.write(248, bytes(4096))  # the last page
    assert disk.seek_unmapped(250) == 256
    assert [tuple(e) for e in disk.extents()] == [
        (0, 16, False),
        (16, 8, True),
        (24, 224, False),
        (248, 8, True),
    ]


def test_discard_zeroes_partial_pages_and_frees_whole(disk: shmdisk.Disk) -> None:
    """discard zeroes exactly its range; whole pages become unmapped."""
    disk.write(0, pattern(256 * 512, 10))
    expect = bytearray(snapshot(disk))
    disk.discard(5, 30)  # sectors 5..34: partial page 0, whole pages 1-3, partial page 4
    expect[5 * 512 : 35 * 512] = bytes(30 * 512)
    assert snapshot(disk) == expect
    assert [e.mapped for e in disk.extents(0, 40)] == [True, False, True]
    assert disk.seek_unmapped(0) == 8 and disk.seek_mapped(8) == 32


def test_write_zeroes_keeps_allocation_when_asked(disk: shmdisk.Disk) -> None:
    """write_zeroes(may_unmap=False) zeroes but keeps pages mapped; the default unmaps."""
    disk.write(0, pattern(64 * 512, 11))
    disk.write_zeroes(0, 32, may_unmap=False)
    assert snapshot(disk)[: 32 * 512] == bytes(32 * 512)
    assert disk.seek_unmapped(0) == 64
    disk.write_zeroes(0, 32)
    assert disk.seek_unmapped(0) == 0


def test_resize_grows_with_zeros_and_shrink_forgets(disk: shmdisk.Disk) -> None:
    """Shrinking drops the tail for good; growing again shows zeros there."""
    disk.write(0, pattern(256 * 512, 12))
    head = snapshot(disk)[: 101 * 512]
    disk.resize(101)  # mid-page
    assert disk.get_info().size_sectors == 101
    with pytest.raises(shmdisk.OutOfRangeError):
        disk.read(101, bytearray(512))
    disk.resize(100_000)  # beyond the original capacity: the file grows
    data = snapshot(disk)
    assert data[: 101 * 512] == head
    assert data[101 * 512 :] == bytes(len(data) - 101 * 512)
    disk.write(99_999, b"e" * 512)
    assert disk.seek_mapped(200) == 99_992


def test_resize_to_zero_and_back(disk: shmdisk.Disk) -> None:
    """A disk shrunk to zero sectors comes back empty."""
    disk.write(0, b"f" * 512)
    disk.resize(0)
    assert disk.mapped_pages() == 0
    disk.resize(8)
    assert snapshot(disk) == bytes(8 * 512)


def test_max_size_limits_resize(name: str) -> None:
    """create(max_size_sectors=...) sets how far a disk may grow."""
    with shmdisk.create(name, 8, max_size_sectors=64) as d:
        d.resize(64)
        with pytest.raises(shmdisk.InvalidGeometryError):
            d.resize(65)
        assert d.get_info().size_sectors == 64


# ------------------------------------------------------------------ inspect


def test_inspect_reports_without_connecting(disk: shmdisk.Disk) -> None:
    """inspect() describes a healthy disk: geometry, mapped pages, owner and mode."""
    disk.write(0, bytes(8192))
    info = shmdisk.inspect(disk.name)
    assert info.state == "ok" and info.problem is None
    assert (info.sector_size, info.size_sectors, info.mapped_pages) == (512, 256, 2)
    assert info.mode == 0o600 and info.uid == os.getuid()
    assert info.creator_pid == os.getpid()
    assert disk.name in shmdisk.list_disks()


def test_mode_is_applied(name: str) -> None:
    """create(mode=...) sets the segment's permission bits exactly, umask or not."""
    old = os.umask(0o077)
    try:
        with shmdisk.create(name, 8, mode=0o640):
            assert shmdisk.inspect(name).mode == 0o640
    finally:
        os.umask(old)


def test_new_name_helper_is_unique() -> None:
    """The suite's names never repeat."""
    assert len({new_name() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "attr", ["name", "sector_size", "page_size", "read_only", "owner", "closed", "frozen"]
)
def test_defining_attributes_are_read_only(disk: shmdisk.Disk, attr: str) -> None:
    """What defines a handle cannot be changed by assignment (it would change every call)."""
    before = getattr(disk, attr)
    with pytest.raises(AttributeError):
        setattr(disk, attr, 4096)
    with pytest.raises(AttributeError):
        disk.new_attribute = 1  # type: ignore[attr-defined]
    assert getattr(disk, attr) == before
    disk.write(0, b"a" * 512)  # and the handle still works as before
    buf = bytearray(512)
    disk.read(0, buf)
    assert buf == b"a" * 512
