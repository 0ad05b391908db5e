"""``create``, ``destroy`` and ``resize``: a disk's life cycle."""

from __future__ import annotations

import argparse
from typing import Any

import shmdisk
from shmdisk._layout import MAX_DISK_BYTES
from shmdisk._units import format_bytes_long, parse_size

from ._common import (
    CliError,
    add_owner_argument,
    connect,
    describe,
    disk_exists,
    error,
    print_json,
    sector_size_arg,
    subcommand,
)
from ._ls import inspect_all


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size, args.sector_size)
    max_size = None if args.max_size is None else parse_size(args.max_size, args.sector_size)
    if max_size is not None:
        # Checked here so the message names the option, not the library's parameter.
        largest = MAX_DISK_BYTES // args.sector_size
        if not size <= max_size <= largest:
            raise CliError(
                f"--max-size {args.max_size} ({max_size} sectors) must lie between SIZE"
                f" ({size} sectors) and the largest disk ({largest} sectors,"
                f" {format_bytes_long(MAX_DISK_BYTES)})"
            )
    disk = shmdisk.create(
        args.name, size, args.sector_size, mode=args.mode, max_size_sectors=max_size
    )
    disk.disconnect()
    if args.json:
        entries, _ = inspect_all([args.name])
        print_json({"disk": entries[0]})
    elif not args.quiet:
        print(
            f"created disk {args.name}: {format_bytes_long(size * args.sector_size)}"
            f" ({size} sectors of {args.sector_size} bytes)"
        )
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    failed = False
    for name in args.names:
        try:
            if not disk_exists(name):
                if not args.force:
                    error(args.prog, f"no such disk: {name}")
                    failed = True
                continue
            shmdisk.destroy(name, owner=args.owner)
        except (shmdisk.ShmdiskError, OSError) as exc:
            error(args.prog, f"{name}: {describe(exc)}")
            failed = True
            continue
        if args.verbose:
            print(f"destroyed disk {name}")
    return 1 if failed else 0


def cmd_resize(args: argparse.Namespace) -> int:
    with connect(args.name, read_only=False, owner=args.owner) as disk:
        before = disk.get_info()
        text = args.size
        sign = text[:1] if text[:1] in "+-" else ""
        delta = parse_size(text[len(sign) :], before.sector_size)
        if sign == "+":
            size = before.size_sectors + delta
        elif sign == "-":
            size = before.size_sectors - delta
        else:
            size = delta
        if size < 0:
            raise CliError(f"cannot shrink disk {args.name} below 0 sectors")
        if size < before.size_sectors and not args.shrink:
            raise CliError(
                f"shrinking disk {args.name} from {before.size_sectors} to {size} sectors drops"
                " the data at its end; add --shrink to do it anyway"
            )
        limit = shmdisk.inspect(args.name).max_size_sectors
        if limit is not None and size > limit:
            ss = before.sector_size
            raise CliError(
                f"disk {args.name} may grow to {limit} sectors"
                f" ({format_bytes_long(limit * ss)}) at most, the limit set when it was created"
                " (shmdisk create --max-size); nothing changed"
            )
        disk.resize(size)
        after = disk.get_info()
    if args.json:
        print_json(
            {
                "name": args.name,
                "sector_size": after.sector_size,
                "old_size_sectors": before.size_sectors,
                "size_sectors": after.size_sectors,
            }
        )
    elif not args.quiet:
        ss = after.sector_size
        print(
            f"resized disk {args.name}: {format_bytes_long(before.size_sectors * ss)}"
            f" -> {format_bytes_long(after.size_sectors * ss)} ({after.size_sectors} sectors)"
        )
    return 0


def _mode_arg(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r} (octal, e.g. 0600)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r} (0000 to 0777)")
    return mode


def register(sub: Any) -> None:
    """Add ``create``, ``destroy`` and ``resize`` to the ``shmdisk`` subcommands."""
    p = subcommand(
        sub,
        "create",
        "create a new empty disk",
        "SIZE is in sectors (65536) or bytes with a unit: 64M, 64MiB, 1.5G, 1T (powers of 1024).\n"
        "\nexample:\n  shmdisk create scratch 64M\n  shmdisk create big 1T --sector-size 4K",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE")
    p.add_argument(
        "--sector-size",
        type=sector_size_arg,
        default=shmdisk.DEFAULT_SECTOR_SIZE,
        metavar="BYTES",
        help="sector size, a power of two from 512 to 64K (default: %(default)s)",
    )
    p.add_argument("--max-size", metavar="SIZE", help="the largest size a later resize may reach")
    p.add_argument(
        "--mode", type=_mode_arg, default=0o600, help="permission bits, octal (default: 0600)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print the new disk as `info --json`")
    p.set_defaults(func=cmd_create)

    p = subcommand(
        sub,
        "destroy",
        "remove disks",
        "Processes still connected see DisconnectedError on their next request.\n"
        "\nexample:\n  shmdisk destroy scratch\n  shmdisk destroy -f maybe-there",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="a missing disk is not an error")
    p.add_argument("-v", "--verbose", action="store_true", help="print each disk removed")
    add_owner_argument(
        p,
        "destroy USER's disk as your own: wait for its I/O in flight and disconnect its"
        " handles (another user's segment is otherwise only unlinked, where you may)",
    )
    p.set_defaults(func=cmd_destroy)

    p = subcommand(
        sub,
        "resize",
        "grow or shrink a disk",
        "SIZE is absolute, or relative with + or -, in sectors or with a unit.\n"
        "Shrinking drops the data at the end and needs --shrink, as with qemu-img resize.\n"
        "\nexample:\n  shmdisk resize scratch 128M\n  shmdisk resize scratch +1G\n"
        "  shmdisk resize --shrink scratch -- -512M",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="[+|-]SIZE")
    p.add_argument("--shrink", action="store_true", help="allow the disk to get smaller")
    add_owner_argument(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print the old and new size as JSON")
    p.set_defaults(func=cmd_resize)
