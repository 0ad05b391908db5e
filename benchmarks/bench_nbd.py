"""``shmdisk serve`` against ``nbdkit memory``, same run: fio's nbd engine and nbdcopy.

    python benchmarks/bench_nbd.py [--size 1G] [--rounds 3] [--tls]

Both servers listen on a Unix socket and hold an empty disk of ``--size`` bytes, started fresh
for every write workload (so writes land on pages never written before: the first-write cost
is part of what is measured) and once per round for the rest, which follow an nbdcopy of
random bytes into the fresh disk (itself the "nbdcopy in" figure); the "rewrite" rows write
over those written pages. Every workload moves a
fixed amount of data (fio ``io_size``), the same for both servers; the two servers alternate
within each round so that noise from other work on the machine hits both alike. The table
gives the median over the rounds and the ratio shmdisk / nbdkit of the medians (higher is
better for shmdisk), next to the target set for it.

With ``--tls`` both servers require TLS on their socket (``nbds+unix://`` URIs, certificates
made for the run with certtool), and only the nbdcopy workloads run (fio's nbd engine refuses
a URI's certificate directory): what encryption costs each server.

Needs fio (with its nbd engine), nbdcopy (libnbd-bin) and nbdkit on PATH; certtool for --tls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from dataclasses import dataclass

import shmdisk
from shmdisk import _units

MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    label: str
    target: float | None  # the ratio shmdisk / nbdkit aimed for (None: shown for insight)
    kind: str  # "fio" or "nbdcopy-in" / "nbdcopy-out"
    rw: str = ""
    bs: str = ""
    depth: int = 1
    fresh: bool = False  # on a fresh, empty disk of its own (else on the disk nbdcopy filled)

    @property
    def writes(self) -> bool:
        return self.rw in ("randwrite", "write")


WORKLOADS = [
    Workload("4 KiB random write, depth 1", 1.2, "fio", "randwrite", "4k", 1, fresh=True),
    Workload("4 KiB random write, depth 16", 1.2, "fio", "randwrite", "4k", 16, fresh=True),
    Workload("1 MiB sequential write, depth 16", 1.2, "fio", "write", "1m", 16, fresh=True),
    Workload("nbdcopy in (fresh disk)", 1.0, "nbdcopy-in"),
    Workload("4 KiB random read, depth 1", 1.2, "fio", "randread", "4k", 1),
    Workload("4 KiB random read, depth 16", 1.2, "fio", "randread", "4k", 16),
    Workload("1 MiB sequential read, depth 16", 1.2, "fio", "read", "1m", 16),
    Workload("nbdcopy out", 1.0, "nbdcopy-out"),
    # The same random writes over pages that already hold data: what a write costs when no
    # page has to be allocated first (for insight; no target).
    Workload("4 KiB random rewrite, depth 1", None, "fio", "randwrite", "4k", 1),
    Workload("4 KiB random rewrite, depth 16", None, "fio", "randwrite", "4k", 16),
]


def parse_size(text: str) -> int:
    """A byte count written as the command line takes one (4096, 64M, 1GiB)."""
    return _units.parse_bytes(text)[0]


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float) -> None:
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


# With --tls: the directories of the server's and the client's certificates.
TLS: dict[str, str] = {}


def make_certificates(d: str) -> dict[str, str]:
    """A CA, a server certificate and a client certificate, laid out for nbdkit, shmdisk serve
    (server/) and libnbd (client/)."""

    def certtool(*args: str) -> None:
        subprocess.run(["certtool", *args], cwd=d, check=True, capture_output=True)

    infos = {
        "ca": "cn = bench CA\nca\ncert_signing_key\n",
        "server": "cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\n"
        "signing_key\n",
        "client": "cn = bench\ntls_www_client\nencryption_key\nsigning_key\n",
    }
    for who, text in infos.items():
        with open(os.path.join(d, f"{who}.info"), "w") as f:
            f.write(text)
        certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", f"{who}-key.pem")
    certtool("--generate-self-signed", "--load-privkey", "ca-key.pem", "--template", "ca.info",
             "--outfile", "ca-cert.pem")  # fmt: skip
    for who in ("server", "client"):
        certtool("--generate-certificate", "--load-ca-certificate", "ca-cert.pem",
                 "--load-ca-privkey", "ca-key.pem", "--load-privkey", f"{who}-key.pem",
                 "--template", f"{who}.info", "--outfile", f"{who}-cert.pem")  # fmt: skip
    dirs = {}
    for who in ("server", "client"):
        dirs[who] = os.path.join(d, who)
        os.mkdir(dirs[who])
        for f in ("ca-cert.pem", f"{who}-cert.pem", f"{who}-key.pem"):
            shutil.copy(os.path.join(d, f), dirs[who])
    return dirs


def tls_uri(uri: str) -> str:
    """``uri`` as the TLS client of a --tls run connects."""
    if not TLS:
        return uri
    return uri.replace("nbd+unix://", "nbds+unix://") + f"&tls-certificates={TLS['client']}"


@contextlib.contextmanager
def shmdisk_server(size: int, sock: str) -> Iterator[str]:
    name = f"bench-nbd-{os.getpid()}-{secrets.token_hex(4)}"
    shmdisk.create(name, size // 512).disconnect()
    try:
        cmd = [sys.executable, "-m", "shmdisk", "serve", name, "--socket", sock, "--quiet"]
        if TLS:
            cmd += ["--tls", "require", "--tls-certificates", TLS["server"]]
        proc = subprocess.Popen(cmd)
        try:
            wait_until(lambda: accepts(sock), proc, 30.0)
            yield tls_uri(f"nbd+unix:///{name}?socket={sock}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        shmdisk.destroy(name)


@contextlib.contextmanager
def nbdkit_server(size: int, sock: str) -> Iterator[str]:
    # nbdkit writes its pid file once it listens; a probe connection would make it log errors.
    pidfile = sock + ".pid"
    tls = ["--tls=require", f"--tls-certificates={TLS['server']}"] if TLS else []
    cmd = ["nbdkit", "-f", "-P", pidfile, "-U", sock, *tls, "memory", str(size)]
    proc = subprocess.Popen(cmd)
    try:
        wait_until(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile) > 0, proc, 30.0)
        yield tls_uri(f"nbd+unix:///?socket={sock}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        for path in (sock, pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


SERVERS = {"shmdisk serve": shmdisk_server, "nbdkit memory": nbdkit_server}


def run_fio(w: Workload, uri: str, size: int) -> float:
    """fio's result for ``w``: IOPS for 4 KiB blocks, bytes per second for 1 MiB ones."""
    io_size = size // 8 if w.bs == "4k" else size
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.depth}",
        f"--size={size}",
        f"--io_size={io_size}",
        "--output-format=json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
    side = job["write" if w.writes else "read"]
    return float(side["iops"] if w.bs == "4k" else side["bw_bytes"])


