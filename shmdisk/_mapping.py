"""A segment as this process sees it: its descriptor and mappings, swapped whole on a resize.

``Segment`` is one open segment: the descriptor, the mapping of its header, lock table and page
map (which never moves: the page map has room for the largest size from the start), and the
lock table's engine. ``Mapping`` adds the data area, mapped at one capacity. When another
process grows the disk past that capacity, a new ``Mapping`` is made and replaces the old one
in a single assignment; a call that already holds the old one finishes on it. Nothing is ever
unmapped or closed explicitly: each object lets go of its memory and descriptor when the last
reference goes, so no call can lose its mapping (or the lock table it holds a mutex in) midway.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from typing import Any

import numpy as np

from . import _layout as L
from . import _stripes
from .errors import CorruptSegmentError


class Segment:
    """One open segment: descriptor, meta mapping (header | lock table | page map), table."""

    def __init__(
        self, name: str, fd: int, header: L.Header, writable: bool, engine: str | None
    ) -> None:
        self.fd = fd  # owned: closed when this object goes
        self.name = name
        self.writable = writable
        self.sector_size = header.sector_size
        self.page_size = header.page_size
        self.shift = header.page_size.bit_length() - 1
        self.max_pages = header.max_pages
        self.data_offset = header.data_offset
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)  # which segment, for re-entry checks
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.prot = prot
        self.meta = mmap.mmap(fd, header.data_offset, mmap.MAP_SHARED, prot)
        whole = memoryview(self.meta)
        self.hq = whole[: L.HEADER_SIZE].cast("Q")
        # The lock table as u64 words (intents) and as u32 words (futex words, for holders).
        self.lq = whole[L.LOCK_OFFSET : L.MAP_OFFSET].cast("Q")
        self.li = whole[L.LOCK_OFFSET : L.MAP_OFFSET].cast("I")
        map_end = L.MAP_OFFSET + header.max_pages * L.MAP_WORD_SIZE
        self.wv = whole[L.MAP_OFFSET : map_end].cast("I")
        self.words = np.frombuffer(
            self.meta, dtype=np.uint32, count=header.max_pages, offset=L.MAP_OFFSET
        )
        # One flag per OS page of the page map: known to hold memory (see _pageio.snapshot).
        self.known = bytearray((header.max_pages >> L.MAP_PAGE_SHIFT) + 1)
        self.engine = engine
        self.ctable: _stripes.CtypesTable | None = None
        if writable and engine == "python":
            from ._pageio import repair

            anchor = ctypes.c_char.from_buffer(self.meta, L.LOCK_OFFSET)
            self._anchor = anchor  # pins the mapping while the table's addresses are in use
            me = weakref.proxy(self)  # the table must not keep its segment alive (a cycle)
            self.ctable = _stripes.CtypesTable(ctypes.addressof(anchor), lambda s: repair(me, s))

    def file_size(self) -> int:
        return os.fstat(self.fd).st_size

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Mapping:
    """A ``Segment`` with its data area mapped at ``cap`` bytes; replaced whole when it grows.

    ``base`` is the mapping of the backing disk (overlays): frozen, so it never grows.
    """

    def __init__(self, seg: Segment, cap: int, base: Mapping | None, base_pages: int) -> None:
        self.seg = seg
        self.cap = cap
        self.base = base
        self.base_pages = base_pages if base is not None else 0
        if cap:
            self.data: mmap.mmap | None = mmap.mmap(
                seg.fd, cap, mmap.MAP_SHARED, seg.prot, offset=seg.data_offset
            )
            self.dv = memoryview(self.data)
            self.dn = np.frombuffer(self.data, dtype=np.uint8)
        else:
            self.data = None
            self.dv = memoryview(b"")
            self.dn = np.zeros(0, dtype=np.uint8)
        self.table: Any = seg.ctable
        self.native: Any = None
        if seg.engine == "native":
            self.native = _stripes.native.Engine(
                seg.meta,
                self.data,
                seg.known,
                fd=seg.fd,
                sector_size=seg.sector_size,
                page_shift=seg.shift,
                max_pages=seg.max_pages,
                data_offset=seg.data_offset,
                writable=seg.writable,
                base=base.native if base is not None else None,
                base_pages=self.base_pages,
            )
            if seg.writable:
                self.table = self.native

    def grown(self) -> Mapping:
        """This mapping, or a new one if the header's capacity grew past it."""
        seg = self.seg
        # Size before capacity: resize stores the capacity first and the size second, so a
        # size read first never belongs to a newer resize than the capacity read after it.
        size_bytes = seg.hq[L.F_SIZE_SECTORS] * seg.sector_size
        cap = seg.hq[L.F_CAPACITY]
        if cap == self.cap:
            return self
        if (
            cap % seg.page_size
            or cap < self.cap
            or cap > seg.max_pages * seg.page_size
            or seg.file_size() < seg.data_offset + cap
            or size_bytes > cap
        ):
            # Never map past the end of the file: touching that would be SIGBUS.
            raise CorruptSegmentError(f"disk {seg.name!r}: header capacity {cap} is inconsistent")
        return Mapping(seg, cap, self.base, self.base_pages)
