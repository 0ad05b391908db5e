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

Public surface (pinned by ``tests/test_public_api.py``):

- ``shmdisk``: the names in ``__all__`` below: the disk API, segment inspection, every error.
- ``shmdisk.errors``: the same errors, in the module that draws their tree.
- ``shmdisk.aio``: the API as coroutines for asyncio.
- ``shmdisk.testing``: the pytest plugin (fixtures, leak guard) and ``unique_name``.
- ``shmdisk.nbd``: the NBD server (``NBDServer``, ``serve``); import it by name, it is not
  loaded by ``import shmdisk``.
- The commands ``shmdisk`` (also ``python -m shmdisk``) and ``shmdisk-ls``.

Everything else is internal and may change in any release: modules whose names start with an
underscore, ``shmdisk.disk`` (where ``Disk`` is implemented; import it from ``shmdisk``), the
``shmdisk.cli`` package (the commands, not a Python API) and the submodules of ``shmdisk.nbd``.

Where to look: ``disk.py`` (the API), ``errors.py`` (every error), ``_layout.py`` (the byte
format of a segment), ``_pageio.py`` (the locking protocol). ``ENGINE`` says which engine runs
it: ``"native"`` (the C extension) or ``"python"`` (``ctypes``; also with
``SHMDISK_NO_EXTENSIONS=1``).
"""

from ._layout import DEFAULT_SECTOR_SIZE, DEFAULT_SIZE_SECTORS
from ._segment import SEGMENT_PREFIX, SegmentInfo, inspect, list_disks, segment_path
from ._stripes import ENGINE
from ._version import __version__
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
