"""The public API: create, connect, copy, freeze and destroy named disks, and the ``Disk`` handle.

``Disk`` is a front: it checks the caller's arguments (before any byte is touched, so a failing
call changes nothing) and hands the request to its page I/O (``_pageio.py``, the locking
protocol) over the segment's mapping (``_mapping.py``; byte format: ``_layout.py``). Its
``read`` and ``write`` come from its base class (``_front.py``), which does the common request
in one call and brings everything else to ``_read_general`` / ``_write_general`` here.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TypeVar

from . import _layout as L
from . import _pageio, _segment
from ._front import Front
from ._mapping import Mapping, Segment
from .errors import (
    BackingLostError,
    BadBufferError,
    DiskExistsError,
    DiskNotFoundError,
    InvalidArgumentError,
    InvalidGeometryError,
    IsReadOnlyError,
    NotFrozenError,
    OutOfRangeError,
    ShmdiskError,
    UnknownError,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy.typing as npt
    from typing_extensions import Buffer as _Buffer

    # A buffer-protocol object. numpy's stubs declare arrays' buffer protocol (__buffer__)
    # only for Python 3.12 and later, so arrays are named too, or mypy refuses them on 3.11.
    Buffer: TypeAlias = _Buffer | npt.NDArray[Any]
    # One buffer, or a list/tuple of them (consecutive sectors).
    Buffers: TypeAlias = Buffer | Iterable[Buffer]

__all__ = [
    "Disk",
    "DiskInfo",
    "Extent",
    "LayerExtent",
    "connect",
    "copy",
    "create",
    "destroy",
    "freeze",
]

# Buffer formats a disk copies into and out of: bytes and plain numbers. An object array
# ('O') filled with raw bytes crashes the interpreter at its next use; structured and
# pointer formats are refused for the same reason.
_PLAIN = frozenset(
    prefix + code
    for prefix in ("", "@", "=", "<", ">", "!")
    for code in [*"cbB?hHiIlLqQnNefdg", "Zf", "Zd", "Zg"]
)


@dataclass(frozen=True)
class DiskInfo:
    """What ``Disk.get_info`` reports (mirage's ``Mirage_block.info``)."""

    read_write: bool
    sector_size: int
    size_sectors: int


class Extent(NamedTuple):
    """A run of sectors that all hold data (``mapped``) or are all known to be zero."""

    sector: int
    n_sectors: int
    mapped: bool


class LayerExtent(NamedTuple):
    """A run of sectors and where its data lives: ``layer`` 0 is the disk itself, 1 its
    backing disk, 2 that one's backing disk...; ``None`` for zeros (``disk`` is then None)."""

    sector: int
    n_sectors: int
    layer: int | None
    disk: str | None


def _index(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"{what} must be an integer, not {type(value).__name__}"
        ) from None


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgumentError(f"timeout must be None or a number >= 0, not {value!r}")
    return float(value)


def _byte_view(b: object, writable: bool) -> memoryview:
    """A flat byte view of one caller's buffer, after every check."""
    try:
        v = memoryview(b)  # type: ignore[arg-type]
    except TypeError:
        raise BadBufferError(
            f"expected a buffer (bytes, bytearray, memoryview, numpy array, mmap), "
            f"not {type(b).__name__}"
        ) from None
    except ValueError as e:  # a released memoryview, a numpy dtype without buffer support
        raise BadBufferError(f"unusable buffer: {e}") from e
    if v.format != "B" and v.format not in _PLAIN:
        raise BadBufferError(
            f"buffer format {v.format!r} is not plain bytes or numbers (object and structured "
            "arrays cannot be filled with raw bytes)"
        )
    if writable and v.readonly:
        raise BadBufferError("read needs writable buffers; this one is read-only")
    if not v.c_contiguous:
        raise BadBufferError("buffers must be C-contiguous")
    return v if v.ndim == 1 and v.format == "B" else v.cast("B")


def _flat_bytes(b: object, writable: bool) -> bool:
    """Whether ``b`` can go to the fast paths as it is: plain, flat, contiguous bytes."""
    t = type(b)
    if t is bytearray or (t is bytes and not writable):
        return True
    if not isinstance(b, memoryview):
        return False
    try:
        return b.format == "B" and b.ndim == 1 and b.c_contiguous and not (writable and b.readonly)
    except ValueError:  # released: _byte_view says so, as a BadBufferError
        return False


# Every live handle, so a forked child can let go of what it inherited mid-call.
_live: weakref.WeakSet[Disk] = weakref.WeakSet()


class Disk(Front):
    """A connected handle on a named disk; get one from :func:`create` or :func:`connect`.

    Use it as a context manager (leaving disconnects, never destroys). Pickling a ``Disk``
    reconnects by name in the receiving process. ``name``, ``sector_size``, ``page_size``,
    ``read_only`` and ``owner`` define the handle and cannot be changed.
    """

    __slots__ = ("__weakref__", "_name", "_owner", "_page", "_read_only", "_ss")  # _io: Front's

    def __init__(self, name: str, io: _pageio.PageIO, read_only: bool, owner: int | None) -> None:
        m = io.current()
        self._name = name
        self._io = io
        self._read_only = read_only
        self._ss = m.seg.sector_size
        self._page = m.seg.page_size
        self._owner = owner
        _live.add(self)

    # ----------------------------------------------------------------- attributes

    @property
    def name(self) -> str:
        return self._name

    @property
    def sector_size(self) -> int:
        return self._ss

    @property
    def page_size(self) -> int:
        """The unit of locking, allocation and the page map (max(4096, sector_size))."""
        return self._page

    @property
    def read_only(self) -> bool:
        """Whether this handle was connected read-only (see ``frozen`` for the disk)."""
        return self._read_only

    @property
    def owner(self) -> int | None:
        """The uid this handle was told to trust besides itself and root, or None."""
        return self._owner

    @property
    def closed(self) -> bool:
        return self._io.m is None

    @property
    def size_sectors(self) -> int:
        return self._io.size_sectors()

    @property
    def frozen(self) -> bool:
        """Whether the disk is frozen: read-only for good, for every handle."""
        return bool(self._io.current().seg.hq[L.F_FROZEN])

    @property
    def backing(self) -> str | None:
        """The name of the disk this overlay reads unwritten pages from, or None."""
        m = self._io.current()
        return m.base.seg.name if m.base is not None else None

    # ----------------------------------------------------------------- the API

    def get_info(self) -> DiskInfo:
        """Sector size, size (current after any resize by any process) and writability."""
        size = self._io.size_sectors()
        writable = not self._read_only and not self._io.current().seg.hq[L.F_FROZEN]
        return DiskInfo(writable, self._ss, size)

    # read() and write() are Front's: the common request in one call, the rest comes here.

    def _read_general(
        self, sector: int, buffers: Buffers, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        views, total = self._views(buffers, True)
        off = _index(sector, "sector") * self._ss
        self._io.read(off, views, total, wait, _timeout(timeout))

    def _write_general(
        self, sector: int, buffers: Buffers, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        views, total = self._views(buffers, False)
        off = _index(sector, "sector") * self._ss
        self._io.write(off, views, total, wait, _timeout(timeout))

    def read_at(
        self, offset: int, buffer: Buffer, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Fill ``buffer`` from byte ``offset``; any alignment, atomic like ``read``."""
        if type(offset) is int and timeout is None and _flat_bytes(buffer, True):
            io = self._io
            if buffer and io.fast_read(offset, buffer) == 0:
                return
            return io.read(offset, (buffer,), len(buffer), wait)  # type: ignore[arg-type]
        v = _byte_view(buffer, True)
        self._io.read(_index(offset, "offset"), (v,), len(v), wait, _timeout(timeout))

    def write_at(
        self, offset: int, data: Buffer, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Write ``data`` at byte ``offset``; any alignment, atomic like ``write``."""
        if type(offset) is int and timeout is None and _flat_bytes(data, False):
            io = self._io
            if data and io.fast_write(offset, data) == 0:
                return
            return io.write(offset, (data,), len(data), wait)  # type: ignore[arg-type]
        v = _byte_view(data, False)
        self._io.write(_index(offset, "offset"), (v,), len(v), wait, _timeout(timeout))

    def _views(self, buffers: object, writable: bool) -> tuple[list[memoryview], int]:
        """Byte views of the caller's buffers and their total length, all checked."""
        items: Iterable[object] = (
            buffers if type(buffers) is list or type(buffers) is tuple else (buffers,)
        )
        views = []
        total = 0
        ss = self._ss
        for b in items:
            v = _byte_view(b, writable)
            n = len(v)
            if n % ss:
                raise BadBufferError(
                    f"buffer of {n} bytes is not a whole number of {ss}-byte sectors"
                )
            views.append(v)
            total += n
        return views, total

    def discard(self, sector: int, n_sectors: int) -> None:
        """Make ``n_sectors`` from ``sector`` read as zeros, giving whole pages back."""
        a, b = self._sector_range(sector, n_sectors)
        self._io.zero(a, b, unmap=True)

    def write_zeroes(self, sector: int, n_sectors: int, *, may_unmap: bool = True) -> None:
        """Zero a range; with ``may_unmap=False`` the pages stay allocated (NBD ``NO_HOLE``)."""
        a, b = self._sector_range(sector, n_sectors)
        self._io.zero(a, b, unmap=bool(may_unmap))

    def _sector_range(self, sector: object, n_sectors: object) -> tuple[int, int]:
        s = _index(sector, "sector")
        n = _index(n_sectors, "n_sectors")
        if n < 0:
            raise OutOfRangeError(f"sector count {n} is negative")
        return s * self._ss, (s + n) * self._ss

    def resize(self, size_sectors: int) -> None:
        """Grow (with zeros) or shrink (dropping the tail for good); every process sees it."""
        n = _index(size_sectors, "size_sectors")
        m = self._io.check(self._io.m, 0, 0, writing=True)
        limit = m.seg.max_pages * self._page // self._ss
        if not 0 <= n <= limit:
            raise InvalidGeometryError(
                f"size {n} is outside [0, {limit}] sectors, the most disk {self._name!r} was "
                "made to hold (its maximum size is set at creation)"
            )
        self._io.resize(n)

    def freeze(self) -> None:
        """Make the disk read-only for good, for every handle in every process.

        Writes, ``discard`` and ``resize`` then raise ``IsReadOnlyError``; reads go on. A
        frozen disk can back overlays (``create(name, backing=...)``).
        """
        if self._read_only:
            self._io.current()
            raise IsReadOnlyError(f"disk {self._name!r} is connected read-only")
        self._io.freeze()

    def seek_mapped(self, sector: int) -> int:
        """First sector >= ``sector`` that may hold data; the disk size if none."""
        return self._seek(sector, True)

    def seek_unmapped(self, sector: int) -> int:
        """First sector >= ``sector`` that is certainly zero; the disk size if none."""
        return self._seek(sector, False)

    def _seek(self, sector: object, mapped: bool) -> int:
        s = _index(sector, "sector")
        if s < 0:
            raise OutOfRangeError(f"sector {s} is negative")
        m = self._io.check(self._io.m, 0, 0, writing=False)
        size = m.seg.hq[L.F_SIZE_SECTORS]
        if s >= size:
            return s
        ss, shift = self._ss, m.seg.shift
        end_page = -(-(size * ss) // self._page)
        p = self._io.scan(m, (s * ss) >> shift, end_page, mapped)
        if p >= end_page:
            return int(size)
        return min(int(size), max(s, (p << shift) // ss))

    def extents(self, start: int = 0, end: int | None = None) -> list[Extent]:
        """The runs of mapped and zero sectors covering ``[start, end)`` (default: the disk).

        In an overlay, sectors its backing disk holds data for count as mapped.
        """
        lo, hi = self._extent_bounds(start, end)
        out: list[Extent] = []
        s = lo
        while s < hi:
            m = self.seek_mapped(s)
            if m > s:
                out.append(Extent(s, min(m, hi) - s, False))
                s = min(m, hi)
                continue
            u = min(self.seek_unmapped(s), hi)
            out.append(Extent(s, u - s, True))
            s = u
        return out

    def _extent_bounds(self, start: object, end: object) -> tuple[int, int]:
        size = self.size_sectors
        lo = _index(start, "start")
        hi = size if end is None else _index(end, "end")
        if not 0 <= lo <= hi <= size:
            raise OutOfRangeError(
                f"extent range [{lo}, {hi}) is outside the disk of {size} sectors"
            )
        return lo, hi

    def layer_extents(self, start: int = 0, end: int | None = None) -> list[LayerExtent]:
        """Like ``extents``, saying for each run which disk of an overlay chain holds it."""
        lo, hi = self._extent_bounds(start, end)
        m = self._io.current()
        ss, shift = self._ss, m.seg.shift
        out: list[LayerExtent] = []
        for ext in self.extents(lo, hi):
            if not ext.mapped:
                out.append(LayerExtent(ext.sector, ext.n_sectors, None, None))
                continue
            a, b = ext.sector * ss, (ext.sector + ext.n_sectors) * ss
            p0, p1 = a >> shift, ((b - 1) >> shift) + 1
            ws = _pageio.snapshot(m.seg, p0, p1)
            for pa, pb, src in _pageio.sources(m, p0, ws):
                sa = max(ext.sector, (pa << shift) // ss)
                sb = min(ext.sector + ext.n_sectors, -(-(pb << shift) // ss))
                layer, name = _layer_of(m, src)
                if out and out[-1].layer == layer and out[-1].sector + out[-1].n_sectors == sa:
                    prev = out.pop()
                    sa = prev.sector
                out.append(LayerExtent(sa, sb - sa, layer, name))
        return out

    def mapped_pages(self) -> int:
        """How many pages of this disk hold data of its own (and memory)."""
        return self._io.count_own()

    def flush(self) -> None:
        """Nothing to do (memory is the medium), but a disconnected handle still fails."""
        self._io.check(self._io.m, 0, 0, writing=False)

    @contextlib.contextmanager
    def hold_writes(self, *, timeout: float | None = None) -> Iterator[Disk]:
        """Hold off every writer of the disk (every thread and process) while the block runs.

        Reads go on, so reading the whole disk inside the block gives one point-in-time
        snapshot; ``copy`` and ``shmdisk export`` use it. Writers wait (and may time out);
        a write from inside the block in this thread raises ``ReentrantCallError``. A frozen
        disk needs no holding.
        """
        t = _timeout(timeout)
        m = self._io.current()
        if m.seg.hq[L.F_FROZEN] or not m.seg.writable:
            if not m.seg.hq[L.F_FROZEN]:
                raise IsReadOnlyError(
                    f"disk {self._name!r} is connected read-only: it cannot hold writers off"
                )
            yield self
            return
        deadline = None if t is None else time.monotonic() + t
        with self._io.hold_all(deadline=deadline):
            yield self

    def open(self, mode: str = "rb", buffering: int = -1) -> BinaryIO:
        """The disk as a binary file object, buffered as ``open`` does (``shmdisk._fileio``)."""
        from ._fileio import open_disk

        self._io.current()
        return open_disk(self, mode, buffering)

    def disconnect(self) -> None:
        """Release this handle (descriptors, mappings); idempotent. The disk stays.

        Safe while other threads are inside calls on this handle: they finish on the mapping
        they hold, which goes when the last of them is done.
        """
        io = getattr(self, "_io", None)
        if io is not None:
            io.attach(None)

    def __enter__(self) -> Disk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()

    def __reduce__(self) -> tuple[Any, tuple[str, bool, int | None]]:
        return (_reconnect, (self._name, self._read_only, self._owner))

    def __repr__(self) -> str:
        m = self._io.m
        if m is None:
            return f"<shmdisk.Disk {self._name!r} disconnected>"
        mode = "ro" if self._read_only else "rw"
        extra = " frozen" if m.seg.hq[L.F_FROZEN] else ""
        if m.base is not None:
            extra += f" over {m.base.seg.name!r}"
        size = m.seg.hq[L.F_SIZE_SECTORS]
        return f"<shmdisk.Disk {self._name!r} {size} x {self._ss} B {mode}{extra}>"


def _layer_of(m: Mapping, src: Mapping | None) -> tuple[int | None, str | None]:
    depth = 0
    b: Mapping | None = m
    while b is not None:
        if b is src:
            return depth, b.seg.name
        b, depth = b.base, depth + 1
    return None, None


def _reconnect(name: str, read_only: bool, owner: int | None = None) -> Disk:
    return connect(name, read_only=read_only, create=False, owner=owner)


# ---------------------------------------------------------------- attaching


def _attach(
    name: str, made: _segment.Made, read_only: bool, owner_uid: int | None, depth: int = 0
) -> Mapping:
    """Map an opened segment (and, for an overlay, its chain of backing disks)."""
    engine = _segment.require_platform()
    try:
        seg = Segment(name, made.fd, made.header, not read_only, engine)
    except BaseException:
        os.close(made.fd)
        raise
    h = made.header
    base = None
    if h.is_overlay:
        base = _attach_base(name, h, owner_uid, depth + 1)
    # The capacity open_segment checked against the file's size, not the header's word now:
    # that may have changed since, and mapping past the end of the file is SIGBUS on first
    # touch. A disk grown meanwhile is remapped by the first request that needs it.
    cap = h.capacity
    try:
        return Mapping(seg, cap, base, -(-(h.base_size_sectors * h.sector_size) // h.page_size))
    except OSError as e:
        raise UnknownError(e.errno or 5, f"disk {name!r}: mapping failed: {e.strerror}") from e


def _attach_base(name: str, h: L.Header, owner_uid: int | None, depth: int) -> Mapping:
    """The frozen backing disk an overlay was made on, checked to be that very disk."""
    if depth > L.MAX_CHAIN:
        raise BackingLostError(f"disk {name!r}: overlay chain deeper than {L.MAX_CHAIN}")
    try:
        made = _segment.open_segment(h.base_name, True, owner_uid)
    except DiskNotFoundError as e:
        raise BackingLostError(
            f"disk {name!r}: its backing disk {h.base_name!r} does not exist any more"
        ) from e
    b = made.header
    if (
        b.created_ns != h.base_created_ns
        or not b.frozen
        or b.size_sectors != h.base_size_sectors
        or b.sector_size != h.sector_size
    ):
        os.close(made.fd)
        raise BackingLostError(
            f"disk {name!r}: {h.base_name!r} is another disk now than the one it was made on"
        )
    return _attach(h.base_name, made, True, owner_uid, depth)


def _handle(name: str, made: _segment.Made, read_only: bool, owner_uid: int | None) -> Disk:
    m = _attach(name, made, read_only, owner_uid)
    return Disk(name, _pageio.PageIO(name, m), read_only, owner_uid)


# ---------------------------------------------------------------- the module functions

_F = TypeVar("_F", bound=Callable[..., Any])


def _system_errors(doing: str) -> Callable[[_F], _F]:
    """Make any ``OSError`` that is not already one of ours (no descriptor left for a ``dup``
    or an ``mmap``: EMFILE) a typed error of disk ``name`` (the first argument)."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def typed(name: Any, *args: Any, **kw: Any) -> Any:
            try:
                return fn(name, *args, **kw)
            except ShmdiskError:
                raise
            except OSError as e:
                raise _segment.os_error(e, str(name), doing) from e

        return typed  # type: ignore[return-value]

    return wrap


@_system_errors("creating")
def create(
    name: str,
    size_sectors: int | None = None,
    sector_size: int | None = None,
    *,
    mode: int = 0o600,
    max_size_sectors: int | None = None,
    backing: str | None = None,
    owner: int | str | None = None,
) -> Disk:
    """Create a new, all-zero disk; ``DiskExistsError`` if the name is taken.

    The disk may later be resized up to ``max_size_sectors`` (default: the larger of its size
    and 1 TiB); the reservation costs no memory. With ``backing=BASE`` the new disk is a
    copy-on-write overlay of the frozen disk ``BASE``, made in constant time: it reads as
    ``BASE`` until written, and costs only what is written to it. Its size and sector size
    default to the base's (a larger size reads zeros past the base). ``owner`` names a user
    whose base disk you trust (see ``connect``).
    """
    name = _segment.validate_name(name)
    mode = _segment.validate_mode(mode)
    owner_uid = _segment.resolve_owner(owner)
    base_header = None
    base_name = ""
    if backing is not None:
        base_name = _segment.validate_name(backing)
        base_header, size_sectors, sector_size = _base_for(
            base_name, owner_uid, size_sectors, sector_size
        )
    if size_sectors is None:
        raise InvalidGeometryError("size_sectors is needed (only an overlay takes its base's)")
    if sector_size is None:
        sector_size = L.DEFAULT_SECTOR_SIZE
    made = _segment.make_segment(
        name, size_sectors, sector_size, mode, max_size_sectors, base_header, base_name
    )
    try:
        disk = _handle(
            name, _segment.Made(os.dup(made.fd), made.header, made.path), False, owner_uid
        )
        _segment.publish(made, name)
    finally:
        os.close(made.fd)
    return disk


_create = create  # connect() has a parameter of that name


def _base_for(
    base_name: str, owner_uid: int | None, size: int | None, sector_size: int | None
) -> tuple[L.Header, int, int]:
    made = _segment.open_segment(base_name, True, owner_uid)
    os.close(made.fd)
    h = made.header
    if not h.frozen:
        raise NotFrozenError(
            f"disk {base_name!r} is not frozen: freeze it first (Disk.freeze(), "
            "shmdisk.freeze(), or `shmdisk freeze`), so it can never change under its overlays"
        )
    if sector_size is not None and sector_size != h.sector_size:
        raise InvalidGeometryError(
            f"sector size {sector_size} differs from {h.sector_size} of backing disk {base_name!r}"
        )
    if size is None:
        size = h.size_sectors
    elif isinstance(size, int) and size < h.size_sectors:
        raise InvalidGeometryError(
            f"size {size} is smaller than backing disk {base_name!r} ({h.size_sectors} sectors); "
            "create the overlay at the base's size, then resize it"
        )
    return h, size, h.sector_size


@_system_errors("connecting")
def connect(
    name: str,
    *,
    read_only: bool = False,
    create: bool = True,
    owner: int | str | None = None,
) -> Disk:
    """Connect to the disk ``name``; if missing, create the default disk (32768 x 512 B).

    Racing connects agree on one device. With ``create=False`` a missing name raises
    ``DiskNotFoundError``. A disk is used only if it belongs to this user or to root;
    ``owner=`` (a user name or uid) names another user whose disk you expect to share.
    """
    name = _segment.validate_name(name)
    owner_uid = _segment.resolve_owner(owner)
    while True:
        try:
            made = _segment.open_segment(name, read_only, owner_uid)
            return _handle(name, made, read_only, owner_uid)
        except DiskNotFoundError:
            if not create:
                raise
        try:
            new = _create(name, L.DEFAULT_SIZE_SECTORS, L.DEFAULT_SECTOR_SIZE)
        except FileExistsError:
            continue  # another process won the race: open what it made
        if not read_only:
            return new
        new.disconnect()  # made read-write (it had to be initialised); now as asked


@_system_errors("destroying")
def destroy(
    name: str,
    *,
    timeout: float = 30.0,
    force: bool = False,
    owner: int | str | None = None,
) -> None:
    """Destroy the disk: connected handles get ``DisconnectedError``; a missing name is fine.

    Waits for I/O in flight (at most ``timeout`` seconds, then ``LockTimeoutError``). A frozen
    disk that backs overlays raises ``DiskBusyError`` unless ``force`` (the overlays then get
    ``BackingLostError``). A file at the name that is no segment of ours is removed, never
    followed.
    """
    t = _timeout(timeout)
    _segment.destroy_segment(
        _segment.validate_name(name),
        30.0 if t is None else t,
        _segment.resolve_owner(owner),
        force,
    )


def freeze(name: str, *, owner: int | str | None = None) -> None:
    """Freeze the disk ``name``: read-only for good, for every handle (see ``Disk.freeze``)."""
    with connect(name, create=False, owner=owner) as disk:
        disk.freeze()


_COPY_CHUNK = 32 << 20  # bytes written per step: bounded locks held on the copy


def copy(
    src: str,
    dst: str,
    *,
    mode: int | None = None,
    owner: int | str | None = None,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Disk:
    """Copy disk ``src`` into a new disk ``dst``: one point in time, sparse, and fast.

    The copy holds off ``src``'s writers (not its readers) while it runs, so it is one
    consistent snapshot even while other processes write; only pages that hold data are
    copied (holes stay holes), at memory-copy speed. An overlay is copied flat. ``dst`` gets
    ``src``'s geometry and mode (or ``mode``) and appears under its name only when complete.
    Holding writers off needs write access to ``src``, or ``src`` frozen. ``timeout`` bounds
    the wait for writers in flight; ``progress(done_bytes, total_bytes)`` is called as it
    goes. Returns a handle on ``dst``.
    """
    dst = _segment.validate_name(dst)
    new_mode = None if mode is None else _segment.validate_mode(mode)
    if os.path.lexists(_segment.segment_path(dst)):
        raise DiskExistsError(f"disk {dst!r} exists already", _segment.segment_path(dst))
    with connect(src, create=False, owner=owner, read_only=not _writable(src)) as s:
        m = s._io.current()
        seg = m.seg
        if new_mode is None:
            new_mode = os.stat(_segment.segment_path(src)).st_mode & 0o777
        max_sectors = seg.max_pages * seg.page_size // seg.sector_size
        with s.hold_writes(timeout=timeout):
            size = s.size_sectors
            made = _segment.make_segment(
                dst, size, seg.sector_size, new_mode, max(size, max_sectors)
            )
            try:
                d = _handle(
                    dst, _segment.Made(os.dup(made.fd), made.header, made.path), False, None
                )
                try:
                    _copy_data(s, d, progress)
                    _segment.publish(made, dst)
                except BaseException:
                    d.disconnect()
                    raise
            finally:
                os.close(made.fd)
    return d


def _writable(name: str) -> bool:
    return os.access(_segment.segment_path(name), os.R_OK | os.W_OK)


def _copy_data(s: Disk, d: Disk, progress: Callable[[int, int], None] | None) -> None:
    """Copy every page of ``s`` that may hold data into ``d`` (``s`` does not change, ``d`` is
    not named yet: nobody else can see it)."""
    m = s._io.current()
    seg = m.seg
    dseg = d._io.current().seg
    ss, shift = seg.sector_size, seg.shift
    total = s.size_sectors * ss
    done = 0
    for ext in s.extents():
        a, b = ext.sector * ss, (ext.sector + ext.n_sectors) * ss
        if ext.mapped:
            p0, p1 = a >> shift, ((b - 1) >> shift) + 1
            ws = _pageio.snapshot(seg, p0, p1)
            for pa, pb, src in _pageio.sources(m, p0, ws):
                lo, hi = max(a, pa << shift), min(b, pb << shift)
                while src is not None and lo < hi:
                    n = min(hi - lo, _COPY_CHUNK)
                    _pageio.fill_unshared(dseg, lo, src, n)
                    lo += n
                    if progress is not None:
                        progress(done + lo - a, total)
        done += b - a
        if progress is not None:
            progress(done, total)
