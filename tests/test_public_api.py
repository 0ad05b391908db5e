"""The public surface is pinned, so it never changes by accident."""

from __future__ import annotations

import shmdisk


def test_all_is_pinned() -> None:
    """__all__ lists exactly these names, sorted as written."""
    assert shmdisk.__all__ == [
        "DEFAULT_SECTOR_SIZE",
        "DEFAULT_SIZE_SECTORS",
        "SEGMENT_PREFIX",
        "BadBufferError",
        "CorruptSegmentError",
        "DisconnectedError",
        "Disk",
        "DiskExistsError",
        "DiskFullError",
        "DiskInfo",
        "DiskNotFoundError",
        "Extent",
        "InvalidArgumentError",
        "InvalidGeometryError",
        "InvalidNameError",
        "IsReadOnlyError",
        "LockTimeoutError",
        "OutOfRangeError",
        "PermissionDeniedError",
        "SegmentInfo",
        "ShmdiskError",
        "UnimplementedError",
        "UnknownError",
        "WouldBlockError",
        "__version__",
        "connect",
        "create",
        "destroy",
        "inspect",
        "list_disks",
        "segment_path",
    ]
    for n in shmdisk.__all__:
        assert hasattr(shmdisk, n)


def test_defaults_match_mirage() -> None:
    """The default geometry is mirage-block-ramdisk's: 32768 sectors of 512 bytes."""
    assert (shmdisk.DEFAULT_SIZE_SECTORS, shmdisk.DEFAULT_SECTOR_SIZE) == (32768, 512)
