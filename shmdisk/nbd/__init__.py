"""Serve shmdisk disks to Network Block Device clients (``shmdisk serve``)."""
