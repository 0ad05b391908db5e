"""``import`` and ``export``: copy raw disk images in and out, keeping holes as holes, with
an optional progress bar."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

import shmdisk
from shmdisk._units import format_bytes, format_bytes_long

from ._common import (
    CliError,
    add_owner_argument,
    connect,
    disk_exists,
    open_disk,
    print_json,
    sector_size_arg,
    signals_held,
    sigterm_raises,
    subcommand,
)

_CHUNK = 1 << 20  # bytes per read/write while copying images: large enough to run at memcpy speed


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
    # `kill PID` must clean up like Ctrl-C: a disk this command created is not left behind.
    with sigterm_raises():
        return _import(args)


def _import(args: argparse.Namespace) -> int:
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
        exists = disk_exists(name)
        if not exists and not args.create:
            raise CliError(
                f"no such disk: {name}; nothing written (add --create to make one the size of"
                " the image)"
            )
        if exists:
            if not os.access(shmdisk.segment_path(name), os.W_OK):
                raise CliError(f"disk {name} is read-only for this user; nothing written")
            disk = open_disk(name, read_only=False, owner=args.owner)
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
            with signals_held():  # a signal must not come between the create and its record
                disk = shmdisk.create(name, image_sectors, sector_size)
                created = True
        t0 = time.monotonic()
        data_bytes = _copy_in(disk, src_fd, image_size, label, _progress_enabled(args))
        seconds = time.monotonic() - t0
    except BaseException:
        if created:
            # A disk this command made and failed to fill is not left behind half-written,
            # even when a second Ctrl-C or SIGTERM follows the first.
            with signals_held():
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
        print_json(summary)
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


@contextlib.contextmanager
def _one_point_in_time(
    name: str, prog: str, owner: str | None
) -> Iterator[tuple[shmdisk.Disk, bool]]:
    """A handle on disk ``name`` whose writers, in every process, wait while the block runs,
    so that what it reads is the disk at one point in time (a frozen disk needs no waiting);
    and whether it is so.

    Holding writers off takes the disk's locks, which a user who may only read the disk cannot
    take: that user gets the image as it is read, with a warning."""
    writable = os.access(shmdisk.segment_path(name), os.R_OK | os.W_OK)
    with connect(name, read_only=not writable, owner=owner) as disk:
        if writable or disk.frozen:
            with disk.hold_writes():
                yield disk, True
            return
        print(
            f"{prog}: warning: disk {name} is read-only for you, so its writers cannot be held"
            " off: the image is not one point in time if they write meanwhile",
            file=sys.stderr,
        )
        yield disk, False


def cmd_export(args: argparse.Namespace) -> int:
    name, path = args.name, args.file
    label = "stdout" if path == "-" else path
    # Status lines must not mix with an image written to stdout.
    status = sys.stderr if path == "-" else sys.stdout
    with _one_point_in_time(name, args.prog, args.owner) as (disk, snapshot):
        info = disk.get_info()
        size = info.size_sectors * info.sector_size
        extents = [(x.sector, x.n_sectors) for x in disk.extents() if x.mapped]
        if path == "-":
            sys.stdout.flush()
            fd = sys.stdout.fileno()
            own_fd = False
        else:
            fd = _open_target(path, _image_mode(name), args.force)
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
        "snapshot": snapshot,
        "seconds": round(seconds, 6),
    }
    if args.json:
        print_json(summary, status)
    elif not args.quiet:
        how = "left as holes" if sparse else "written as zeros"
        print(
            f"exported disk {name} to {label}: {format_bytes_long(size)},"
            f" {format_bytes_long(data_bytes)} of data, {format_bytes_long(size - data_bytes)}"
            f" {how}, {_rate(size, seconds)}",
            file=status,
        )
    return 0


def _image_mode(name: str) -> int:
    """Permission bits for a new image of disk ``name``: the disk's own, less any execute bit.

    An image holds the disk's bytes, so it is no more open than the disk: the default 0600 disk
    gives a 0600 file (the umask may narrow it further, never widen it).
    """
    return stat.S_IMODE(os.stat(shmdisk.segment_path(name)).st_mode) & 0o666


def _open_target(path: str, mode: int, force: bool) -> int:
    """Open the image file for writing.

    Without ``force`` only a new file is made (``O_EXCL``, which also never follows a symlink):
    a file, link or device already at ``path`` may be someone else's, and writing the disk into
    it could hand them its contents. ``--force`` overwrites what is there, through a symlink
    too, keeping an existing file's own permissions.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags if force else flags | os.O_EXCL, mode)
    except FileExistsError:
        what = "a symbolic link" if os.path.islink(path) else "there already"
        raise CliError(f"{path} is {what}; nothing written (add --force to overwrite it)") from None


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


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def register(sub: Any) -> None:
    """Add ``import`` and ``export`` to the ``shmdisk`` subcommands."""
    p = subcommand(
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
        type=sector_size_arg,
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
    add_owner_argument(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    p.set_defaults(func=cmd_import)

    p = subcommand(
        sub,
        "export",
        "copy a disk out to a raw image file",
        "Only data is written: a regular output file gets holes where the disk has holes, so\n"
        "it takes no more room than the data. To a pipe ('-' for stdout) holes go out as zeros.\n"
        "A new FILE gets the disk's permission bits (0600 for a default disk); an existing one,\n"
        "or a symlink, is refused unless --force. The image is the disk at one point in time:\n"
        "writers in every process wait until it is written (a frozen disk never changes).\n"
        "An overlay is exported flat, its backing disks' data included.\n"
        "\nexample:\n  shmdisk export scratch disk.img\n"
        "  shmdisk export --force scratch /dev/nbd0\n"
        "  shmdisk export scratch - | gzip > disk.img.gz",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="overwrite FILE if it exists (following a symlink there)",
    )
    _add_progress(p)
    add_owner_argument(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    p.set_defaults(func=cmd_export)
