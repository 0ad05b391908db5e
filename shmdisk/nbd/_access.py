"""What a connection may do with an export: the one place the server decides it.

Every path into an export (``NBD_OPT_LIST``, ``INFO``, ``GO``, ``EXPORT_NAME``, meta contexts)
asks :func:`decide`, for every kind of socket alike (Unix, TCP, socket-activated, TLS or not).
Three things narrow what a client gets, and none of them can widen what another allowed:

- **The disk's file.** A client on a Unix socket is served only as far as its own process
  could open the segment itself: :func:`file_access` applies the kernel's rules (owner, group
  and other bits, a POSIX ACL if the file has one, the client's uid, gid and supplementary
  groups as ``SO_PEERCRED`` and ``SO_PEERGROUPS`` gave them; root may do everything). Without
  this a server run by the disk's owner or by root would hand every local user who can reach
  its socket what the file's permissions refuse them. An overlay also needs read access to each
  disk it is backed by, as opening it does. TCP clients have no local identity: they are judged
  by how they got in (TLS, the listener's address), not by file permissions.
- **The policy** (``NBDServer(access=policy)``): any callable ``policy(export_name, peer)``
  returning an :class:`Access`; :func:`allow_all` when none is given.
- **The export**: one that is read-only (``--read-only``, a frozen disk, a disk this process
  may only read) never becomes writable.

The permissions are read at every handshake, so a ``chmod`` applies to the next connection; a
connection keeps what it was given, as an open file descriptor does.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._peer import Credentials, Peer

__all__ = [
    "Access",
    "AccessPolicy",
    "FileFacts",
    "allow_all",
    "decide",
    "file_access",
    "narrowest",
]


class Access(enum.Enum):
    """What a connection may do with one export."""

    READ_WRITE = "read-write"
    READ_ONLY = "read-only"
    REFUSED = "refused"  # answered NBD_REP_ERR_POLICY, and left out of NBD_OPT_LIST


AccessPolicy = Callable[[str, Peer], Access]

_RANK = {Access.REFUSED: 0, Access.READ_ONLY: 1, Access.READ_WRITE: 2}


def narrowest(*grants: Access) -> Access:
    """The least of ``grants``: REFUSED < READ_ONLY < READ_WRITE."""
    return min(grants, key=_RANK.__getitem__)


def allow_all(export: str, peer: Peer) -> Access:
    """The default policy: no narrowing beyond the file's permissions and the export's."""
    return Access.READ_WRITE


@dataclass(frozen=True)
class FileFacts:
    """What the kernel looks at when a process opens a segment file."""

    uid: int
    gid: int
    mode: int  # the permission bits (st_mode & 0o777)
    acl: bytes | None = None  # the raw system.posix_acl_access attribute, if the file has one

    def describe(self) -> str:
        acl = " with an ACL" if self.acl else ""
        return f"owner {self.uid}, group {self.gid}, mode {self.mode:04o}{acl}"


_READ, _WRITE = 4, 2


def file_access(files: Sequence[FileFacts], creds: Credentials | None) -> tuple[Access, str]:
    """What a process with ``creds`` could open: the segment ``files[0]``, read-write or
    read-only, each backing disk ``files[1:]`` read-only; and why, for the log.

    Unknown credentials get nothing: a server that cannot tell who is asking must not guess.
    """
    if creds is None:
        return Access.REFUSED, "the kernel did not say who the client is"
    if creds.uid == 0:
        return Access.READ_WRITE, "root"
    who = f"uid {creds.uid}"
    if not files or not _allows(files[0], creds, _READ):
        facts = files[0].describe() if files else "no file"
        return Access.REFUSED, f"{who} may not read the disk ({facts})"
    for base in files[1:]:
        if not _allows(base, creds, _READ):
            return Access.REFUSED, f"{who} may not read a disk it is backed by ({base.describe()})"
    if _allows(files[0], creds, _READ | _WRITE):
        return Access.READ_WRITE, f"{who} may read and write the disk"
    return Access.READ_ONLY, f"{who} may only read the disk ({files[0].describe()})"


def _allows(f: FileFacts, creds: Credentials, want: int) -> bool:
    """Whether the kernel lets ``creds`` open ``f`` for ``want`` (read 4, write 2)."""
    if f.acl is not None:
        return _acl_allows(f.acl, f, creds, want)
    if creds.uid == f.uid:
        bits = f.mode >> 6  # the owner class decides alone, even if group or other grant more
    elif f.gid == creds.gid or f.gid in creds.groups:
        bits = f.mode >> 3
    else:
        bits = f.mode
    return bits & want == want


# The system.posix_acl_access attribute: a little-endian version word (2), then entries of
# (tag u16, perm u16, id u32). Tags as in the kernel's posix_acl_xattr.h.
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_KNOWN_TAGS = frozenset({_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER})


def _acl_allows(raw: bytes, f: FileFacts, creds: Credentials, want: int) -> bool:
    """The kernel's POSIX ACL check (``posix_acl_permission``); a malformed ACL refuses."""
    size = len(raw) - _ACL_HEADER.size
    if size < 0 or size % _ACL_ENTRY.size or _ACL_HEADER.unpack_from(raw)[0] != _ACL_VERSION:
        return False
    entries: list[tuple[int, int, int]] = [
        _ACL_ENTRY.unpack_from(raw, _ACL_HEADER.size + i * _ACL_ENTRY.size)
        for i in range(size // _ACL_ENTRY.size)
    ]
    if any(tag not in _KNOWN_TAGS for tag, _perm, _id in entries):
        return False  # the kernel answers EIO to what it cannot read
    mask = next((perm for tag, perm, _id in entries if tag == _MASK), 7)
    groups = {creds.gid, *creds.groups}
    for tag, perm, ident in entries:
        if tag == _USER_OBJ and creds.uid == f.uid:
            return perm & want == want
        if tag == _USER and creds.uid == ident:
            return perm & mask & want == want
    # The first group entry that grants ``want`` decides, through the mask; the mask is the
    # same for all of them, so "any entry grants it through the mask" is the same test.
    found = False
    for tag, perm, ident in entries:
        if (tag == _GROUP_OBJ and f.gid in groups) or (tag == _GROUP and ident in groups):
            found = True
            if perm & mask & want == want:
                return True
    if found:
        return False
    other = next((perm for tag, perm, _id in entries if tag == _OTHER), 0)
    return other & want == want


def decide(
    policy: AccessPolicy, export: str, export_read_only: bool, peer: Peer, by_file: Access
) -> Access:
    """The access ``peer`` gets to ``export``: the file's word, the policy's and the export's."""
    wanted = policy(export, peer)
    if not isinstance(wanted, Access):
        raise TypeError(f"access policy returned {wanted!r}, not an Access")
    ceiling = Access.READ_ONLY if export_read_only else Access.READ_WRITE
    return narrowest(wanted, by_file, ceiling)
