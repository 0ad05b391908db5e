"""The NBD server against real clients: nbdinfo, nbdcopy (libnbd), qemu-img and qemu-io."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import new_name

import shmdisk
from shmdisk.nbd import NBDServer

TIMEOUT = 30.0
MiB = 1 << 20
SERVE_CMD = (sys.executable, "-m", "shmdisk", "serve")


def need(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def ok(*cmd: str) -> str:
    done = run(*cmd)
    assert done.returncode == 0, f"{cmd} failed: {done.stderr}"
    return done.stdout


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes, so not pytest's long tmp_path.
    d = tempfile.mkdtemp(prefix="nbd", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    """A 4 MiB disk of 512-byte sectors."""
    name = new_name("nbdc")
    d = shmdisk.create(name, 4 * MiB // 512)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


@pytest.fixture
def server(disk: shmdisk.Disk, sockdir: str) -> Iterator[NBDServer]:
    with NBDServer([disk], socket_path=os.path.join(sockdir, "s")) as srv:
        yield srv


def sparse_image(path: str, size: int) -> bytes:
    """A raw image with random data in a few places, zeros written out in one, holes elsewhere."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for at, n in ((0, 5000), (MiB, 64 * 1024), (3 * MiB + 4096, 100), (size - 512, 512)):
            data = os.urandom(n)
            content[at : at + n] = data
            f.seek(at)
            f.write(data)
        f.seek(2 * MiB)
        f.write(bytes(256 * 1024))  # allocated zeros: a sparse copy must not map them either
    return bytes(content)


def disk_bytes(disk: shmdisk.Disk) -> bytes:
    buf = bytearray(disk.get_info().size_sectors * disk.sector_size)
    disk.read(0, buf)
    return bytes(buf)


def mapped_ranges(disk: shmdisk.Disk) -> list[tuple[int, int]]:
    ss = disk.sector_size
    return [(e.sector * ss, e.n_sectors * ss) for e in disk.extents() if e.mapped]


@need("nbdinfo")
def test_nbdinfo_size_and_flags(server: NBDServer, disk: shmdisk.Disk) -> None:
    """nbdinfo sees the size, the capabilities and the sector-size block constraint."""
    info = json.loads(ok("nbdinfo", "--json", server.uri()))
    [export] = info["exports"]
    assert info["structured"] is True
    assert export["export-name"] == disk.name
    assert export["export-size"] == 4 * MiB
    assert export["contexts"] == ["base:allocation"]
    for flag in ("can_multi_conn", "can_trim", "can_zero", "can_fast_zero", "can_flush"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] == 512
    assert export["block_size_maximum"] == 32 * MiB


@need("nbdinfo")
def test_nbdinfo_map_matches_the_page_map(server: NBDServer, disk: shmdisk.Disk) -> None:
    """nbdinfo --map reports data exactly where the disk has mapped pages, holes elsewhere."""
    disk.write_at(100, b"x")
    disk.write_at(MiB + 3, os.urandom(70000))
    disk.write_at(4 * MiB - 1, b"z")
    extents = json.loads(ok("nbdinfo", "--map", "--json", server.uri()))
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == mapped_ranges(disk)
    assert all(e["type"] in (0, 3) for e in extents)
    assert sum(e["length"] for e in extents) == 4 * MiB
    assert extents[0]["offset"] == 0 and len(data) == 3


