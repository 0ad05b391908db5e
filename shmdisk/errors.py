"""Every error shmdisk raises, in one place.

Each error is a :class:`ShmdiskError` *and* the standard-library error a caller would already
catch, so ``except FileExistsError`` or ``except ValueError`` keeps working. The first four are
the error vocabulary of the MirageOS BLOCK interface (``Unknown``, ``Unimplemented``,
``Is_read_only``, ``Disconnected``)::

    ShmdiskError
    ├── UnknownError            (OSError)             an unexpected failure of the system
    ├── UnimplementedError      (NotImplementedError) the operation is not supported
    ├── IsReadOnlyError         (PermissionError)     a write through a read-only handle
    ├── DisconnectedError       (ConnectionError)     the handle is closed or the disk destroyed
    ├── DiskExistsError         (FileExistsError)     create() of a name that is taken
    ├── DiskNotFoundError       (FileNotFoundError)   connect(create=False) of a missing name
    ├── PermissionDeniedError   (PermissionError)     the segment's mode forbids this process
    ├── DiskFullError           (OSError, ENOSPC)     /dev/shm has no room for a new page
    ├── LockTimeoutError        (TimeoutError)        a lock or a half-made segment never came free
    ├── WouldBlockError         (BlockingIOError)     wait=False and another holder has the lock
    ├── InvalidArgumentError    (TypeError)           a sector or count that is not an int
    ├── OutOfRangeError         (ValueError)          a sector range outside the disk
    ├── BadBufferError          (ValueError, TypeError) not a buffer, read-only, not whole sectors
    ├── InvalidNameError        (ValueError)          a disk name outside [A-Za-z0-9._-]{1,200}
    ├── InvalidGeometryError    (ValueError)          a bad size or sector size
    └── CorruptSegmentError     (ValueError)          a segment with our prefix but a bad header

Every class keeps the standard ``args`` so instances pickle and cross process boundaries intact.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BadBufferError",
    "CorruptSegmentError",
    "DisconnectedError",
    "DiskExistsError",
    "DiskFullError",
    "DiskNotFoundError",
    "InvalidArgumentError",
    "InvalidGeometryError",
    "InvalidNameError",
    "IsReadOnlyError",
    "LockTimeoutError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ShmdiskError",
    "UnimplementedError",
    "UnknownError",
    "WouldBlockError",
]


class ShmdiskError(Exception):
    """Base class of every error raised by shmdisk."""


class UnknownError(ShmdiskError, OSError):
    """An unexpected failure of the operating system (mirage: ``Unknown``)."""


class UnimplementedError(ShmdiskError, NotImplementedError):
    """The operation is not supported by this device (mirage: ``Unimplemented``)."""


class IsReadOnlyError(ShmdiskError, PermissionError):
    """A modifying operation on a read-only handle (mirage: ``Is_read_only``)."""


class DisconnectedError(ShmdiskError, ConnectionError):
    """The handle was disconnected, or the disk was destroyed (mirage: ``Disconnected``)."""


class DiskExistsError(ShmdiskError, FileExistsError):
    """A disk of that name exists already."""


class DiskNotFoundError(ShmdiskError, FileNotFoundError):
    """No disk of that name exists."""


class PermissionDeniedError(ShmdiskError, PermissionError):
    """The segment's owner or mode does not allow this process in."""


class DiskFullError(ShmdiskError, OSError):
    """The shared-memory filesystem has no room; nothing of the failing call was written."""

    def __init__(self, message: str = "no space left in shared memory") -> None:
        # OSError(errno, strerror) fills .errno, so callers can test errno == ENOSPC;
        # args stay (errno, message), which is what pickling passes back to __init__ ...
        super().__init__(_errno.ENOSPC, message)

    def __reduce__(self) -> tuple[type[DiskFullError], tuple[str]]:
        # ... so tell pickle to rebuild from the message alone.
        return (type(self), (str(self.strerror),))


class LockTimeoutError(ShmdiskError, TimeoutError):
    """A lock, or a segment still being created, did not become available in time."""


class InvalidArgumentError(ShmdiskError, TypeError):
    """A sector, count or size of the wrong type (not an integer)."""


class WouldBlockError(ShmdiskError, BlockingIOError):
    """``wait=False`` was asked and the pages are locked by someone else; nothing was done."""


class OutOfRangeError(ShmdiskError, ValueError):
    """A sector or range outside the disk (checked before any byte is touched)."""


class BadBufferError(ShmdiskError, ValueError, TypeError):
    """A buffer that is not a contiguous buffer, is read-only, or is not whole sectors."""


class InvalidNameError(ShmdiskError, ValueError):
    """A disk name that is empty, too long or outside ``[A-Za-z0-9._-]``."""


class InvalidGeometryError(ShmdiskError, ValueError):
    """A negative or too large size, or a sector size that is not a power of two in range."""


class CorruptSegmentError(ShmdiskError, ValueError):
    """A segment with the shmdisk prefix whose header is foreign, damaged or of another version."""
