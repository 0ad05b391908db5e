"""Names and the life of a segment: create, open, trust, inspect, destroy.

Everything that touches a segment *by name* lives here; everything that touches it through a
mapping lives in ``_mapping.py`` and ``_pageio.py``.

**Creation is atomic.** A segment is made without a name (``O_TMPFILE`` in ``/dev/shm``),
fully initialised (header, lock table) and only then linked into place under its name; the
link fails if the name is taken. Nobody ever sees a half-made segment, a creator that dies
leaves nothing behind, and racing creators agree on one disk.

**Trust.** A segment is used only if it is a regular file (opened with ``O_NOFOLLOW``, checked
with ``fstat``) owned by this process's effective uid or by root, or by the user the caller
named with ``owner=``. Anything else at our name raises ``UntrustedOwnerError``: another user
could otherwise squat a name, read what we write into it, or truncate it under our mapping.
Locking a mutex that lives in memory another user may write would let them corrupt this
process, so an untrusted segment is never locked, only unlinked when destroyed.

**Destruction** takes every stripe (waiting for I/O in flight), marks the header destroyed and
unlinks the name, checking that the name still is the file it marked. A segment found marked
but still named (its destroyer died in between) counts as gone: the next open finishes the
unlink.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import _layout as L
from . import _stripes
from .errors import (
    CorruptSegmentError,
    DiskBusyError,
    DiskExistsError,
    DiskFullError,
    DiskNotFoundError,
    InvalidGeometryError,
    InvalidModeError,
    InvalidNameError,
    PermissionDeniedError,
    UnimplementedError,
    UnknownError,
    UntrustedOwnerError,
)

SEGMENT_PREFIX = "shmdisk."
SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidNameError(f"disk name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidNameError(
            f"invalid disk name {name!r}: use 1-200 characters from [A-Za-z0-9._-]"
        )
    return name


def validate_mode(mode: object) -> int:
    """A permission mode: an int in 0..0o777 (no setuid, setgid or sticky bits)."""
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise InvalidModeError(f"mode must be an int such as 0o600, not {type(mode).__name__}")
    if not 0 <= mode <= 0o777:
        raise InvalidModeError(
            f"mode {mode:#o} is outside 0..0o777" if mode >= 0 else f"mode {mode} is negative"
        )
    return mode


def resolve_owner(owner: object) -> int | None:
    """The uid a caller trusts besides itself and root: a user name or uid, or None."""
    if owner is None:
        return None
    if isinstance(owner, bool) or not isinstance(owner, (int, str)):
        raise InvalidNameError(f"owner must be a user name or uid, not {type(owner).__name__}")
    if isinstance(owner, int):
        if owner < 0:
            raise InvalidNameError(f"owner uid {owner} is negative")
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        if owner.isdigit():
            return int(owner)
        raise InvalidNameError(f"no user named {owner!r}") from None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def segment_path(name: str) -> str:
    """Where the segment of disk ``name`` lives in the filesystem."""
    return f"{SHM_DIR}/{SEGMENT_PREFIX}{validate_name(name)}"


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


def require_platform() -> str:
    """The engine to use; UnimplementedError where the lock table's ABI is not ours."""
    if _stripes.ENGINE is None:
        raise UnimplementedError(
            f"{_stripes.PLATFORM_PROBLEM}: the lock table holds glibc x86-64 robust mutexes, "
            "whose layout other C libraries and word sizes do not share, and lock-free reads "
            "rely on x86's memory ordering"
        )
    return _stripes.ENGINE


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


def os_error(e: OSError, name: str, doing: str) -> Exception:
    """Translate an OS failure on segment ``name`` into our error tree, keeping its errno."""
    path = f"{SHM_DIR}/{SEGMENT_PREFIX}{name}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(e.errno, f"disk {name!r}: permission denied ({doing})", path)
    if e.errno == errno.ENOSPC:
        return DiskFullError(e.errno, f"disk {name!r}: no space left in {SHM_DIR}", path)
    return UnknownError(e.errno or errno.EIO, f"disk {name!r}: {doing}: {e.strerror}", path)


# ---------------------------------------------------------------- creating


@dataclass
class Made:
    """A segment made but not yet named (``publish`` names it), or opened by name."""

    fd: int
    header: L.Header
    path: str


