"""The exports a server offers: which disk each name is, and what a client is told about it.

:class:`ExportTable` owns the disk handles the server connected by name (and disconnects them
when it closes) and answers "what is export NAME right now, for this peer": the disk's current
size, whether it is writable, and the access the peer gets (``_access.py``). A disk destroyed
and re-created under the same name is attached again here, so new connections reach it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import shmdisk
from shmdisk import errors

from . import _proto as P
from ._access import Access, AccessPolicy, decide
from ._peer import Peer

if TYPE_CHECKING:
    from shmdisk.disk import Disk

__all__ = ["Export", "ExportRefused", "ExportTable", "UnknownExport"]

log = logging.getLogger("shmdisk.nbd")


@dataclass(frozen=True)
class Export:
    """One export as a client sees it at the moment it enters transmission."""

    name: str
    disk: Disk
    read_only: bool
    size: int  # bytes, fixed for the connection at its handshake
    sector_size: int
    page_size: int

    def transmission_flags(self, structured: bool) -> int:
        flags = (
            P.FLAG_HAS_FLAGS
            | P.FLAG_SEND_FLUSH
            | P.FLAG_SEND_CACHE
            # Every connection reads and writes the same shared memory, with no cache of its
            # own, so a flush on one connection covers writes made on all the others.
            | P.FLAG_CAN_MULTI_CONN
        )
        if structured:
            flags |= P.FLAG_SEND_DF  # reads are answered in one chunk anyway
        if self.read_only:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= (
                P.FLAG_SEND_FUA
                | P.FLAG_SEND_TRIM
                | P.FLAG_SEND_WRITE_ZEROES
                | P.FLAG_SEND_FAST_ZERO
            )
        return flags

    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) as NBD_INFO_BLOCK_SIZE gives them."""
        minimum = self.sector_size
        preferred = max(self.sector_size, self.page_size, 4096)
        return minimum, preferred, P.MAX_REQUEST

    def description(self) -> str:
        sectors = self.size // self.sector_size
        return f"shmdisk {self.name}: {sectors} sectors of {self.sector_size} bytes"


class UnknownExport(LookupError):
    """No export of that name, or its disk is gone."""


class ExportRefused(PermissionError):
    """The export exists, but the access policy refuses it to this peer."""


class ExportTable:
    """Export name -> disk, for the server's whole life.

    ``specs`` are disk names (connected by :meth:`open`, disconnected by :meth:`close`) or
    connected :class:`~shmdisk.Disk` handles (the caller's: used as they are, never closed,
    never replaced). The first is also the default export, the empty name.
    """

    def __init__(
        self,
        specs: Sequence[str | Disk],
        *,
        read_only: bool,
        create: bool,
        policy: AccessPolicy,
    ) -> None:
        self._specs = list(specs)
        self._read_only = read_only
        self._create = create
        self._policy = policy
        self._exports: dict[str, Export] = {}
        self._owned: list[Disk] = []
        self._default = ""
        self._lock = threading.Lock()
        self._closing = False

    # --- life --------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect the disks named in the specs; raises what ``shmdisk.connect`` raises."""
        for spec in self._specs:
            if isinstance(spec, str):
                disk = shmdisk.connect(spec, read_only=self._read_only, create=self._create)
                self._owned.append(disk)
            else:
                disk = spec
            if disk.name in self._exports:
                raise ValueError(f"disk {disk.name!r} is exported twice")
            self._exports[disk.name] = self._export_of(disk)
            if not self._default:
                self._default = disk.name

    def close(self) -> None:
        """Disconnect the disks this table connected (idempotent)."""
        with self._lock:
            self._closing = True
            owned, self._owned = self._owned, []
        for disk in owned:
            try:
                disk.disconnect()
            except errors.ShmdiskError:
                pass  # already gone: nothing left to release

    # --- questions ---------------------------------------------------------------------------
    @property
    def default(self) -> str:
        return self._default

    def names(self) -> list[str]:
        return list(self._exports)

    def visible(self, peer: Peer) -> list[str]:
        """The names NBD_OPT_LIST shows ``peer``: all but those the policy refuses it."""
        return [n for n in self._exports if self._policy(n, peer) is not Access.REFUSED]

    def resolve(self, name: str, peer: Peer) -> Export:
        """Export ``name`` ("" is the default) as ``peer`` may use it, with its current size.

        Raises :class:`UnknownExport` or :class:`ExportRefused`.
        """
        key = name or self._default
        export = self._exports.get(key)
        if export is None:
            raise UnknownExport(f"no export named {name!r}")
        export = self._current(export)
        access = decide(self._policy, export.name, export.read_only, peer)
        if access is Access.REFUSED:
            raise ExportRefused(f"export {export.name!r} is not available to this client")
        if access is Access.READ_ONLY and not export.read_only:
            export = dataclasses.replace(export, read_only=True)
        return export

    # --- internals ---------------------------------------------------------------------------
    def _current(self, export: Export) -> Export:
        """``export`` with the disk's present size, re-attached if it was destroyed."""
        try:
            info = export.disk.get_info()
        except errors.DisconnectedError as exc:
            fresh = self._reattach(export)
            if fresh is None:
                log.warning("export %r is unavailable: %s", export.name, exc)
                raise UnknownExport(f"export {export.name!r} is unavailable: {exc}") from None
            export = fresh
            info = export.disk.get_info()
        except errors.ShmdiskError as exc:
            log.warning("export %r is unavailable: %s", export.name, exc)
            raise UnknownExport(f"export {export.name!r} is unavailable: {exc}") from None
        size = info.size_sectors * info.sector_size
        read_only = export.read_only or not info.read_write
        if size != export.size or read_only != export.read_only:
            export = dataclasses.replace(
                export, read_only=read_only, size=size, sector_size=info.sector_size
            )
        return export

    def _export_of(self, disk: Disk) -> Export:
        info = disk.get_info()
        return Export(
            name=disk.name,
            disk=disk,
            read_only=self._read_only or disk.read_only or not info.read_write,
            size=info.size_sectors * info.sector_size,
            sector_size=info.sector_size,
            page_size=disk.page_size,
        )

    def _reattach(self, old: Export) -> Export | None:
        """A new handle on a destroyed disk's name, if we own it and the name exists again."""
        with self._lock:
            current = self._exports[old.name]
            if current.disk is not old.disk:
                return current  # another connection got here first
            if self._closing or not any(d is old.disk for d in self._owned):
                return None  # the caller's handle: not ours to replace
            try:
                disk = shmdisk.connect(old.name, read_only=self._read_only, create=False)
            except (errors.ShmdiskError, OSError):
                return None
            self._owned.append(disk)
            export = self._export_of(disk)
            self._exports[old.name] = export
        log.info("export %r: the disk was re-created; new connections get the new one", old.name)
        return export
