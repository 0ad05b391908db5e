"""What ``shmdisk serve`` holds on to under many clients, and how it runs out of descriptors.

    python benchmarks/bench_nbd_resources.py [--clients 40] [--read 32M] [--seconds 5]

Two scenarios, each on a server started for it (``python -m shmdisk serve`` on a Unix socket,
a disk of its own, written all over so that reads copy data):

- memory: ``--clients`` connections each READ ``--read`` bytes, then stay connected and idle;
  the server's ``VmRSS``, ``RssAnon`` and ``RssShmem`` (its payload buffers are shared
  anonymous mappings, so they count in ``RssShmem``, with the disk pages it has touched), its
  threads and descriptors: before, while the clients idle, and once they have all hung up.
- descriptors: the server runs with ``RLIMIT_NOFILE`` lowered to ``--nofile``; twice as many
  clients connect and stay; the script counts the lines the server logs from then on (it runs
  with ``--quiet``: warnings only) and the CPU it uses over ``--seconds``, then checks that a
  client is served once the others have left.

Prints one JSON object. Run it against another checkout with ``PYTHONPATH=that/checkout``
to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import shmdisk
from shmdisk import _units

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Just enough of the NBD wire format for a client that negotiates and reads.
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x0003E889045565A9
OPT_GO, REP_ACK = 7, 1
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698


def parse_size(text: str) -> int:
    """A byte count written as the command line takes one (4096, 64M, 1GiB)."""
    return _units.parse_bytes(text)[0]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("server hung up")
        got += k
    return bytes(buf)


def connect_and_go(path: str, export: str) -> socket.socket:
    """A client past the handshake (NBD_OPT_GO, simple replies) on ``export``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        rmagic, _opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert rmagic == REPLY_MAGIC
        recv_exact(s, length)
        if kind == REP_ACK:
            return s
        if kind & (1 << 31):
            raise RuntimeError(f"NBD_OPT_GO refused: {kind:#x}")


def read(s: socket.socket, offset: int, length: int) -> None:
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 1, offset, length))
    magic, error, _handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC and error == 0, error
    view = memoryview(bytearray(1 * MiB))
    left = length
    while left:
        k = s.recv_into(view, min(left, len(view)))
        if not k:
            raise EOFError("server hung up mid-reply")
        left -= k


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem (KiB), Threads and open descriptors of process ``pid``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "Threads"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@contextlib.contextmanager
def server(
    size: int, nofile: int | None = None
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """A ``shmdisk serve`` subprocess on a fresh disk; yields (process, socket path, export)."""
    name = f"bench-res-{os.getpid()}-{secrets.token_hex(4)}"
    disk = shmdisk.create(name, size // 512)
    # Written all over, so that reads copy data rather than being answered as holes.
    chunk = os.urandom(MiB)
    for at in range(0, size, MiB):
        disk.write_at(at, chunk)
    disk.disconnect()
    tmp = tempfile.mkdtemp(prefix="bench-res-")
    path = os.path.join(tmp, "s")
    prelude = ""
    if nofile is not None:
        limit = f"({nofile}, {nofile})"
        prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, {limit})\n"
    code = prelude + "import sys\nfrom shmdisk.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    cmd = [sys.executable, "-c", code, "serve", name, "--socket", path, "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"server did not start: {err}")
            time.sleep(0.02)
        yield proc, path, name
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shmdisk.destroy(name)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def drain(stream: object, into: list[str]) -> threading.Thread:
    def run() -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def memory(clients: int, length: int) -> dict[str, object]:
    size = max(length, 8 * MiB)
    with server(size) as (proc, path, name):
        lines: list[str] = []
        drain(proc.stderr, lines)
        time.sleep(0.5)
        idle = status(proc.pid)
        socks = []
        try:
            for _ in range(clients):
                s = connect_and_go(path, name)
                read(s, 0, length)
                socks.append(s)
            time.sleep(2.0)  # past the server's idle release (1 s) for the last client too
            held = status(proc.pid)
        finally:
            for s in socks:
                s.close()
        time.sleep(2.0)
        after = status(proc.pid)
    return {
        "clients": clients,
        "read_bytes": length,
        "server_idle": idle,
        "clients_connected_idle": held,
        "clients_gone": after,
    }


def descriptors(nofile: int, clients: int, seconds: float) -> dict[str, object]:
    with server(8 * MiB, nofile) as (proc, path, name):
        lines: list[str] = []
        drain(proc.stderr, lines)
        time.sleep(0.5)
        socks = []
        first_line = len(lines)
        try:
            for _ in range(clients):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(path)  # the backlog takes them even while accept fails
                socks.append(s)
            time.sleep(0.5)
            before_lines, cpu0, t0 = len(lines), cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            window_lines = len(lines) - before_lines
            all_lines = len(lines) - first_line
            sample = lines[first_line : first_line + 3]
        finally:
            for s in socks:
                s.close()
        time.sleep(2.0)
        served = True
        try:
            read(connect_and_go(path, name), 0, 4096)
        except (OSError, EOFError, RuntimeError):
            served = False
    return {
        "nofile": nofile,
        "clients": clients,
        "seconds": round(t1 - t0, 2),
        "log_lines_in_window": window_lines,
        "log_lines_since_clients_came": all_lines,
        "cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "sample": sample,
        "served_afterwards": served,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=40, help="idle clients (default 40)")
    parser.add_argument("--read", type=parse_size, default=32 * MiB, help="each reads (32M)")
    parser.add_argument("--nofile", type=int, default=64, help="RLIMIT_NOFILE (default 64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="out of descriptors (5)")
    args = parser.parse_args(argv)
    result = {
        "memory": memory(args.clients, args.read),
        "descriptors": descriptors(args.nofile, 2 * args.nofile, args.seconds),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
