"""Serve shmdisk disks to Network Block Device clients (``shmdisk serve``).

:class:`NBDServer` runs the server in background threads (tests, embedding); :func:`serve`
runs it in the foreground until SIGINT or SIGTERM, as ``shmdisk serve NAME...`` does.
:class:`Access`, :class:`Peer` and :class:`Transport` are what an access policy
(``NBDServer(access=...)``) works with: it is called as ``policy(export_name, peer)`` and
returns an :class:`Access`, which can narrow what the disk's permissions give a client, never
widen it. :class:`TLSConfigError` is what ``start()`` raises for TLS options that cannot work
(a TCP listener without credentials, a missing certificate, ``tls_psk`` before Python 3.13).
"""

from ._access import Access, AccessPolicy
from ._peer import Credentials, Peer, Transport
from ._tls import TLSConfigError
from .server import DEFAULT_HOST, DEFAULT_PORT, NBDServer, serve

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Access",
    "AccessPolicy",
    "Credentials",
    "NBDServer",
    "Peer",
    "TLSConfigError",
    "Transport",
    "serve",
]
