"""A probe: a spawned process of a chosen engine that makes one call when told, and says when.

Scenarios about waiting (a killed holder, a stopped one) need a caller that is *known* to be
inside a blocked call at a known moment. A probe gets one request at a time over a pipe, marks in
shared memory when it enters the call and when the call returned (``CLOCK_MONOTONIC`` ns, the
same clock in every process), and answers with the outcome. The parent sees "entered, not yet
returned" without waiting for the answer, and the lock table's ``FUTEX_WAITERS`` bit tells it the
probe really sleeps on the stripe (``_table.has_waiters``).

A probe keeps a read-write handle and, when asked for one, a read-only handle on the disk.
Between calls it answers questions: the stripes it cannot take (``_table.stuck_stripes``), the
pages its engine repaired after dead holders, its engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import time
import traceback
from dataclasses import dataclass
from typing import Any

import shmdisk

from . import _engines, _table
from ._common import SPAWN

# Shared words of one probe: the call's number while inside it, when it entered, when it left.
_P_INSIDE, _P_T_CALL, _P_T_DONE, _P_FIELDS = range(4)


@dataclass(frozen=True)
class Outcome:
    """How one call ended: 'ok' or the exception's class name, and when (monotonic ns)."""

    status: str
    t_call: int
    t_done: int
    digest: str  # of the bytes a read returned ("" for writes)
    detail: str = ""

    @property
    def seconds(self) -> float:
        return (self.t_done - self.t_call) / 1e9


def _main(name: str, conn: Any, words: Any) -> None:
    from ._nursery import die_with_parent

    die_with_parent()
    rw = shmdisk.connect(name, create=False)
    ro: shmdisk.Disk | None = None
    conn.send(("ready", _engines.running()))
    calls = 0
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        what = msg[0]
        if what == "call":
            _, op, sector, count, kw, read_only = msg
            if read_only and ro is None:
                ro = shmdisk.connect(name, read_only=True, create=False)
            d = rw if ro is None or not read_only else ro
            buf = bytearray(count * d.sector_size)
            if op == "write":
                buf[:] = (b"probe%03d" % (calls % 1000)) * (len(buf) // 8)
            calls += 1
            words[_P_T_DONE] = 0
            words[_P_T_CALL] = time.monotonic_ns()
            words[_P_INSIDE] = calls
            status, detail = "ok", ""
            try:
                if op == "write":
                    d.write(sector, buf, **kw)
                else:
                    d.read(sector, buf, **kw)
            except BaseException as e:  # KeyboardInterrupt too: the outcome says what came
                status, detail = type(e).__name__, str(e)[:200]
            done = time.monotonic_ns()
            words[_P_T_DONE] = done
            words[_P_INSIDE] = 0
            digest = hashlib.blake2b(buf, digest_size=16).hexdigest() if op == "read" else ""
            conn.send(Outcome(status, int(words[_P_T_CALL]), done, digest, detail))
        elif what == "stuck":
            try:
                stuck = _table.stuck_stripes(rw)
                whole = _table.whole_disk_held_within(rw, msg[1])
                conn.send((len(stuck), whole, ""))
            except BaseException:
                conn.send((-1, False, traceback.format_exc(limit=3)))
        elif what == "repaired":
            conn.send(_engines.repaired_pages())
        elif what == "exit":
            break
    rw.disconnect()
    if ro is not None:
        ro.disconnect()


class Probe:
    """The parent's side of one probe process (see the module text)."""

    def __init__(self, name: str, engine: str, nt_stores: bool = False) -> None:
        self._conn, child = SPAWN.Pipe()
        self._words = SPAWN.Array(ctypes.c_int64, _P_FIELDS, lock=False)
        self.proc = SPAWN.Process(target=_main, args=(name, child, self._words), daemon=True)
        _engines.start(self.proc, engine, nt_stores)
        child.close()
        self.engine = ""
        self._pending = False

    def ready(self, timeout: float) -> bool:
        """Wait until the probe is connected; its engine is then in ``engine``."""
        if self.engine:
            return True
        if not self._conn.poll(timeout):
            return False
        tag, self.engine = self._conn.recv()
        return bool(tag == "ready")

    def call(
        self,
        op: str,
        sector: int,
        count: int,
        *,
        read_only: bool = False,
        **kw: Any,
    ) -> None:
        """Start one call (``op`` 'read' or 'write', ``kw``: wait=, timeout=); returns at once."""
        assert not self._pending, "one call at a time"
        self._words[_P_INSIDE] = 0
        self._words[_P_T_DONE] = 0
        self._conn.send(("call", op, sector, count, kw, read_only))
        self._pending = True

    def inside(self) -> bool:
        """The call has started and not returned."""
        return bool(self._words[_P_INSIDE]) and not self._words[_P_T_DONE]

    def wait_inside(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.inside():
            if self._words[_P_T_DONE] or time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True

    def returned_ns(self) -> int:
        """When the call returned (0: not yet)."""
        return int(self._words[_P_T_DONE])

    def outcome(self, timeout: float) -> Outcome | None:
        """The outcome of the call, waiting up to ``timeout`` s; None if it has not ended."""
        if not self._pending:
            raise RuntimeError("no call in progress")
        if not self._conn.poll(timeout):
            return None
        self._pending = False
        out: Outcome = self._conn.recv()
        return out

    def ask(self, *msg: Any, timeout: float = 60.0) -> Any:
        assert not self._pending, "a call is in progress"
        self._conn.send(msg)
        if not self._conn.poll(timeout):
            raise RuntimeError(f"probe did not answer {msg[0]!r} within {timeout} s")
        return self._conn.recv()

    def close(self) -> None:
        try:
            if not self._pending:
                self._conn.send(("exit",))
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()
