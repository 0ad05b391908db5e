"""numpy arrays are buffers to the type checker too, on every supported Python."""

from __future__ import annotations

import os
import secrets

import numpy as np

import shmdisk
import shmdisk.aio


def test_numpy_arrays_type_check_as_buffers() -> None:
    """read/write/read_at/write_at take numpy arrays under mypy --strict (numpy's stubs
    declare the buffer protocol for Python 3.12+ only)."""
    name = f"typing-np-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with shmdisk.create(name, 64) as disk:
            a = np.arange(1024, dtype=np.uint32)
            disk.write_at(0, a)
            disk.write(8, [a, np.zeros(512, dtype=np.uint8)])
            b = np.empty(1024, dtype=np.uint32)
            disk.read_at(0, b)
            disk.read(8, [b])
            assert (a == b).all()
            _ = shmdisk.aio.AsyncDisk(disk)
    finally:
        shmdisk.destroy(name)
