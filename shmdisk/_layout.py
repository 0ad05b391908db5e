"""The byte format of a shmdisk segment: every field and offset, and nowhere else.

A disk is one POSIX shared-memory object (``/dev/shm/shmdisk.NAME``) laid out as::

    offset 0            header      HEADER_SIZE bytes: 16 little-endian u64 fields (below)
    offset MAP_OFFSET   page map    one u32 per page, for max_pages pages (sparse until touched)
    offset data_offset  data        capacity_bytes of sector data (sparse until written)

The file is truncated once to ``data_offset + capacity_bytes``; tmpfs only spends memory on pages
that are touched, so reserving the page map for ``max_pages`` costs nothing until used.

Page map word (u32), one per page::

    bit 31      MAPPED: the page holds data (it was written and not discarded since)
    bits 0-30   SEQ:    a sequence counter, odd while a writer is changing the page

A word per page instead of a bit: writers of neighbouring pages then never read-modify-write a
shared byte, so no second lock is needed to keep a mapped flag from being lost, and the same
word carries the counter that lets readers copy without a lock (see ``_locks.py``). It costs
4 bytes per 4 KiB page (0.1 %).

The header's magic is written last by the creator: a segment without it is still being made.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = 0x004B5349444D4853  # b"SHMDISK\0" read as a little-endian u64
VERSION = 1
HEADER_SIZE = 4096
MAP_OFFSET = HEADER_SIZE

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
N_FIELDS = 16  # words 14 and 15 are reserved (zero)

HEADER = struct.Struct("<16Q")

MAPPED = 1 << 31
SEQ_MASK = MAPPED - 1
MAP_WORD_SIZE = 4

MIN_SECTOR_SIZE = 512
MAX_SECTOR_SIZE = 65536
OS_PAGE_SIZE = 4096
DEFAULT_SECTOR_SIZE = 512
DEFAULT_SIZE_SECTORS = 32768
# A disk may grow to max(this, its size at creation) unless told otherwise at creation.
DEFAULT_MAX_BYTES = 1 << 40
# Hard ceiling: the data and the page map must both fit in a 47-bit address space.
MAX_DISK_BYTES = 1 << 46


def page_size_for(sector_size: int) -> int:
    """The page (the unit of locking, allocation and the map) for a sector size."""
    return max(OS_PAGE_SIZE, sector_size)


def align_up(n: int, to: int) -> int:
    return -(-n // to) * to


def data_offset_for(max_pages: int) -> int:
    return align_up(MAP_OFFSET + max_pages * MAP_WORD_SIZE, OS_PAGE_SIZE)


@dataclass(frozen=True)
class Header:
    """A decoded header; ``validate`` says whether it can be trusted."""

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

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        w = HEADER.unpack_from(raw)
        return cls(*w[:14])

    def pack(self) -> bytes:
        return HEADER.pack(
            self.magic,
            self.version,
            self.header_size,
            self.sector_size,
            self.page_size,
            self.size_sectors,
            self.capacity,
            self.max_pages,
            self.generation,
            self.destroyed,
            self.created_ns,
            self.creator_pid,
            self.creator_uid,
            self.data_offset,
            0,
            0,
        )

    def problem(self, file_size: int) -> str | None:
        """Why this header cannot be trusted for a file of ``file_size`` bytes, or None."""
        if self.magic != MAGIC:
            return "no shmdisk magic (foreign or unfinished segment)"
        if self.version != VERSION:
            return f"layout version {self.version}, this shmdisk reads version {VERSION}"
        if self.header_size != HEADER_SIZE:
            return f"header size {self.header_size} != {HEADER_SIZE}"
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
        return None
