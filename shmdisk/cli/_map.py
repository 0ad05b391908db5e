"""``map``: a picture of which parts of a disk hold data, and the list of its extents."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from shmdisk._render import GLYPHS_ASCII, GLYPHS_UNICODE, render_map
from shmdisk._units import format_bytes, format_bytes_long

from ._common import (
    add_owner_argument,
    can_draw_unicode,
    connect,
    positive_int,
    print_json,
    subcommand,
    table,
)


def cmd_map(args: argparse.Namespace) -> int:
    with connect(args.name, read_only=True, owner=args.owner) as disk:
        info = disk.get_info()
        extents = [(x.sector, x.n_sectors, x.mapped) for x in disk.extents()]
        page_size = disk.page_size
    ss, size = info.sector_size, info.size_sectors
    data_sectors = sum(n for _, n, mapped in extents if mapped)
    if args.json:
        print_json(
            {
                "name": args.name,
                "sector_size": ss,
                "page_size": page_size,
                "size_sectors": size,
                "mapped_sectors": data_sectors,
                "extents": [
                    {"sector": s, "n_sectors": n, "mapped": m, "offset": s * ss, "length": n * ss}
                    for s, n, m in extents
                ],
            }
        )
        return 0
    glyphs = GLYPHS_ASCII if args.ascii or not can_draw_unicode() else GLYPHS_UNICODE
    columns = args.width
    if columns is None:
        columns = max(16, min(64, shutil.get_terminal_size((80, 24)).columns - 8))
    n_data = sum(1 for _, _, m in extents if m)
    pct = 100.0 * data_sectors / size if size else 0.0
    print(
        f"disk {args.name}: {format_bytes_long(size * ss)} ({size} sectors of {ss} bytes),"
        f" {format_bytes_long(data_sectors * ss)} holds data ({pct:.1f}%)"
        f" in {n_data} extent{'' if n_data == 1 else 's'}"
    )
    print()
    for line in render_map(
        extents, size, ss, columns=columns, rows=args.rows, glyphs=glyphs, page_size=page_size
    ):
        print(line)
    print()
    shown = extents if args.all else extents[: args.limit]
    rows = [
        [
            str(s),
            str(s + n - 1),
            str(n),
            format_bytes(s * ss),
            format_bytes(n * ss),
            "data" if m else "hole",
        ]
        for s, n, m in shown
    ]
    headers = ["START", "END", "SECTORS", "OFFSET", "LENGTH", "TYPE"]
    print("\n".join(table(headers, rows, {"START", "END", "SECTORS", "OFFSET", "LENGTH"})))
    if len(shown) < len(extents):
        print(f"... {len(extents) - len(shown)} more extents (--all shows them, --json too)")
    return 0


def register(sub: Any) -> None:
    """Add ``map`` to the ``shmdisk`` subcommands."""
    p = subcommand(
        sub,
        "map",
        "draw which parts of a disk hold data",
        "example:\n  shmdisk map scratch\n  shmdisk map --json scratch | jq '.extents[]'",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--width", type=positive_int, help="cells per row (default: fits the terminal)")
    p.add_argument("--rows", type=positive_int, default=8, help="rows of cells (default: 8)")
    p.add_argument("--ascii", action="store_true", help="draw with ASCII characters only")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=32,
        help="extents listed in the table (default: 32)",
    )
    p.add_argument("-a", "--all", action="store_true", help="list every extent")
    add_owner_argument(p)
    p.add_argument("--json", action="store_true", help="print the extents as JSON")
    p.set_defaults(func=cmd_map)
