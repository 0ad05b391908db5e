"""Every error shmdisk raises, in one place.

Each error is a :class:`ShmdiskError` *and* the standard-library error a caller would already
catch, so ``except FileExistsError`` or ``except ValueError`` keeps working. The first four are
the error vocabulary of the MirageOS BLOCK interface (``Unknown``, ``Unimplemented``,
``Is_read_only``, ``Disconnected``)::

    ShmdiskError
    ├── UnknownError            (OSError)             an unexpected failure of the system
    ├── UnimplementedError      (NotImplementedError) not supported (here, or on this platform)
    ├── IsReadOnlyError         (PermissionError)     a write through a read-only handle, or to a
    │                                                 frozen disk
    ├── DisconnectedError       (ConnectionError)     the handle is closed or the disk destroyed
    │   └── BackingLostError                          an overlay's backing disk is gone
    ├── DiskExistsError         (FileExistsError)     create() of a name that is taken
    ├── DiskNotFoundError       (FileNotFoundError)   connect(create=False) of a missing name
    ├── PermissionDeniedError   (PermissionError)     the segment's mode forbids this process
    │   └── UntrustedOwnerError                       the segment belongs to another user
    ├── DiskFullError           (OSError, ENOSPC)     /dev/shm has no room for a new page
    ├── DiskBusyError           (OSError, EBUSY)      destroy() of a disk that backs overlays
    ├── LockTimeoutError        (TimeoutError)        a lock did not come free in time
    ├── WouldBlockError         (BlockingIOError)     wait=False and another holder has the lock
    ├── ReentrantCallError      (RuntimeError)        a call nested inside a call on the same
    │                                                 disk in the same thread (signal handler)
    ├── InvalidArgumentError    (TypeError)           a sector or count that is not an int
    │   └── InvalidModeError    (ValueError)          a mode that is not an int in 0..0o777
    ├── NotFrozenError          (ValueError)          backing=BASE where BASE is not frozen
    ├── OutOfRangeError         (ValueError)          a sector range outside the disk
    ├── BadBufferError          (ValueError, TypeError) not a plain buffer, read-only, not
    │                                                 whole sectors
    ├── InvalidNameError        (ValueError)          a disk name outside [A-Za-z0-9._-]{1,200}
    ├── InvalidGeometryError    (ValueError)          a bad size or sector size
    └── CorruptSegmentError     (ValueError)          a segment with our prefix but a bad header

The errors that are ``OSError``\\ s carry ``errno`` and, where a file is involved, ``filename``
(the segment's path), as the standard library's own do; ``str()`` is the message alone. A
failure of the system keeps its original ``OSError`` as ``__cause__``. Every class pickles, so
an error raised in a worker process arrives intact.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

__all__ = [
    "BackingLostError",
    "BadBufferError",
    "CorruptSegmentError",
    "DisconnectedError",
    "DiskBusyError",
    "DiskExistsError",
    "DiskFullError",
    "DiskNotFoundError",
    "InvalidArgumentError",
    "InvalidGeometryError",
    "InvalidModeError",
    "InvalidNameError",
    "IsReadOnlyError",
    "LockTimeoutError",
    "NotFrozenError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ReentrantCallError",
    "ShmdiskError",
    "UnimplementedError",
    "UnknownError",
    "UntrustedOwnerError",
    "WouldBlockError",
]


class ShmdiskError(Exception):
    """Base class of every error raised by shmdisk."""


class _SystemError(OSError):
    """An ``OSError`` with a default errno: ``Cls(message[, filename])``, or
    ``Cls(errno, message[, filename])`` to name the errno that caused it."""

    default_errno = _errno.EIO

    def __init__(self, *args: Any) -> None:
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            code, rest = args[0], args[1:]
        else:
            code, rest = self.default_errno, args
        message = str(rest[0]) if rest else (self.__doc__ or "").split("\n")[0]
        filename = rest[1] if len(rest) > 1 else None
        if filename is None:
            super().__init__(code, message)
        else:
            super().__init__(code, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        args: tuple[Any, ...] = (self.errno, self.strerror)
        if self.filename is not None:
            args += (self.filename,)
        return (type(self), args, self.__dict__ or None)


class UnknownError(ShmdiskError, _SystemError):
    """An unexpected failure of the operating system (mirage: ``Unknown``)."""


class UnimplementedError(ShmdiskError, NotImplementedError):
    """The operation is not supported by this device (mirage: ``Unimplemented``)."""


class IsReadOnlyError(ShmdiskError, _SystemError, PermissionError):
    """A modifying operation on a read-only handle or a frozen disk (mirage: ``Is_read_only``)."""

    default_errno = _errno.EROFS


class DisconnectedError(ShmdiskError, _SystemError, ConnectionError):
    """The handle was disconnected, or the disk was destroyed (mirage: ``Disconnected``)."""

    default_errno = _errno.ENOTCONN


class BackingLostError(DisconnectedError):
    """An overlay's backing disk was destroyed, or is missing or another disk now."""


