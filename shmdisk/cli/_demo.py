"""``demo``: worker processes (spawn) share one fresh disk, each writing its own stamped
region and reading the others' back; the parent then checks every byte.

The workers are module-level functions here: a spawn child finds them by this module's path.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue as _queue
import secrets
import signal
import sys
import threading
import time
from typing import Any

import shmdisk
from shmdisk._units import format_bytes, format_bytes_long, parse_size

from ._common import CliError, can_draw_unicode, positive_int, subcommand, table


def _demo_pattern(worker: int, sector: int, n_sectors: int, sector_size: int) -> bytes:
    """What worker ``worker`` writes to sectors ``[sector, sector + n_sectors)``.

    Every sector starts with a readable stamp naming its worker and sector, and the rest is a
    pattern that differs per worker, so a sector landing in the wrong place is caught.
    """
    import numpy as np

    # One sector's pattern tiled: uint8 all the way, so a large region costs one copy of itself
    # in memory rather than several times that in wide temporaries.
    row = (
        (np.arange(sector_size, dtype=np.uint32) * (2 * worker + 3) + worker * 89) & 0xFF
    ).astype(np.uint8)
    data = np.tile(row, (n_sectors, 1))
    for k in range(n_sectors):
        stamp = f"shmdisk demo: worker {worker}, sector {sector + k}\n".encode()
        data[k, : len(stamp)] = np.frombuffer(stamp, dtype=np.uint8)
    return data.tobytes()


def _mismatches(got: bytes | bytearray, expected: bytes) -> int:
    import numpy as np

    a = np.frombuffer(got, dtype=np.uint8)
    b = np.frombuffer(expected, dtype=np.uint8)
    return int(np.count_nonzero(a != b))


def _demo_worker(
    name: str,
    index: int,
    regions: list[tuple[int, int]],
    barrier: Any,
    results: Any,
) -> None:
    """One demo worker: write its own region in small requests, wait for the others, then read
    every other worker's region back and count the bytes that differ."""
    # The parent handles Ctrl-C and cleans up; a worker dying of it first would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report: dict[str, Any] = {"index": index, "pid": os.getpid()}
    try:
        with shmdisk.connect(name, create=False) as disk:
            ss = disk.sector_size
            start, count = regions[index]
            data = memoryview(_demo_pattern(index, start, count, ss))
            t0 = time.perf_counter()
            step = max(1, 65536 // ss)  # 64 KiB requests, so the workers' writes interleave
            for off in range(0, count, step):
                n = min(step, count - off)
                disk.write(start + off, data[off * ss : (off + n) * ss])
            report["write_s"] = time.perf_counter() - t0
            report["wrote"] = count * ss
            barrier.wait(timeout=60)
            t1 = time.perf_counter()
            checked = 0
            bad = 0
            for peer, (p_start, p_count) in enumerate(regions):
                if peer == index:
                    continue
                buf = bytearray(p_count * ss)
                disk.read(p_start, buf)
                bad += _mismatches(buf, _demo_pattern(peer, p_start, p_count, ss))
                checked += len(buf)
            report["read_s"] = time.perf_counter() - t1
            report["checked"] = checked
            report["peers"] = len(regions) - 1
            report["mismatches"] = bad
    except BaseException as exc:  # reported to the parent, which prints one line for it
        with contextlib.suppress(Exception):
            barrier.abort()
        report["error"] = f"{type(exc).__name__}: {exc}"
    results.put(report)


_MARKS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _demo_strip(regions: list[tuple[int, int]], size: int, cells: int) -> str:
    """One line of the disk: each worker's region drawn with its number, holes as dots."""
    marks = []
    for i in range(cells):
        lo = i * size // cells
        hi = (i + 1) * size // cells
        mark = "\u00b7" if can_draw_unicode() else "."
        for w, (start, count) in enumerate(regions):
            if start < hi and lo < start + count:
                mark = _MARKS[w % len(_MARKS)]
        marks.append(mark)
    return "".join(marks)


def cmd_demo(args: argparse.Namespace) -> int:
    workers = args.workers
    if not 1 <= workers <= 64:
        raise CliError(f"--workers must be between 1 and 64, not {workers}")
    ss = shmdisk.DEFAULT_SECTOR_SIZE
    region_sectors = parse_size(args.region, ss)
    if region_sectors < 1:
        raise CliError("--region must be at least one sector")
    # Regions spread over a disk twice their total size: the gaps between them are never written,
    # so the demo also shows that untouched parts of a disk cost no memory.
    stride = 2 * region_sectors
    size = workers * stride
    regions = [(w * stride, region_sectors) for w in range(workers)]
    name = f"demo-{os.getpid()}-{secrets.token_hex(3)}"
    ctx = multiprocessing.get_context("spawn")
    out = sys.stdout
    print(f"shmdisk demo: {workers} worker processes share one disk in shared memory", file=out)
    print(
        f"  disk {name}: {format_bytes_long(size * ss)} ({size} sectors of {ss} bytes),"
        f" at {shmdisk.segment_path(name)}",
        file=out,
    )
    print(
        f"  each worker writes its own stamped {format_bytes_long(region_sectors * ss)} region,"
        " then reads every other worker's region back",
        file=out,
    )
    print(file=out)
    procs: list[Any] = []
    result = 1
    disk: shmdisk.Disk | None = None
    # `kill PID` must clean up like Ctrl-C does: turn SIGTERM into an exception too.
    old_term = _set_signal(signal.SIGTERM, _raise_terminated)
    try:
        disk = shmdisk.create(name, size, ss)
        barrier = ctx.Barrier(workers)
        results = ctx.Queue()
        # Children inherit an ignored SIGINT through exec, so a Ctrl-C during their start-up
        # reaches only the parent, which stops them and removes the disk.
        old = _set_signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for w in range(workers):
                proc = ctx.Process(
                    target=_demo_worker,
                    args=(name, w, regions, barrier, results),
                    name=f"shmdisk-demo-{w}",
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
        finally:
            _set_signal(signal.SIGINT, old)
        reports = _demo_collect(procs, results, timeout=args.timeout)
        for proc in procs:
            proc.join(timeout=5)
        result = _demo_report(disk, name, regions, reports, procs, size)
        return result
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated: stopping the workers", file=sys.stderr)
        return 143
    finally:
        # A second Ctrl-C or SIGTERM (or a first one that comes just as the demo ends) must
        # not cut the clean-up short.
        _set_signal(signal.SIGTERM, signal.SIG_IGN)
        old_int = _set_signal(signal.SIGINT, signal.SIG_IGN)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if disk is not None:
            disk.disconnect()
        if args.keep and disk is not None:
            print(f"disk {name} kept: try `shmdisk map {name}`, then `shmdisk destroy {name}`")
        else:
            # Also when a signal landed inside create(): the segment may exist without a
            # handle, and its name (our pid and a random token) is nobody else's.
            shmdisk.destroy(name)
            print(f"disk {name} destroyed", file=out)
            if result == 0:
                print(
                    "next: shmdisk create scratch 64M; shmdisk ls; shmdisk map scratch;"
                    " shmdisk destroy scratch",
                    file=out,
                )
        _set_signal(signal.SIGTERM, old_term)
        _set_signal(signal.SIGINT, old_int)


class _Terminated(Exception):
    """SIGTERM arrived during the demo."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _set_signal(signum: int, handler: Any) -> Any:
    """``signal.signal`` where allowed: only the main thread may set handlers; elsewhere (main()
    called from a thread) the defaults stay and this returns None."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)


def _demo_collect(procs: list[Any], results: Any, timeout: float) -> dict[int, dict[str, Any]]:
    """Reports by worker index; stops early when a worker died without reporting."""
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(reports) < len(procs) and time.monotonic() < deadline:
        try:
            report = results.get(timeout=0.2)
        except _queue.Empty:
            silent = [i for i, p in enumerate(procs) if i not in reports and p.exitcode is not None]
            if silent:
                # A dead worker never reports; give the queue a moment to drain, then stop.
                with contextlib.suppress(_queue.Empty):
                    while True:
                        r = results.get(timeout=0.5)
                        reports[r["index"]] = r
                break
            continue
        reports[report["index"]] = report
    return reports


def _demo_report(
    disk: shmdisk.Disk,
    name: str,
    regions: list[tuple[int, int]],
    reports: dict[int, dict[str, Any]],
    procs: list[Any],
    size: int,
) -> int:
    ss = disk.sector_size
    rows = []
    all_ok = True
    for w, (start, count) in enumerate(regions):
        r = reports.get(w)
        region = f"{format_bytes(start * ss)}-{format_bytes((start + count) * ss)}"
        if r is None:
            code = procs[w].exitcode
            why = "no report (timed out)" if code is None else f"died (exit code {code})"
            rows.append([str(w), str(procs[w].pid), region, "-", "-", "-", why])
            all_ok = False
            continue
        if "error" in r:
            rows.append([str(w), str(r["pid"]), region, "-", "-", "-", f"failed: {r['error']}"])
            all_ok = False
            continue
        ok = r["mismatches"] == 0
        all_ok &= ok
        ms = (r["write_s"] + r["read_s"]) * 1000
        rows.append(
            [
                str(w),
                str(r["pid"]),
                region,
                format_bytes(r["wrote"]),
                f"{r['peers']} region{'' if r['peers'] == 1 else 's'},"
                f" {format_bytes(r['checked'])}",
                f"{ms:.0f} ms",
                "ok" if ok else f"{r['mismatches']} bytes differ",
            ]
        )
    headers = ["WORKER", "PID", "REGION", "WROTE", "READ BACK", "TIME", "RESULT"]
    for line in table(headers, rows, {"WORKER", "PID", "WROTE", "TIME"}, sep="  "):
        print("  " + line)
    print()

    # The parent checks the whole disk itself: every region as its worker wrote it, and every
    # gap still zero, so "ok" means every byte of the disk, not only what the workers compared.
    t0 = time.perf_counter()
    bad = 0
    expected_regions: list[tuple[int, int, int | None]] = []
    pos = 0
    for w, (start, count) in enumerate(regions):
        expected_regions.append((pos, start - pos, None))
        expected_regions.append((start, count, w))
        pos = start + count
    expected_regions.append((pos, size - pos, None))
    for start, count, owner in expected_regions:
        if count <= 0:
            continue
        buf = bytearray(count * ss)
        disk.read(start, buf)
        expected = bytes(len(buf)) if owner is None else _demo_pattern(owner, start, count, ss)
        bad += _mismatches(buf, expected)
    check_ms = (time.perf_counter() - t0) * 1000
    info = shmdisk.inspect(name)
    data_bytes = sum(c for _, c in regions) * ss
    print(f"  disk map  |{_demo_strip(regions, size, min(64, size))}|")
    mark = "digit" if len(regions) <= 10 else "character (0-9, then a-z)"
    print(f"            each {mark} is that worker's region; dots were never written")
    print(
        f"  memory    {format_bytes_long(info.allocated_bytes)} of RAM holds this"
        f" {format_bytes_long(size * ss)} disk: the {format_bytes_long(size * ss - data_bytes)}"
        " never written cost nothing"
    )
    first = bytearray(ss)
    w_last = len(regions) - 1
    disk.read(regions[w_last][0], first)
    stamp = bytes(first).split(b"\n", 1)[0].decode("ascii", "replace")
    print(f"  sector {regions[w_last][0]} reads: {stamp!r}")
    print()
    n = len(regions)
    if all_ok and bad == 0:
        if n == 1:
            workers = "1 worker wrote its region"
        else:
            others = "the other region" if n == 2 else f"the other {n - 1} regions"
            workers = f"{n} workers each read back {others}"
        print(
            f"verified: every byte as written ({workers};\n          the parent re-read all"
            f" {format_bytes_long(size * ss)}, holes included, in {check_ms:.0f} ms)"
        )
        return 0
    print(
        f"FAILED: {bad} bytes of the disk differ from what was written"
        + ("" if all_ok else "; some workers failed (see the table)")
    )
    return 1


def register(sub: Any) -> None:
    """Add ``demo`` to the ``shmdisk`` subcommands."""
    p = subcommand(
        sub,
        "demo",
        "watch worker processes share one disk",
        "Creates a fresh disk, starts the workers (spawn), each writes its own stamped region\n"
        "and reads the others' back; the parent then checks every byte of the disk. The disk is\n"
        "destroyed at the end, even on Ctrl-C. Exit code 0 only if every byte checked out.\n"
        "\nexample:\n  shmdisk demo\n  shmdisk demo --workers 8 --region 4M",
    )
    p.add_argument("--workers", type=positive_int, default=4, help="worker processes (default: 4)")
    p.add_argument(
        "--region", default="1M", metavar="SIZE", help="bytes each worker writes (default: 1M)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the workers (default: 120)",
    )
    p.add_argument("--keep", action="store_true", help="keep the disk afterwards, to look at it")
    p.set_defaults(func=cmd_demo)
