"""shmdisk: named block devices in POSIX shared memory.

Create a disk by name in one process; any process on the machine connects to it by name and
sees the same bytes. The API follows MirageOS's BLOCK device::

    import shmdisk

    with shmdisk.create("scratch", size_sectors=2048) as disk:   # 1 MiB of 512-byte sectors
        disk.write(0, b"hello".ljust(512, b"\\0"))
    # ... in any other process:
    with shmdisk.connect("scratch", create=False) as disk:
        buf = bytearray(512)
        disk.read(0, buf)
    shmdisk.destroy("scratch")

Where to look: ``disk.py`` (the API), ``errors.py`` (every error), ``_layout.py`` (the byte
format of a segment), ``_pageio.py`` (the locking protocol). ``ENGINE`` says which engine runs
it: ``"native"`` (the C extension) or ``"python"`` (``ctypes``; also with
``SHMDISK_NO_EXTENSIONS=1``).
"""

from ._layout import DEFAULT_SECTOR_SIZE, DEFAULT_SIZE_SECTORS
from ._segment import SEGMENT_PREFIX, SegmentInfo, inspect, list_disks, segment_path
from ._stripes import ENGINE
from .disk import (
    Disk,
    DiskInfo,
    Extent,
    LayerExtent,
    connect,
    copy,
    create,
    destroy,
    freeze,
)
from .errors import (
    BackingLostError,
    BadBufferError,
    CorruptSegmentError,
    DisconnectedError,
    DiskBusyError,
    DiskExistsError,
    DiskFullError,
    DiskNotFoundError,
    InvalidArgumentError,
    InvalidGeometryError,
    InvalidModeError,
    InvalidNameError,
    IsReadOnlyError,
    LockTimeoutError,
    NotFrozenError,
    OutOfRangeError,
    PermissionDeniedError,
    ReentrantCallError,
    ShmdiskError,
    UnimplementedError,
    UnknownError,
    UntrustedOwnerError,
    WouldBlockError,
)

__version__ = "0.1.0"

__all__ = [
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
