"""The on-disk format, pinned byte for byte: a change here breaks every disk already made."""

from __future__ import annotations

import importlib
import importlib.util
import os
import struct

import numpy as np
import pytest
from _helpers import new_name

import shmdisk
from shmdisk import _layout as L
from shmdisk import _stripes

# A header with every field set, packed by hand from the layout's documentation (not by
# Header.pack): 32 little-endian u64 words, then the backing disk's name at byte 256.
GOLDEN_WORDS = [
    0x004B5349444D4853,  # 0 magic b"SHMDISK\0"
    2,  # 1 version
    4096,  # 2 header size
    512,  # 3 sector size
    4096,  # 4 page size
    2048,  # 5 size in sectors
    1 << 20,  # 6 capacity (bytes of data area)
    256,  # 7 max pages
    3,  # 8 generation
    0,  # 9 destroyed
    1764662400000000000,  # 10 created (ns)
    4242,  # 11 creator pid
    1000,  # 12 creator uid
    73728,  # 13 data offset: 69632 + 256 * 4, rounded up to 4096
    1,  # 14 lock kind: robust mutexes
    int.from_bytes(b"glibcx64", "little"),  # 15 lock ABI
    4096,  # 16 lock table offset
    1024,  # 17 stripes
    4,  # 18 stripe shift (16 pages a unit)
    64,  # 19 slot size
    69632,  # 20 page map offset: 4096 + 1024 * 64
    1,  # 21 frozen
    1764662300000000000,  # 22 backing disk's created (ns)
    1024,  # 23 backing disk's size in sectors
    4,  # 24 length of the backing disk's name
] + [0] * 7
GOLDEN = (struct.pack("<32Q", *GOLDEN_WORDS) + b"gold").ljust(4096, b"\0")


def golden_header() -> L.Header:
    return L.Header(
        magic=L.MAGIC,
        version=2,
        header_size=4096,
        sector_size=512,
        page_size=4096,
        size_sectors=2048,
        capacity=1 << 20,
        max_pages=256,
        generation=3,
        destroyed=0,
        created_ns=1764662400000000000,
        creator_pid=4242,
        creator_uid=1000,
        data_offset=73728,
        frozen=1,
        base_created_ns=1764662300000000000,
        base_size_sectors=1024,
        base_name="gold",
    )


def test_header_packs_to_the_golden_bytes() -> None:
    """Header.pack gives exactly the documented bytes, and unpack reads them back."""
    assert golden_header().pack() == GOLDEN
    assert L.Header.unpack(GOLDEN) == golden_header()
    assert GOLDEN[:8] == b"SHMDISK\0"
    assert golden_header().problem(73728 + (1 << 20)) is None


def test_offsets_bits_and_slots_are_pinned() -> None:
    """Where the lock table, page map and data start, what the word bits mean, slot layout."""
    assert (L.HEADER_SIZE, L.LOCK_OFFSET, L.MAP_OFFSET) == (4096, 4096, 69632)
    assert (L.STRIPES, L.STRIPE_SHIFT, L.SLOT_SIZE, L.MUTEX_SIZE) == (1024, 4, 64, 40)
    assert (L.INTENT_FIRST, L.INTENT_COUNT) == (40, 48)
    assert (L.MAPPED, L.ZEROED, L.SEQ_MASK) == (0x80000000, 0x40000000, 0x3FFFFFFF)
    assert L.data_offset_for(1) == 73728 and L.data_offset_for(1024) == 73728
    assert L.data_offset_for(1025) == 77824
    assert [L.stripe_of(p) for p in (0, 15, 16, 16 * 1024, 16 * 1025 + 3)] == [0, 0, 1, 0, 1]
    assert L.word_writing(0x80000002) == 0x80000003
    assert L.word_done(0x80000003, L.MAPPED) == 0x80000004
    assert L.word_done(0x3FFFFFFF, L.ZEROED) == L.ZEROED  # the counter wraps inside its bits


def test_native_engine_is_built_for_this_layout() -> None:
    """The C extension compiles the same offsets in (the engine refuses it otherwise)."""
    if importlib.util.find_spec("shmdisk._native") is None:
        pytest.skip("the native engine is not built here (no compiler at install)")
    native = importlib.import_module("shmdisk._native")
    assert (native.MAP_OFFSET, native.LOCK_OFFSET, native.SLOT_SIZE) == (69632, 4096, 64)


def test_a_real_disk_matches_the_format(name: str) -> None:
    """A created disk's file: header fields where documented, initialised robust mutexes in
    every slot, a hole for the page map and data, and the file size the header implies."""
    with shmdisk.create(name, 2048, max_size_sectors=2048) as d:
        d.write(0, b"\xab" * 512)
    path = shmdisk.segment_path(name)
    with open(path, "rb") as f:
        raw = f.read(L.MAP_OFFSET + 4)
    w = struct.unpack_from("<32Q", raw)
    assert w[0] == L.MAGIC and w[1:6] == (2, 4096, 512, 4096, 2048)
    assert (w[6], w[7], w[13]) == (1 << 20, 256, 73728)
    assert w[14:22] == (1, GOLDEN_WORDS[15], 4096, 1024, 4, 64, 69632, 0)
    assert w[12] == os.geteuid() and w[24] == 0
    slots = np.frombuffer(raw[L.LOCK_OFFSET : L.MAP_OFFSET], dtype="<i4").reshape(1024, 16)
    assert (slots[:, 0] == 0).all()  # every futex word free
    assert ((slots[:, 4] & ~0x300) == (_stripes.MUTEX_KIND & ~0x300)).all()  # robust, shared
    (word0,) = struct.unpack_from("<I", raw, L.MAP_OFFSET)
    assert word0 & L.MAPPED and word0 & 1 == 0  # page 0: written, no writer inside
    assert os.stat(path).st_size == 73728 + (1 << 20)
    with open(path, "rb") as f:
        f.seek(73728)
        assert f.read(512) == b"\xab" * 512


def test_a_new_name_helper_is_unique() -> None:
    """The helper the other format tests rely on gives fresh names."""
    assert new_name() != new_name()
