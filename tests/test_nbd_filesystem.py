"""The whole stack a user builds: ext4 on a shmdisk, through nbdfuse and a loop device.

A disk is served captive to nbdfuse (``nbdfuse DIR [ shmdisk serve NAME ]``), the FUSE file is
attached to a loop device, formatted with mkfs.ext4 and mounted; files are written, the
filesystem unmounted and checked clean by fsck; then another process reads the disk through
the library and finds the same bytes, files included. Needs root (mount, losetup), FUSE and
loop devices: skipped, with the reason, where any of them is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import new_name

import shmdisk

TIMEOUT = 60.0
MiB = 1 << 20
TOOLS = ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "debugfs", "mount")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    tools = [t for t in TOOLS if shutil.which(t) is None]
    if tools:
        return f"needs {', '.join(tools)}"
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            return f"needs {dev} (FUSE and loop devices)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}): {done.stderr}"
    return done.stdout


# Runs in another process: the disk's bytes through the library, written to an image file.
DUMP = """
import sys, shmdisk
disk = shmdisk.connect(sys.argv[1], read_only=True, create=False)
with disk, open(sys.argv[2], "wb") as f:
    buf = bytearray(1 << 20)
    for at in range(0, disk.get_info().size_sectors * disk.sector_size, len(buf)):
        disk.read_at(at, buf)
        f.write(buf)
"""


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    name = new_name("nbdfs")
    d = shmdisk.create(name, 64 * MiB // 512)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


def test_ext4_through_nbdfuse_and_a_loop_device(
    disk: shmdisk.Disk, tmp_path: os.PathLike[str]
) -> None:
    """mkfs, mount, write, umount, fsck clean; the library in another process sees it all."""
    base = str(tmp_path)
    fuse_dir, mnt = os.path.join(base, "fuse"), os.path.join(base, "mnt")
    pidfile = os.path.join(base, "nbdfuse.pid")
    os.mkdir(fuse_dir)
    os.mkdir(mnt)
    files = {
        "hello.txt": b"hello from a filesystem on shared memory\n",
        "data/random.bin": os.urandom(3 * MiB + 123),
        "data/zeros.bin": bytes(MiB),
    }
    with contextlib.ExitStack() as undo:
        # "--": the server command's own options (python3 -m) are not nbdfuse's.
        server = [sys.executable, "-m", "shmdisk", "serve", disk.name]
        fuse = subprocess.Popen(
            ["nbdfuse", "-P", pidfile, "--", fuse_dir, "[", *server, "]"], stderr=subprocess.PIPE
        )
        undo.callback(_stop_nbdfuse, fuse, fuse_dir)
        deadline = time.monotonic() + TIMEOUT
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
            assert fuse.poll() is None, f"nbdfuse exited: {fuse.communicate()[1]!r}"
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.05)
        image = os.path.join(fuse_dir, "nbd")
        assert os.path.getsize(image) == 64 * MiB

        loop = sh("losetup", "--find", "--show", image).strip()
        undo.callback(subprocess.run, ["losetup", "-d", loop], check=False, timeout=TIMEOUT)
        sh("mkfs.ext4", "-q", "-F", loop)
        sh("mount", loop, mnt)
        undo.callback(_unmount, mnt)
        os.mkdir(os.path.join(mnt, "data"))
        for path, data in files.items():
            with open(os.path.join(mnt, path), "wb") as f:
                f.write(data)
        os.sync()
        sh("umount", mnt)
        sh("fsck.ext4", "-n", "-f", loop)  # exit status 0: no errors found
        with open(loop, "rb") as f:
            through_loop = hashlib.sha256(f.read()).hexdigest()

    # Everything is detached and unmounted: the bytes now come through the library alone,
    # read by another process.
    dumped = os.path.join(base, "dumped.img")
    sh(sys.executable, "-c", DUMP, disk.name, dumped)
    with open(dumped, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == through_loop
    sh("fsck.ext4", "-n", "-f", dumped)
    for path, data in files.items():
        got = subprocess.run(
            ["debugfs", "-R", f"cat /{path}", dumped],
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        ).stdout
        assert got == data, path
    # mkfs discarded the device: an ext4 with 4 MiB of files maps a few MiB, not 64.
    assert disk.mapped_pages() * disk.page_size < 16 * MiB


def _unmount(mnt: str) -> None:
    """Clean-up after a failure: unmount ``mnt`` if the test did not get to it."""
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False, timeout=TIMEOUT)


def _stop_nbdfuse(fuse: subprocess.Popen[bytes], fuse_dir: str) -> None:
    """Unmount the FUSE file; nbdfuse then exits and stops its captive server."""
    subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True, check=False)
    try:
        fuse.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        fuse.kill()
        fuse.wait()
    if fuse.stderr is not None:
        fuse.stderr.close()
