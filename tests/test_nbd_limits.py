"""What clients can make the server hold: connections, threads, buffer memory, descriptors."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from _helpers import new_name
from test_nbd_protocol import Client
from test_nbd_tls import make_with_certtool, make_with_openssl

import shmdisk
from shmdisk.nbd import NBDServer, _buffers, _connection, _transmission
from shmdisk.nbd import _proto as P
from shmdisk.nbd._workers import ThreadCache

MiB = 1 << 20
TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nbdl", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    """A 16 MiB disk, written all over (reads copy data rather than answer holes)."""
    name = new_name("nbdl")
    d = shmdisk.create(name, 16 * MiB // 512)
    d.write_at(0, os.urandom(MiB) * 16)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


def wait_until(cond: object, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


# --- connections -----------------------------------------------------------------------------


def test_clients_beyond_max_connections_wait_for_a_free_slot(
    disk: shmdisk.Disk, sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With max_connections=2 a third client gets no greeting until one of the two leaves;
    then it is served. The limit is logged once, not per client."""
    path = os.path.join(sockdir, "m")
    with NBDServer([disk], socket_path=path, max_connections=2) as srv:
        first, second = Client(path), Client(path)
        first.start()
        second.start()
        third = Client(path)
        try:
            third.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                third.sock.recv(1)  # connected (the backlog took it), but not served
            assert srv.connections() == 2
            first.close()
            third.sock.settimeout(TIMEOUT)
            third.start()
            assert third.read(0, 512) == second.read(0, 512)
        finally:
            for c in (second, third):
                c.close()
    assert caplog.text.count("2 clients connected (the most allowed)") == 1


def test_max_connections_must_be_positive(disk: shmdisk.Disk) -> None:
    """0, negative and non-integer limits are refused when the server is made."""
    for bad in (0, -1):
        with pytest.raises(ValueError):
            NBDServer([disk], socket_path="/tmp/x", max_connections=bad)
    with pytest.raises(TypeError):
        NBDServer([disk], socket_path="/tmp/x", max_connections=1.5)  # type: ignore[arg-type]


# --- threads ---------------------------------------------------------------------------------


def test_thread_cache_keeps_a_few_spares_and_lets_idle_ones_end() -> None:
    """After a burst of 20 jobs at once, at most `spare` threads stay; they end when idle."""
    cache = ThreadCache("t", spare=3, idle_timeout=0.3)
    gate = threading.Event()
    done = threading.Semaphore(0)

    def job() -> None:
        gate.wait(TIMEOUT)
        done.release()

    for _ in range(20):
        cache.run(job)
    assert cache.threads() == 20
    gate.set()
    for _ in range(20):
        assert done.acquire(timeout=TIMEOUT)
    assert wait_until(lambda: cache.threads() <= 3)
    cache.run(done.release)  # a spare takes new work
    assert done.acquire(timeout=TIMEOUT)
    assert wait_until(lambda: cache.threads() == 0)
    cache.stop(time.monotonic() + TIMEOUT)


def test_connection_threads_end_with_their_connections(disk: shmdisk.Disk, sockdir: str) -> None:
    """30 clients at once, then none: the server's threads go back to a few spares."""
    path = os.path.join(sockdir, "t")
    with NBDServer([disk], socket_path=path) as srv:
        clients = [Client(path) for _ in range(30)]
        for c in clients:
            c.start()
        assert wait_until(lambda: srv._threads.threads() >= 30)
        for c in clients:
            c.close()
        assert wait_until(lambda: srv.connections() == 0)
        assert wait_until(lambda: srv._threads.threads() <= 4)


# --- buffer memory ---------------------------------------------------------------------------


def resident(buf: _buffers.Buffer) -> int:
    """Bytes of ``buf``'s mapping that are in memory now (from /proc/self/smaps)."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf._map))
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                lo = int(first.split("-")[0], 16)
                inside = lo == start
            elif inside and first == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_an_idle_connection_gives_its_buffer_memory_back(
    disk: shmdisk.Disk, sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a 16 MiB read the buffer keeps 4 MiB for the next request; once the client has
    been quiet for IDLE_RELEASE it keeps none. Requests up to 1 MiB never start the check."""
    made: list[_buffers.BufferPool] = []

    class Recording(_buffers.BufferPool):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(_transmission, "BufferPool", Recording)
    monkeypatch.setattr(_transmission, "IDLE_RELEASE", 1.0)
    path = os.path.join(sockdir, "b")
    with NBDServer([disk], socket_path=path) as srv:
        c = Client(path)
        try:
            c.start()
            assert len(c.read(0, 16 * MiB)) == 16 * MiB
            [pool] = made
            [buf] = pool._all
            assert wait_until(lambda: resident(buf) <= _buffers.KEEP + 8192, 1.0)
            assert resident(buf) > MiB  # kept for the next request at first
            assert wait_until(lambda: resident(buf) <= 8192)
            assert not pool.holding
            c.read(0, 256 * 1024)
            assert not pool.holding  # nbdcopy-sized requests cost no idle check
            assert c.read(MiB, 512) == bytes(disk_bytes(disk, MiB, 512))
        finally:
            c.close()
        assert srv.connections() <= 1


