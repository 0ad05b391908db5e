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


class ThreadCache:
    """Runs jobs on reused daemon threads; :meth:`stop` ends the idle ones."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []

    def run(self, job: Job) -> None:
        """Run ``job`` on an idle thread, or on a new one if none is idle."""
        thread = None
        with self._lock:
            if self._idle:
                self._idle -= 1  # that idle thread takes this job from the queue
            else:
                name = f"{self._name}-{len(self._threads)}"
                thread = threading.Thread(target=self._loop, name=name, daemon=True)
                self._threads.append(thread)
        self._jobs.put(job)
        if thread is not None:
            thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # jobs handle their own errors; this is a last resort
                log.exception("a server thread's job failed")
            finally:
                with self._lock:
                    self._idle += 1

    def stop(self, deadline: float) -> None:
        """End every thread once its job is done; wait for them until ``deadline``."""
        with self._lock:
            threads = list(self._threads)
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
