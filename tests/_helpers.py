"""Helpers shared by the test modules: ``from _helpers import new_name``.

A plain module rather than ``conftest.py``: pytest imports conftest files itself, and importing
one again by name breaks under ``--import-mode=importlib``. The tests directory is on pytest's
``pythonpath`` (pyproject.toml), so this imports the same way under every import mode, and in
the spawned children of the multiprocess tests.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable


def new_name(tag: str = "t") -> str:
    """A disk name no other test, process or xdist worker will use."""
    return f"test-{tag}-{os.getpid()}-{secrets.token_hex(4)}"


#: The uid and gid a root test run drops to, to act as another user ("nobody").
NOBODY = 65534


def as_other_user(fn: Callable[[], int], timeout: float = 30.0) -> tuple[int, str, str]:
    """Run ``fn`` in a forked child that has become uid/gid 65534, as a real other user would.

    Returns the child's exit code (``fn``'s return value) and what it wrote to stdout and stderr.
    Needs root. The child writes through real descriptors, not pytest's captured streams, and
    is killed if it runs longer than ``timeout`` seconds. It can import only what that uid may
    read: a module first imported there may live in a directory closed to it.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns into pytest
            code = 99
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code = fn()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"the child running as uid {NOBODY} hung")
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()
