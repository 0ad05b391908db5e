"""What every scenario shares: its options and result, unique disk names, and running child
processes (start methods, joining, draining queues, progress lines)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import shmdisk

SPAWN = mp.get_context("spawn")
FORK = mp.get_context("fork")


@dataclass
class Result:
    """The outcome of one scenario: pass/fail, figures, and what went wrong."""

    scenario: str
    ok: bool = True
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    def fail(self, problem: str) -> None:
        self.ok = False
        if len(self.problems) < 20:
            self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "scenario": self.scenario,
            "ok": self.ok,
            "figures": self.figures,
            "problems": self.problems,
            "seconds": round(self.seconds, 2),
        }
        if self.skipped:
            d["skipped"] = self.skipped
        return d


@dataclass
class Options:
    """Knobs shared by the scenarios (the CLI fills them; tests pass small values)."""

    duration: float = 10.0
    processes: int = 4
    seed: int | None = None
    progress: Callable[[str], None] | None = None
    sector_size: int = 512
    disk_pages: int = 64  # torture: a small disk, so requests collide often
    max_pages: int = 4  # torture: the longest request, in pages
    large_mib: float = 8.0  # kill: a victim's largest write (8 MiB: 128 stripes)
    hang_after: float = 5.0  # kill: a survivor silent this long counts as a hang
    examples: int = 300  # hostile: hypothesis examples per check
    tmpfs_size: str = "8M"  # enospc
    interval: float = 1.0  # seconds between progress lines
    threads: int = 1  # torture: threads per process, sharing one Disk handle
    window_at: int = 0  # torture: first page of the I/O window (1000: across a page-map page)
    blocks: bool = False  # torture: whole-block writes, discards and zeroings (see _blocks_loop)
    resize: bool = False  # torture --blocks: also shrink to a block boundary and grow back
    discard: bool = True  # torture --blocks: discard and zero blocks (off: --no-discard)
    churn: bool = False  # torture: short-lived threads one after another (see --churn)
    split_writes: bool = False  # torture self-test: non-atomic writes that must be caught
    engines: str = "inherit"  # engines of the child processes (see _engines.py)
    min_kills: int = 0  # kill, read-only: go on past the duration until this many kills

    def rng(self, salt: int = 0) -> random.Random:
        seed = self.seed if self.seed is not None else secrets.randbits(32)
        return random.Random(seed * 1000003 + salt)

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)


def unique_name(tag: str) -> str:
    """A disk name no other run or test will pick."""
    return f"stress-{tag}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def scratch_disk(tag: str, size_sectors: int, sector_size: int = 512, **kw: Any) -> Iterator[str]:
    """Create a disk for a scenario and destroy it afterwards, whatever happens."""
    name = unique_name(tag)
    shmdisk.create(name, size_sectors, sector_size, **kw).disconnect()
    try:
        yield name
    finally:
        shmdisk.destroy(name)


def start_together(ready: Any, n: int, duration: float, patience: float = 120.0) -> float:
    """Called by each of ``n`` children as it starts: wait (up to ``patience`` s) until all are
    up, then return when this one should stop. Spawned interpreters start one by one, slowly on
    a loaded machine; counting the run from the last start keeps every run its full length."""
    with ready.get_lock():
        ready.value += 1
    deadline = time.monotonic() + patience
    while ready.value < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return time.monotonic() + duration


def _oversleep(words: Any) -> None:
    """Sleep 1 ms at a time until told to stop; keep the longest overshoot (ns) in words[1]."""
    while not words[0]:
        t = time.monotonic_ns()
        time.sleep(0.001)
        late = time.monotonic_ns() - t - 1_000_000
        if late > words[1]:
            words[1] = late


class SchedulingDelay:
    """A process that only sleeps, to measure how long this machine keeps a runnable process
    waiting for a CPU. A loaded machine stalls every process that long, holders of locks
    included; scenarios scale their stall limits by it (``limit_ms``)."""

    def __init__(self) -> None:
        import ctypes

        self._words = SPAWN.Array(ctypes.c_int64, 2, lock=False)
        self._proc = SPAWN.Process(target=_oversleep, args=(self._words,), daemon=True)
        self._proc.start()

    def reset(self) -> None:
        self._words[1] = 0

    def worst_ms(self) -> float:
        return float(self._words[1]) / 1e6

    def limit_ms(self, floor_ms: float) -> float:
        """``floor_ms``, or three times the worst delay seen if that is more: a lock holder
        kept off the CPU, then its waiter, then the waiter's caller."""
        return max(floor_ms, 3 * self.worst_ms())

    def stop(self) -> None:
        self._words[0] = 1
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


def join_all(procs: list[Any], timeout: float) -> list[Any]:
    """Join processes within ``timeout`` overall; kill and return the ones that did not end."""
    deadline = time.monotonic() + timeout
    stuck = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            stuck.append(p)
    for p in stuck:
        p.kill()
        p.join(5)
    return stuck


def drain(q: Any, n: int, timeout: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        try:
            out.append(q.get(timeout=max(0.01, deadline - time.monotonic())))
        except Exception:
            break
    return out


def progress_loop(
    opt: Options, label: str, procs: list[Any], stop_at: float | None, line: Callable[[], str]
) -> None:
    """Print a progress line every interval until ``stop_at`` or until every process ended
    (``stop_at`` None: at most the duration plus 180 s, for starting and a hang to show)."""
    t0 = time.monotonic()
    if stop_at is None:
        stop_at = t0 + opt.duration + 180
    nxt = t0 + opt.interval
    while any(p.is_alive() for p in procs) and time.monotonic() < stop_at:
        time.sleep(0.05)
        if time.monotonic() >= nxt:
            opt.say(f"{label:<14}{time.monotonic() - t0:6.1f}s  {line()}")
            nxt += opt.interval
