"""Serve shmdisk disks to Network Block Device clients (``shmdisk serve``).

:class:`NBDServer` runs the server in background threads (tests, embedding); :func:`serve`
runs it in the foreground until SIGINT or SIGTERM, as ``shmdisk serve NAME...`` does.
:class:`Access`, :class:`Peer` and :class:`Transport` are what an access policy
(``NBDServer(access=...)``) works with: it is called as ``policy(export_name, peer)`` and
returns an :class:`Access`.
"""

from ._access import Access, AccessPolicy
from ._peer import Credentials, Peer, Transport
from .server import DEFAULT_HOST, DEFAULT_PORT, NBDServer, serve

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Access",
    "AccessPolicy",
    "Credentials",
    "NBDServer",
    "Peer",
    "Transport",
    "serve",
]
