"""A disk as a standard binary file object: ``Disk.open(mode)``.

``open_disk`` builds what the standard library's ``open`` builds for a file: a raw
``io.RawIOBase`` object (``DiskRawIO``) wrapped in ``io.BufferedReader``, ``io.BufferedWriter``
or ``io.BufferedRandom``. So everything that takes a binary file works: ``shutil.copyfileobj``,
``tarfile``, ``zipfile``, ``hashlib.file_digest``, ``readinto`` into numpy arrays.

Behaviour, where a disk differs from a regular file:

- Modes: ``rb`` (read), ``wb`` (write; the disk is *not* truncated: a block device has a fixed
  size), ``r+b`` and ``w+b`` (read and write). Text, append and exclusive-create modes are
  refused with ``ValueError``; a read-only handle refuses every writing mode with
  ``IsReadOnlyError`` (a ``PermissionError``), as ``open`` does for a file without write access.
- The size is ``size_sectors * sector_size``, re-read on every call that needs it, so a
  ``resize`` by any process is seen at once (``seek(0, SEEK_END)``, reads at the end).
- Any byte offset and length works: each raw read or write is one ``Disk.read_at`` /
  ``Disk.write_at`` call, atomic against every other request on the device.
- ``truncate`` raises ``io.UnsupportedOperation``: the size of a shared device is changed with
  ``Disk.resize`` on purpose, never as a side effect of file code.
- Reads at or past the end return ``b""``; a write that starts at or past the end raises
  ``OSError(ENOSPC)`` and one that crosses the end writes what fits (a short write), as a write
  to a block device does. Seeking past the end is allowed, as for a file.
- ``seek`` also understands ``os.SEEK_DATA`` and ``os.SEEK_HOLE`` (from the mapped-page bitmap).
- ``fileno()`` raises ``io.UnsupportedOperation``: no file descriptor holds the disk's bytes,
  so ``numpy.fromfile`` and ``os.sendfile`` cannot be used; use ``readinto`` instead.
- Closing the file never disconnects or destroys the disk.
"""

from __future__ import annotations

import errno
import io
import operator
import os
from typing import TYPE_CHECKING, BinaryIO, cast

from shmdisk.errors import IsReadOnlyError, OutOfRangeError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from shmdisk.disk import Disk

__all__ = ["DiskRawIO", "open_disk"]

# The standard library's buffer is 8 KiB; each raw call here costs a lock round trip of a few
# microseconds, so a larger buffer keeps small sequential reads and writes cheap.
_MIN_BUFFER_SIZE = 64 * 1024

# A read or write racing with a shrinking resize in another process can find the device smaller
# than the size it just read; it re-reads the size and tries again a few times.
_RESIZE_RETRIES = 8


