"""A model of a disk in an overlay chain: its bytes, and where each page reads from.

The overlay tests apply the same operations to a disk and to its model and compare them byte
for byte, extent for extent. Pages are in one of three states, as the page map's words say:
``OWN`` (the disk holds the page), ``BELOW`` (read from the backing disk) and ``ZERO``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import shmdisk

OWN, BELOW, ZERO = "own", "below", "zero"


@dataclass
class Layer:
    """One disk of a chain: ``name``, its bytes, the state of each page, the disk under it."""

    name: str
    sector_size: int
    page_size: int
    data: bytearray
    kinds: list[str] = field(default_factory=list)
    below: Layer | None = None
    below_pages: int = 0

    @classmethod
    def empty(cls, name: str, size_sectors: int, sector_size: int = 512) -> Layer:
        page = max(4096, sector_size)
        layer = cls(name, sector_size, page, bytearray(size_sectors * sector_size))
        layer.kinds = [ZERO] * layer.pages
        return layer

    @classmethod
    def over(cls, name: str, below: Layer, size_sectors: int | None = None) -> Layer:
        """An overlay of ``below`` (frozen from now on), of its size or larger."""
        size = len(below.data) if size_sectors is None else size_sectors * below.sector_size
        data = bytearray(below.data) + bytearray(size - len(below.data))
        layer = cls(name, below.sector_size, below.page_size, data, below=below)
        layer.below_pages = below.pages
        layer.kinds = [BELOW if p < layer.below_pages else ZERO for p in range(layer.pages)]
        return layer

    @property
    def pages(self) -> int:
        return -(-len(self.data) // self.page_size)

    @property
    def size_sectors(self) -> int:
        return len(self.data) // self.sector_size

    # ------------------------------------------------------------ where data lives

    def has_data(self, p: int) -> bool:
        """Whether page ``p`` may hold data: the disk's own, or one below that it reads."""
        kind = self.kinds[p] if p < len(self.kinds) else ZERO
        if kind == OWN:
            return True
        if kind == BELOW and self.below is not None and p < self.below_pages:
            return self.below.has_data(p)
        return False

    def layer_of(self, p: int) -> tuple[int, str] | None:
        """Which disk of the chain page ``p`` reads from (depth, name), None for zeros."""
        kind = self.kinds[p] if p < len(self.kinds) else ZERO
        if kind == OWN:
            return 0, self.name
        if kind == BELOW and self.below is not None and p < self.below_pages:
            under = self.below.layer_of(p)
            return None if under is None else (under[0] + 1, under[1])
        return None

    def _runs(self, key: object) -> list[tuple[int, int, object]]:
        spp = self.page_size // self.sector_size
        size = self.size_sectors
        out: list[tuple[int, int, object]] = []
        for p in range(self.pages):
            value = key(p)  # type: ignore[operator]
            a, b = p * spp, min(size, (p + 1) * spp)
            if out and out[-1][2] == value:
                out[-1] = (out[-1][0], b, value)
            else:
                out.append((a, b, value))
        return out

    def extents(self) -> list[shmdisk.Extent]:
        return [shmdisk.Extent(a, b - a, bool(v)) for a, b, v in self._runs(self.has_data)]

    def layer_extents(self) -> list[shmdisk.LayerExtent]:
        out = []
        for a, b, v in self._runs(self.layer_of):
            depth, name = v if v is not None else (None, None)  # type: ignore[misc]
            out.append(shmdisk.LayerExtent(a, b - a, depth, name))
        return out

    def own_pages(self) -> int:
        return sum(1 for p in range(self.pages) if self.kinds[p] == OWN)

    # ------------------------------------------------------------ operations

    def _touch(self, a: int, b: int) -> None:
        for p in range(a // self.page_size, -(-b // self.page_size)):
            self.kinds[p] = OWN

    def write(self, off: int, blob: bytes) -> None:
        self.data[off : off + len(blob)] = blob
        self._touch(off, off + len(blob))

    def zero(self, a: int, b: int, unmap: bool) -> None:
        """``discard`` (``unmap``) or ``write_zeroes`` of bytes ``[a, b)``."""
        if a == b:
            return
        self.data[a:b] = bytes(b - a)
        if not unmap:
            self._touch(a, b)
            return
        page = self.page_size
        p0, p1 = a // page, -(-b // page)
        full_lo = -(-a // page)
        full_hi = p1 if b == len(self.data) else b // page
        if full_lo >= full_hi:
            partial, whole = list(range(p0, p1)), range(0)
        else:
            partial = ([p0] if p0 < full_lo else []) + ([full_hi] if full_hi < p1 else [])
            whole = range(full_lo, full_hi)
        for p in partial:
            if self.has_data(p):
                self.kinds[p] = OWN  # copied up, then partly zeroed
        for p in whole:
            self.kinds[p] = ZERO

    def resize(self, size_sectors: int) -> None:
        new = size_sectors * self.sector_size
        old = len(self.data)
        page = self.page_size
        if new < old:
            if new % page and self.has_data(new // page):
                self.kinds[new // page] = OWN
            for p in range(-(-new // page), -(-old // page)):
                self.kinds[p] = ZERO
            del self.data[new:]
        else:
            self.data += bytes(new - old)
            self.kinds += [ZERO] * (self.pages - len(self.kinds))


def pattern(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def random_ops(layer: Layer, disk: shmdisk.Disk, seed: int, count: int) -> None:
    """Apply ``count`` random writes, discards and zero-writes to ``disk`` and its model."""
    rng = np.random.default_rng(seed)
    ss, size = layer.sector_size, layer.size_sectors
    for i in range(count):
        s = int(rng.integers(0, size))
        n = int(rng.integers(1, min(size - s, 40) + 1))
        kind = int(rng.integers(0, 5))
        if kind <= 1:
            blob = pattern(n * ss, seed * 1000 + i)
            disk.write(s, blob)
            layer.write(s * ss, blob)
        elif kind == 2:
            off = s * ss + int(rng.integers(0, ss))
            blob = pattern(int(rng.integers(1, 3 * ss)), seed * 1000 + i)
            blob = blob[: size * ss - off]
            disk.write_at(off, blob)
            layer.write(off, blob)
        elif kind == 3:
            disk.discard(s, n)
            layer.zero(s * ss, (s + n) * ss, unmap=True)
        else:
            disk.write_zeroes(s, n, may_unmap=False)
            layer.zero(s * ss, (s + n) * ss, unmap=False)
