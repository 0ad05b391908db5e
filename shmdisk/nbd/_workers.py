"""Threads for the server: a cache of reusable threads, and per-connection request workers.

Threads are reused rather than started per connection or per request: starting one costs far
more than a request, and every thread that touches a disk gets a lock descriptor of its own
from the core. :class:`ThreadCache` hands a job to an idle thread or starts one; a
:class:`Workers` runs one connection's offloaded requests on at most ``limit`` of them, so one
client can never take every thread (a client that stops reading its replies stalls its own
workers only).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable

__all__ = ["ThreadCache", "Workers"]

log = logging.getLogger("shmdisk.nbd")

Job = Callable[[], None]

# Idle threads kept for the next connections and requests; more end as soon as they are done.
SPARE = 4
# An idle thread ends after this long without work.
IDLE_TIMEOUT = 10.0


class ThreadCache:
    """Runs jobs on reused daemon threads; :meth:`stop` ends them all.

    A thread that finishes a job stays for the next one only while fewer than ``spare`` others
    are idle, and an idle thread ends after ``idle_timeout`` seconds without work: a burst of
    connections does not leave its threads (and the lock descriptor each got from the core)
    behind once it is over.
    """

    def __init__(self, name: str, spare: int = SPARE, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._name = name
        self._spare = spare
        self._idle_timeout = idle_timeout
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Idle threads not yet promised a job: each run() promises one of them the job it queues.
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._started = 0

    def run(self, job: Job) -> None:
        """Run ``job`` on an idle thread, or on a new one if none is idle."""
        with self._lock:
            if self._idle:
                self._idle -= 1  # that idle thread takes this job from the queue
                self._jobs.put(job)
                return
            name = f"{self._name}-{self._started}"
            self._started += 1
            thread = threading.Thread(target=self._loop, args=(job,), name=name, daemon=True)
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
            raise

    def threads(self) -> int:
        """How many threads exist now, busy or idle."""
        with self._lock:
            return len(self._threads)

    def _loop(self, first: Job) -> None:
        me = threading.current_thread()
        job: Job | None = first
        while job is not None:
            try:
                job()
            except BaseException:  # jobs handle their own errors; this is a last resort
                log.exception("a server thread's job failed")
            job = None  # let the job (and what it holds) go while idle
            with self._lock:
                if self._idle >= self._spare:
                    break  # enough idle threads already
                self._idle += 1
            job = self._next()
        with self._lock:
            self._threads.discard(me)

    def _next(self) -> Job | None:
        """The next job for this idle thread; None when it is to end."""
        while True:
            try:
                return self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # not promised a job: leave
                        self._idle -= 1
                        return None
                # A job was promised to an idle thread just now: it may be this one's.

    def stop(self, deadline: float) -> None:
        """End every thread once its job is done; wait for them until ``deadline``."""
        with self._lock:
            threads = list(self._threads)
            # Idle threads end on their None; busy ones find one when they are done.
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


class Workers:
    """One connection's request workers: jobs run in order of submission, ``limit`` at once."""

    def __init__(self, threads: ThreadCache, limit: int) -> None:
        self._threads = threads
        self._limit = limit
        self._jobs: collections.deque[Job] = collections.deque()
        self._running = 0
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)
            start = self._running < self._limit
            if start:
                self._running += 1
        if start:
            self._threads.run(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running -= 1
                    return
                job = self._jobs.popleft()
            job()
