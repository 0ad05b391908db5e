"""What every subcommand shares: the error types, output (errors, tables, the ``--json``
envelope), connecting without creating, signals, and argument types."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import IO, Any

import shmdisk
from shmdisk._units import parse_bytes

#: Version of every ``--json`` document; bumped when a key changes meaning or disappears.
JSON_VERSION = 1


class CliError(Exception):
    """A failure reported as one line on stderr with exit code 1."""


class UsageError(CliError):
    """Arguments that do not fit together (argparse cannot tell): one line, exit code 2."""


class Terminated(Exception):
    """SIGTERM arrived (``kill PID``): raised like KeyboardInterrupt, so clean-up runs."""


# --------------------------------------------------------------------------------------------
# Output


def print_json(doc: dict[str, Any], stream: IO[str] | None = None) -> None:
    print(json.dumps({"version": JSON_VERSION, **doc}, indent=2), file=stream or sys.stdout)


def table(
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


def can_draw_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or ""
    return encoding.lower().replace("-", "") in {"utf8", "utf16", "utf32"}


def describe(exc: BaseException) -> str:
    """An exception as the text after ``error:``."""
    if isinstance(exc, OSError) and not isinstance(exc, shmdisk.ShmdiskError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc)
    return text or type(exc).__name__


def error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Disks


def disk_exists(name: str) -> bool:
    # lexists: a dangling symlink with our prefix still takes the name.
    return os.path.lexists(shmdisk.segment_path(name))


def open_disk(name: str, *, read_only: bool, owner: str | None = None) -> shmdisk.Disk:
    """Connect to an existing disk; never create one as a side effect of looking at it.

    ``owner`` (``--owner USER``) names another user whose disk this one expects to use; without
    it only the caller's and root's disks are used (``UntrustedOwnerError`` otherwise).
    The library's own messages for a missing or unusable disk speak of its Python API; here
    they become the command line's (``shmdisk destroy NAME`` removes a broken segment).
    """
    try:
        return shmdisk.connect(name, read_only=read_only, create=False, owner=owner)
    except shmdisk.DiskNotFoundError:
        raise CliError(f"no such disk: {name}") from None
    except shmdisk.CorruptSegmentError as exc:
        raise _unusable(name, exc) from None


def _unusable(name: str, exc: shmdisk.CorruptSegmentError) -> Exception:
    """A segment connect refused: what ``inspect`` calls it, and how to remove it."""
    try:
        info = shmdisk.inspect(name)
    except (shmdisk.ShmdiskError, OSError):
        return exc
    if info.state == "ok":  # it was finished (or re-created) since: the refusal stands alone
        return exc
    what = info.state if info.problem is None else f"{info.state}: {info.problem}"
    return CliError(f"disk {name} cannot be used ({what}); `shmdisk destroy {name}` removes it")


@contextlib.contextmanager
def connect(name: str, *, read_only: bool, owner: str | None = None) -> Iterator[shmdisk.Disk]:
    """``open_disk`` for the length of a ``with`` block."""
    disk = open_disk(name, read_only=read_only, owner=owner)
    try:
        yield disk
    finally:
        disk.disconnect()


# --------------------------------------------------------------------------------------------
# Signals


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises ``Terminated`` in the main thread, so ``finally`` and
    ``except`` clauses clean up after ``kill PID`` as they do after Ctrl-C.

    Only the main thread may set handlers; called from another thread, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then let them through.

    For a step and the record of it (a disk created, and ``created = True``) that a signal must
    not separate, and for a clean-up that a second Ctrl-C must not cut short.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --------------------------------------------------------------------------------------------
# Arguments


def subcommand(
    sub: Any, name: str, help_text: str, epilog: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subparser whose description defaults to its help line and whose epilog keeps its
    line breaks (the examples)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=description or help_text[:1].upper() + help_text[1:] + ".",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def add_owner_argument(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """``--owner USER``, for the commands that connect to a disk someone else may own.

    A disk is used only if it belongs to the caller or to root: another user's segment at the
    name could be a squatter waiting to read what we write, or to truncate it under us. Naming
    the user says that this disk is expected and that user is trusted (``owner=`` in Python).
    """
    p.add_argument(
        "--owner",
        metavar="USER",
        help=help_text
        or "use the disk although it belongs to USER (a name or uid), not to you or root:"
        " only for a user you trust, who can change or break it under you",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def sector_size_arg(text: str) -> int:
    """``--sector-size``: bytes, with or without a unit ("4096" and "4K" both mean bytes)."""
    try:
        value, _ = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    # Checked here too, so that `create x 1M --sector-size 1000` blames the sector size, not 1M.
    if value < 512 or value > 65536 or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"invalid sector size {text!r}: a power of two from 512 to 64K"
        )
    return value
