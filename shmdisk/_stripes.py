"""The lock table's mutexes, and which engine drives them.

Two engines run the same protocol (``_pageio.py``) on the same bytes (``_layout.py``):

* ``"native"``: the C extension ``shmdisk._native`` does the common read and write request in
  one call and takes the table's mutexes for everything else;
* ``"python"``: the same mutexes through ``ctypes`` calls into the C library, used when the
  extension could not be built or ``SHMDISK_NO_EXTENSIONS=1`` is set.

Processes of either engine share a disk. Both need what the byte format was made for: glibc's
``pthread_mutex_t`` on x86-64 (its layout, and the robust list threaded through it, are an ABI).
Anywhere else shmdisk refuses to create or connect, with ``UnimplementedError`` saying why: a
musl or 32-bit process locking a glibc mutex corrupts it, and the lock-free reads lean on
x86's store ordering. ``ENGINE`` is ``None`` there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
import time
from typing import Any, Protocol

from . import _layout as L

# Robust mutexes a thread may hold: the kernel walks at most this many of a dying thread's
# (ROBUST_LIST_LIMIT); hold more and the earliest-locked stay stuck forever.
ROBUST_LIST_LIMIT = 2048
# Futex __owner value glibc stores while a mutex taken with EOWNERDEAD is not yet consistent.
OWNER_INCONSISTENT = 0x7FFFFFFF
OWNER_FIELD = 2  # __owner is the third int of pthread_mutex_t
SLICE_NS = 50_000_000  # a blocked lock wakes this often to let Ctrl-C and timeouts in


def _platform_problem() -> str | None:
    machine = platform.machine().lower()
    libc, _ = platform.libc_ver()
    if machine not in ("x86_64", "amd64") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return f"shmdisk needs x86-64 (this is {machine or 'unknown'})"
    if libc != "glibc":
        return f"shmdisk needs glibc (this is {libc or 'an unknown C library'})"
    return None


PLATFORM_PROBLEM = _platform_problem()


def _load_native() -> Any:
    if PLATFORM_PROBLEM or os.environ.get("SHMDISK_NO_EXTENSIONS", "") not in ("", "0"):
        return None
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError:
        return None
    # The extension compiles the byte format in; refuse one built for another layout.
    same = (
        _native.STRIPES == L.STRIPES
        and _native.STRIPE_SHIFT == L.STRIPE_SHIFT
        and _native.SLOT_SIZE == L.SLOT_SIZE
        and _native.LOCK_OFFSET == L.LOCK_OFFSET
        and _native.MAP_OFFSET == L.MAP_OFFSET
        and _native.INTENT_FIRST == L.INTENT_FIRST
        and _native.INTENT_COUNT == L.INTENT_COUNT
        and _native.F_SIZE_SECTORS == L.F_SIZE_SECTORS
        and _native.F_DESTROYED == L.F_DESTROYED
        and _native.F_FROZEN == L.F_FROZEN
        and _native.MAPPED == L.MAPPED
        and _native.ZEROED == L.ZEROED
        and _native.MUTEX_SIZE == L.MUTEX_SIZE
    )
    return _native if same else None


native: Any = _load_native()
ENGINE: str | None = None if PLATFORM_PROBLEM else ("native" if native is not None else "python")


class Table(Protocol):
    """The lock operations both engines offer on one segment's table."""

    def trylock(self, s: int) -> int: ...  # 0 (taken; repaired if its holder died) or errno
    def lock(self, s: int, timeout_ns: int) -> int: ...  # 0, ETIMEDOUT or errno
    def unlock(self, s: int) -> None: ...
    def set_intent(self, s: int, first: int, count: int) -> None: ...
    def init_stripes(self) -> None: ...
    def fence(self) -> None: ...