@need("nbdinfo")
def test_nbdinfo_map_of_a_fragmented_disk_across_short_replies(
    server: NBDServer, disk: shmdisk.Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With replies capped at 4 extents, nbdinfo --map still gets all 80 runs right."""
    from shmdisk.nbd import _handlers

    monkeypatch.setattr(_handlers, "MAX_EXTENTS", 4)
    page = disk.page_size
    for p in range(1, 80, 2):
        disk.write_at(p * page, b"f")
    extents = json.loads(ok("nbdinfo", "--map", "--json", server.uri()))
    data = [(e["offset"], e["length"]) for e in extents if e["type"] == 0]
    assert data == mapped_ranges(disk) == [(p * page, page) for p in range(1, 80, 2)]


@need("nbdcopy")
def test_nbdcopy_in_and_out_byte_for_byte_keeping_holes(
    server: NBDServer, disk: shmdisk.Disk, sockdir: str
) -> None:
    """nbdcopy copies an image in and out exactly; holes and zeros stay unmapped both ways."""
    src = os.path.join(sockdir, "src.img")
    content = sparse_image(src, 4 * MiB)
    ok("nbdcopy", src, server.uri())
    assert disk_bytes(disk) == content
    page = disk.page_size
    assert disk.mapped_pages() <= (5000 + 64 * 1024 + 100 + 512) // page + 8
    for start, length in mapped_ranges(disk):
        assert not (start < 2 * MiB + 256 * 1024 and 2 * MiB < start + length), "zeros mapped"
    out = os.path.join(sockdir, "out.img")
    ok("nbdcopy", server.uri(), out)
    with open(out, "rb") as f:
        assert f.read() == content
    assert os.stat(out).st_blocks * 512 < 1 * MiB  # the copy out is sparse too


@need("qemu-img")
def test_qemu_img_convert_compare_and_map(
    server: NBDServer, disk: shmdisk.Disk, sockdir: str
) -> None:
    """qemu-img converts a raw file into the export and back; compare agrees; map sees holes."""
    src = os.path.join(sockdir, "src.img")
    content = sparse_image(src, 4 * MiB)
    ok("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, server.uri())
    assert disk_bytes(disk) == content
    ok("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri())
    disk.write_at(5, bytes([content[5] ^ 0xFF]))  # a byte the image has not (it is random)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, server.uri()).returncode == 1
    back = os.path.join(sockdir, "back.img")
    ok("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), back)
    with open(back, "rb") as f:
        assert f.read() == disk_bytes(disk)
    mapping = json.loads(ok("qemu-img", "map", "--output=json", "-f", "raw", server.uri()))
    data = [(m["start"], m["length"]) for m in mapping if m["data"]]
    assert data == mapped_ranges(disk)


def _local_side(name: str, writing: Any, stop: Any, b_written: Any, result: Any) -> None:
    """Child process: rewrite region A through shared memory until told to stop, then check B."""
    disk = shmdisk.connect(name, create=False)
    try:
        gen = 0
        while not stop.is_set():
            disk.write(0, bytes([gen % 251]) * MiB)  # region A: [0, 1 MiB), one atomic write
            gen += 1
            writing.set()
        disk.write(0, b"\xa5" * MiB)
        b_written.wait(TIMEOUT)
        got = bytearray(MiB)
        disk.read(2 * MiB // 512, got)  # region B: [2 MiB, 3 MiB)
        result.put((gen, got == b"\x5a" * MiB))
    finally:
        disk.disconnect()


@need("qemu-io", "nbdcopy")
def test_local_process_and_nbd_client_share_the_disk(
    server: NBDServer, disk: shmdisk.Disk, sockdir: str
) -> None:
    """A local process and NBD clients use the disk at once; each sees the other's data whole."""
    ctx = multiprocessing.get_context("spawn")
    writing, stop, b_written, result = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_local_side, args=(disk.name, writing, stop, b_written, result))
    child.start()
    try:
        uri = server.uri()
        assert writing.wait(TIMEOUT)
        # While the child rewrites region A, nbdcopy reads the disk out in 256 KiB requests
        # (each must hold one whole generation, never a torn mix) and qemu-io writes region B.
        for i in range(3):
            out = os.path.join(sockdir, f"snap{i}")
            ok("nbdcopy", "--request-size=262144", uri, out)
            with open(out, "rb") as f:
                snap = f.read(MiB)
            for at in range(0, MiB, 256 * 1024):
                assert len(set(snap[at : at + 256 * 1024])) == 1, f"torn read at {at}"
        ok("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {2 * MiB} {MiB}", uri)
        stop.set()
        b_written.set()
        generations, seen_b = result.get(timeout=TIMEOUT)
        assert seen_b is True
        assert generations > 1
        child.join(TIMEOUT)
        assert child.exitcode == 0
        ok("qemu-io", "-f", "raw", "-c", f"read -P 0xa5 0 {MiB}", uri)
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)


# --- the command line -------------------------------------------------------------------------


# Starts a command the way systemd socket activation does: the listening socket as descriptor
# 3, LISTEN_PID (the pid the command will have: exec keeps it) and LISTEN_FDS in the environment.
ACTIVATE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


class Serve:
    """``shmdisk serve`` in a child process, with its stderr collected; ``activate`` hands it
    a listening socket by socket activation."""

    def __init__(self, *args: str, activate: socket.socket | None = None) -> None:
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        cmd = [sys.executable, "-m", "shmdisk", "serve", *args]
        fds: tuple[int, ...] = ()
        if activate is not None:
            fds = (activate.fileno(),)
            cmd = [sys.executable, "-c", ACTIVATE, str(fds[0]), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, pass_fds=fds)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(pattern, self.stderr())
            if found:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.stderr()!r}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server, wait for it (killing it if it hangs), keep its log in .log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log = self.stderr()
            self.err.close()


