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
    errors.BackingLostError: ConnectionError,
    errors.UntrustedOwnerError: PermissionError,
    errors.DiskBusyError: OSError,
    errors.ReentrantCallError: RuntimeError,
    errors.InvalidModeError: ValueError,
    errors.NotFrozenError: ValueError,
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


ERRNOS = {
    errors.UnknownError: errno.EIO,
    errors.IsReadOnlyError: errno.EROFS,
    errors.DisconnectedError: errno.ENOTCONN,
    errors.DiskExistsError: errno.EEXIST,
    errors.DiskNotFoundError: errno.ENOENT,
    errors.PermissionDeniedError: errno.EACCES,
    errors.UntrustedOwnerError: errno.EPERM,
    errors.DiskFullError: errno.ENOSPC,
    errors.DiskBusyError: errno.EBUSY,
    errors.LockTimeoutError: errno.ETIMEDOUT,
    errors.WouldBlockError: errno.EAGAIN,
}


@pytest.mark.parametrize("cls", list(ERRNOS))
def test_os_errors_carry_errno_and_filename_through_pickle(cls: type[OSError]) -> None:
    """OSError kinds keep errno and filename as the stdlib's do; str() is the message alone."""
    plain = cls("it broke")
    assert plain.errno == ERRNOS[cls] and str(plain) == "it broke"
    e = cls(errno.EMFILE, "too many", "/dev/shm/shmdisk.x")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    assert (back.errno, back.strerror, back.filename) == (errno.EMFILE, "too many", e.filename)
    assert str(back) == "too many"


def test_real_errors_name_the_file_and_keep_the_cause(name: str) -> None:
    """DiskExistsError names the segment; a system failure keeps its OSError as __cause__."""
    shmdisk.create(name, 8).disconnect()
    with pytest.raises(shmdisk.DiskExistsError) as exists:
        shmdisk.create(name, 8)
    assert exists.value.errno == errno.EEXIST
    assert exists.value.filename == shmdisk.segment_path(name)
    with pytest.raises(shmdisk.DiskNotFoundError) as missing:
        shmdisk.connect(name + "-nope", create=False)
    assert missing.value.filename == shmdisk.segment_path(name + "-nope")
    assert isinstance(exists.value.__cause__, FileExistsError)


def test_untrusted_owner_and_busy_errors_carry_their_facts() -> None:
    """Attributes added to an error (owner_uid, overlays) survive pickling."""
    e = errors.UntrustedOwnerError(errno.EPERM, "not yours", "/p")
    e.owner_uid = 1234  # type: ignore[attr-defined]
    back = pickle.loads(pickle.dumps(e))
    assert back.owner_uid == 1234 and back.filename == "/p"
    b = errors.DiskBusyError("busy")
    b.overlays = ["a", "b"]  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(b)).overlays == ["a", "b"]
