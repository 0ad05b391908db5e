"""Names and the life of a segment: create, open, validate, inspect, unlink.

Everything that touches a segment *by name* lives here; everything that touches it *by
descriptor and mapping* lives in ``disk.py``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from dataclasses import dataclass

import posix_ipc

from . import _layout as L
from . import _locks
from .errors import (
    CorruptSegmentError,
    DiskExistsError,
    DiskFullError,
    DiskNotFoundError,
    InvalidGeometryError,
    InvalidNameError,
    LockTimeoutError,
    PermissionDeniedError,
    UnknownError,
)

SEGMENT_PREFIX = "shmdisk."
SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
# How long a connector waits for a creator to publish the header before calling the
# segment half-made (the creator holds the whole-disk lock while it writes the header).
READY_TIMEOUT = 5.0


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"disk name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidNameError(
            f"invalid disk name {name!r}: use 1-200 characters from [A-Za-z0-9._-]"
        )
    return name


def segment_path(name: str) -> str:
    """Where the segment of disk ``name`` lives in the filesystem."""
    return f"{SHM_DIR}/{SEGMENT_PREFIX}{validate_name(name)}"


def _ipc_name(name: str) -> str:
    return f"/{SEGMENT_PREFIX}{name}"


def list_disks() -> list[str]:
    """Names of every segment with the shmdisk prefix, sorted (corrupt ones included)."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    n = len(SEGMENT_PREFIX)
    return sorted(
        e[n:] for e in entries if e.startswith(SEGMENT_PREFIX) and _NAME_RE.fullmatch(e[n:])
    )


