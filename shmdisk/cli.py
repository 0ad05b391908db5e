"""The ``shmdisk`` and ``shmdisk-ls`` commands.

``main(argv) -> int`` and ``ls_main(argv) -> int`` never call ``sys.exit`` themselves, so tests and
other programs can call them. Exit codes: 0 ok, 1 failed, 2 usage error, 130 interrupted (Ctrl-C;
143 when ``demo`` is stopped by SIGTERM).
Every failure is one line ``shmdisk: error: ...`` on stderr; everything a script may want to read
has ``--json``, an object whose ``"version"`` key is bumped when a field changes meaning.

Only the public API is used, and ``ls``/``info`` only ever ``shmdisk.inspect`` a segment, so a
corrupt or half-created one is reported, never repaired or removed behind the user's back.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import importlib
import json
import multiprocessing
import os
import pwd
import queue as _queue
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import shmdisk
from shmdisk._render import GLYPHS_ASCII, GLYPHS_UNICODE, render_map
from shmdisk._units import format_bytes, format_bytes_long, parse_bytes, parse_size

__all__ = ["JSON_VERSION", "ls_main", "main"]

#: Version of every ``--json`` document; bumped when a key changes meaning or disappears.
JSON_VERSION = 1

_CHUNK = 1 << 20  # bytes per read/write while copying images: large enough to run at memcpy speed


class CliError(Exception):
    """A failure reported as one line on stderr with exit code 1."""


# --------------------------------------------------------------------------------------------
# Output helpers


def _print_json(doc: dict[str, Any], stream: IO[str] | None = None) -> None:
    print(json.dumps({"version": JSON_VERSION, **doc}, indent=2), file=stream or sys.stdout)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[str], sep: str = " "
) -> list[str]:
    """Aligned columns like ``lsblk``: numbers right-aligned, the last column never padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if headers[i] in right:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell if last else cell.ljust(widths[i]))
        lines.append(sep.join(cells).rstrip())
    return lines


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
    import grp  # local: only `info` needs group names

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
    when = _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc)
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

    A handle keeps the segment's fds open (its OFD locks live on them) and the segment mapped;
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


def _entry(info: Any, holders: set[int] | None) -> dict[str, Any]:
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
        "access": _access(info.path),
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


def _inspect(name: str) -> shmdisk.SegmentInfo:
    """``shmdisk.inspect``, but a FIFO or device wearing our prefix is described, not opened:
    opening a FIFO for reading blocks until a writer appears, which may be never."""
    st = os.lstat(shmdisk.segment_path(name)) if _exists(name) else None
    if st is None or stat.S_ISREG(st.st_mode):
        return shmdisk.inspect(name)
    kind = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
    if stat.S_ISFIFO(st.st_mode):
        kind = "fifo"
    return shmdisk.SegmentInfo(
        name=name,
        path=shmdisk.segment_path(name),
        state="corrupt",
        problem=f"not a regular file but a {kind}",
        sector_size=None,
        page_size=None,
        size_sectors=None,
        max_size_sectors=None,
        mapped_pages=None,
        generation=None,
        created_ns=None,
        creator_pid=None,
        creator_uid=None,
        uid=st.st_uid,
        gid=st.st_gid,
        mode=stat.S_IMODE(st.st_mode),
        file_bytes=st.st_size,
        allocated_bytes=st.st_blocks * 512,
    )


