"""A full /dev/shm: a clean DiskFullError with nothing written, never SIGBUS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, shmdisk
    # Runs in a private mount namespace with a 4 MiB tmpfs over /dev/shm.
    d = shmdisk.create("full", (64 << 20) // 512)
    chunk = 64 * 1024
    written = 0
    err = None
    while True:
        try:
            d.write(written // 512, bytes([written // chunk % 250 + 1]) * chunk)
            written += chunk
        except shmdisk.DiskFullError as e:
            err = e
            break
    # The failing write changed nothing: its range still reads as zeros.
    buf = bytearray(chunk)
    d.read(written // 512, buf)
    failed_range_zero = buf == bytes(chunk)
    # Earlier data intact.
    intact = True
    for off in range(0, written, chunk):
        d.read(off // 512, buf)
        intact &= buf == bytes([off // chunk % 250 + 1]) * chunk
    # Discard gives space back; the write then succeeds.
    d.discard(0, (4 * chunk) // 512)
    d.write(written // 512, b"\\x07" * chunk)
    d.read(written // 512, buf)
    print(json.dumps({
        "written": written, "errno": err.errno, "type": type(err).__name__,
        "failed_range_zero": failed_range_zero, "intact": intact,
        "after_discard": buf == b"\\x07" * chunk,
    }))
    """
)


def can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -m (mount namespaces)")
def test_full_tmpfs_gives_clean_error() -> None:
    """Writes into a full tmpfs raise DiskFullError(ENOSPC), write nothing, keep old data."""
    script = (
        "mount --make-rprivate / && mount -t tmpfs -o size=4m tmpfs /dev/shm && "
        f'exec {sys.executable} -c "$CHILD"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        env={**os.environ, "CHILD": CHILD},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # a SIGBUS would show as -7 here
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "DiskFullError" and out["errno"] == 28
    assert 2 << 20 <= out["written"] < 4 << 20
    assert out["failed_range_zero"] and out["intact"] and out["after_discard"]