def check_geometry(size_sectors: object, sector_size: object, max_size_sectors: object) -> None:
    for label, v in (("size_sectors", size_sectors), ("sector_size", sector_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidGeometryError(f"{label} must be an int, not {type(v).__name__}")
    assert isinstance(size_sectors, int) and isinstance(sector_size, int)
    if not (L.MIN_SECTOR_SIZE <= sector_size <= L.MAX_SECTOR_SIZE) or sector_size & (
        sector_size - 1
    ):
        raise InvalidGeometryError(
            f"sector size {sector_size} is not a power of two in "
            f"[{L.MIN_SECTOR_SIZE}, {L.MAX_SECTOR_SIZE}]"
        )
    if size_sectors < 0:
        raise InvalidGeometryError(f"size {size_sectors} is negative")
    if size_sectors * sector_size > L.MAX_DISK_BYTES:
        raise InvalidGeometryError(
            f"size {size_sectors} x {sector_size} B exceeds the limit of {L.MAX_DISK_BYTES} bytes"
        )
    if max_size_sectors is not None:
        if not isinstance(max_size_sectors, int) or isinstance(max_size_sectors, bool):
            raise InvalidGeometryError("max_size_sectors must be an int or None")
        if not size_sectors <= max_size_sectors <= L.MAX_DISK_BYTES // sector_size:
            raise InvalidGeometryError(
                f"max_size_sectors {max_size_sectors} must lie in [size, "
                f"{L.MAX_DISK_BYTES // sector_size}]"
            )


def _os_error(e: BaseException, name: str) -> Exception:
    """Translate a posix_ipc/OS failure on segment ``name`` into our error tree."""
    if isinstance(e, posix_ipc.PermissionsError) or (
        isinstance(e, OSError) and isinstance(e, PermissionError)
    ):
        return PermissionDeniedError(f"disk {name!r}: permission denied")
    if isinstance(e, OSError) and e.errno == 28:
        return DiskFullError(f"disk {name!r}: no space left in {SHM_DIR}")
    return UnknownError(f"disk {name!r}: {e}")


@dataclass
class Opened:
    """An open segment: its descriptor and validated header."""

    fd: int
    header: L.Header
    created: bool


def create_segment(
    name: str, size_sectors: int, sector_size: int, mode: int, max_size_sectors: int | None
) -> Opened:
    """Create and initialise a new segment; exactly one racing creator wins (O_EXCL)."""
    check_geometry(size_sectors, sector_size, max_size_sectors)
    page = L.page_size_for(sector_size)
    size_bytes = size_sectors * sector_size
    if max_size_sectors is None:
        max_bytes = max(size_bytes, min(L.DEFAULT_MAX_BYTES, L.MAX_DISK_BYTES))
    else:
        max_bytes = max_size_sectors * sector_size
    max_pages = L.align_up(max_bytes, page) // page
    capacity = L.align_up(size_bytes, page)
    data_offset = L.data_offset_for(max_pages)
    try:
        shm = posix_ipc.SharedMemory(_ipc_name(name), posix_ipc.O_CREX, mode=mode)
    except posix_ipc.ExistentialError:
        raise DiskExistsError(f"disk {name!r} exists already") from None
    except (posix_ipc.Error, OSError) as e:
        raise _os_error(e, name) from None
    fd = shm.fd
    try:
        # Hold the whole lock space while the header is incomplete: connectors wait on it.
        _locks.lock(fd, _locks.WRLCK, _locks.WHOLE_START, _locks.WHOLE_LEN)
        os.fchmod(fd, mode)  # shm_open applied the umask; the caller asked for this mode
        os.ftruncate(fd, data_offset + capacity)
        header = L.Header(
            magic=L.MAGIC,
            version=L.VERSION,
            header_size=L.HEADER_SIZE,
            sector_size=sector_size,
            page_size=page,
            size_sectors=size_sectors,
            capacity=capacity,
            max_pages=max_pages,
            generation=0,
            destroyed=0,
            created_ns=time.time_ns(),
            creator_pid=os.getpid(),
            creator_uid=os.getuid(),
            data_offset=data_offset,
        )
        raw = header.pack()
        # Everything but the magic first, the magic last: its presence means "ready".
        os.pwrite(fd, raw[8:], 8)
        os.pwrite(fd, raw[:8], 0)
        _locks.unlock(fd, _locks.WHOLE_START, _locks.WHOLE_LEN)
    except BaseException as e:
        os.close(fd)
        posix_ipc.unlink_shared_memory(_ipc_name(name))
        if isinstance(e, OSError):
            raise _os_error(e, name) from None
        raise
    return Opened(fd, header, True)


def read_header(fd: int) -> tuple[L.Header, int]:
    """The header as it is now (via pread: nothing is mapped yet) and the file size."""
    # Magic before size: a creator sets the size before it writes the magic, so a size read
    # after seeing the magic is never the size of a file still being made.
    raw = os.pread(fd, L.HEADER.size, 0)
    size = os.fstat(fd).st_size
    if len(raw) < L.HEADER.size:
        raw = raw + bytes(L.HEADER.size - len(raw))
    return L.Header.unpack(raw), size


def _open_existing(name: str, read_only: bool) -> int:
    """Open a segment that exists, refusing anything that is not a regular file.

    Opened directly rather than through posix_ipc (same path, same flags as shm_open) because
    shm_open cannot add O_NONBLOCK: a FIFO carrying our prefix would block the open forever.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(segment_path(name), flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DiskNotFoundError(f"no disk named {name!r}") from None
    except (IsADirectoryError, NotADirectoryError):
        raise CorruptSegmentError(f"disk {name!r}: not a regular file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise CorruptSegmentError(f"disk {name!r}: is a symbolic link") from None
        raise _os_error(e, name) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptSegmentError(f"disk {name!r}: not a regular file")
    return fd


def open_segment(name: str, read_only: bool) -> Opened:
    """Open an existing segment and validate its header; wait for a creator to finish."""
    fd = _open_existing(name, read_only)
    try:
        header, size = read_header(fd)
        if header.magic == 0:
            # Still being created (or its creator died half-way): the creator holds the
            # whole-disk lock until the magic is written, so wait for that lock.
            deadline = time.monotonic() + READY_TIMEOUT
            while header.magic == 0 and time.monotonic() < deadline:
                try:
                    _locks.lock_within(
                        fd,
                        _locks.RDLCK,
                        _locks.WHOLE_START,
                        _locks.WHOLE_LEN,
                        max(0.0, deadline - time.monotonic()),
                    )
                except LockTimeoutError:
                    break
                _locks.unlock(fd, _locks.WHOLE_START, _locks.WHOLE_LEN)
                header, size = read_header(fd)
                if header.magic == 0:
                    time.sleep(0.005)  # opened between the creator's O_EXCL and its lock
            if header.magic == 0:
                raise CorruptSegmentError(
                    f"disk {name!r} is incomplete: its creator never finished it "
                    f"(destroy it with shmdisk.destroy({name!r}))"
                )
        problem = header.problem(size)
        if problem is not None:
            # A resize in another process may have been half-way through the header (it holds
            # the whole-disk lock meanwhile): look again once under the shared whole-disk lock.
            _locks.lock_within(fd, _locks.RDLCK, _locks.WHOLE_START, _locks.WHOLE_LEN, 5.0)
            try:
                header, size = read_header(fd)
            finally:
                _locks.unlock(fd, _locks.WHOLE_START, _locks.WHOLE_LEN)
            problem = header.problem(size)
        if problem is not None:
            raise CorruptSegmentError(f"disk {name!r}: {problem}")
    except BaseException:
        os.close(fd)
        raise
    return Opened(fd, header, False)


def create_or_open(name: str, read_only: bool) -> Opened:
    """connect(create=True): open, or create the default disk; racing callers agree."""
    while True:
        try:
            return open_segment(name, read_only)
        except DiskNotFoundError:
            pass
        if read_only:
            # A read-only handle cannot initialise a segment; make it read-write, then reopen.
            try:
                opened = create_segment(
                    name, L.DEFAULT_SIZE_SECTORS, L.DEFAULT_SECTOR_SIZE, 0o600, None
                )
                os.close(opened.fd)
            except DiskExistsError:
                pass
            continue
        try:
            return create_segment(name, L.DEFAULT_SIZE_SECTORS, L.DEFAULT_SECTOR_SIZE, 0o600, None)
        except DiskExistsError:
            continue  # another process won the race: open what it made


def destroy_segment(name: str, timeout: float) -> None:
    """Mark the segment destroyed and unlink it; a missing name is not an error.

    The whole-disk lock makes destroy wait for I/O in flight; checking the inode under that
    lock makes sure we unlink the segment we marked, not a new one made by a racing
    destroy-and-create (every destroyer holds this lock on the inode it unlinks).
    """
    path = segment_path(name)
    try:
        fd = _open_existing(name, read_only=False)
    except DiskNotFoundError:
        return
    try:
        _locks.lock_within(fd, _locks.WRLCK, _locks.WHOLE_START, _locks.WHOLE_LEN, timeout)
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return  # someone else destroyed it (and perhaps made a new one) meanwhile
        except FileNotFoundError:
            return
        header, size = read_header(fd)
        if size >= L.HEADER_SIZE and header.magic == L.MAGIC:
            os.pwrite(fd, (1).to_bytes(8, "little"), L.F_DESTROYED * 8)
        try:
            posix_ipc.unlink_shared_memory(_ipc_name(name))
        except posix_ipc.ExistentialError:
            pass
    except OSError as e:
        raise _os_error(e, name) from None
    finally:
        os.close(fd)  # also drops our lock


@dataclass(frozen=True)
class SegmentInfo:
    """What ``inspect`` sees of a segment, without connecting to it or changing it."""

    name: str
    path: str
    state: str  # "ok" | "incomplete" | "corrupt" | "unsupported-version"
    problem: str | None
    sector_size: int | None
    page_size: int | None
    size_sectors: int | None
    max_size_sectors: int | None
    mapped_pages: int | None
    generation: int | None
    created_ns: int | None
    creator_pid: int | None
    creator_uid: int | None
    uid: int
    gid: int
    mode: int
    file_bytes: int
    allocated_bytes: int


def inspect(name: str) -> SegmentInfo:
    """Look at a segment read-only; a corrupt one is described, never raised or modified.

    Raises DiskNotFoundError if it does not exist and PermissionDeniedError if it cannot
    be read.
    """
    from . import _pagemap  # local: _pagemap pulls in numpy, inspect is rarely hot

    path = segment_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DiskNotFoundError(f"no disk named {name!r}") from None
    if not stat.S_ISREG(st.st_mode):
        return _odd_file(name, path, st, "not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DiskNotFoundError(f"no disk named {name!r}") from None
    except PermissionError:
        raise PermissionDeniedError(f"disk {name!r}: permission denied") from None
    except OSError as e:
        return _odd_file(name, path, st, f"cannot open: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _odd_file(name, path, st, "not a regular file")
        header, size = read_header(fd)
        problem = header.problem(size)
        if header.magic == 0:
            state = "incomplete"
        elif header.magic == L.MAGIC and header.version != L.VERSION:
            state = "unsupported-version"
        elif problem:
            state = "corrupt"
        else:
            state = "ok"
        ok = state == "ok"
        mapped = None
        if ok:
            pages = L.align_up(header.size_sectors * header.sector_size, header.page_size)
            mapped = _pagemap.count_mapped_fd(fd, pages // header.page_size)
        return SegmentInfo(
            name=name,
            path=path,
            state=state,
            problem=problem,
            sector_size=header.sector_size if ok else None,
            page_size=header.page_size if ok else None,
            size_sectors=header.size_sectors if ok else None,
            max_size_sectors=header.max_pages * header.page_size // header.sector_size
            if ok
            else None,
            mapped_pages=mapped,
            generation=header.generation if ok else None,
            created_ns=header.created_ns if ok else None,
            creator_pid=header.creator_pid if ok else None,
            creator_uid=header.creator_uid if ok else None,
            uid=st.st_uid,
            gid=st.st_gid,
            mode=stat.S_IMODE(st.st_mode),
            file_bytes=st.st_size,
            allocated_bytes=st.st_blocks * 512,
        )
    finally:
        os.close(fd)


def _odd_file(name: str, path: str, st: os.stat_result, problem: str) -> SegmentInfo:
    """What inspect says of an entry with our prefix that is no segment at all."""
    return SegmentInfo(
        name=name,
        path=path,
        state="corrupt",
        problem=problem,
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