def _inspect_all(names: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Entries for ``names`` (all disks when empty) and error lines for names that failed."""
    explicit = bool(names)
    if not explicit:
        names = sorted(shmdisk.list_disks())
    infos = []
    errors = []
    for name in names:
        try:
            infos.append(_inspect(name))
        except shmdisk.DiskNotFoundError:
            # Destroyed between list_disks() and inspect(): only worth an error when asked for.
            if explicit:
                errors.append(f"no such disk: {name}")
        except (shmdisk.ShmdiskError, OSError) as exc:
            errors.append(f"{name}: {_describe(exc)}")
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
    entries, errors = _inspect_all(args.names)
    if args.json:
        _print_json({"disks": entries})
    else:
        rows = []
        for e in entries:
            cells = _ls_cells(e, args.bytes)
            rows.append([cells[c] for c in columns])
        lines = _table(columns, rows, _LS_RIGHT)
        print("\n".join(lines[1:] if args.noheadings else lines))
    for line in errors:
        _error(args.prog, line)
    return 1 if errors else 0


def cmd_info(args: argparse.Namespace) -> int:
    entries, errors = _inspect_all([args.name])
    if errors:
        raise CliError(errors[0])
    e = entries[0]
    if args.json:
        _print_json({"disk": e})
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
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    return 0


# --------------------------------------------------------------------------------------------
# create, destroy, resize


def _sector_size_arg(text: str) -> int:
    value, _ = parse_bytes(text)  # "4096" and "4K" both mean bytes here
    # Checked here too, so that `create x 1M --sector-size 1000` blames the sector size, not 1M.
    if value < 512 or value > 65536 or value & (value - 1):
        raise ValueError(f"invalid sector size {text!r}: a power of two from 512 to 64K")
    return value


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size, args.sector_size)
    max_size = None if args.max_size is None else parse_size(args.max_size, args.sector_size)
    disk = shmdisk.create(
        args.name, size, args.sector_size, mode=args.mode, max_size_sectors=max_size
    )
    disk.disconnect()
    if args.json:
        entries, _ = _inspect_all([args.name])
        _print_json({"disk": entries[0]})
    elif not args.quiet:
        print(
            f"created disk {args.name}: {format_bytes_long(size * args.sector_size)}"
            f" ({size} sectors of {args.sector_size} bytes)"
        )
    return 0


def _exists(name: str) -> bool:
    return os.path.lexists(shmdisk.segment_path(name))


def cmd_destroy(args: argparse.Namespace) -> int:
    failed = False
    for name in args.names:
        try:
            if not _exists(name):
                if not args.force:
                    _error(args.prog, f"no such disk: {name}")
                    failed = True
                continue
            shmdisk.destroy(name)
        except (shmdisk.ShmdiskError, OSError) as exc:
            _error(args.prog, f"{name}: {_describe(exc)}")
            failed = True
            continue
        if args.verbose:
            print(f"destroyed disk {name}")
    return 1 if failed else 0


def cmd_resize(args: argparse.Namespace) -> int:
    with _connect(args.name, read_only=False) as disk:
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
        disk.resize(size)
        after = disk.get_info()
    if args.json:
        _print_json(
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


@contextlib.contextmanager
def _connect(name: str, *, read_only: bool) -> Iterator[shmdisk.Disk]:
    """Connect to an existing disk; never create one as a side effect of looking at it."""
    try:
        disk = shmdisk.connect(name, read_only=read_only, create=False)
    except shmdisk.DiskNotFoundError:
        raise CliError(f"no such disk: {name}") from None
    try:
        yield disk
    finally:
        disk.disconnect()


# --------------------------------------------------------------------------------------------
# map


def cmd_map(args: argparse.Namespace) -> int:
    with _connect(args.name, read_only=True) as disk:
        info = disk.get_info()
        extents = [(x.sector, x.n_sectors, x.mapped) for x in disk.extents()]
        page_size = disk.page_size
    ss, size = info.sector_size, info.size_sectors
    data_sectors = sum(n for _, n, mapped in extents if mapped)
    if args.json:
        _print_json(
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
    glyphs = GLYPHS_ASCII if args.ascii or not _can_draw_unicode() else GLYPHS_UNICODE
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
    print("\n".join(_table(headers, rows, {"START", "END", "SECTORS", "OFFSET", "LENGTH"})))
    if len(shown) < len(extents):
        print(f"... {len(extents) - len(shown)} more extents (--all shows them, --json too)")
    return 0


def _can_draw_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or ""
    return encoding.lower().replace("-", "") in {"utf8", "utf16", "utf32"}


# --------------------------------------------------------------------------------------------
# import and export


class _Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled and total > 0
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        frac = min(1.0, done / self.total)
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        rate = done / max(now - self.start, 1e-6)
        sys.stderr.write(
            f"\r{self.label} {frac * 100:5.1f}% [{bar}] {format_bytes(done)}/"
            f"{format_bytes(self.total)} {format_bytes(int(rate))}/s "
        )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(self.total, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def _progress_enabled(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def _data_ranges(fd: int, size: int, granule: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of a file that may hold data, widened to ``granule``.

    SEEK_DATA/SEEK_HOLE (Linux 3.1+, tmpfs, ext4, xfs, btrfs) let a sparse image skip its holes
    without reading them; where they are not supported the whole file is one range.
    """
    ranges: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after `offset`: the rest is a hole
                    break
                raise
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            start = data // granule * granule
            end = min(size, -(-hole // granule) * granule)
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(end, ranges[-1][1]))
            else:
                ranges.append((start, end))
            offset = hole
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE):
            raise
        return [(0, size)] if size else []
    return ranges


def _nonzero_runs(buf: memoryview, length: int, granule: int) -> list[tuple[int, int]]:
    """``[start, end)`` runs within ``buf[:length]`` whose granules are not all zero bytes.

    ``buf`` must be zero-filled up to a whole granule past ``length``; numpy's ``any`` looks at
    a MiB in ~40 us, where comparing memoryviews in Python takes ~1.7 ms.
    """
    import numpy as np

    padded = -(-length // granule) * granule
    words = np.frombuffer(buf[:padded], dtype=np.uint64).reshape(-1, granule // 8)
    flags = words.any(axis=1)
    runs: list[tuple[int, int]] = []
    if not flags.any():
        return runs
    # Indices where the flag changes give the run boundaries without a Python loop per granule.
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flags, [False])).astype(np.int8)))
    for first, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        runs.append((first * granule, min(stop * granule, length)))
    return runs


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CliError("the input file got shorter while it was being read")
        done += n


def _write_full(fd: int, data: memoryview, offset: int | None) -> None:
    done = 0
    while done < len(data):
        if offset is None:
            n = os.write(fd, data[done:])
        else:
            n = os.pwrite(fd, data[done:], offset + done)
        done += n


