"""The exports a server offers: which disk each name is, and what a client is told about it.

:class:`ExportTable` owns the disk handles the server connected by name (and disconnects them
when it closes) and answers "what is export NAME right now, for this peer": the disk's current
size, whether it is writable, and the access the peer gets (``_access.py``, from the disk
file's permissions as they are now). A disk destroyed and re-created under the same name is
attached again here, so new connections reach it, under the rules the first connect followed:
a segment of another owner than this process's user, root, or the ``owner`` the server was
told to trust is refused (``UntrustedOwnerError``) and the export stays unavailable.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import shmdisk
from shmdisk import errors

from . import _proto as P
from ._access import Access, AccessPolicy, FileFacts, decide, file_access
from ._peer import Peer, Transport

if TYPE_CHECKING:
    from shmdisk._mapping import Mapping
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
    """The export exists, but this peer may not use it (``str`` is for the client; ``reason``
    says why, for the log)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ExportTable:
    """Export name -> disk, for the server's whole life.

    ``specs`` are disk names (connected by :meth:`open`, disconnected by :meth:`close`) or
    connected :class:`~shmdisk.Disk` handles (the caller's: used as they are, never closed,
    never replaced). The first is also the default export, the empty name. ``owner`` is the
    user (name or uid) whose disks the server may serve besides its own and root's, as for
    ``shmdisk.connect``.
    """

    def __init__(
        self,
        specs: Sequence[str | Disk],
        *,
        read_only: bool,
        create: bool,
        policy: AccessPolicy,
        owner: int | str | None = None,
    ) -> None:
        self._specs = list(specs)
        self._read_only = read_only
        self._create = create
        self._policy = policy
        self._owner = owner
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
                disk = shmdisk.connect(
                    spec, read_only=self._read_only, create=self._create, owner=self._owner
                )
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
        """The names NBD_OPT_LIST shows ``peer``: all but those it would be refused.

        A listed export is one the client can go on to use, so ``nbdinfo --list`` shows what
        works rather than errors; a local user learns nothing it could not see in /dev/shm,
        and a network client nothing about disks it may not use. (A refused name asked for by
        name is answered ``NBD_REP_ERR_POLICY``, so a user who expected it learns why.)
        """
        names = []
        for name in self._exports:
            try:
                self.resolve(name, peer)
            except ExportRefused:
                continue
            except UnknownExport:
                pass  # unavailable for now (destroyed): listed, as the server still offers it
            names.append(name)
        return names

    def resolve(self, name: str, peer: Peer) -> Export:
        """Export ``name`` ("" is the default) as ``peer`` may use it, with its current size.

        Raises :class:`UnknownExport` or :class:`ExportRefused`.
        """
        key = name or self._default
        export = self._exports.get(key)
        if export is None:
            raise UnknownExport(f"no export named {name!r}")
        export = self._current(export)
        if peer.transport is Transport.UNIX:
            try:
                by_file, reason = file_access(_file_facts(export.disk), peer.credentials)
            except (OSError, errors.ShmdiskError) as exc:
                # Destroyed between the size check and now: unavailable, not a bug.
                raise UnknownExport(f"export {export.name!r} is unavailable: {exc}") from None
        else:
            by_file, reason = Access.READ_WRITE, "network client"
        access = decide(self._policy, export.name, export.read_only, peer, by_file)
        if access is Access.REFUSED:
            if by_file is not Access.REFUSED:
                reason = "refused by the access policy"
            who = ""
            if peer.credentials is not None:
                who = f" to uid {peer.credentials.uid}"
            raise ExportRefused(f"export {export.name!r} is not available{who}", reason)
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
                # The same trust as the first connect: the server's own user, root, or the
                # owner it was told to trust; a name re-created by anyone else is not served.
                disk = shmdisk.connect(
                    old.name, read_only=self._read_only, create=False, owner=old.disk.owner
                )
            except errors.UntrustedOwnerError as exc:
                log.warning("export %r: not attaching the re-created disk: %s", old.name, exc)
                return None
            except (errors.ShmdiskError, OSError):
                return None
            self._owned.append(disk)
            export = self._export_of(disk)
            self._exports[old.name] = export
        log.info("export %r: the disk was re-created; new connections get the new one", old.name)
        return export


# The extended attribute the kernel keeps a file's POSIX ACL in.
_ACL_XATTR = "system.posix_acl_access"


def _file_facts(disk: Disk) -> list[FileFacts]:
    """The owner, group, mode and ACL of the file ``disk`` maps, then of each disk it is backed
    by (an overlay's chain), read from the descriptors this process holds.

    The descriptors, not the names: a name may already belong to a re-created disk, while the
    client is about to be served the one this handle maps. The core has no public way to stat
    a handle's file, so this is the one place that reaches into its mapping.
    """
    facts = []
    mapping: Mapping | None = disk._io.current()
    while mapping is not None:
        fd = mapping.seg.fd
        st = os.fstat(fd)
        try:
            acl: bytes | None = os.getxattr(fd, _ACL_XATTR)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            acl = None
        facts.append(FileFacts(st.st_uid, st.st_gid, st.st_mode & 0o777, acl))
        mapping = mapping.base
    return facts