@pytest.fixture
def two_disks() -> Iterator[list[shmdisk.Disk]]:
    names = [new_name("nbdcli"), new_name("nbdcli")]
    made = [shmdisk.create(names[0], 2048), shmdisk.create(names[1], 4096)]
    yield made
    for d in made:
        d.disconnect()
    for n in names:
        shmdisk.destroy(n)


@need("nbdinfo")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_several_exports_and_clean_stop(
    two_disks: list[shmdisk.Disk], sockdir: str, sig: int
) -> None:
    """`shmdisk serve A B --socket P` exports both, logs each connection, stops cleanly."""
    path = os.path.join(sockdir, "cli.sock")
    a, b = two_disks
    serve = Serve(a.name, b.name, "--socket", path)
    try:
        serve.wait_for("serving")
        listing = json.loads(ok("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={path}"))
        sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
        assert sizes == {a.name: 2048 * 512, b.name: 4096 * 512}
        default = json.loads(ok("nbdinfo", "--json", f"nbd+unix:///?socket={path}"))
        assert default["exports"][0]["export-size"] == 2048 * 512
        serve.wait_for(r"conn 2 .*closed")
    finally:
        rc = serve.stop(sig)
    assert rc == 0, serve.log
    assert len(re.findall(r"conn \d+ .*: closed", serve.log)) == 2  # a line per connection
    assert not os.path.exists(path)


@need("nbdinfo", "qemu-io")
def test_serve_command_read_only_over_tcp(two_disks: list[shmdisk.Disk]) -> None:
    """`--read-only --bind 127.0.0.1:0 --tls off`: a plain TCP export that reads but refuses
    writes."""
    a = two_disks[0]
    a.write_at(0, b"R" * 512)
    serve = Serve(a.name, "--read-only", "--bind", "127.0.0.1:0", "--tls", "off")
    try:
        port = int(serve.wait_for(r"on 127\.0\.0\.1:(\d+)").group(1))
        uri = f"nbd://127.0.0.1:{port}/{a.name}"
        info = json.loads(ok("nbdinfo", "--json", uri))
        assert info["exports"][0]["is_read_only"] is True
        ok("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x52 0 512", uri)
        # Clients believe the flag and refuse up front (the server's EPERM for writes that
        # come anyway is covered at the wire level).
        assert run("qemu-io", "-f", "raw", "-c", "write -P 1 0 512", uri).returncode != 0
    finally:
        assert serve.stop() == 0
    assert "warning: serving plain TCP" in serve.log and "any local user can read the" in serve.log
    got = bytearray(512)
    a.read(0, got)
    assert got == b"R" * 512


def test_serve_command_missing_disk_fails_and_create_makes_it(sockdir: str) -> None:
    """A missing disk is an error (exit 1) unless --create asks for a default-sized one."""
    name = new_name("nbdmissing")
    path = os.path.join(sockdir, "m.sock")
    done = subprocess.run(
        [sys.executable, "-m", "shmdisk", "serve", name, "--socket", path],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert name in done.stderr and "Traceback" not in done.stderr
    serve = Serve(name, "--create", "--socket", path)
    try:
        serve.wait_for("serving")
        assert shmdisk.inspect(name).size_sectors == shmdisk.DEFAULT_SIZE_SECTORS
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    finally:
        try:
            assert serve.stop() == 0
        finally:
            shmdisk.destroy(name)


@need("nbdinfo")
def test_nbdinfo_list_and_unknown_exports_log_plainly(
    two_disks: list[shmdisk.Disk], sockdir: str
) -> None:
    """`nbdinfo --list` (which aborts without waiting for the ACK) logs no socket error; an
    unknown export is logged with the name the client asked for."""
    path = os.path.join(sockdir, "log.sock")
    a, b = two_disks
    serve = Serve(a.name, b.name, "--socket", path)
    try:
        serve.wait_for("serving")
        listing = json.loads(ok("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={path}"))
        assert {e["export-name"] for e in listing["exports"]} == {a.name, b.name}
        missing = run("nbdinfo", f"nbd+unix:///no-such-export?socket={path}")
        assert missing.returncode != 0
        serve.wait_for(r"conn 2 .*closed")
    finally:
        assert serve.stop() == 0
    assert "Broken pipe" not in serve.log and "socket error" not in serve.log, serve.log
    assert re.search(r"conn 1 .*: closed \(client aborted\)", serve.log), serve.log
    assert re.search(r"conn 2 .*unknown export 'no-such-export'", serve.log), serve.log


def test_serve_bind_error_names_the_address(two_disks: list[shmdisk.Disk]) -> None:
    """An address in use is one error line that says which address, and exit status 1."""
    name = two_disks[0].name
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*SERVE_CMD, name, "--bind", f"127.0.0.1:{port}", "--tls", "off"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr == (
        f"shmdisk serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