def _spool(src_fd: int, limit: int, granule: int) -> IO[bytes]:
    """Copy a pipe into a sparse temporary file, at most ``limit + 1`` bytes of it.

    A stream's length is unknown until its end, but an oversized image must be refused before
    any byte reaches the disk; the spool is bounded by the disk's size, so it never grows
    without limit, and its zero granules are left as holes.
    """
    spool = tempfile.TemporaryFile(prefix="shmdisk-import-")  # noqa: SIM115  returned open
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    total = 0
    while total <= limit:
        n = os.readv(src_fd, [view])
        if n == 0:
            break
        # Fill the rest of the last granule with zeros so _nonzero_runs sees no stale bytes.
        view[n : -(-n // granule) * granule] = bytes(-(-n // granule) * granule - n)
        for start, end in _nonzero_runs(view, n, granule):
            _write_full(spool.fileno(), view[start:end], total + start)
        total += n
    os.ftruncate(spool.fileno(), total)
    return spool


def cmd_import(args: argparse.Namespace) -> int:
    name, path = args.name, args.file
    label = "stdin" if path == "-" else path
    created = False
    disk: shmdisk.Disk | None = None
    spool: IO[bytes] | None = None
    src: IO[bytes] | None = None
    try:
        if path == "-":
            src_fd = sys.stdin.fileno()
        else:
            src = open(path, "rb")  # noqa: SIM115  closed in finally with the rest
            src_fd = src.fileno()
        exists = _exists(name)
        if not exists and not args.create:
            raise CliError(
                f"no such disk: {name}; nothing written (add --create to make one the size of"
                " the image)"
            )
        if exists:
            if not os.access(shmdisk.segment_path(name), os.W_OK):
                raise CliError(f"disk {name} is read-only for this user; nothing written")
            disk = shmdisk.connect(name, create=False)
            if not disk.get_info().read_write:
                raise CliError(f"disk {name} is read-only; nothing written")
            sector_size = disk.sector_size
            capacity = disk.get_info().size_sectors * sector_size
        else:
            sector_size = args.sector_size
            capacity = None
        if not stat.S_ISREG(os.fstat(src_fd).st_mode):
            # Bounded by the disk (or, with --create, by what /dev/shm could ever hold).
            limit = capacity if capacity is not None else shutil.disk_usage("/dev/shm").free
            spool = _spool(src_fd, limit, 4096)
            src_fd = spool.fileno()
        image_size = os.fstat(src_fd).st_size
        if spool is not None and capacity is not None and image_size > capacity:
            # The spool stopped reading at the disk's size: the stream's real length is unknown.
            raise CliError(
                f"{label} holds more than disk {name} ({format_bytes_long(capacity)},"
                f" {capacity} bytes); nothing written"
            )
        remainder = image_size % sector_size
        if remainder and not args.pad:
            raise CliError(
                f"{label} is {image_size} bytes, not a whole number of {sector_size}-byte"
                f" sectors; nothing written (add --pad to fill its last sector with zeros)"
            )
        image_sectors = -(-image_size // sector_size)
        if capacity is not None and image_sectors * sector_size > capacity:
            raise CliError(
                f"{label} is {format_bytes_long(image_size)} ({image_size} bytes) but disk {name}"
                f" holds {format_bytes_long(capacity)} ({capacity} bytes); nothing written"
                f" (grow it first: shmdisk resize {name} {image_sectors})"
            )
        if disk is None:
            disk = shmdisk.create(name, image_sectors, sector_size)
            created = True
        t0 = time.monotonic()
        data_bytes = _copy_in(disk, src_fd, image_size, label, _progress_enabled(args))
        seconds = time.monotonic() - t0
    except BaseException:
        if created:
            # A disk this command made and failed to fill is not left behind half-written.
            if disk is not None:
                disk.disconnect()
            shmdisk.destroy(name)
        raise
    finally:
        if disk is not None:
            disk.disconnect()
        for f in (spool, src):
            if f is not None:
                f.close()
    summary = {
        "name": name,
        "file": path,
        "image_bytes": image_size,
        "data_bytes": data_bytes,
        "hole_bytes": image_size - data_bytes,
        "created": created,
        "seconds": round(seconds, 6),
    }
    if args.json:
        _print_json(summary)
    elif not args.quiet:
        print(
            f"imported {label} into disk {name}{' (created)' if created else ''}:"
            f" {format_bytes_long(image_size)}, {format_bytes_long(data_bytes)} of data written,"
            f" {format_bytes_long(image_size - data_bytes)} left as holes,"
            f" {_rate(image_size, seconds)}"
        )
    return 0


def _rate(n: int, seconds: float) -> str:
    took = f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    return f"{took} ({format_bytes(int(n / max(seconds, 1e-6)))}/s)"


def _copy_in(disk: shmdisk.Disk, fd: int, size: int, label: str, progress: bool) -> int:
    """Write the image's data granules to the disk and discard the rest; bytes of data."""
    ss = disk.sector_size
    granule = max(disk.page_size, ss)
    chunk = max(granule, _CHUNK // granule * granule)
    buf = bytearray(chunk)
    view = memoryview(buf)
    bar = _Progress(f"import {label}", size, progress)
    written = 0
    pos = 0  # everything before `pos` is done: written, or discarded as a hole

    def hole(start: int, end: int) -> None:
        # Holes in the image become holes on the disk: old data there must read as zeros, and
        # discard gives its pages back instead of writing zeros into them.
        first = -(-start // ss)
        last = -(-end // ss)
        if last > first:
            disk.discard(first, last - first)

    for start, end in _data_ranges(fd, size, granule):
        hole(pos, start)
        offset = start
        while offset < end:
            n = min(chunk, end - offset)
            _pread_full(fd, view[:n], offset)
            padded = -(-n // granule) * granule
            if padded > n:
                view[n:padded] = bytes(padded - n)
            cursor = offset
            for a, b in _nonzero_runs(view, n, granule):
                hole(cursor, offset + a)
                b_padded = -(-b // ss) * ss  # the image's last partial sector, padded with zeros
                disk.write((offset + a) // ss, view[a:b_padded])
                written += b - a
                cursor = offset + b_padded
            hole(cursor, offset + n)
            offset += n
            bar.update(offset)
        pos = end
    hole(pos, size)
    bar.finish()
    return written


def cmd_export(args: argparse.Namespace) -> int:
    name, path = args.name, args.file
    label = "stdout" if path == "-" else path
    # Status lines must not mix with an image written to stdout.
    status = sys.stderr if path == "-" else sys.stdout
    with _connect(name, read_only=True) as disk:
        info = disk.get_info()
        size = info.size_sectors * info.sector_size
        extents = [(x.sector, x.n_sectors) for x in disk.extents() if x.mapped]
        if path == "-":
            sys.stdout.flush()
            fd = sys.stdout.fileno()
            own_fd = False
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
            own_fd = True
        try:
            st = os.fstat(fd)
            appending = bool(_fd_flags(fd) & os.O_APPEND)
            sparse = stat.S_ISREG(st.st_mode) and not appending
            t0 = time.monotonic()
            if sparse:
                base = 0 if own_fd else os.lseek(fd, 0, os.SEEK_CUR)
                os.ftruncate(fd, base)  # old bytes in the file must not show through holes
                data_bytes = _copy_out_sparse(disk, extents, fd, base, size, label, args)
                os.ftruncate(fd, base + size)
                if not own_fd:
                    os.lseek(fd, base + size, os.SEEK_SET)
            else:
                data_bytes = _copy_out_stream(disk, extents, fd, size, label, args)
            seconds = time.monotonic() - t0
        finally:
            if own_fd:
                os.close(fd)
    summary = {
        "name": name,
        "file": path,
        "image_bytes": size,
        "data_bytes": data_bytes,
        "hole_bytes": size - data_bytes,
        "sparse": sparse,
        "seconds": round(seconds, 6),
    }
    if args.json:
        _print_json(summary, status)
    elif not args.quiet:
        how = "left as holes" if sparse else "written as zeros"
        print(
            f"exported disk {name} to {label}: {format_bytes_long(size)},"
            f" {format_bytes_long(data_bytes)} of data, {format_bytes_long(size - data_bytes)}"
            f" {how}, {_rate(size, seconds)}",
            file=status,
        )
    return 0


def _fd_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _chunks(
    disk: shmdisk.Disk, extents: list[tuple[int, int]]
) -> Iterator[tuple[int, memoryview, int]]:
    """``(byte offset, buffer, length)`` for the data extents, read a chunk at a time."""
    ss = disk.sector_size
    granule = max(disk.page_size, ss)
    chunk_sectors = max(granule, _CHUNK // granule * granule) // ss
    buf = bytearray(chunk_sectors * ss + granule)  # + a granule of zeros for _nonzero_runs
    view = memoryview(buf)
    for sector, n_sectors in extents:
        done = 0
        while done < n_sectors:
            n = min(chunk_sectors, n_sectors - done)
            length = n * ss
            disk.read(sector + done, view[:length])
            padded = -(-length // granule) * granule
            if padded > length:
                view[length:padded] = bytes(padded - length)
            yield (sector + done) * ss, view, length
            done += n


def _copy_out_sparse(
    disk: shmdisk.Disk,
    extents: list[tuple[int, int]],
    fd: int,
    base: int,
    size: int,
    label: str,
    args: argparse.Namespace,
) -> int:
    granule = max(disk.page_size, disk.sector_size)
    bar = _Progress(f"export {label}", size, _progress_enabled(args))
    written = 0
    for offset, view, length in _chunks(disk, extents):
        # Written zeros are data to the disk but need no room in the file: skip them too.
        for a, b in _nonzero_runs(view, length, granule):
            _write_full(fd, view[a:b], base + offset + a)
            written += b - a
        bar.update(offset + length)
    bar.finish()
    return written


def _copy_out_stream(
    disk: shmdisk.Disk,
    extents: list[tuple[int, int]],
    fd: int,
    size: int,
    label: str,
    args: argparse.Namespace,
) -> int:
    """Pipes and devices cannot seek: holes go out as zeros, in order."""
    zeros = memoryview(bytes(_CHUNK))
    bar = _Progress(f"export {label}", size, _progress_enabled(args))
    pos = 0
    written = 0

    def fill(until: int) -> None:
        nonlocal pos
        while pos < until:
            n = min(len(zeros), until - pos)
            _write_full(fd, zeros[:n], None)
            pos += n
            bar.update(pos)

    for offset, view, length in _chunks(disk, extents):
        fill(offset)
        _write_full(fd, view[:length], None)
        pos += length
        written += length
        bar.update(pos)
    fill(size)
    bar.finish()
    return written


# --------------------------------------------------------------------------------------------
# demo


def _demo_pattern(worker: int, sector: int, n_sectors: int, sector_size: int) -> bytes:
    """What worker ``worker`` writes to sectors ``[sector, sector + n_sectors)``.

    Every sector starts with a readable stamp naming its worker and sector, and the rest is a
    pattern that differs per worker, so a sector landing in the wrong place is caught.
    """
    import numpy as np

    # One sector's pattern tiled: uint8 all the way, so a large region costs one copy of itself
    # in memory rather than several times that in wide temporaries.
    row = (
        (np.arange(sector_size, dtype=np.uint32) * (2 * worker + 3) + worker * 89) & 0xFF
    ).astype(np.uint8)
    data = np.tile(row, (n_sectors, 1))
    for k in range(n_sectors):
        stamp = f"shmdisk demo: worker {worker}, sector {sector + k}\n".encode()
        data[k, : len(stamp)] = np.frombuffer(stamp, dtype=np.uint8)
    return data.tobytes()


def _mismatches(got: bytes | bytearray, expected: bytes) -> int:
    import numpy as np

    a = np.frombuffer(got, dtype=np.uint8)
    b = np.frombuffer(expected, dtype=np.uint8)
    return int(np.count_nonzero(a != b))


def _demo_worker(
    name: str,
    index: int,
    regions: list[tuple[int, int]],
    barrier: Any,
    results: Any,
) -> None:
    """One demo worker: write its own region in small requests, wait for the others, then read
    every other worker's region back and count the bytes that differ."""
    # The parent handles Ctrl-C and cleans up; a worker dying of it first would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report: dict[str, Any] = {"index": index, "pid": os.getpid()}
    try:
        with shmdisk.connect(name, create=False) as disk:
            ss = disk.sector_size
            start, count = regions[index]
            data = memoryview(_demo_pattern(index, start, count, ss))
            t0 = time.perf_counter()
            step = max(1, 65536 // ss)  # 64 KiB requests, so the workers' writes interleave
            for off in range(0, count, step):
                n = min(step, count - off)
                disk.write(start + off, data[off * ss : (off + n) * ss])
            report["write_s"] = time.perf_counter() - t0
            report["wrote"] = count * ss
            barrier.wait(timeout=60)
            t1 = time.perf_counter()
            checked = 0
            bad = 0
            for peer, (p_start, p_count) in enumerate(regions):
                if peer == index:
                    continue
                buf = bytearray(p_count * ss)
                disk.read(p_start, buf)
                bad += _mismatches(buf, _demo_pattern(peer, p_start, p_count, ss))
                checked += len(buf)
            report["read_s"] = time.perf_counter() - t1
            report["checked"] = checked
            report["peers"] = len(regions) - 1
            report["mismatches"] = bad
    except BaseException as exc:  # reported to the parent, which prints one line for it
        with contextlib.suppress(Exception):
            barrier.abort()
        report["error"] = f"{type(exc).__name__}: {exc}"
    results.put(report)


_MARKS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _demo_strip(regions: list[tuple[int, int]], size: int, cells: int) -> str:
    """One line of the disk: each worker's region drawn with its number, holes as dots."""
    marks = []
    for i in range(cells):
        lo = i * size // cells
        hi = (i + 1) * size // cells
        mark = "\u00b7" if _can_draw_unicode() else "."
        for w, (start, count) in enumerate(regions):
            if start < hi and lo < start + count:
                mark = _MARKS[w % len(_MARKS)]
        marks.append(mark)
    return "".join(marks)


def cmd_demo(args: argparse.Namespace) -> int:
    workers = args.workers
    if not 1 <= workers <= 64:
        raise CliError(f"--workers must be between 1 and 64, not {workers}")
    ss = shmdisk.DEFAULT_SECTOR_SIZE
    region_sectors = parse_size(args.region, ss)
    if region_sectors < 1:
        raise CliError("--region must be at least one sector")
    # Regions spread over a disk twice their total size: the gaps between them are never written,
    # so the demo also shows that untouched parts of a disk cost no memory.
    stride = 2 * region_sectors
    size = workers * stride
    regions = [(w * stride, region_sectors) for w in range(workers)]
    name = f"demo-{os.getpid()}-{secrets.token_hex(3)}"
    ctx = multiprocessing.get_context("spawn")
    out = sys.stdout
    print(f"shmdisk demo: {workers} worker processes share one disk in shared memory", file=out)
    print(
        f"  disk {name}: {format_bytes_long(size * ss)} ({size} sectors of {ss} bytes),"
        f" at {shmdisk.segment_path(name)}",
        file=out,
    )
    print(
        f"  each worker writes its own stamped {format_bytes_long(region_sectors * ss)} region,"
        " then reads every other worker's region back",
        file=out,
    )
    print(file=out)
    procs: list[Any] = []
    result = 1
    disk: shmdisk.Disk | None = None
    # `kill PID` must clean up like Ctrl-C does: turn SIGTERM into an exception too.
    old_term = _set_signal(signal.SIGTERM, _raise_terminated)
    try:
        disk = shmdisk.create(name, size, ss)
        barrier = ctx.Barrier(workers)
        results = ctx.Queue()
        # Children inherit an ignored SIGINT through exec, so a Ctrl-C during their start-up
        # reaches only the parent, which stops them and removes the disk.
        old = _set_signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for w in range(workers):
                proc = ctx.Process(
                    target=_demo_worker,
                    args=(name, w, regions, barrier, results),
                    name=f"shmdisk-demo-{w}",
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
        finally:
            _set_signal(signal.SIGINT, old)
        reports = _demo_collect(procs, results, timeout=args.timeout)
        for proc in procs:
            proc.join(timeout=5)
        result = _demo_report(disk, name, regions, reports, procs, size)
        return result
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated: stopping the workers", file=sys.stderr)
        return 143
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        old_int = _set_signal(signal.SIGINT, signal.SIG_IGN)
        _set_signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if disk is not None:
            disk.disconnect()
        if args.keep and disk is not None:
            print(f"disk {name} kept: try `shmdisk map {name}`, then `shmdisk destroy {name}`")
        else:
            # Also when a signal landed inside create(): the segment may exist without a
            # handle, and its name (our pid and a random token) is nobody else's.
            shmdisk.destroy(name)
            print(f"disk {name} destroyed", file=out)
            if result == 0:
                print(
                    "next: shmdisk create scratch 64M; shmdisk ls; shmdisk map scratch;"
                    " shmdisk destroy scratch",
                    file=out,
                )
        _set_signal(signal.SIGTERM, old_term)
        _set_signal(signal.SIGINT, old_int)


class _Terminated(Exception):
    """SIGTERM arrived during the demo."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _set_signal(signum: int, handler: Any) -> Any:
    """``signal.signal`` where allowed: only the main thread may set handlers; elsewhere (main()
    called from a thread) the defaults stay and this returns None."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


def _demo_collect(procs: list[Any], results: Any, timeout: float) -> dict[int, dict[str, Any]]:
    """Reports by worker index; stops early when a worker died without reporting."""
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(reports) < len(procs) and time.monotonic() < deadline:
        try:
            report = results.get(timeout=0.2)
        except _queue.Empty:
            silent = [i for i, p in enumerate(procs) if i not in reports and p.exitcode is not None]
            if silent:
                # A dead worker never reports; give the queue a moment to drain, then stop.
                with contextlib.suppress(_queue.Empty):
                    while True:
                        r = results.get(timeout=0.5)
                        reports[r["index"]] = r
                break
            continue
        reports[report["index"]] = report
    return reports


def _demo_report(
    disk: shmdisk.Disk,
    name: str,
    regions: list[tuple[int, int]],
    reports: dict[int, dict[str, Any]],
    procs: list[Any],
    size: int,
) -> int:
    ss = disk.sector_size
    rows = []
    all_ok = True
    for w, (start, count) in enumerate(regions):
        r = reports.get(w)
        region = f"{format_bytes(start * ss)}-{format_bytes((start + count) * ss)}"
        if r is None:
            code = procs[w].exitcode
            why = "no report (timed out)" if code is None else f"died (exit code {code})"
            rows.append([str(w), str(procs[w].pid), region, "-", "-", "-", why])
            all_ok = False
            continue
        if "error" in r:
            rows.append([str(w), str(r["pid"]), region, "-", "-", "-", f"failed: {r['error']}"])
            all_ok = False
            continue
        ok = r["mismatches"] == 0
        all_ok &= ok
        ms = (r["write_s"] + r["read_s"]) * 1000
        rows.append(
            [
                str(w),
                str(r["pid"]),
                region,
                format_bytes(r["wrote"]),
                f"{r['peers']} region{'' if r['peers'] == 1 else 's'},"
                f" {format_bytes(r['checked'])}",
                f"{ms:.0f} ms",
                "ok" if ok else f"{r['mismatches']} bytes differ",
            ]
        )
    headers = ["WORKER", "PID", "REGION", "WROTE", "READ BACK", "TIME", "RESULT"]
    for line in _table(headers, rows, {"WORKER", "PID", "WROTE", "TIME"}, sep="  "):
        print("  " + line)
    print()

    # The parent checks the whole disk itself: every region as its worker wrote it, and every
    # gap still zero, so "ok" means every byte of the disk, not only what the workers compared.
    t0 = time.perf_counter()
    bad = 0
    expected_regions: list[tuple[int, int, int | None]] = []
    pos = 0
    for w, (start, count) in enumerate(regions):
        expected_regions.append((pos, start - pos, None))
        expected_regions.append((start, count, w))
        pos = start + count
    expected_regions.append((pos, size - pos, None))
    for start, count, owner in expected_regions:
        if count <= 0:
            continue
        buf = bytearray(count * ss)
        disk.read(start, buf)
        expected = bytes(len(buf)) if owner is None else _demo_pattern(owner, start, count, ss)
        bad += _mismatches(buf, expected)
    check_ms = (time.perf_counter() - t0) * 1000
    info = shmdisk.inspect(name)
    data_bytes = sum(c for _, c in regions) * ss
    print(f"  disk map  |{_demo_strip(regions, size, min(64, size))}|")
    mark = "digit" if len(regions) <= 10 else "character (0-9, then a-z)"
    print(f"            each {mark} is that worker's region; dots were never written")
    print(
        f"  memory    {format_bytes_long(info.allocated_bytes)} of RAM holds this"
        f" {format_bytes_long(size * ss)} disk: the {format_bytes_long(size * ss - data_bytes)}"
        " never written cost nothing"
    )
    first = bytearray(ss)
    w_last = len(regions) - 1
    disk.read(regions[w_last][0], first)
    stamp = bytes(first).split(b"\n", 1)[0].decode("ascii", "replace")
    print(f"  sector {regions[w_last][0]} reads: {stamp!r}")
    print()
    n = len(regions)
    if all_ok and bad == 0:
        if n == 1:
            workers = "1 worker wrote its region"
        else:
            others = "the other region" if n == 2 else f"the other {n - 1} regions"
            workers = f"{n} workers each read back {others}"
        print(
            f"verified: every byte as written ({workers};\n          the parent re-read all"
            f" {format_bytes_long(size * ss)}, holes included, in {check_ms:.0f} ms)"
        )
        return 0
    print(
        f"FAILED: {bad} bytes of the disk differ from what was written"
        + ("" if all_ok else "; some workers failed (see the table)")
    )
    return 1


# --------------------------------------------------------------------------------------------
# argument parsing and dispatch


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, shmdisk.ShmdiskError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc)
    return text or type(exc).__name__


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def _mode_arg(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r} (octal, e.g. 0600)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid mode {text!r} (0000 to 0777)")
    return mode


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _sector_size_type(text: str) -> int:
    try:
        return _sector_size_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_ls_arguments(p: argparse.ArgumentParser) -> None:
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


_LS_DESCRIPTION = """\
List every shmdisk on the machine (or only NAME...), like lsblk: size, sector and page size,
how much holds data (MAPPED, USE%), the memory the segment really uses (MEM), what you may do
with it (RW), owner, mode, creation time, the processes holding it open (HOLDERS, "?" when not
every process can be looked at) and its STATE. A corrupt, half-created or foreign-version
segment is listed with its state and never modified."""

_LS_EPILOG = """\
examples:
  %(prog)s                      all disks
  %(prog)s -b scratch           one disk, sizes in bytes
  %(prog)s -o NAME,SIZE,HOLDERS --noheadings
  %(prog)s --json               {"version": 1, "disks": [{"name": ..., "size_sectors": ...}]}"""


def _subcommand(
    sub: Any, name: str, help_text: str, epilog: str, description: str | None = None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=description or help_text[:1].upper() + help_text[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The ``shmdisk`` parser and its subparsers action (``serve`` is added by ``main``)."""
    parser = argparse.ArgumentParser(
        prog="shmdisk",
        description="Named block devices in POSIX shared memory.",
        epilog="Run `shmdisk COMMAND --help` for each command's options and an example.\n"
        "First time? Try: shmdisk demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _subcommand(sub, "ls", "list disks", _LS_EPILOG.replace("%(prog)s", "shmdisk ls"))
    p.description = _LS_DESCRIPTION
    _add_ls_arguments(p)

    p = _subcommand(
        sub,
        "info",
        "show everything known about one disk",
        "example:\n  shmdisk info scratch\n  shmdisk info --json scratch",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("-b", "--bytes", action="store_true", help="print sizes in bytes only")
    p.add_argument("--json", action="store_true", help='print {"version": 1, "disk": {...}}')
    p.set_defaults(func=cmd_info)

    p = _subcommand(
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
        type=_sector_size_type,
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

    p = _subcommand(
        sub,
        "destroy",
        "remove disks",
        "Processes still connected see DisconnectedError on their next request.\n"
        "\nexample:\n  shmdisk destroy scratch\n  shmdisk destroy -f maybe-there",
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="a missing disk is not an error")
    p.add_argument("-v", "--verbose", action="store_true", help="print each disk removed")
    p.set_defaults(func=cmd_destroy)

    p = _subcommand(
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
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print the old and new size as JSON")
    p.set_defaults(func=cmd_resize)

    p = _subcommand(
        sub,
        "map",
        "draw which parts of a disk hold data",
        "example:\n  shmdisk map scratch\n  shmdisk map --json scratch | jq '.extents[]'",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--width", type=_positive_int, help="cells per row (default: fits the terminal)")
    p.add_argument("--rows", type=_positive_int, default=8, help="rows of cells (default: 8)")
    p.add_argument("--ascii", action="store_true", help="draw with ASCII characters only")
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=32,
        help="extents listed in the table (default: 32)",
    )
    p.add_argument("-a", "--all", action="store_true", help="list every extent")
    p.add_argument("--json", action="store_true", help="print the extents as JSON")
    p.set_defaults(func=cmd_map)

    p = _subcommand(
        sub,
        "import",
        "copy a raw disk image into a disk",
        "The image's holes and all-zero blocks are not copied: they are discarded on the disk,\n"
        "so holes stay holes. An image larger than the disk, a read-only disk or a missing disk\n"
        "(without --create) is refused before any byte is written. FILE '-' reads stdin.\n"
        "\nexample:\n  shmdisk import scratch disk.img\n"
        "  shmdisk import --create --sector-size 4096 fresh disk.img\n"
        "  zcat disk.img.gz | shmdisk import scratch -",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--create", action="store_true", help="create the disk, the size of the image, if missing"
    )
    p.add_argument(
        "--sector-size",
        type=_sector_size_type,
        default=shmdisk.DEFAULT_SECTOR_SIZE,
        metavar="BYTES",
        help="sector size of a disk made by --create (default: %(default)s)",
    )
    p.add_argument(
        "--pad",
        action="store_true",
        help="accept an image that ends mid-sector: its last sector is filled with zeros",
    )
    _add_progress(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    p.set_defaults(func=cmd_import)

    p = _subcommand(
        sub,
        "export",
        "copy a disk out to a raw image file",
        "Only data is written: a regular output file gets holes where the disk has none, so it\n"
        "takes no more room than the data. To a pipe ('-' for stdout) holes go out as zeros.\n"
        "\nexample:\n  shmdisk export scratch disk.img\n"
        "  shmdisk export scratch - | gzip > disk.img.gz",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE")
    _add_progress(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    p.set_defaults(func=cmd_export)

    p = _subcommand(
        sub,
        "demo",
        "watch worker processes share one disk",
        "Creates a fresh disk, starts the workers (spawn), each writes its own stamped region\n"
        "and reads the others' back; the parent then checks every byte of the disk. The disk is\n"
        "destroyed at the end, even on Ctrl-C. Exit code 0 only if every byte checked out.\n"
        "\nexample:\n  shmdisk demo\n  shmdisk demo --workers 8 --region 4M",
    )
    p.add_argument("--workers", type=_positive_int, default=4, help="worker processes (default: 4)")
    p.add_argument(
        "--region", default="1M", metavar="SIZE", help="bytes each worker writes (default: 1M)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the workers (default: 120)",
    )
    p.add_argument("--keep", action="store_true", help="keep the disk afterwards, to look at it")
    p.set_defaults(func=cmd_demo)
    return parser, sub


def _load_nbd_cli() -> Any:
    return importlib.import_module("shmdisk.nbd.cli")


def _add_serve(sub: Any) -> None:
    """``serve`` comes from the NBD package; if it cannot load, only ``serve`` says so."""
    try:
        _load_nbd_cli().register(sub)
    except Exception as exc:
        reason = _describe(exc)
        p = sub.add_parser("serve", help="serve disks over NBD (unavailable)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(args: argparse.Namespace) -> int:
            raise CliError(f"the NBD server is unavailable: {reason}")

        p.set_defaults(func=unavailable)


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"shmdisk {version('shmdisk')}"
    except Exception:
        return "shmdisk (version unknown)"


def _dispatch(args: argparse.Namespace, prog: str) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    args.prog = prog
    try:
        return func(args)
    except CliError as exc:
        _error(prog, str(exc))
    except ValueError as exc:  # parse_size and friends: the user's input, not a crash
        _error(prog, _describe(exc))
    except (shmdisk.ShmdiskError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        _error(prog, _describe(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


def _broken_pipe() -> int:
    # `shmdisk ls | head -1`: the reader left. Point stdout at /dev/null so the interpreter's
    # final flush does not raise again, and fail quietly as other filters do.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 1


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed them
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)


def main(argv: list[str] | None = None) -> int:
    """Run ``shmdisk`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser, sub = build_parser()
    _add_serve(sub)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    return _dispatch(args, "shmdisk")


def ls_main(argv: list[str] | None = None) -> int:
    """Run ``shmdisk-ls`` (the same as ``shmdisk ls``); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="shmdisk-ls",
        description=_LS_DESCRIPTION,
        epilog=_LS_EPILOG.replace("%(prog)s", "shmdisk-ls"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    _add_ls_arguments(parser)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    return _dispatch(args, "shmdisk-ls")