class DiskExistsError(ShmdiskError, _SystemError, FileExistsError):
    """A disk of that name exists already."""

    default_errno = _errno.EEXIST


class DiskNotFoundError(ShmdiskError, _SystemError, FileNotFoundError):
    """No disk of that name exists."""

    default_errno = _errno.ENOENT


class PermissionDeniedError(ShmdiskError, _SystemError, PermissionError):
    """The segment's owner or mode does not allow this process in."""

    default_errno = _errno.EACCES


class UntrustedOwnerError(PermissionDeniedError):
    """The segment belongs to a user this process does not trust (not itself, not root).

    ``owner_uid`` is that user's uid. Pass ``owner=`` to ``connect`` to trust them.
    """

    default_errno = _errno.EPERM


class DiskFullError(ShmdiskError, _SystemError):
    """The shared-memory filesystem has no room; nothing of the failing call was written."""

    default_errno = _errno.ENOSPC


class DiskBusyError(ShmdiskError, _SystemError):
    """The disk backs overlays (named in ``overlays``), so it cannot go without ``force``."""

    default_errno = _errno.EBUSY


class LockTimeoutError(ShmdiskError, _SystemError, TimeoutError):
    """A lock did not become available in time."""

    default_errno = _errno.ETIMEDOUT


class WouldBlockError(ShmdiskError, _SystemError, BlockingIOError):
    """``wait=False`` was asked and the pages are locked by someone else; nothing was done."""

    default_errno = _errno.EAGAIN


class ReentrantCallError(ShmdiskError, RuntimeError):
    """A call on a disk made while the same thread is inside another call on that disk.

    It happens when a signal handler uses a disk the interrupted code was using; the nested
    call would wait for the lock its own thread holds. Nothing was done.
    """


class InvalidArgumentError(ShmdiskError, TypeError):
    """A sector, count or size of the wrong type (not an integer)."""


class InvalidModeError(InvalidArgumentError, ValueError):
    """A permission mode that is not an int in ``0..0o777``."""


class NotFrozenError(ShmdiskError, ValueError):
    """An overlay was asked for on a disk that is not frozen (it could change under it)."""


class OutOfRangeError(ShmdiskError, ValueError):
    """A sector or range outside the disk (checked before any byte is touched)."""


class BadBufferError(ShmdiskError, ValueError, TypeError):
    """A buffer that is not plain bytes or numbers, not contiguous, read-only where it must be
    written, released, or not a whole number of sectors."""


class InvalidNameError(ShmdiskError, ValueError):
    """A disk name that is empty, too long or outside ``[A-Za-z0-9._-]``."""


class InvalidGeometryError(ShmdiskError, ValueError):
    """A negative or too large size, or a sector size that is not a power of two in range."""


class CorruptSegmentError(ShmdiskError, ValueError):
    """A segment with the shmdisk prefix whose header is foreign, damaged or of another version."""