# ---------------------------------------------------------------- the ctypes engine


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Libc:
    """The few C library calls the python engine needs, typed once."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        vp, ci = ctypes.c_void_p, ctypes.c_int
        # The calls that never block, through PyDLL (the GIL stays held) and without argtypes
        # (callers pass c_void_p objects): a trylock + unlock pair costs about 2/3 as much.
        quick = ctypes.PyDLL(None)
        self.quick_trylock = quick.pthread_mutex_trylock
        self.quick_unlock = quick.pthread_mutex_unlock
        self.trylock = libc.pthread_mutex_trylock
        self.clocklock = libc.pthread_mutex_clocklock
        self.unlock = libc.pthread_mutex_unlock
        self.consistent = libc.pthread_mutex_consistent
        self.init = libc.pthread_mutex_init
        self.attr_init = libc.pthread_mutexattr_init
        self.attr_destroy = libc.pthread_mutexattr_destroy
        self.attr_pshared = libc.pthread_mutexattr_setpshared
        self.attr_robust = libc.pthread_mutexattr_setrobust
        self.fallocate = libc.fallocate
        for f in (self.trylock, self.unlock, self.consistent, self.attr_init, self.attr_destroy):
            f.argtypes, f.restype = [vp], ci
        self.clocklock.argtypes = [vp, ci, ctypes.POINTER(_Timespec)]
        self.clocklock.restype = ci
        self.init.argtypes, self.init.restype = [vp, vp], ci
        self.attr_pshared.argtypes = self.attr_robust.argtypes = [vp, ci]
        self.attr_pshared.restype = self.attr_robust.restype = ci
        self.fallocate.argtypes = [ci, ci, ctypes.c_long, ctypes.c_long]
        self.fallocate.restype = ci


_libc: _Libc | None = None if PLATFORM_PROBLEM else _Libc()
KIND_OFFSET = 16  # pthread_mutex_t.__data.__kind, glibc x86-64


def _mutex_kind() -> int:
    """The ``__kind`` word glibc gives a robust, process-shared, normal mutex here."""
    if _libc is None:
        return -1
    attr = ctypes.create_string_buffer(64)
    mutex = ctypes.create_string_buffer(L.MUTEX_SIZE)
    _libc.attr_init(attr)
    _libc.attr_pshared(attr, 1)
    _libc.attr_robust(attr, 1)
    _libc.init(mutex, attr)
    _libc.attr_destroy(attr)
    return int.from_bytes(mutex.raw[KIND_OFFSET : KIND_OFFSET + 4], "little", signed=True)


# Every stripe of a table that is safe to lock says this: a table that does not (never
# initialised, or scribbled over) is refused before any mutex in it is touched.
MUTEX_KIND = _mutex_kind()
# A locked instruction is a full fence on x86, non-temporal stores included; an uncontended
# acquire and release of a threading.Lock is the cheapest one pure Python has (~0.1 us).
_fence_lock = threading.Lock()


def fence() -> None:
    with _fence_lock:
        pass


FALLOC_PUNCH_KEEP = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch(fd: int, offset: int, length: int) -> None:
    """Give the file's memory in [offset, offset + length) back; it reads as zeros after."""
    if length > 0 and _libc is not None:
        _libc.fallocate(fd, FALLOC_PUNCH_KEEP, offset, length)


class CtypesTable:
    """The lock table of one segment, driven through ctypes (the python engine).

    ``base`` is the address of the table in this process; the mapping it lies in must outlive
    this object (``_mapping.Segment`` keeps both). ``repair(s)`` is the protocol's repair of a
    dead holder's stripe (``_pageio.repair``), bound to the segment.
    """

    def __init__(self, base: int, repair: Any) -> None:
        assert _libc is not None
        self._c = _libc
        self._repair = repair
        self.c_trylock = _libc.quick_trylock  # for the python engine's one-page write path
        self.c_unlock = _libc.quick_unlock
        self.addr = [ctypes.c_void_p(base + s * L.SLOT_SIZE) for s in range(L.STRIPES)]
        self._intent = (ctypes.c_uint64 * (L.STRIPES * L.SLOT_SIZE // 8)).from_address(base)

    def after_trylock(self, s: int, rc: int) -> int:
        """What a trylock's ``rc`` means once a dead holder's stripe is repaired."""
        return self._consistent(s, rc)

    def _consistent(self, s: int, rc: int) -> int:
        if rc == errno.EOWNERDEAD:
            self._repair(s)
            rc = self._c.consistent(self.addr[s])
        return int(rc)

    def consistent(self, s: int) -> None:
        self._c.consistent(self.addr[s])

    def trylock(self, s: int) -> int:
        return self._consistent(s, self.c_trylock(self.addr[s]))

    def lock(self, s: int, timeout_ns: int) -> int:
        rc = self._c.trylock(self.addr[s])
        if rc == errno.EBUSY:
            at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + timeout_ns
            ts = _Timespec(at // 1_000_000_000, at % 1_000_000_000)
            rc = self._c.clocklock(self.addr[s], time.CLOCK_MONOTONIC, ctypes.byref(ts))
        return self._consistent(s, rc)

    def unlock(self, s: int) -> None:
        rc = self.c_unlock(self.addr[s])
        if rc:
            raise OSError(rc, os.strerror(rc))

    def set_intent(self, s: int, first: int, count: int) -> None:
        k = s * (L.SLOT_SIZE // 8)
        self._intent[k + L.INTENT_FIRST // 8] = first
        self._intent[k + L.INTENT_COUNT // 8] = count

    def init_stripes(self) -> None:
        c = self._c
        attr = ctypes.create_string_buffer(64)
        rc = c.attr_init(attr) or c.attr_pshared(attr, 1) or c.attr_robust(attr, 1)
        try:
            for s in range(L.STRIPES):
                if rc:
                    break
                ctypes.memset(self.addr[s], 0, L.SLOT_SIZE)
                rc = c.init(self.addr[s], attr)
        finally:
            c.attr_destroy(attr)
        if rc:
            raise OSError(rc, os.strerror(rc))

    def fence(self) -> None:
        fence()
