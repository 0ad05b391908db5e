"""``map``: a picture of which parts of a disk hold data, and the list of its extents."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from shmdisk._render import (
    BASE_GLYPHS_ASCII,
    BASE_GLYPHS_UNICODE,
    GLYPHS_ASCII,
    GLYPHS_UNICODE,
    render_map,
)
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
        backing = disk.backing
        # (sector, n_sectors, layer, disk): layer 0 is this disk, 1 its backing disk...
        runs = [(x.sector, x.n_sectors, x.layer, x.disk) for x in disk.layer_extents()]
        page_size = disk.page_size
    ss, size = info.sector_size, info.size_sectors
    extents = [(s, n, layer is not None) for s, n, layer, _ in runs]
    data_sectors = sum(n for _, n, mapped in extents if mapped)
    own_sectors = sum(n for _, n, layer, _ in runs if layer == 0)
    if args.json:
        print_json(
            {
                "name": args.name,
                "sector_size": ss,
                "page_size": page_size,
                "size_sectors": size,
                "mapped_sectors": data_sectors,
                "backing": backing,
                "own_sectors": own_sectors,
                "extents": [
                    {
                        "sector": s,
                        "n_sectors": n,
                        "mapped": layer is not None,
                        "offset": s * ss,
                        "length": n * ss,
                        "layer": layer,
                        "disk": name,
                    }
                    for s, n, layer, name in runs
                ],
            }
        )
        return 0
    ascii_only = args.ascii or not can_draw_unicode()
    glyphs = GLYPHS_ASCII if ascii_only else GLYPHS_UNICODE
    columns = args.width
    if columns is None:
        columns = max(16, min(64, shutil.get_terminal_size((80, 24)).columns - 8))
    n_data = sum(1 for _, _, m in _merged(extents) if m)
    pct = 100.0 * data_sectors / size if size else 0.0
    over = ""
    if backing is not None:
        over = f", {format_bytes_long(own_sectors * ss)} of it its own, the rest from {backing}"
    print(
        f"disk {args.name}: {format_bytes_long(size * ss)} ({size} sectors of {ss} bytes),"
        f" {format_bytes_long(data_sectors * ss)} holds data ({pct:.1f}%)"
        f" in {n_data} extent{'' if n_data == 1 else 's'}{over}"
    )
    print()
    own = [(s, n, layer == 0) for s, n, layer, _ in runs]
    below = [(s, n, layer is not None and layer > 0) for s, n, layer, _ in runs]
    for line in render_map(
        own if backing is not None else extents,
        size,
        ss,
        columns=columns,
        rows=args.rows,
        glyphs=glyphs,
        page_size=page_size,
        base_extents=below if backing is not None else None,
        base_glyphs=BASE_GLYPHS_ASCII if ascii_only else BASE_GLYPHS_UNICODE,
    ):
        print(line)
    print()
    shown = runs if args.all else runs[: args.limit]
    rows = []
    for s, n, layer, name in shown:
        row = [str(s), str(s + n - 1), str(n), format_bytes(s * ss), format_bytes(n * ss)]
        row.append("hole" if layer is None else "data" if layer == 0 else "base")
        if backing is not None:
            row.append("-" if name is None else name)
        rows.append(row)
    headers = ["START", "END", "SECTORS", "OFFSET", "LENGTH", "TYPE"]
    if backing is not None:
        headers.append("FROM")
    print("\n".join(table(headers, rows, {"START", "END", "SECTORS", "OFFSET", "LENGTH"})))
    if len(shown) < len(runs):
        print(f"... {len(runs) - len(shown)} more extents (--all shows them, --json too)")
    return 0


def _merged(extents: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """Neighbouring runs of the same kind as one (an overlay's data from several layers)."""
    out: list[tuple[int, int, bool]] = []
    for s, n, m in extents:
        if out and out[-1][2] == m and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n, m)
        else:
            out.append((s, n, m))
    return out


def register(sub: Any) -> None:
    """Add ``map`` to the ``shmdisk`` subcommands."""
    p = subcommand(
        sub,
        "map",
        "draw which parts of a disk hold data",
        "For an overlay the picture and the table tell its own data (TYPE data) from what it\n"
        "reads from its backing disks (TYPE base, FROM the disk that holds it).\n"
        "\nexample:\n  shmdisk map scratch\n  shmdisk map --json scratch | jq '.extents[]'",
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