def _parse_mode(mode: str) -> tuple[bool, bool]:
    """Return (readable, writable) for an ``open``-style binary mode string."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwb+axt"):
        raise ValueError(f"invalid mode: {mode!r}")
    if "t" in chars or "b" not in chars:
        raise ValueError(
            f"invalid mode {mode!r}: a disk opens in binary mode only "
            "(wrap it in io.TextIOWrapper for text)"
        )
    if "a" in chars or "x" in chars:
        raise ValueError(f"invalid mode {mode!r}: a disk cannot be appended to or created")
    if ("r" in chars) == ("w" in chars):
        raise ValueError(f"invalid mode {mode!r}: need exactly one of 'r' and 'w'")
    plus = "+" in chars
    return ("r" in chars or plus), ("w" in chars or plus)


class DiskRawIO(io.RawIOBase):
    """Unbuffered byte-addressed file view of a ``Disk``; each call is one device request."""

    def __init__(self, disk: Disk, mode: str = "rb") -> None:
        readable, writable = _parse_mode(mode)
        if disk.closed:
            # Let the device raise its own DisconnectedError with its usual message.
            disk.get_info()
        if writable and disk.read_only:
            raise IsReadOnlyError(
                f"disk {disk.name!r} is connected read-only; cannot open {mode!r}"
            )
        super().__init__()
        self._disk = disk
        self._readable = readable
        self._writable = writable
        self._pos = 0
        self.name = disk.name
        # The mode string FileIO reports for the same flags.
        self.mode = ("rb+" if readable else "wb") if writable else "rb"

    # -- the parts io.RawIOBase asks for ---------------------------------------------------

    @property
    def disk(self) -> Disk:
        """The device this file reads and writes."""
        return self._disk

    def readable(self) -> bool:
        self._checkClosed()
        return self._readable

    def writable(self) -> bool:
        self._checkClosed()
        return self._writable

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def isatty(self) -> bool:
        self._checkClosed()
        return False

    def size(self) -> int:
        """The disk's current size in bytes (read from the device on each call)."""
        info = self._disk.get_info()
        return info.size_sectors * info.sector_size

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        offset = operator.index(offset)
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size() + offset
        elif whence in (os.SEEK_DATA, os.SEEK_HOLE):
            pos = self._seek_data_hole(offset, whence)
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            # What FileIO (lseek) reports for a negative result.
            raise OSError(errno.EINVAL, "negative seek position", self.name)
        self._pos = pos
        return pos

    def _seek_data_hole(self, offset: int, whence: int) -> int:
        # lseek(2) semantics: ENXIO at or past the end; the end counts as a hole.
        info = self._disk.get_info()
        size = info.size_sectors * info.sector_size
        if offset < 0 or offset >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), self.name)
        sector = offset // info.sector_size
        if whence == os.SEEK_DATA:
            found = self._disk.seek_mapped(sector)
            if found >= info.size_sectors:
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), self.name)
        else:
            found = self._disk.seek_unmapped(sector)
        return min(max(offset, found * info.sector_size), size)

    def truncate(self, size: int | None = None) -> int:
        self._checkClosed()
        raise io.UnsupportedOperation(
            "truncate: a disk has a fixed size; use Disk.resize to change it"
        )

    def readinto(self, buffer: Buffer) -> int:
        self._checkClosed()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        with memoryview(buffer) as view, view.cast("B") as target:
            want = len(target)
            for _ in range(_RESIZE_RETRIES):
                n = min(want, self.size() - self._pos)
                if n <= 0:
                    return 0
                try:
                    self._disk.read_at(self._pos, target[:n])
                except OutOfRangeError:
                    continue  # shrunk by another process between size() and read_at
                self._pos += n
                return n
        raise OutOfRangeError(f"disk {self.name!r} kept shrinking under a read")

    def readall(self) -> bytes:
        # One request for the rest of the disk instead of RawIOBase's 8 KiB loop.
        self._checkClosed()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        buf = bytearray(max(0, self.size() - self._pos))
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def write(self, data: Buffer) -> int:
        self._checkClosed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        with memoryview(data) as view, view.cast("B") as source:
            want = len(source)
            if want == 0:
                return 0
            for _ in range(_RESIZE_RETRIES):
                n = min(want, self.size() - self._pos)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "write past the end of the disk", self.name)
                try:
                    self._disk.write_at(self._pos, source[:n])
                except OutOfRangeError:
                    continue  # shrunk by another process between size() and write_at
                self._pos += n
                return n
        raise OutOfRangeError(f"disk {self.name!r} kept shrinking under a write")

    def flush(self) -> None:
        # Every write already sits in shared memory; nothing is buffered at this level.
        self._checkClosed()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._pos}"
        return f"<DiskRawIO name={self.name!r} mode={self.mode!r} {state}>"


def open_disk(disk: Disk, mode: str = "rb", buffering: int = -1) -> BinaryIO:
    """Open ``disk`` as a binary file; see the module docstring for the exact behaviour.

    ``buffering=0`` returns the unbuffered ``DiskRawIO`` (each ``write`` is then one atomic
    device request); ``-1`` picks a buffer of at least 64 KiB; a positive value is the buffer size.
    """
    raw = DiskRawIO(disk, mode)
    if buffering == 0:
        return cast("BinaryIO", raw)
    if buffering < 0:
        buffering = max(_MIN_BUFFER_SIZE, disk.page_size)
    buffered: io.BufferedIOBase
    if raw.readable() and raw.writable():
        buffered = io.BufferedRandom(raw, buffering)
    elif raw.writable():
        buffered = io.BufferedWriter(raw, buffering)
    else:
        buffered = io.BufferedReader(raw, buffering)
    return cast("BinaryIO", buffered)
