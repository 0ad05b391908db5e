"""``Disk.read`` and ``Disk.write``: the common request in one call, the rest handed on.

``Front`` is the base class of ``Disk``. Its ``read`` / ``write`` first offer a plain request
(an int sector, one buffer, no timeout) to the handle's page I/O, whose ``read_sectors`` /
``write_sectors`` do it at once or answer "not here"; everything else, and whatever those
decline, goes to ``Disk._read_general`` / ``_write_general`` with the arguments as given,
which check them and raise the typed errors. With the native engine ``Front`` is the C type
``shmdisk._native.Front`` (one C call for the whole request: at 4 KiB a Python frame is a
quarter of the cost); with the python engine it is ``PyFront`` below, the same in Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _stripes

if TYPE_CHECKING:
    from ._pageio import PageIO
    from .disk import Buffers


class PyFront:
    __slots__ = ("_io",)

    _io: PageIO

    def read(
        self, sector: int, buffers: Buffers, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Fill ``buffers`` (one or a list, each whole sectors) from ``sector`` onwards.

        Atomic against every write from any thread or process. With ``wait=False`` a read that
        would have to wait for a writer raises ``WouldBlockError``; with ``timeout`` one that
        waits longer raises ``LockTimeoutError``; either way nothing was read.
        """
        if timeout is None and self._io.read_sectors(sector, buffers) == 0:
            return
        self._read_general(sector, buffers, wait=wait, timeout=timeout)

    def write(
        self, sector: int, buffers: Buffers, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        """Copy ``buffers`` (one or a list, each whole sectors) to the disk at ``sector``.

        All or nothing, and atomic against every other call from any thread or process.
        ``wait`` and ``timeout`` as for ``read``.
        """
        if timeout is None and self._io.write_sectors(sector, buffers) == 0:
            return
        self._write_general(sector, buffers, wait=wait, timeout=timeout)

    def _read_general(
        self, sector: int, buffers: Buffers, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        raise NotImplementedError  # Disk's

    def _write_general(
        self, sector: int, buffers: Buffers, *, wait: bool = True, timeout: float | None = None
    ) -> None:
        raise NotImplementedError  # Disk's


# An if statement, not an expression: mypy then takes Front for PyFront, a class to derive from.
if TYPE_CHECKING or _stripes.native is None:  # noqa: SIM108
    Front = PyFront
else:
    Front = _stripes.native.Front
