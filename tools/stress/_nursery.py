"""Fast, short-lived children of a chosen engine: a spawned process that forks them on request.

Victims are killed many times a second, and a spawned interpreter takes a third of a second or
more to start, while ``fork`` takes about a millisecond. But a forked child runs the engine of
the process it was forked from. So a scenario starts one ``Nursery`` per engine it wants
(spawned with that engine, see ``_engines.py``), and asks it to fork each victim.

A nursery forks ``fn(ctx, *args)`` for a module-level ``fn``; ``ctx.shared`` holds the shared
arrays given to the nursery when it was spawned (shared memory cannot travel over a pipe later),
and ``ctx.inherited`` a ``Disk`` the nursery connected *before* forking, when asked, so that the
child uses a handle it inherited through fork. The parent kills children by pid and asks the
nursery to reap them (only a process's parent can), which also tells how they died.

Children die with their nursery, and the nursery with its parent (``PR_SET_PDEATHSIG``), so a
killed stress run leaves no process behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import shmdisk

from . import _engines
from ._common import SPAWN

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the one that started it ends."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class ChildContext:
    """What a forked child gets besides its arguments."""

    shared: dict[str, Any]
    inherited: shmdisk.Disk | None


def _exit_code(status: int) -> int:
    """A waitpid status as multiprocessing reports it: the exit code, or -signal."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _run_child(
    conn: Any, fn: Callable[..., object], ctx: ChildContext, args: tuple[Any, ...]
) -> None:
    code = 0
    try:
        conn.close()  # only the nursery talks to the parent; a held pipe would hide its death
        die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fn(ctx, *args)
    except BaseException:
        traceback.print_exc(limit=6)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(conn: Any, shared: dict[str, Any]) -> None:
    """The nursery's loop: fork, reap, kill-all, exit; one answer per request."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the run is the parent's to handle
    handles: dict[str, shmdisk.Disk] = {}
    children: set[int] = set()
    try:
        conn.send(("ready", _engines.running()))
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            what = msg[0]
            if what == "fork":
                _, fn, args, inherit = msg
                handle = None
                if inherit is not None:
                    if inherit not in handles or handles[inherit].closed:
                        handles[inherit] = shmdisk.connect(inherit, create=False)
                    handle = handles[inherit]
                pid = os.fork()
                if pid == 0:
                    _run_child(conn, fn, ChildContext(shared, handle), args)
                children.add(pid)
                conn.send(pid)
            elif what == "reap":
                _, pid, timeout = msg
                conn.send(_reap(children, pid, timeout))
            elif what == "drop":
                _, name = msg
                h = handles.pop(name, None)
                if h is not None:
                    h.disconnect()
                conn.send(None)
            elif what == "exit":
                break
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(children):
            _reap(children, pid, 5.0)
        for h in handles.values():
            h.disconnect()
        try:
            conn.send("bye")
        except OSError:
            pass


def _reap(children: set[int], pid: int, timeout: float) -> int | None:
    """Wait up to ``timeout`` s for child ``pid``; its exit code, or None if still running."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            children.discard(pid)
            return None
        if got == pid:
            children.discard(pid)
            return _exit_code(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.0005)


class Nursery:
    """A spawned process running ``engine`` that forks children on request (see the module)."""

    def __init__(self, engine: str, shared: dict[str, Any], nt_stores: bool = False) -> None:
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_serve, args=(child, shared), daemon=True)
        _engines.start(self.proc, engine, nt_stores)
        child.close()
        if not self._conn.poll(120):
            raise RuntimeError("a nursery did not start within 120 s")
        tag, self.engine = self._conn.recv()
        assert tag == "ready"

    def _ask(self, msg: tuple[Any, ...], timeout: float = 30.0) -> Any:
        self._conn.send(msg)
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the {self.engine} nursery did not answer {msg[0]!r}")
        return self._conn.recv()

    def fork(self, fn: Callable[..., object], *args: Any, inherit: str | None = None) -> int:
        """Fork ``fn(ctx, *args)``; its pid. ``inherit``: give it a handle on that disk that
        the nursery connected before forking."""
        pid: int = self._ask(("fork", fn, args, inherit))
        return pid

    def reap(self, pid: int, timeout: float = 5.0) -> int | None:
        """The exit code of child ``pid`` (-signal if killed) once it ended, or None."""
        code: int | None = self._ask(("reap", pid, timeout), timeout + 30)
        return code

    def drop(self, name: str) -> None:
        """Disconnect the nursery's own handle on disk ``name`` (before it is destroyed)."""
        self._ask(("drop", name))

    def close(self) -> None:
        """Kill every child still running, then end the nursery."""
        try:
            self._ask(("exit",), 30)
        except (RuntimeError, OSError, EOFError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()


class Nurseries:
    """One nursery per engine a scenario's ``--engines`` choice uses, started lazily."""

    def __init__(self, choice: str, shared: dict[str, Any], nt_stores: bool = False) -> None:
        self.choice = choice
        self.shared = shared
        self.nt_stores = nt_stores
        self._by_engine: dict[str, Nursery] = {}

    def for_child(self, i: int) -> Nursery:
        """The nursery for the ``i``-th child of the scenario (engines alternate if mixed)."""
        engine = _engines.plan(self.choice, i)
        if engine not in self._by_engine:
            self._by_engine[engine] = Nursery(engine, self.shared, self.nt_stores)
        return self._by_engine[engine]

    def all(self) -> list[Nursery]:
        return list(self._by_engine.values())

    def close(self) -> None:
        for n in self._by_engine.values():
            n.close()
        self._by_engine.clear()
