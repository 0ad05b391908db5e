"""What a connection may do with an export: the one place the server decides it.

Every path into an export (``NBD_OPT_LIST``, ``INFO``, ``GO``, ``EXPORT_NAME``, meta contexts)
asks :func:`decide`, for every kind of socket alike (Unix, TCP, socket-activated). A policy is
any callable ``policy(export_name, peer) -> Access``; the server passes the one it was given
(``NBDServer(access=...)``), or :func:`allow_all`. Whatever a policy says, an export that is
read-only (``--read-only``, or a disk this process may only read) never becomes writable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ._peer import Peer

__all__ = ["Access", "AccessPolicy", "allow_all", "decide"]


class Access(enum.Enum):
    """What a connection may do with one export."""

    READ_WRITE = "read-write"
    READ_ONLY = "read-only"
    REFUSED = "refused"  # as if the export did not exist for this peer, but with ERR_POLICY


AccessPolicy = Callable[[str, Peer], Access]


def allow_all(export: str, peer: Peer) -> Access:
    """The default policy: every peer may use every export as far as the export allows."""
    return Access.READ_WRITE


def decide(policy: AccessPolicy, export: str, export_read_only: bool, peer: Peer) -> Access:
    """The access ``peer`` gets to ``export``: the policy's word, narrowed by the export."""
    wanted = policy(export, peer)
    if not isinstance(wanted, Access):
        raise TypeError(f"access policy returned {wanted!r}, not an Access")
    if wanted is Access.READ_WRITE and export_read_only:
        return Access.READ_ONLY
    return wanted
