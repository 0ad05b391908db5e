"""The byte format of a shmdisk segment: every field, offset and bit, and nowhere else.

A disk is one POSIX shared-memory object (``/dev/shm/shmdisk.NAME``) laid out as::

    offset 0              header      HEADER_SIZE bytes: N_FIELDS little-endian u64 words
                                      (below), then the backing disk's name (overlays only)
    offset LOCK_OFFSET    lock table  STRIPES slots of SLOT_SIZE bytes (below)
    offset MAP_OFFSET     page map    one u32 word per page, for max_pages pages
    offset data_offset    data        capacity bytes of sector data

The file is truncated once to ``data_offset + capacity``; tmpfs only spends memory on pages that
are touched, so reserving the page map for ``max_pages`` costs nothing until used. The file
never shrinks (another process's mapping would SIGBUS); ``resize`` only grows ``capacity``.

**Page-map word** (u32), one per page::

    bit 31      MAPPED  the page holds data of this disk (written, not discarded since)
    bit 30      ZEROED  the page reads as zeros even where a backing disk has data (overlays)
    bits 0-29   SEQ     a sequence counter, odd while a writer is changing the page

A page that is neither MAPPED nor ZEROED reads from the backing disk (overlays) or as zeros.
A page that is not MAPPED is a hole in the file: its memory was never taken or was given back.

**Lock-table slot** (SLOT_SIZE bytes), one per stripe::

    offset 0              a process-shared, robust pthread mutex (MUTEX_SIZE bytes, glibc ABI)
    offset INTENT_FIRST   u64: first page of the range its holder is changing
    offset INTENT_COUNT   u64: number of pages of that range

Page ``p`` belongs to stripe ``(p >> STRIPE_SHIFT) % STRIPES``. The protocol that uses the table
and the SEQ counters is described in ``_pageio.py``.

The header's magic is written before the segment gets its name (it is made unnamed and linked
into place whole, see ``_segment.py``), so a segment without it is not one of ours.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

MAGIC = 0x004B5349444D4853  # b"SHMDISK\0" read as a little-endian u64
VERSION = 2  # 1: shmdisk 0.1 (OFD byte-range locks, no lock table)
HEADER_SIZE = 4096

# Header fields, as indices of u64 words (the hot path reads them through a 'Q' memoryview).
F_MAGIC = 0
F_VERSION = 1
F_HEADER_SIZE = 2
F_SECTOR_SIZE = 3
F_PAGE_SIZE = 4
F_SIZE_SECTORS = 5  # mutable: logical size, changed by resize
F_CAPACITY = 6  # mutable: bytes of data area the file holds (grows, never shrinks)
F_MAX_PAGES = 7  # pages the page map has room for: the resize limit
F_GENERATION = 8  # mutable: bumped by every resize
F_DESTROYED = 9  # mutable: set (before unlink) by destroy
F_CREATED_NS = 10
F_CREATOR_PID = 11
F_CREATOR_UID = 12
F_DATA_OFFSET = 13
F_LOCK_KIND = 14  # LOCK_ROBUST_MUTEX
F_LOCK_ABI = 15  # which C library and CPU the mutexes were made for (ABI_TAGS)
F_LOCK_OFFSET = 16
F_STRIPES = 17
F_STRIPE_SHIFT = 18
F_SLOT_SIZE = 19
F_MAP_OFFSET = 20
F_FROZEN = 21  # mutable, once: set by freeze, never cleared
F_BASE_CREATED_NS = 22  # overlays: the backing disk's created_ns (0: no backing disk)
F_BASE_SIZE_SECTORS = 23  # overlays: the backing disk's size (frozen, so it never changes)
F_BASE_NAME_LEN = 24  # overlays: bytes of the backing disk's name at BASE_NAME_OFFSET
N_FIELDS = 32  # words 25-31 are reserved (zero)

HEADER = struct.Struct(f"<{N_FIELDS}Q")
BASE_NAME_OFFSET = HEADER.size  # 256
BASE_NAME_MAX = 256

LOCK_ROBUST_MUTEX = 1
# The glibc pthread_mutex_t layout (and the robust-list offset inside it) is an ABI: only
# processes of the same C library and word size may lock the same table.
ABI_GLIBC_X86_64 = int.from_bytes(b"glibcx64", "little")
ABI_TAGS = {ABI_GLIBC_X86_64: "glibc/x86-64"}
MUTEX_SIZE = 40  # sizeof(pthread_mutex_t), glibc x86-64
STRIPES = 1024
STRIPE_SHIFT = 4  # 16 pages (64 KiB of 4 KiB pages) per stripe unit
SLOT_SIZE = 64
INTENT_FIRST = 40
INTENT_COUNT = 48
LOCK_OFFSET = HEADER_SIZE
MAP_OFFSET = LOCK_OFFSET + STRIPES * SLOT_SIZE

MAPPED = 1 << 31
ZEROED = 1 << 30
FLAGS = MAPPED | ZEROED
SEQ_MASK = ZEROED - 1
MAP_WORD_SIZE = 4
MAP_PAGE_BYTES = 4096  # the page map is allocated (and known to hold memory) in OS pages
MAP_PAGE_SHIFT = 10  # page-map words in one OS page of the map: 1 << 10

# Futex word of a robust mutex (first 4 bytes of the slot), as the kernel defines it.
FUTEX_WAITERS = 0x80000000
FUTEX_OWNER_DIED = 0x40000000
FUTEX_TID_MASK = 0x3FFFFFFF

MIN_SECTOR_SIZE = 512
MAX_SECTOR_SIZE = 65536
OS_PAGE_SIZE = 4096
DEFAULT_SECTOR_SIZE = 512
DEFAULT_SIZE_SECTORS = 32768
# A disk may grow to max(this, its size at creation) unless told otherwise at creation.
DEFAULT_MAX_BYTES = 1 << 40
# Hard ceiling: the data and the page map must both fit in a 47-bit address space.
MAX_DISK_BYTES = 1 << 46
MAX_CHAIN = 16  # overlays of overlays: the deepest chain a disk may sit on


def page_size_for(sector_size: int) -> int:
    """The page (the unit of locking, allocation and the map) for a sector size."""
    return max(OS_PAGE_SIZE, sector_size)


def align_up(n: int, to: int) -> int:
    return -(-n // to) * to


def data_offset_for(max_pages: int) -> int:
    return align_up(MAP_OFFSET + max_pages * MAP_WORD_SIZE, OS_PAGE_SIZE)


def stripe_of(page: int) -> int:
    return (page >> STRIPE_SHIFT) % STRIPES


def word_writing(w: int) -> int:
    """The word a writer stores before it changes the page: the counter made odd."""
    return w | 1


def word_done(w: int, flags: int) -> int:
    """The word a writer stores when done: counter one past odd, with ``flags``."""
    return flags | (((w | 1) + 1) & SEQ_MASK)


@dataclass(frozen=True)
class Header:
    """A decoded header; ``problem`` says whether it can be trusted."""

    magic: int
    version: int
    header_size: int
    sector_size: int
    page_size: int
    size_sectors: int
    capacity: int
    max_pages: int
    generation: int
    destroyed: int
    created_ns: int
    creator_pid: int
    creator_uid: int
    data_offset: int
    lock_kind: int = LOCK_ROBUST_MUTEX
    lock_abi: int = ABI_GLIBC_X86_64
    lock_offset: int = LOCK_OFFSET
    stripes: int = STRIPES
    stripe_shift: int = STRIPE_SHIFT
    slot_size: int = SLOT_SIZE
    map_offset: int = MAP_OFFSET
    frozen: int = 0
    base_created_ns: int = 0
    base_size_sectors: int = 0
    base_name: str = ""

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Decode the first HEADER_SIZE bytes of a segment (shorter input reads as zeros)."""
        raw = bytes(raw[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
        w = HEADER.unpack_from(raw)
        n = min(w[F_BASE_NAME_LEN], BASE_NAME_MAX)
        name = raw[BASE_NAME_OFFSET : BASE_NAME_OFFSET + n].decode("ascii", "replace")
        names = [f.name for f in fields(cls)][:F_BASE_NAME_LEN]
        return cls(**dict(zip(names, w, strict=False)), base_name=name)

    def words(self) -> list[int]:
        """The N_FIELDS header words, in order."""
        vals = [getattr(self, f.name) for f in fields(self)][:-1]
        vals.append(len(self.base_name.encode("ascii")))
        return vals + [0] * (N_FIELDS - len(vals))

    def pack(self) -> bytes:
        """The whole HEADER_SIZE bytes: the words, then the backing disk's name."""
        name = self.base_name.encode("ascii")
        return (HEADER.pack(*self.words()) + name).ljust(HEADER_SIZE, b"\0")

    @property
    def is_overlay(self) -> bool:
        return self.base_created_ns != 0

    def problem(self, file_size: int) -> str | None:
        """Why this header cannot be trusted for a file of ``file_size`` bytes, or None."""
        if self.magic != MAGIC:
            return "no shmdisk magic (foreign or unfinished segment)"
        if self.version != VERSION:
            return version_problem(self.version)
        if self.header_size != HEADER_SIZE:
            return f"header size {self.header_size} != {HEADER_SIZE}"
        if self.lock_kind != LOCK_ROBUST_MUTEX:
            return f"unknown lock kind {self.lock_kind}"
        if (
            self.lock_offset != LOCK_OFFSET
            or self.stripes != STRIPES
            or self.stripe_shift != STRIPE_SHIFT
            or self.slot_size != SLOT_SIZE
            or self.map_offset != MAP_OFFSET
        ):
            return "lock table or page map not where this version puts them"
        ss = self.sector_size
        if not (MIN_SECTOR_SIZE <= ss <= MAX_SECTOR_SIZE and ss & (ss - 1) == 0):
            return f"bad sector size {ss}"
        if self.page_size != page_size_for(ss):
            return f"page size {self.page_size} does not fit sector size {ss}"
        if self.max_pages * self.page_size > MAX_DISK_BYTES:
            return f"page map of {self.max_pages} pages is beyond the size limit"
        if self.data_offset != data_offset_for(self.max_pages):
            return f"data offset {self.data_offset} does not follow the page map"
        if self.capacity % self.page_size or self.capacity > self.max_pages * self.page_size:
            return f"capacity {self.capacity} does not fit the page map"
        if self.size_sectors * ss > self.capacity:
            return f"size {self.size_sectors} sectors exceeds the capacity {self.capacity}"
        if file_size < self.data_offset + self.capacity:
            return (
                f"segment is {file_size} bytes, the header needs {self.data_offset + self.capacity}"
            )
        if self.frozen not in (0, 1) or self.destroyed not in (0, 1):
            return "frozen or destroyed flag is neither 0 nor 1"
        if self.is_overlay:
            if not self.base_name or self.base_size_sectors * ss > MAX_DISK_BYTES:
                return "overlay without a valid backing disk"
        elif self.base_name or self.base_size_sectors:
            return "backing disk fields set on a disk that is no overlay"
        return None


def version_problem(version: int) -> str:
    if version == 1:
        return "layout version 1 (shmdisk 0.1); this shmdisk reads version 2"
    return f"layout version {version}, this shmdisk reads version {VERSION}"
