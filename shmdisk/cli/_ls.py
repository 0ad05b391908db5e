"""``ls``, ``info`` and ``shmdisk-ls``: what is on the machine, straight from
``shmdisk.inspect``, so a corrupt or half-created segment is reported, never repaired or removed.

Also finds the processes holding each disk open (HOLDERS), from /proc.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import grp
import os
import pwd
import time
from collections.abc import Sequence
from typing import Any

import shmdisk
from shmdisk._units import format_bytes, format_bytes_long

from ._common import CliError, describe, error, print_json, subcommand, table

# --------------------------------------------------------------------------------------------
# Formatting


def _owner(uid: int | None) -> str:
    if uid is None:
        return "-"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int | None) -> str:
    if gid is None:
        return "-"
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _short_time(ns: int | None, now: float | None = None) -> str:
    """``ls -l`` style: the time of day within half a year, the year otherwise."""
    if ns is None:
        return "-"
    when = _dt.datetime.fromtimestamp(ns / 1e9)
    now = time.time() if now is None else now
    if abs(now - ns / 1e9) < 182 * 86400:
        return when.strftime("%b %d %H:%M")
    return when.strftime("%b %d  %Y")


def _iso_time(ns: int | None) -> str | None:
    if ns is None:
        return None
    when = _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _access(path: str) -> str:
    """What the calling user may do with the segment: ``rw``, ``ro`` or ``--``."""
    if os.access(path, os.R_OK | os.W_OK):
        return "rw"
    if os.access(path, os.R_OK):
        return "ro"
    return "--"


# --------------------------------------------------------------------------------------------
# Who holds a disk open


def _scan_holders(paths: set[str]) -> tuple[dict[str, set[int]], bool]:
    """Pids whose open fds or memory mappings refer to each path, and whether every process
    could be looked at (another user's /proc/PID/fd is closed to non-root callers).

    A handle keeps the segment's fd open (for fallocate and fstat) and the segment mapped;
    maps also catches a process that closed its fds but kept a mapping.
    """
    found: dict[str, set[int]] = {p: set() for p in paths}
    if not paths:
        return found, True
    wanted = {p.encode(): p for p in paths}
    complete = True
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found, False
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        base = f"/proc/{entry}"
        try:
            fds = os.listdir(f"{base}/fd")
        except PermissionError:
            complete = False
            fds = []
        except OSError:  # the process exited while we looked
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if target in found:
                found[target].add(pid)
        try:
            with open(f"{base}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            # Unreadable maps (e.g. a sandbox's init, even for root) do not make the count
            # unknown: a connected handle always keeps the segment's fds open, seen above.
            continue
        if b"/dev/shm/" not in maps:
            continue
        for line in maps.splitlines():
            # "start-end perms offset dev inode   pathname"; the pathname may contain spaces.
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5] in wanted:
                found[wanted[parts[5]]].add(pid)
    return found, complete


# --------------------------------------------------------------------------------------------
# ls and info


def _backing_lost(info: shmdisk.SegmentInfo) -> bool | None:
    """Whether an overlay's backing disk is gone (destroyed, or another disk under its name);
    None for a disk that is no overlay."""
    if info.backing is None:
        return None
    try:
        base = shmdisk.inspect(info.backing)
    except shmdisk.DiskNotFoundError:
        return True
    except (shmdisk.ShmdiskError, OSError):
        return None  # cannot tell
    return base.state != "ok" or base.created_ns != info.backing_created_ns


def _entry(info: shmdisk.SegmentInfo, holders: set[int] | None) -> dict[str, Any]:
    """One disk as ``ls --json`` and ``info --json`` show it."""
    sector_size = info.sector_size
    size_sectors = info.size_sectors
    size_bytes = None
    if sector_size is not None and size_sectors is not None:
        size_bytes = sector_size * size_sectors
    mapped_bytes = None
    mapped_percent = None
    if info.mapped_pages is not None and info.page_size is not None and size_bytes is not None:
        # A partly used last page counts once, never more than the disk holds.
        mapped_bytes = min(info.mapped_pages * info.page_size, size_bytes)
        mapped_percent = round(100.0 * mapped_bytes / size_bytes, 2) if size_bytes else 0.0
    max_bytes = None
    if info.max_size_sectors is not None and sector_size is not None:
        max_bytes = info.max_size_sectors * sector_size
    return {
        "name": info.name,
        "path": info.path,
        "state": info.state,
        "problem": info.problem,
        "size_bytes": size_bytes,
        "size_sectors": size_sectors,
        "sector_size": sector_size,
        "page_size": info.page_size,
        "max_size_sectors": info.max_size_sectors,
        "max_size_bytes": max_bytes,
        "mapped_pages": info.mapped_pages,
        "mapped_bytes": mapped_bytes,
        "mapped_percent": mapped_percent,
        "allocated_bytes": info.allocated_bytes,
        "file_bytes": info.file_bytes,
        # A frozen disk is read-only for everyone, whatever its mode.
        "access": "ro" if info.frozen and _access(info.path) == "rw" else _access(info.path),
        "frozen": info.frozen,
        "backing": info.backing,
        "backing_lost": _backing_lost(info),
        "owner": _owner(info.uid),
        "uid": info.uid,
        "gid": info.gid,
        "mode": f"{info.mode:04o}",
        "created": _iso_time(info.created_ns),
        "created_ns": info.created_ns,
        "creator_pid": info.creator_pid,
        "creator_uid": info.creator_uid,
        "generation": info.generation,
        "holders": None if holders is None else len(holders),
        "holder_pids": None if holders is None else sorted(holders),
    }


def inspect_all(names: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Entries for ``names`` (all disks when empty) and error lines for names that failed."""
    explicit = bool(names)
    if not explicit:
        names = sorted(shmdisk.list_disks())
    infos = []
    errors = []
    for name in names:
        try:
            # inspect describes FIFOs, directories and symlinks without opening them, and
            # another user's disk this user may not read from its file alone ("unreadable").
            infos.append(shmdisk.inspect(name))
        except shmdisk.DiskNotFoundError:
            # Destroyed between list_disks() and inspect(): only worth an error when asked for.
            if explicit:
                errors.append(f"no such disk: {name}")
        except (shmdisk.ShmdiskError, OSError) as exc:
            errors.append(f"{name}: {describe(exc)}")
    holders, complete = _scan_holders({i.path for i in infos})
    entries = [_entry(i, holders[i.path] if complete else None) for i in infos]
    return entries, errors


_LS_COLUMNS = (
    "NAME",
    "SIZE",
    "SECTOR",
    "PAGE",
    "MAPPED",
    "USE%",
    "MEM",
    "RW",
    "OWNER",
    "MODE",
    "CREATED",
    "HOLDERS",
    "BASE",
    "STATE",
)
_LS_RIGHT = {"SIZE", "SECTOR", "PAGE", "MAPPED", "USE%", "MEM", "HOLDERS"}


def _ls_cells(e: dict[str, Any], in_bytes: bool) -> dict[str, str]:
    def size(n: int | None) -> str:
        if n is None:
            return "-"
        return str(n) if in_bytes else format_bytes(n)

    def plain(n: int | None) -> str:
        return "-" if n is None else str(n)

    pct = e["mapped_percent"]
    state = e["state"] if e["problem"] is None else f"{e['state']}: {e['problem']}"
    if state == "ok" and e["frozen"]:
        state = "frozen"
    base = "-" if e["backing"] is None else e["backing"]
    if e["backing_lost"]:
        base += " (gone)"
    return {
        "NAME": e["name"],
        "SIZE": size(e["size_bytes"]),
        "SECTOR": plain(e["sector_size"]),
        "PAGE": plain(e["page_size"]),
        "MAPPED": size(e["mapped_bytes"]),
        "USE%": "-" if pct is None else f"{pct:.1f}%",
        "MEM": size(e["allocated_bytes"]),
        "RW": e["access"],
        "OWNER": e["owner"],
        "MODE": e["mode"],
        "CREATED": _short_time(e["created_ns"]),
        "HOLDERS": "?" if e["holders"] is None else str(e["holders"]),
        "BASE": base,
        "STATE": state,
    }


def _parse_columns(text: str | None) -> list[str]:
    if text is None:
        return list(_LS_COLUMNS)
    columns = [c.strip().upper() for c in text.split(",") if c.strip()]
    unknown = [c for c in columns if c not in _LS_COLUMNS]
    if unknown or not columns:
        raise CliError(
            f"unknown column {', '.join(unknown) or repr(text)};"
            f" choose from {','.join(_LS_COLUMNS)}"
        )
    return columns


def cmd_ls(args: argparse.Namespace) -> int:
    columns = _parse_columns(args.output)
    entries, errors = inspect_all(args.names)
    if args.json:
        print_json({"disks": entries})
    else:
        rows = []
        for e in entries:
            cells = _ls_cells(e, args.bytes)
            rows.append([cells[c] for c in columns])
        lines = table(columns, rows, _LS_RIGHT)
        print("\n".join(lines[1:] if args.noheadings else lines))
    for line in errors:
        error(args.prog, line)
    return 1 if errors else 0


def cmd_info(args: argparse.Namespace) -> int:
    entries, errors = inspect_all([args.name])
    if errors:
        raise CliError(errors[0])
    e = entries[0]
    if e["state"] == "ok":
        e["overlays"] = _overlays(args.name)
    if args.json:
        print_json({"disk": e, "engine": shmdisk.ENGINE})
        return 0

    def size(n: int | None) -> str:
        if n is None:
            return "unknown"
        if args.bytes or n < 1024:
            return f"{n} bytes"
        return f"{format_bytes_long(n)} ({n} bytes)"

    state = e["state"] if e["problem"] is None else f"{e['state']}: {e['problem']}"
    lines = [("name", e["name"]), ("path", e["path"]), ("state", state)]
    if e["size_bytes"] is not None:
        lines.append(("size", f"{size(e['size_bytes'])}, {e['size_sectors']} sectors"))
        lines.append(("sector size", f"{e['sector_size']} bytes"))
        lines.append(("page size", f"{e['page_size']} bytes"))
        lines.append(("max size", f"{size(e['max_size_bytes'])}, {e['max_size_sectors']} sectors"))
        pct = e["mapped_percent"]
        pages = e["mapped_pages"]
        lines.append(("mapped", f"{size(e['mapped_bytes'])}, {pct:.1f}%, {pages} pages"))
    lines.append(("memory used", size(e["allocated_bytes"])))
    if e["state"] == "ok":
        lines.append(("frozen", "yes: read-only for good" if e["frozen"] else "no"))
    if e["backing"] is not None:
        gone = " (gone: the overlay cannot be used)" if e["backing_lost"] else ""
        lines.append(("backing", f"{e['backing']}{gone}; mapped counts this overlay's own data"))
    if e.get("overlays"):
        lines.append(("overlays", ", ".join(e["overlays"])))
    lines.append(
        ("owner", f"{e['owner']}:{_group(e['gid'])}, mode {e['mode']} ({e['access']} for you)")
    )
    if e["created_ns"] is not None:
        when = _dt.datetime.fromtimestamp(e["created_ns"] / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(("created", f"{when} by pid {e['creator_pid']} ({_owner(e['creator_uid'])})"))
        lines.append(("generation", str(e["generation"])))
    if e["holders"] is None:
        lines.append(("holders", "? (not every process could be looked at)"))
    else:
        pids = ", ".join(map(str, e["holder_pids"]))
        lines.append(("holders", f"{e['holders']}" + (f" (pids {pids})" if pids else "")))
    lines.append(("engine", f"{shmdisk.ENGINE or 'none on this platform'} (this process)"))
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    return 0


def _overlays(name: str) -> list[str]:
    """The disks made on this one (``shmdisk destroy`` refuses it while they exist)."""
    try:
        info = shmdisk.inspect(name)
    except (shmdisk.ShmdiskError, OSError):
        return []
    if not info.frozen:
        return []  # only a frozen disk can back overlays
    users = []
    for other in shmdisk.list_disks():
        try:
            o = shmdisk.inspect(other)
        except (shmdisk.ShmdiskError, OSError):
            continue
        if o.backing == name and o.backing_created_ns == info.created_ns:
            users.append(other)
    return users


def add_ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME", help="only these disks")
    p.add_argument("-b", "--bytes", action="store_true", help="print sizes in bytes")
    p.add_argument("-n", "--noheadings", action="store_true", help="do not print the header")
    p.add_argument(
        "-o",
        "--output",
        metavar="LIST",
        help=f"columns to print, comma-separated ({','.join(_LS_COLUMNS)})".replace("%", "%%"),
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_ls)


LS_DESCRIPTION = """\
List every shmdisk on the machine (or only NAME...), like lsblk: size, sector and page size,
how much holds data (MAPPED, USE%), the memory the segment really uses (MEM), what you may do
with it (RW: rw, ro or --), owner, mode, creation time, the processes holding it open (HOLDERS,
"?" when not every process can be looked at), the disk an overlay is made on (BASE; MAPPED is
then the overlay's own data) and its STATE ("frozen": read-only for good). A corrupt,
half-created or foreign-version segment is listed with its state and never modified; another
user's disk that you may not read is listed as unreadable, with its owner, mode and memory."""

LS_EPILOG = """\
examples:
  %(prog)s                      all disks
  %(prog)s -b scratch           one disk, sizes in bytes
  %(prog)s -o NAME,SIZE,HOLDERS --noheadings
  %(prog)s --json               {"version": 1, "disks": [{"name": ..., "size_sectors": ...}]}"""


def register(sub: Any) -> None:
    """Add ``ls`` and ``info`` to the ``shmdisk`` subcommands."""
    p = subcommand(sub, "ls", "list disks", LS_EPILOG.replace("%(prog)s", "shmdisk ls"))
    p.description = LS_DESCRIPTION
    add_ls_arguments(p)

    p = subcommand(
        sub,
        "info",
        "show everything known about one disk",
        "example:\n  shmdisk info scratch\n  shmdisk info --json scratch",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("-b", "--bytes", action="store_true", help="print sizes in bytes only")
    p.add_argument("--json", action="store_true", help='print {"version": 1, "disk": {...}}')
    p.set_defaults(func=cmd_info)
