"""Page-aligned payload buffers, reused by one connection's requests.

A buffer is an anonymous mapping big enough for the largest request plus its reply header:
page aligned (the disk copies to and from page-aligned memory fastest), and costing memory only
where touched. A read is filled right behind its reply header and leaves in one send; a write
payload is received straight into one and handed to the disk.

Memory stays bounded: a connection holds one buffer for the request it is serving, plus one
per request waiting on a worker (at most ``MAX_IN_FLIGHT``); a buffer given back after a
request larger than :data:`KEEP` returns the memory past ``KEEP`` to the system at once, and a
connection whose client has been quiet for :data:`IDLE_RELEASE` seconds gives back all of it
(:meth:`BufferPool.release_idle`), so idle connections cost no buffer memory however large
their last requests were.
"""

from __future__ import annotations

import mmap

from . import _proto as P

__all__ = ["DATA_AT", "KEEP", "Buffer", "BufferPool"]

# Where a payload starts inside a buffer. The reply header sits just before it, so header and
# data leave in one send. 256 bytes past the page boundary keeps the copies between this buffer
# and the disk's page-aligned memory off the 8/16-byte page-offset aliasing that makes the fast
# string copy of some CPUs several times slower.
DATA_AT = 256
# Requests up to this size (qemu-img's 2 MiB, nbdcopy's 256 KiB, fio's 1 MiB) reuse their
# buffer's memory; bigger ones fault it in again each time, which costs about what copying it
# does, so only rare giant requests pay it.
KEEP = 4 << 20
# A pool with a free buffer filled past this has memory worth giving back when idle. Below it
# (nbdcopy's 256 KiB requests, fio's 4 KiB) the connection does not even check for idleness,
# which costs a poll() each time it waits for its client.
HOLDING = 1 << 20
# How long a client must stay quiet before its connection gives back all its buffer memory.
IDLE_RELEASE = 1.0


class Buffer:
    """One request's payload space: ``payload(n)`` is where its ``n`` bytes go."""

    __slots__ = ("_map", "used", "view")

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, DATA_AT + P.MAX_REQUEST)
        self.view = memoryview(self._map)
        self.used = 0  # how much of the payload space may hold memory (touched, not trimmed)

    def payload(self, n: int) -> memoryview:
        if n > self.used:
            self.used = n
        return self.view[DATA_AT : DATA_AT + n]

    def trim(self, keep: int = KEEP) -> None:
        """Give back the memory past ``keep`` payload bytes (it reads as zeros afterwards)."""
        if self.used > keep:
            page = mmap.PAGESIZE
            start = -(-(DATA_AT + keep) // page) * page
            self._map.madvise(mmap.MADV_DONTNEED, start, len(self._map) - start)
            self.used = keep

    def close(self) -> None:
        # A slice of the view still alive somewhere would make close() raise; the mapping then
        # goes away with its last reference instead.
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            pass


class BufferPool:
    """The buffers of one connection; grows to the most requests it had in flight at once."""

    def __init__(self) -> None:
        self._free: list[Buffer] = []
        self._all: list[Buffer] = []
        # Some free buffer holds more than HOLDING: worth releasing when the client is idle.
        # Set by whoever gives a buffer back (any thread), cleared by release_idle.
        self.holding = False

    def take(self) -> Buffer:
        try:
            return self._free.pop()
        except IndexError:
            buf = Buffer()
            self._all.append(buf)
            return buf

    def give(self, buf: Buffer) -> None:
        if buf.used > KEEP:
            buf.trim()
        if buf.used > HOLDING:
            self.holding = True
        self._free.append(buf)

    def release_idle(self) -> None:
        """Give back the memory of every free buffer (the receiving thread, while idle).

        Only this thread takes buffers, so none of these can be handed out meanwhile; one
        that a worker gives back during the sweep sets :attr:`holding` again.
        """
        self.holding = False
        for buf in list(self._free):
            buf.trim(0)

    def close(self) -> None:
        for buf in self._all:
            buf.close()
        self._all.clear()
        self._free.clear()
