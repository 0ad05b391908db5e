"""``create``, ``destroy``, ``freeze`` and ``resize``: a disk's life cycle."""

from __future__ import annotations

import argparse
from typing import Any

import shmdisk
from shmdisk._layout import MAX_DISK_BYTES
from shmdisk._units import format_bytes_long, parse_size

from ._common import (
    CliError,
    UsageError,
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
    if args.size is None and args.backing is None:
        raise UsageError("SIZE is needed (only an overlay, --backing BASE, takes its base's)")
    sector_size = args.sector_size
    if sector_size is None:
        sector_size = _base_sector_size(args.backing) or shmdisk.DEFAULT_SECTOR_SIZE
    size = None if args.size is None else parse_size(args.size, sector_size)
    max_size = None if args.max_size is None else parse_size(args.max_size, sector_size)
    if max_size is not None:
        # Checked here so the message names the option, not the library's parameter.
        largest = MAX_DISK_BYTES // sector_size
        smallest = size if size is not None else shmdisk.inspect(args.backing).size_sectors or 0
        if not smallest <= max_size <= largest:
            raise CliError(
                f"--max-size {args.max_size} ({max_size} sectors) must lie between SIZE"
                f" ({smallest} sectors) and the largest disk ({largest} sectors,"
                f" {format_bytes_long(MAX_DISK_BYTES)})"
            )
    disk = shmdisk.create(
        args.name,
        size,
        args.sector_size,
        mode=args.mode,
        max_size_sectors=max_size,
        backing=args.backing,
    )
    info = disk.get_info()
    disk.disconnect()
    if args.json:
        entries, _ = inspect_all([args.name])
        print_json({"disk": entries[0]})
    elif not args.quiet:
        ss, n = info.sector_size, info.size_sectors
        over = f", an overlay of {args.backing}" if args.backing else ""
        print(
            f"created disk {args.name}: {format_bytes_long(n * ss)} ({n} sectors of {ss} bytes)"
            f"{over}"
        )
    return 0


def _base_sector_size(backing: str | None) -> int | None:
    """The sector size of the disk an overlay will be made on (None: no base, or unreadable;
    then creating says what is wrong)."""
    if backing is None:
        return None
    try:
        return shmdisk.inspect(backing).sector_size
    except shmdisk.DiskNotFoundError:
        raise CliError(f"no such disk: {backing} (the --backing disk)") from None


def _chain_depth(name: str) -> int:
    """How many backing disks lie under ``name`` (0 for a disk that is no overlay)."""
    depth = 0
    seen = {name}
    while True:
        try:
            backing = shmdisk.inspect(name).backing
        except (shmdisk.ShmdiskError, OSError):
            return depth
        if backing is None or backing in seen:
            return depth
        seen.add(backing)
        name, depth = backing, depth + 1


def cmd_destroy(args: argparse.Namespace) -> int:
    failed = False
    # Overlays before the disks they sit on, so `destroy base ovl` works in any order.
    for name in sorted(args.names, key=_chain_depth, reverse=True):
        try:
            if not disk_exists(name):
                if not args.force:
                    error(args.prog, f"no such disk: {name}")
                    failed = True
                continue
            shmdisk.destroy(name, force=args.force, owner=args.owner)
        except shmdisk.DiskBusyError as exc:
            users = ", ".join(getattr(exc, "overlays", [])) or "overlays"
            error(
                args.prog,
                f"disk {name} backs {users}: destroy them first, or destroy it with"
                " --force (they then lose their base)",
            )
            failed = True
            continue
        except (shmdisk.ShmdiskError, OSError) as exc:
            error(args.prog, f"{name}: {describe(exc)}")
            failed = True
            continue
        if args.verbose:
            print(f"destroyed disk {name}")
    return 1 if failed else 0


def cmd_freeze(args: argparse.Namespace) -> int:
    failed = False
    for name in args.names:
        try:
            with connect(name, read_only=False) as disk:
                was = disk.frozen
                disk.freeze()
        except (CliError, shmdisk.ShmdiskError, OSError) as exc:
            error(args.prog, f"{name}: {describe(exc)}")
            failed = True
            continue
        if not args.quiet and not args.json:
            print(f"disk {name} {'was frozen already' if was else 'is frozen: read-only for good'}")
    if args.json:
        entries, _ = inspect_all([n for n in args.names if disk_exists(n)])
        print_json({"disks": entries})
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
    """Add ``create``, ``destroy``, ``freeze`` and ``resize`` to the ``shmdisk`` subcommands."""
    p = subcommand(
        sub,
        "create",
        "create a new empty disk, or an overlay of a frozen one",
        "SIZE is in sectors (65536) or bytes with a unit: 64M, 64MiB, 1.5G, 1T (powers of 1024).\n"
        "With --backing BASE the new disk is a copy-on-write overlay of the frozen disk BASE:\n"
        "made at once whatever BASE's size, it reads as BASE until written and costs only what\n"
        "is written to it. SIZE then defaults to BASE's (a larger one reads zeros past BASE).\n"
        "\nexample:\n  shmdisk create scratch 64M\n  shmdisk create big 1T --sector-size 4K\n"
        "  shmdisk freeze golden && shmdisk create work --backing golden",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("size", metavar="SIZE", nargs="?", help="needed unless --backing is given")
    p.add_argument(
        "--backing",
        metavar="BASE",
        help="make a copy-on-write overlay of the frozen disk BASE (see `shmdisk freeze`)",
    )
    p.add_argument(
        "--sector-size",
        type=sector_size_arg,
        default=None,
        metavar="BYTES",
        help="sector size, a power of two from 512 to 64K (default: 512, or BASE's)",
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
        "Processes still connected see DisconnectedError on their next request. A frozen disk\n"
        "that overlays are made on is refused (they would lose their base) unless --force;\n"
        "overlays named with their base go first, so one command removes a whole chain.\n"
        "\nexample:\n  shmdisk destroy scratch\n  shmdisk destroy -f maybe-there\n"
        "  shmdisk destroy golden work1 work2",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="a missing disk is not an error; a base is destroyed under its overlays",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print each disk removed")
    add_owner_argument(
        p,
        "destroy USER's disk as your own: wait for its I/O in flight and disconnect its"
        " handles (another user's segment is otherwise only unlinked, where you may)",
    )
    p.set_defaults(func=cmd_destroy)

    p = subcommand(
        sub,
        "freeze",
        "make disks read-only for good, so overlays can be made on them",
        "A frozen disk refuses writes, discards and resizes from every handle in every process,\n"
        "for good; reads go on. Only a frozen disk can back overlays (create --backing), and it\n"
        "cannot be destroyed while they exist (unless destroy --force).\n"
        "\nexample:\n  shmdisk freeze golden\n  shmdisk create test1 --backing golden",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print the disks as `ls --json`")
    p.set_defaults(func=cmd_freeze)

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
