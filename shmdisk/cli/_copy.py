"""``copy``: a new disk holding another's bytes at one point in time (``shmdisk.copy``)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import shmdisk
from shmdisk._units import format_bytes_long

from ._common import CliError, disk_exists, print_json, sigterm_raises, subcommand
from ._image import _add_progress, _Progress, _progress_enabled, _rate
from ._ls import inspect_all
from ._manage import _mode_arg


def cmd_copy(args: argparse.Namespace) -> int:
    # `kill PID` must stop it like Ctrl-C: the half-made copy is never named, so nothing stays.
    with sigterm_raises():
        return _copy(args)


def _copy(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    if not disk_exists(src):
        raise CliError(f"no such disk: {src}")
    seg = shmdisk.inspect(src)
    total = (seg.size_sectors or 0) * (seg.sector_size or 0)
    bar = _Progress(f"copy {src}", total, _progress_enabled(args))

    def progress(done: int, total: int) -> None:
        bar.update(done)

    t0 = time.monotonic()
    disk = shmdisk.copy(src, dst, mode=args.mode, timeout=args.timeout, progress=progress)
    seconds = time.monotonic() - t0
    bar.finish()
    with disk:
        info = disk.get_info()
        size = info.size_sectors * info.sector_size
        data = min(size, disk.mapped_pages() * disk.page_size)
    if args.json:
        entries, _ = inspect_all([dst])
        print_json(
            {
                "source": src,
                "name": dst,
                "size_bytes": size,
                "data_bytes": data,
                "seconds": round(seconds, 6),
                "disk": entries[0],
            }
        )
    elif not args.quiet:
        print(
            f"copied disk {src} to {dst}: {format_bytes_long(size)},"
            f" {format_bytes_long(data)} of data (holes stay holes), one point in time,"
            f" {_rate(data, seconds)}"
        )
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def register(sub: Any) -> None:
    """Add ``copy`` to the ``shmdisk`` subcommands."""
    p = subcommand(
        sub,
        "copy",
        "copy a disk into a new disk, at one point in time",
        "DST is a new disk with SRC's bytes, size, sector size, size limit and mode: a copy of\n"
        "one point in time (writers of SRC in every process wait until it is done), sparse\n"
        "(holes stay holes) and flat (an overlay's backing disks are copied in). DST appears\n"
        "only when complete: an interrupted copy leaves nothing. Holding writers off needs\n"
        "write access to SRC, or SRC frozen.\n"
        "\nexample:\n  shmdisk copy scratch scratch-backup\n"
        "  shmdisk copy --json work1 evidence | jq .data_bytes",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument(
        "--mode", type=_mode_arg, default=None, help="DST's permission bits, octal (default: SRC's)"
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="give up if SRC's writers in flight take longer than this to finish",
    )
    _add_progress(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print a summary and DST as JSON")
    p.set_defaults(func=cmd_copy)