def make_segment(
    name: str,
    size_sectors: int,
    sector_size: int,
    mode: int,
    max_size_sectors: int | None,
    base: L.Header | None = None,
    base_name: str = "",
) -> Made:
    """A new, initialised segment without a name yet (``O_TMPFILE``): nobody else sees it."""
    check_geometry(size_sectors, sector_size, max_size_sectors)
    engine = require_platform()
    page = L.page_size_for(sector_size)
    size_bytes = size_sectors * sector_size
    if max_size_sectors is None:
        max_bytes = max(size_bytes, min(L.DEFAULT_MAX_BYTES, L.MAX_DISK_BYTES))
    else:
        max_bytes = max_size_sectors * sector_size
    max_pages = L.align_up(max_bytes, page) // page
    capacity = L.align_up(size_bytes, page)
    data_offset = L.data_offset_for(max_pages)
    path = f"{SHM_DIR}/{SEGMENT_PREFIX}{name}"
    try:
        fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise UnimplementedError(
                f"{SHM_DIR} does not support unnamed files (O_TMPFILE): shmdisk needs "
                "Linux 3.11 or later with tmpfs there"
            ) from e
        raise os_error(e, name, "creating") from e
    try:
        os.fchmod(fd, mode)  # O_TMPFILE applied the umask; the caller asked for this mode
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
            creator_uid=os.geteuid(),
            data_offset=data_offset,
            base_created_ns=base.created_ns if base is not None else 0,
            base_size_sectors=base.size_sectors if base is not None else 0,
            base_name=base_name,
        )
        # Header and lock table must hold memory before anything maps them: a store into a
        # hole of a full tmpfs is SIGBUS.
        os.posix_fallocate(fd, 0, L.MAP_OFFSET)
        os.pwrite(fd, header.pack(), 0)
        _init_stripes(name, fd, header, engine)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError) and not isinstance(e, (DiskFullError, UnknownError)):
            raise os_error(e, name, "creating") from e
        raise
    return Made(fd, header, path)


def _init_stripes(name: str, fd: int, header: L.Header, engine: str) -> None:
    from ._mapping import Mapping, Segment

    seg = Segment(name, os.dup(fd), header, True, engine)
    Mapping(seg, 0, None, 0).table.init_stripes()


