"""nbdcopy throughput through ``shmdisk serve`` against ``nbdkit memory``, same run, same socket.

    python benchmarks/bench_nbd.py [--size 1G] [--rounds 3] [-- extra nbdcopy options]

For each round and each server (started fresh, on a Unix socket, each holding an empty disk of
``--size`` bytes) nbdcopy copies a file of random bytes in /dev/shm into the export ("write,
fresh": every page is allocated by the copy), copies it in again ("write, again"), and copies
the export out to ``null:`` ("read"). The two servers alternate within each round so that noise
from other work on the machine hits both alike. The table gives the best round of each (the
least disturbed one) and the median, in GB/s (10^9 bytes per second), and the ratios
shmdisk / nbdkit of both. Buffers are the clients' and servers' own, so alignment is theirs.

Needs nbdcopy (libnbd-bin) and nbdkit on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import shmdisk

OPS = ("write, fresh", "write, again", "read")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        if ready():
            return
        time.sleep(0.02)
    raise TimeoutError(f"server not ready after {timeout} s")


def accepts(path: str) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        return True
    return False


@contextlib.contextmanager
def shmdisk_server(size: int, sock: str) -> Iterator[str]:
    name = f"bench-nbd-{os.getpid()}-{secrets.token_hex(4)}"
    shmdisk.create(name, size // 512).disconnect()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmdisk", "serve", name, "--socket", sock, "--quiet"]
    )
    try:
        wait_until(lambda: accepts(sock), proc)
        yield f"nbd+unix:///{name}?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shmdisk.destroy(name)


@contextlib.contextmanager
def nbdkit_server(size: int, sock: str) -> Iterator[str]:
    # nbdkit writes its pid file once it listens; a probe connection would make it log errors.
    pidfile = sock + ".pid"
    proc = subprocess.Popen(["nbdkit", "-f", "-P", pidfile, "-U", sock, "memory", str(size)])
    try:
        wait_until(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile) > 0, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for path in (sock, pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def one_round(
    server: Callable[[int, str], contextlib.AbstractContextManager[str]],
    size: int,
    src: str,
    sock: str,
    extra: list[str],
) -> dict[str, float]:
    """Seconds per operation against a freshly started server."""
    with server(size, sock) as uri:
        fresh = timed(["nbdcopy", *extra, src, uri])
        again = timed(["nbdcopy", *extra, src, uri])
        read = timed(["nbdcopy", *extra, uri, "null:"])
    return dict(zip(OPS, (fresh, again, read), strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", type=parse_size, help="disk size (default 1G)")
    parser.add_argument("--rounds", default=3, type=int, help="rounds per server (default 3)")
    parser.add_argument("nbdcopy_args", nargs="*", help="extra nbdcopy options (after --)")
    args = parser.parse_args(argv)
    for tool in ("nbdcopy", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"bench_nbd: {tool} is not installed", file=sys.stderr)
            return 2
    size: int = args.size
    results: dict[str, dict[str, list[float]]] = {
        "shmdisk": {op: [] for op in OPS},
        "nbdkit": {op: [] for op in OPS},
    }
    servers = {"shmdisk": shmdisk_server, "nbdkit": nbdkit_server}
    with (
        tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp,
        tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="bench-nbd-src-") as src,
    ):
        chunk = 1 << 20
        for _ in range(size // chunk):
            src.write(os.urandom(chunk))
        src.write(os.urandom(size % chunk))
        src.flush()
        sock = os.path.join(tmp, "nbd.sock")
        for r in range(args.rounds):
            # Alternate which server goes first, so neither always follows the other's cleanup.
            order = ["shmdisk", "nbdkit"] if r % 2 == 0 else ["nbdkit", "shmdisk"]
            for label in order:
                seconds = one_round(servers[label], size, src.name, sock, args.nbdcopy_args)
                for op, s in seconds.items():
                    results[label][op].append(size / s / 1e9)

    extra = " ".join(args.nbdcopy_args) or "defaults"
    print(
        f"nbdcopy ({extra}) over a Unix socket, {size / (1 << 30):g} GiB, "
        f"{args.rounds} rounds; GB/s best (median)"
    )
    print(f"{'operation':<14} {'shmdisk serve':>16} {'nbdkit memory':>16} {'ratio':>15}")
    for op in OPS:
        ours, theirs = results["shmdisk"][op], results["nbdkit"][op]
        cells = [f"{max(v):6.2f} ({statistics.median(v):5.2f})" for v in (ours, theirs)]
        median_ratio = statistics.median(ours) / statistics.median(theirs)
        ratio = f"{max(ours) / max(theirs):.2f}x ({median_ratio:.2f}x)"
        print(f"{op:<14} {cells[0]:>16} {cells[1]:>16} {ratio:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
