"""Serve shmdisk disks to Network Block Device clients (``shmdisk serve``).

:class:`NBDServer` runs the server in background threads (tests, embedding); :func:`serve`
runs it in the foreground until SIGINT or SIGTERM, as ``shmdisk serve NAME...`` does.
"""

from .server import DEFAULT_HOST, DEFAULT_PORT, NBDServer, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "NBDServer", "serve"]
