"""Child processes of the reliability kill tests (importable under spawn)."""

from __future__ import annotations

import time
from typing import Any

import shmdisk
from shmdisk import _layout


def hold_every_stripe_of(names: list[str], ready: Any) -> None:
    """Hold every stripe of each disk in ``names`` (1024 each) in this thread, then wait to be
    killed: with two disks, exactly the kernel's limit of robust mutexes a dying thread frees."""
    disks = [shmdisk.connect(n, create=False) for n in names]
    holds = [d.hold_writes() for d in disks]
    for h in holds:
        h.__enter__()
    ready.set()
    time.sleep(3600)


def hold_all_with_intent(name: str, ready: Any, first: int, count: int) -> None:
    """Hold every stripe of the disk with intent ``(first, count)``, as a write of that range
    would, then wait to be killed."""
    d = shmdisk.connect(name, create=False)
    io = d._io
    with io.holding(io.current(), list(range(_layout.STRIPES)), (first, count)):
        ready.set()
        time.sleep(3600)
