"""The public surface is pinned, so it never changes by accident."""

from __future__ import annotations

import shmdisk


def test_all_is_pinned() -> None:
    """__all__ lists exactly these names, sorted as written."""
    assert shmdisk.__all__ == [
        "DEFAULT_SECTOR_SIZE",
        "DEFAULT_SIZE_SECTORS",
        "ENGINE",
        "SEGMENT_PREFIX",
        "BackingLostError",
        "BadBufferError",
        "CorruptSegmentError",
        "DisconnectedError",
        "Disk",
        "DiskBusyError",
        "DiskExistsError",
        "DiskFullError",
        "DiskInfo",
        "DiskNotFoundError",
        "Extent",
        "InvalidArgumentError",
        "InvalidGeometryError",
        "InvalidModeError",
        "InvalidNameError",
        "IsReadOnlyError",
        "LayerExtent",
        "LockTimeoutError",
        "NotFrozenError",
        "OutOfRangeError",
        "PermissionDeniedError",
        "ReentrantCallError",
        "SegmentInfo",
        "ShmdiskError",
        "UnimplementedError",
        "UnknownError",
        "UntrustedOwnerError",
        "WouldBlockError",
        "__version__",
        "connect",
        "copy",
        "create",
        "destroy",
        "freeze",
        "inspect",
        "list_disks",
        "segment_path",
    ]
    for n in shmdisk.__all__:
        assert hasattr(shmdisk, n)


def test_defaults_match_mirage() -> None:
    """The default geometry is mirage-block-ramdisk's: 32768 sectors of 512 bytes."""
    assert (shmdisk.DEFAULT_SIZE_SECTORS, shmdisk.DEFAULT_SECTOR_SIZE) == (32768, 512)