def disk_bytes(disk: shmdisk.Disk, offset: int, n: int) -> bytearray:
    buf = bytearray(n)
    disk.read_at(offset, buf)
    return buf


# --- running out of descriptors --------------------------------------------------------------

LIMITED_SERVER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n}))
from shmdisk.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def test_running_out_of_descriptors_backs_off_and_logs_once(
    disk: shmdisk.Disk, sockdir: str
) -> None:
    """A server limited to 40 descriptors with 80 clients waiting: over 3 s it logs one line
    (not one per try) and uses little CPU; once they leave it says so and serves again."""
    path = os.path.join(sockdir, "fd")
    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-c", LIMITED_SERVER.format(n=40), "serve", disk.name, "--socket", path],
        stderr=err,
    )
    clients: list[socket.socket] = []
    try:
        assert wait_until(lambda: os.path.exists(path))
        for _ in range(80):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                pass  # queued in the backlog: accept is what fails
            clients.append(s)
        err.seek(0)
        assert wait_until(lambda: "cannot accept clients" in (err.seek(0), err.read())[1])
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3.0)
        cpu, elapsed = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
        err.seek(0)
        log = err.read()
        assert log.count("cannot accept clients") == 1, log
        assert "Too many open files" in log
        assert cpu < 0.25 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.1f} s"
        for s in clients:
            s.close()
        clients.clear()
        c = Client(path)
        try:
            c.start()
            assert c.read(0, 512) == bytes(disk_bytes(disk, 0, 512))
        finally:
            c.close()
        err.seek(0)
        assert "accepting clients on unix:" in err.read()
    finally:
        for s in clients:
            s.close()
        proc.terminate()
        proc.wait(TIMEOUT)
        err.close()
    assert proc.returncode == 0


def test_a_failure_to_start_a_connection_thread_costs_that_client_only(
    disk: shmdisk.Disk, sockdir: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """If no thread can be started for a client, it is dropped and the acceptor goes on."""
    path = os.path.join(sockdir, "th")
    caplog.set_level(logging.WARNING, logger="shmdisk.nbd")
    with NBDServer([disk], socket_path=path) as srv:
        real = srv._threads.run
        failures = [1]

        def flaky(job: object) -> None:
            if failures:
                failures.pop()
                raise RuntimeError("can't start new thread")
            real(job)  # type: ignore[arg-type]

        monkeypatch.setattr(srv._threads, "run", flaky)
        dropped = Client(path)
        assert dropped.closed_by_server()
        dropped.close()
        c = Client(path)
        try:
            c.start()
        finally:
            c.close()
    assert "can't start new thread" in caplog.text


# --- slow clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("during", ["options", "tls"])
def test_a_trickling_handshake_is_cut_off_at_the_deadline(
    disk: shmdisk.Disk, sockdir: str, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    """A client sending a byte every 0.2 s, in its options or in its TLS handshake, is cut
    off once the whole handshake has taken HANDSHAKE_TIMEOUT, not reset by every byte."""
    monkeypatch.setattr(_connection, "HANDSHAKE_TIMEOUT", 1.0)
    path = os.path.join(sockdir, "slow")
    certs = os.path.join(sockdir, "pki")
    os.mkdir(certs)
    (make_with_certtool if shutil.which("certtool") else make_with_openssl)(certs)
    with NBDServer([disk], socket_path=path, tls="on", tls_certificates=certs, tls_psk=None) as srv:
        c = Client(path)
        try:
            c.greet()
            if during == "tls":
                c.option(P.OPT_STARTTLS)
                assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ACK
                trickle = b"\x16\x03\x01\x02\x00" + bytes(512)
            else:
                trickle = P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0) * 20
            start = time.monotonic()
            c.sock.settimeout(0.2)
            for byte in trickle:
                try:
                    c.sock.send(bytes([byte]))
                    if c.sock.recv(65536) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            took = time.monotonic() - start
            assert took < 4.0, f"cut off after {took:.1f} s"
        finally:
            c.close()
        assert wait_until(lambda: srv.connections() == 0)
