"""Which page-I/O engine each child process runs, and what a process repaired.

A process picks its engine once, at import (``shmdisk/_stripes.py``): ``"native"`` (the C
extension) unless ``SHMDISK_NO_EXTENSIONS=1`` is in its environment, then ``"python"``. Spawned
children get the environment the parent has when it starts them, so a scenario mixes engines on
one disk by starting its children inside ``child_env``. Forked children keep the engine of the
process they were forked from (see ``_nursery.py`` for fast forks of either engine).

``--engines`` choices: ``inherit`` (children run what this process's environment says), ``native``,
``python``, or ``mixed`` (children alternate, native first).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import shmdisk
from shmdisk import _pageio, _stripes

CHOICES = ("inherit", "native", "python", "mixed")
# Forces glibc's non-temporal memcpy/memset for copies above 1 MiB (288 MiB by default on some
# machines, so that large requests would otherwise never take that path).
NT_TUNABLE = "glibc.cpu.x86_non_temporal_threshold=0x100000"
_NO_EXT = "SHMDISK_NO_EXTENSIONS"


def native_built() -> bool:
    """Whether the native engine can run here (built, and the platform is the supported one)."""
    return _stripes.PLATFORM_PROBLEM is None and (
        importlib.util.find_spec("shmdisk._native") is not None
    )


def problem(choice: str) -> str | None:
    """Why ``choice`` cannot be honoured here, or None."""
    if choice not in CHOICES:
        return f"unknown engine choice {choice!r}"
    if choice in ("native", "mixed") and not native_built():
        return f"--engines {choice} needs the native engine, which is not built here"
    return None


def plan(choice: str, i: int) -> str:
    """The engine of the ``i``-th child: 'native', 'python' or 'inherit'."""
    if choice == "mixed":
        return ("native", "python")[i % 2]
    return choice


def inherited() -> str:
    """The engine an 'inherit' child runs: what this process's environment selects."""
    if os.environ.get(_NO_EXT, "") not in ("", "0") or not native_built():
        return "python"
    return "native"


def resolve(engine: str) -> str:
    return inherited() if engine == "inherit" else engine


@contextlib.contextmanager
def child_env(engine: str, nt_stores: bool = False) -> Iterator[None]:
    """Children started inside run ``engine`` (and, with ``nt_stores``, NT copies from 1 MiB)."""
    saved = {k: os.environ.get(k) for k in (_NO_EXT, "GLIBC_TUNABLES")}
    try:
        if engine == "python":
            os.environ[_NO_EXT] = "1"
        elif engine == "native":
            os.environ[_NO_EXT] = "0"
        if nt_stores:
            old = os.environ.get("GLIBC_TUNABLES", "")
            os.environ["GLIBC_TUNABLES"] = f"{old}:{NT_TUNABLE}" if old else NT_TUNABLE
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start(proc: Any, engine: str, nt_stores: bool = False) -> None:
    """Start a spawn-context process running ``engine``."""
    with child_env(engine, nt_stores):
        proc.start()


def repaired_pages() -> int:
    """Odd counters this process made even after a lock holder died, in either engine."""
    native = _stripes.native.repaired_pages() if _stripes.native is not None else 0
    return int(native) + _pageio.repaired_pages


def running() -> str:
    """This process's engine, as children report it."""
    return shmdisk.ENGINE or "none"


def code(engine: str) -> int:
    """An engine name as a number, for shared int64 arrays (0 unknown, 1 native, 2 python)."""
    return {"native": 1, "python": 2}.get(engine, 0)


def name_of(code_: int) -> str:
    return {1: "native", 2: "python"}.get(code_, "unknown")