def publish(made: Made, name: str) -> None:
    """Give a made segment its name; DiskExistsError (and nothing changed) if it is taken."""
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an unnamed file (link(2) would try to
    # link the magic symlink itself); a directory descriptor makes os.link use linkat.
    dfd = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(
            f"/proc/self/fd/{made.fd}",
            os.path.basename(made.path),
            dst_dir_fd=dfd,
            follow_symlinks=True,
        )
    except FileExistsError as e:
        raise DiskExistsError(
            e.errno, f"disk {name!r} exists already{_whose(made.path)}", made.path
        ) from e
    except OSError as e:
        raise os_error(e, name, "naming the new segment") from e
    finally:
        os.close(dfd)


def _whose(path: str) -> str:
    """What to add to "exists already" when the entry at ``path`` is another user's: create
    never touches it, but the caller should know that connect will refuse it too."""
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return ""
    if uid in (os.geteuid(), 0):
        return ""
    return f" and belongs to user {user_name(uid)} (uid {uid}), not to you or root"


# ---------------------------------------------------------------- opening


def read_header(fd: int) -> tuple[L.Header, int]:
    """The header as it is now (via pread: nothing is mapped yet) and the file size."""
    raw = os.pread(fd, L.HEADER_SIZE, 0)
    size = os.fstat(fd).st_size
    return L.Header.unpack(raw), size


def _open_path(name: str, read_only: bool) -> int:
    """Open our name, refusing anything that is not a regular file, without following links.

    ``O_NONBLOCK``: a FIFO carrying our prefix would otherwise block the open forever.
    """
    path = segment_path(name)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DiskNotFoundError(errno.ENOENT, f"no disk named {name!r}", path) from None
    except (IsADirectoryError, NotADirectoryError) as e:
        raise CorruptSegmentError(f"disk {name!r}: {path} is not a regular file") from e
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise CorruptSegmentError(f"disk {name!r}: {path} is a symbolic link") from e
        if e.errno == errno.ENXIO:  # a FIFO with no writer, opened for writing
            raise CorruptSegmentError(f"disk {name!r}: {path} is not a regular file") from e
        raise os_error(e, name, "opening") from e
    return fd


def check_trusted(name: str, st: os.stat_result, owner_uid: int | None) -> None:
    """Refuse a segment that is not a regular file of ours, root's or the named owner's."""
    path = segment_path(name)
    if not stat.S_ISREG(st.st_mode):
        raise CorruptSegmentError(f"disk {name!r}: {path} is not a regular file")
    uid = st.st_uid
    if uid in (os.geteuid(), 0) or uid == owner_uid:
        return
    who = user_name(uid)
    e = UntrustedOwnerError(
        errno.EPERM,
        f"disk {name!r} belongs to user {who} (uid {uid}), not to you or root: refusing it. "
        f"If you expect {who} to share it with you, connect with owner={who!r} "
        f"(CLI: --owner {who})",
        path,
    )
    e.owner_uid = uid  # type: ignore[attr-defined]
    raise e


def open_segment(name: str, read_only: bool, owner_uid: int | None = None) -> Made:
    """Open an existing, trusted segment and validate its header."""
    require_platform()
    fd = _open_path(name, read_only)
    try:
        st = os.fstat(fd)
        check_trusted(name, st, owner_uid)
        header, size = read_header(fd)
        problem = header.problem(size)
        if problem is not None:
            raise CorruptSegmentError(f"disk {name!r}: {problem}")
        if header.lock_abi != L.ABI_GLIBC_X86_64:
            raise UnimplementedError(
                f"disk {name!r} was made for lock ABI "
                f"{L.ABI_TAGS.get(header.lock_abi, hex(header.lock_abi))}, not this process's"
            )
        if not read_only:
            _check_lock_table(name, fd)
        if header.destroyed:
            # Its destroyer died between marking it and unlinking it: finish the job.
            _unlink_if_same(name, st)
            raise DiskNotFoundError(errno.ENOENT, f"no disk named {name!r}", segment_path(name))
    except BaseException:
        os.close(fd)
        raise
    return Made(fd, header, segment_path(name))


def _check_lock_table(name: str, fd: int) -> None:
    """Refuse a table whose mutexes are not all robust, process-shared ones (a read-write
    handle locks them; glibc would act on whatever kind a damaged one claims to be)."""
    import numpy as np

    raw = os.pread(fd, L.MAP_OFFSET - L.LOCK_OFFSET, L.LOCK_OFFSET)
    kinds = np.frombuffer(raw, dtype="<i4").reshape(L.STRIPES, L.SLOT_SIZE // 4)
    # Bits 8 and 9 are glibc's lock-elision hints, which do not change how a mutex locks.
    kind = kinds[:, _stripes.KIND_OFFSET // 4] & ~0x300
    bad = np.flatnonzero(kind != _stripes.MUTEX_KIND & ~0x300)
    if len(bad):
        raise CorruptSegmentError(
            f"disk {name!r}: {len(bad)} of its {L.STRIPES} page locks are damaged "
            f"(the first is stripe {int(bad[0])})"
        )


def _unlink_if_same(name: str, st: os.stat_result) -> bool:
    """Unlink our name if it is still the file ``st`` describes. True if it was unlinked."""
    path = segment_path(name)
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise os_error(e, name, "unlinking") from e
    return True


# ---------------------------------------------------------------- destroying


def destroy_segment(
    name: str, timeout: float, owner_uid: int | None = None, force: bool = False
) -> None:
    """Destroy the disk ``name``; a missing name is fine (see the module text)."""
    path = segment_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        _remove_squatter(name, path, st)
        return
    trusted = st.st_uid in (os.geteuid(), 0) or st.st_uid == owner_uid
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO):
            # Not ours to open for writing (or swapped for something else meanwhile): what can
            # be done is to take the name away, if this user may.
            _unlink_if_same(name, st)
            return
        raise os_error(e, name, "opening to destroy") from e
    try:
        fst = os.fstat(fd)
        header, size = read_header(fd)
        if not trusted or header.problem(size) is not None or _stripes.ENGINE is None:
            # Never lock what another user may write, and a segment that is not a valid one
            # of ours has nothing to lock: take the name away.
            _unlink_if_same(name, fst)
            return
        if not _may_unlink(fst):
            # Marking first and then failing to unlink would destroy the disk for every
            # handle while reporting failure: write access to a segment (mode 0666) is no
            # right to remove it, just as for any file in a sticky directory.
            raise PermissionDeniedError(
                errno.EPERM,
                f"disk {name!r}: only its owner ({user_name(fst.st_uid)}) or root may destroy it",
                path,
            )
        if header.frozen and not force:
            users = overlays_of(name, header)
            if users:
                busy = DiskBusyError(
                    errno.EBUSY,
                    f"disk {name!r} backs overlays {', '.join(users)}: destroy them first "
                    "(or force it, and they lose their base)",
                    path,
                )
                busy.overlays = users  # type: ignore[attr-defined]
                raise busy
        _destroy_locked(name, fd, fst, header, timeout)
    finally:
        os.close(fd)


def _may_unlink(st: os.stat_result) -> bool:
    """Whether this process may remove the name of the file ``st`` describes from SHM_DIR:
    write access to the directory, and where it is sticky (as /dev/shm is), being the file's
    owner, the directory's owner or root."""
    euid = os.geteuid()
    if euid == 0:
        return True
    try:
        d = os.stat(SHM_DIR)
    except OSError:
        return False
    if not os.access(SHM_DIR, os.W_OK | os.X_OK, effective_ids=True):
        return False
    return not d.st_mode & stat.S_ISVTX or euid in (st.st_uid, d.st_uid)


def _destroy_locked(
    name: str, fd: int, st: os.stat_result, header: L.Header, timeout: float
) -> None:
    from ._mapping import Mapping, Segment
    from ._pageio import PageIO

    seg = Segment(name, os.dup(fd), header, True, _stripes.ENGINE)
    io = PageIO(name, Mapping(seg, 0, None, 0))
    with io.hold_all(deadline=time.monotonic() + timeout):
        # Marked first: a handle that still sees the name may find its segment gone, never
        # a segment gone without the mark (a creator checks exactly that).
        seg.hq[L.F_DESTROYED] = 1
        _unlink_if_same(name, st)


def _remove_squatter(name: str, path: str, st: os.stat_result) -> None:
    """A symlink, FIFO, directory or device at our name: remove it, never following it."""
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise os_error(e, name, "removing a non-segment at its name") from e


def overlays_of(name: str, header: L.Header) -> list[str]:
    """Names of the disks whose backing disk is this one (this very disk, by creation time)."""
    users = []
    for other in list_disks():
        if other == name:
            continue
        try:
            info = inspect(other)
        except (DiskNotFoundError, PermissionDeniedError):
            continue
        if info.backing == name and info.backing_created_ns == header.created_ns:
            users.append(other)
    return users


# ---------------------------------------------------------------- looking


@dataclass(frozen=True)
class SegmentInfo:
    """What ``inspect`` sees of a segment, without connecting to it or changing it.

    ``state`` is ``"ok"``, ``"corrupt"``, ``"old-version"`` (made by an older shmdisk),
    ``"unsupported-version"`` (made by a newer one), ``"destroyed"`` (marked, not yet
    unlinked) or ``"unreadable"`` (this user may not read it; only the file's facts are known).
    """

    name: str
    path: str
    state: str
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
    version: int | None = None
    frozen: bool = False
    backing: str | None = None
    backing_created_ns: int | None = None


def inspect(name: str) -> SegmentInfo:
    """Look at a segment read-only; a corrupt one is described, never raised or modified.

    Raises DiskNotFoundError if it does not exist. A segment this user may not read is
    described from its file alone (state ``"unreadable"``).
    """
    from . import _pagemap  # local: _pagemap pulls in numpy, inspect is rarely hot

    path = segment_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DiskNotFoundError(errno.ENOENT, f"no disk named {name!r}", path) from None
    if not stat.S_ISREG(st.st_mode):
        return _file_only(name, path, st, "corrupt", "not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DiskNotFoundError(errno.ENOENT, f"no disk named {name!r}", path) from None
    except PermissionError:
        return _file_only(name, path, st, "unreadable", None)
    except OSError as e:
        return _file_only(name, path, st, "corrupt", f"cannot open: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _file_only(name, path, st, "corrupt", "not a regular file")
        header, size = read_header(fd)
        problem = header.problem(size)
        if header.magic == L.MAGIC and header.version < L.VERSION:
            state = "old-version"
        elif header.magic == L.MAGIC and header.version > L.VERSION:
            state = "unsupported-version"
        elif problem:
            state = "corrupt"
        elif header.destroyed:
            state, problem = "destroyed", "marked destroyed; its destroyer did not finish"
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
            version=header.version if header.magic == L.MAGIC else None,
            frozen=bool(header.frozen) if ok else False,
            backing=header.base_name if ok and header.is_overlay else None,
            backing_created_ns=header.base_created_ns if ok and header.is_overlay else None,
        )
    finally:
        os.close(fd)


def _file_only(
    name: str, path: str, st: os.stat_result, state: str, problem: str | None
) -> SegmentInfo:
    """What inspect says of an entry it cannot read as a segment."""
    return SegmentInfo(
        name=name,
        path=path,
        state=state,
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


def iter_infos() -> Iterator[SegmentInfo]:
    """``inspect`` of every disk that still exists."""
    for name in list_disks():
        try:
            yield inspect(name)
        except DiskNotFoundError:
            continue
