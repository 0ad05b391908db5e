"""The exception tree: one base, the fitting stdlib class, picklable."""

from __future__ import annotations

import errno
import pickle

import pytest

import shmdisk
from shmdisk import errors

STDLIB_BASE = {
    errors.UnknownError: OSError,
    errors.UnimplementedError: NotImplementedError,
    errors.IsReadOnlyError: PermissionError,
    errors.DisconnectedError: ConnectionError,
    errors.DiskExistsError: FileExistsError,
    errors.DiskNotFoundError: FileNotFoundError,
    errors.PermissionDeniedError: PermissionError,
    errors.DiskFullError: OSError,
    errors.LockTimeoutError: TimeoutError,
    errors.WouldBlockError: BlockingIOError,
    errors.InvalidArgumentError: TypeError,
    errors.OutOfRangeError: ValueError,
    errors.BadBufferError: ValueError,
    errors.InvalidNameError: ValueError,
    errors.InvalidGeometryError: ValueError,
    errors.CorruptSegmentError: ValueError,
}


def test_every_error_is_listed_and_exported() -> None:
    """Every class in errors.__all__ is checked here and re-exported by the package."""
    names = {n for n in errors.__all__ if n != "ShmdiskError"}
    assert names == {c.__name__ for c in STDLIB_BASE}
    for n in errors.__all__:
        assert getattr(shmdisk, n) is getattr(errors, n)


@pytest.mark.parametrize("cls", list(STDLIB_BASE))
def test_error_has_base_and_stdlib_class(cls: type[Exception]) -> None:
    """Each error is a ShmdiskError and the stdlib error a caller already catches."""
    e = cls("boom")
    assert isinstance(e, shmdisk.ShmdiskError)
    assert isinstance(e, STDLIB_BASE[cls])


@pytest.mark.parametrize("cls", list(STDLIB_BASE))
def test_error_pickles_intact(cls: type[Exception]) -> None:
    """An error crossing a process boundary keeps its type and message."""
    e = cls("it broke")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    assert "it broke" in str(back)


def test_disk_full_carries_enospc() -> None:
    """DiskFullError has errno ENOSPC, also after pickling."""
    e = pickle.loads(pickle.dumps(shmdisk.DiskFullError("full")))
    assert e.errno == errno.ENOSPC
