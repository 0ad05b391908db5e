"""Size parsing and formatting, and the map picture: the command line's pure helpers."""

from __future__ import annotations

import pytest

from shmdisk import cli
from shmdisk._render import GLYPHS_ASCII, cell_fractions, render_map
from shmdisk._units import format_bytes, format_bytes_long, parse_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "sectors"),
    [
        ("65536", 65536),
        ("0", 0),
        ("64M", 131072),
        ("64MiB", 131072),
        ("64MB", 131072),
        ("64m", 131072),
        ("1.5G", 3 * 1024 * 1024),
        ("4096B", 8),
        ("1T", 1 << 31),
        ("2K", 4),
        (" 8 KiB ", 16),
    ],
)
def test_parse_size_reads_sectors_or_units(text: str, sectors: int) -> None:
    """A bare number is sectors; any unit is bytes in powers of 1024."""
    assert parse_size(text, 512) == sectors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1000B", "not a whole number of 512-byte sectors"),
        ("1.5", "whole number"),
        ("12 parsecs", "invalid size"),
        ("-1", "invalid size"),
        ("iB", "invalid size"),
        ("5iB", "needs a unit"),
        ("0.0001K", "not a whole number of bytes"),
        ("", "invalid size"),
    ],
)
def test_parse_size_rejects_with_a_reason(text: str, message: str) -> None:
    """Bad sizes raise ValueError naming what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_size(text, 512)


def test_parse_bytes_is_exact_for_fractions() -> None:
    """1.5G is exactly 1610612736 bytes; no float rounding."""
    assert parse_bytes("1.5G") == (1610612736, True)
    assert parse_bytes("0.5K") == (512, True)
    assert parse_bytes("512") == (512, False)


@pytest.mark.parametrize(
    ("n", "compact", "long"),
    [
        (0, "0B", "0 bytes"),
        (1, "1B", "1 byte"),
        (1023, "1023B", "1023 bytes"),
        (1024, "1K", "1 KiB"),
        (1536, "1.5K", "1.5 KiB"),
        (64 << 20, "64M", "64 MiB"),
        ((1 << 30) * 3 // 2, "1.5G", "1.5 GiB"),
        (1 << 40, "1T", "1 TiB"),
        ((1 << 20) - 1, "1M", "1 MiB"),  # rounds up into the next unit, never "1024K"
        ((1 << 20) - 1024, "1023K", "1023 KiB"),
        (10**9 * 512, "476G", "476 GiB"),  # 10**9 sectors: at most 4 digits, never "1e+09"
        (1 << 60, "1E", "1 EiB"),
    ],
)
def test_format_bytes(n: int, compact: str, long: str) -> None:
    """Sizes print like lsblk (compact) and in prose (long)."""
    assert format_bytes(n) == compact
    assert format_bytes_long(n) == long


def test_cell_fractions_sweep() -> None:
    """Each cell's fraction is the share of its sectors covered by mapped extents."""
    extents = [(0, 3, False), (3, 4, True), (7, 3, False)]
    assert cell_fractions(extents, 10, 3) == [0.0, 1.0, 0.25]
    assert cell_fractions([(0, 10, True)], 10, 20) == [1.0] * 10
    assert cell_fractions([], 0, 5) == []


def test_render_map_ascii_picture_and_legend() -> None:
    """The picture has a row per `columns` cells, offsets at the left, and a legend."""
    extents = [(0, 100, True), (100, 900, False), (1000, 24, True)]
    lines = render_map(extents, 1024, 512, columns=8, rows=2, glyphs=GLYPHS_ASCII)
    # Cell 1 holds 36 of 64 data sectors (more than half), cell 15 holds 24 (less).
    assert lines[:2] == ["  0B #+......", "256K .......-"]
    assert lines[2] == "     # data  + mostly data  - some data  . hole   (one cell = 32K)"


def test_render_map_empty_and_tiny_disks() -> None:
    """A 0-sector disk says so; a disk smaller than the grid gets one cell per page."""
    assert render_map([], 0, 512) == ["(empty disk: 0 sectors)"]
    lines = render_map([(0, 8, True), (8, 8, False)], 16, 512, glyphs=GLYPHS_ASCII)
    assert lines[0] == "0B #."


def test_a_broken_nbd_module_fails_serve_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """If shmdisk.nbd.cli cannot load, `serve` fails with one line and other commands work."""

    def broken() -> None:
        raise ImportError("no module named 'shmdisk.nbd.cli'")

    monkeypatch.setattr(cli, "_load_nbd_cli", broken)
    assert cli.main(["serve", "x", "--bind", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "shmdisk: error: the NBD server is unavailable: no module named 'shmdisk.nbd.cli'\n"
    )
    assert cli.main(["create", "--help"]) == 0
    assert "example" in capsys.readouterr().out
