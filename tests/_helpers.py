"""Helpers shared by the test modules: ``from _helpers import new_name``.

A plain module rather than ``conftest.py``: pytest imports conftest files itself, and importing
one again by name breaks under ``--import-mode=importlib``. The tests directory is on pytest's
``pythonpath`` (pyproject.toml), so this imports the same way under every import mode, and in
the spawned children of the multiprocess tests.
"""

from __future__ import annotations

import os
import secrets


def new_name(tag: str = "t") -> str:
    """A disk name no other test, process or xdist worker will use."""
    return f"test-{tag}-{os.getpid()}-{secrets.token_hex(4)}"
