"""The picture ``shmdisk map`` draws: which parts of a disk hold data.

Pure functions over ``(sector, n_sectors, mapped)`` extents, so they are tested without a disk.
The disk is cut into ``cells`` equal slices; each slice is drawn by how much of it holds data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shmdisk._units import format_bytes

__all__ = [
    "BASE_GLYPHS_ASCII",
    "BASE_GLYPHS_UNICODE",
    "GLYPHS_ASCII",
    "GLYPHS_UNICODE",
    "Glyphs",
    "cell_fractions",
    "render_map",
]


@dataclass(frozen=True)
class Glyphs:
    """The four shades of a map cell, from "all data" to "no data"."""

    full: str
    most: str
    some: str
    none: str

    def pick(self, fraction: float) -> str:
        """Glyph for a cell whose ``fraction`` (0..1) of sectors hold data."""
        if fraction >= 1.0:
            return self.full
        if fraction > 0.5:
            return self.most
        if fraction > 0.0:
            return self.some
        return self.none


GLYPHS_UNICODE = Glyphs(full="\u2588", most="\u2593", some="\u2591", none="\u00b7")
GLYPHS_ASCII = Glyphs(full="#", most="+", some="-", none=".")
# An overlay's cells whose data comes mostly from its backing disks (``none`` is not used).
BASE_GLYPHS_UNICODE = Glyphs(full="\u2261", most="=", some="-", none="\u00b7")
BASE_GLYPHS_ASCII = Glyphs(full="%", most="=", some=":", none=".")


def cell_fractions(
    extents: Iterable[tuple[int, int, bool]], size_sectors: int, cells: int
) -> list[float]:
    """Fraction of each of ``cells`` equal slices of ``[0, size_sectors)`` covered by data.

    Slice ``i`` is ``[i*size//cells, (i+1)*size//cells)``; one sweep over the extents, so a disk
    with a million extents costs a million steps, not cells times extents.
    """
    if size_sectors <= 0 or cells <= 0:
        return []
    cells = min(cells, size_sectors)
    covered = [0] * cells
    for sector, n_sectors, mapped in extents:
        if not mapped or n_sectors <= 0:
            continue
        start = max(0, sector)
        end = min(size_sectors, sector + n_sectors)
        if start >= end:
            continue
        # First slice touching `start`: the largest i with i*size//cells <= start.
        i = start * cells // size_sectors
        while i + 1 < cells and (i + 1) * size_sectors // cells <= start:
            i += 1
        while i > 0 and i * size_sectors // cells > start:
            i -= 1
        while i < cells and i * size_sectors // cells < end:
            lo = i * size_sectors // cells
            hi = (i + 1) * size_sectors // cells
            covered[i] += min(hi, end) - max(lo, start)
            i += 1
    return [
        covered[i] / ((i + 1) * size_sectors // cells - i * size_sectors // cells)
        for i in range(cells)
    ]


def render_map(
    extents: Sequence[tuple[int, int, bool]],
    size_sectors: int,
    sector_size: int,
    *,
    columns: int = 64,
    rows: int = 8,
    glyphs: Glyphs = GLYPHS_UNICODE,
    page_size: int = 4096,
    base_extents: Sequence[tuple[int, int, bool]] | None = None,
    base_glyphs: Glyphs = BASE_GLYPHS_UNICODE,
) -> list[str]:
    """Lines of the picture: each row starts with the byte offset of its first cell.

    Never more cells than pages (data is tracked per page, so a finer picture would only repeat
    itself) and never more than ``columns * rows``; a legend line ends the picture. For an
    overlay, ``extents`` are its own data and ``base_extents`` the data it reads from its
    backing disks: a cell whose data is mostly the latter is drawn with ``base_glyphs``,
    shaded by all the data it holds.
    """
    if size_sectors <= 0:
        return ["(empty disk: 0 sectors)"]
    size_bytes = size_sectors * sector_size
    pages = max(1, -(-size_bytes // max(page_size, sector_size)))
    cells = max(1, min(columns * rows, pages, size_sectors))
    fractions = cell_fractions(extents, size_sectors, cells)
    cells = len(fractions)
    picks = [glyphs.pick(f) for f in fractions]
    if base_extents is not None:
        below = cell_fractions(base_extents, size_sectors, cells)
        picks = [
            base_glyphs.pick(own + base) if base > own else glyphs.pick(own + base)
            for own, base in zip(fractions, below, strict=True)
        ]
    per_row = min(columns, cells)
    labels = [
        format_bytes(i * size_sectors // cells * sector_size) for i in range(0, cells, per_row)
    ]
    width = max(len(label) for label in labels)
    lines = []
    for row, first in enumerate(range(0, cells, per_row)):
        picture = "".join(picks[first : first + per_row])
        lines.append(f"{labels[row]:>{width}} {picture}")
    cell_bytes = size_bytes / cells
    cell_text = format_bytes(int(cell_bytes))
    if cell_bytes != int(cell_bytes):
        cell_text = "~" + cell_text
    g, b = glyphs, base_glyphs
    if base_extents is None:
        legend = f"{g.full} data  {g.most} mostly data  {g.some} some data"
    else:
        legend = (
            f"{g.full} own data  {g.most} mostly  {g.some} some  "
            f"{b.full} base data  {b.most} mostly  {b.some} some"
        )
    lines.append(f"{'':>{width}} {legend}  {g.none} hole   (one cell = {cell_text})")
    return lines