def run_nbdcopy(args: list[str], size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", *args], check=True)
    return size / (time.perf_counter() - start)


def workloads() -> list[Workload]:
    """The workloads of this run: with --tls only nbdcopy's, as fio's nbd engine does not let
    libnbd read the certificate directory a URI names (tls-certificates)."""
    return [w for w in WORKLOADS if not TLS or w.kind != "fio"]


def one_round(server: str, size: int, src: str, sock: str) -> dict[str, float]:
    """Every workload once against ``server``; {label: figure}."""
    start = SERVERS[server]
    out: dict[str, float] = {}
    for w in workloads():
        if w.fresh:
            with start(size, sock) as uri:
                out[w.label] = run_fio(w, uri, size)
    with start(size, sock) as uri:
        for w in workloads():
            if w.kind == "nbdcopy-in":
                out[w.label] = run_nbdcopy([src, uri], size)
            elif w.kind == "nbdcopy-out":
                out[w.label] = run_nbdcopy([uri, "null:"], size)
            elif not w.fresh:
                out[w.label] = run_fio(w, uri, size)
    return out


def figure(w: Workload, value: float) -> str:
    if w.bs == "4k":
        return f"{value / 1000:7.1f} k IOPS"
    return f"{value / 1e9:7.2f} GB/s  "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", type=parse_size, help="disk size (default 1G)")
    parser.add_argument("--rounds", default=3, type=int, help="rounds per server (default 3)")
    parser.add_argument("--tls", action="store_true", help="both servers require TLS")
    args = parser.parse_args(argv)
    tools = ("fio", "nbdcopy", "nbdkit") + (("certtool",) if args.tls else ())
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"bench_nbd: needs {', '.join(missing)} on PATH", file=sys.stderr)
        return 2
    size: int = args.size
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SERVERS}
    with (
        tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp,
        tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="bench-nbd-src-") as src,
    ):
        for _ in range(size // MiB):
            src.write(os.urandom(MiB))
        src.write(os.urandom(size % MiB))
        src.flush()
        sock = os.path.join(tmp, "nbd.sock")
        if args.tls:
            TLS.update(make_certificates(tmp))
        for r in range(args.rounds):
            # Alternate which server goes first, so neither always follows the other's cleanup.
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            for server in order:
                for label, value in one_round(server, size, src.name, sock).items():
                    results[server].setdefault(label, []).append(value)

    ours, theirs = (results[s] for s in SERVERS)
    print(
        f"NBD over a Unix socket{' with TLS' if args.tls else ''}, {size / (1 << 30):g} GiB "
        f"disk, median of {args.rounds} rounds (fio nbd engine, nbdcopy defaults)"
    )
    print(
        f"{'workload':<34} {'shmdisk serve':>15} {'nbdkit memory':>15} {'ratio':>7} {'target':>7}"
    )
    for w in workloads():
        a, b = statistics.median(ours[w.label]), statistics.median(theirs[w.label])
        ratio = a / b
        if w.target is None:
            target = "     -"
        else:
            target = f"{w.target:5.1f}x" + ("" if ratio >= w.target else "  (below)")
        print(f"{w.label:<34} {figure(w, a):>15} {figure(w, b):>15} {ratio:6.2f}x {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
