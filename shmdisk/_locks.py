"""The locking protocol, in one place.

Locks are Linux open-file-description (OFD) byte-range locks on the segment file. They are a
lock *space*, not real bytes: "byte" ``p`` stands for data page ``p``. Nothing is ever read or
written at those offsets.

* **I/O** on pages ``[p0, p1)`` locks the range ``[p0, p1)`` in one ``fcntl`` call: shared for
  a locked read, exclusive for write and discard. One range, one syscall, however many pages.
* **Whole-disk operations** (resize, destroy, creation) lock ``[0, infinity)`` exclusively, so
  they wait for all I/O in flight and hold all new I/O off.
* Every operation takes exactly one range lock and never a second while holding it, so there
  is no lock order to get wrong and no deadlock.

Why OFD locks: the kernel drops them when the last descriptor of the open file is closed, which
includes the death of the holder: a SIGKILLed worker never wedges the others. Classic POSIX
``F_SETLK`` locks belong to the process and are silently dropped when *any* descriptor of the file
is closed; semaphores stay held by a dead process forever.

OFD locks belong to the open file description, not to a thread: two threads locking through one
descriptor would not exclude each other. So each thread of a process gets its own descriptor
(``Disk`` re-opens ``/proc/self/fd/N``, which makes a new open file description of the same
inode), and a forked child drops the descriptors it inherited (they share the parent's locks).

**Lock-free reads.** The page map word of every page carries a sequence counter that a writer
makes odd before it touches the page and even (one higher) when it is done, all while holding
its exclusive lock. A reader on x86-64 may skip the lock: it notes the words of its pages, copies,
and re-reads the words; equal and even means no writer touched those pages meanwhile, so the copy
is one consistent snapshot. Any odd word, any change, or a second failed try sends the reader to
the shared lock. This relies on x86's ordering of stores (a writer's counter stores and data
stores become visible in program order) and loads; on other CPUs every read takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct
import time

from .errors import LockTimeoutError

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (must be 0 for OFD locks), padded to 32 bytes.
FLOCK = struct.Struct("=hh4xqqi4x")
SETLKW = fcntl.F_OFD_SETLKW
SETLK = fcntl.F_OFD_SETLK
RDLCK = fcntl.F_RDLCK
WRLCK = fcntl.F_WRLCK
UNLCK = fcntl.F_UNLCK

WHOLE_START = 0
WHOLE_LEN = 0  # l_len 0: to the end of the lock space, however far it grows

# Readers may use the sequence counters instead of the lock only where stores and loads are
# seen in program order by other CPUs (x86-TSO).
LOCK_FREE_READS = platform.machine().lower() in ("x86_64", "amd64")
OPTIMISTIC_TRIES = 2


def lock(fd: int, kind: int, start: int, length: int) -> None:
    """Block until the range is locked (``kind`` RDLCK or WRLCK)."""
    fcntl.fcntl(fd, SETLKW, FLOCK.pack(kind, 0, start, length, 0))


def unlock(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, SETLKW, FLOCK.pack(UNLCK, 0, start, length, 0))


def try_lock(fd: int, kind: int, start: int, length: int) -> bool:
    """Lock the range if it is free now; False if another holder has it."""
    try:
        fcntl.fcntl(fd, SETLK, FLOCK.pack(kind, 0, start, length, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_within(fd: int, kind: int, start: int, length: int, timeout: float) -> None:
    """Lock the range, polling, or raise LockTimeoutError after ``timeout`` seconds.

    Used where a hung (not dead) holder must not hang the caller forever: connecting to a
    segment that is still being created, and destroy.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not try_lock(fd, kind, start, length):
        if time.monotonic() >= deadline:
            raise LockTimeoutError(f"lock not free after {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def reopen(fd: int, writable: bool) -> int:
    """A new open file description of the same file as ``fd`` (for per-thread locks)."""
    return os.open(f"/proc/self/fd/{fd}", (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
