"""resize-destroy: one process resizes, one destroys and re-creates, others do I/O, and threads
race disconnect(); no process may die of a signal, and every error must be a typed one."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import stamp

import shmdisk

from . import _engines
from ._common import (
    SPAWN,
    Options,
    Result,
    join_all,
    progress_loop,
    start_together,
    unique_name,
)
from ._requests import read_request, write_request

_R_OPS, _R_OOR, _R_DISC, _R_NOTFOUND, _R_CORRUPT, _R_STALE, _R_UNTYPED, _R_FIELDS = range(8)


def _rd_worker(
    name: str, idx: int, seed: int, run: tuple[Any, int, float], gen: Any, counts: Any
) -> None:
    """Random I/O that survives its disk being resized, destroyed and re-created."""
    stop_at = start_together(*run)
    rng = random.Random(seed)
    base = idx * _R_FIELDS
    disk: shmdisk.Disk | None = None
    floor = 0  # the generation this handle's disk has at least
    my_gen = 0  # the generation stamped into what this handle writes
    seq = 0
    while time.monotonic() < stop_at:
        if disk is None:
            floor = gen.value
            try:
                disk = shmdisk.connect(name, create=False)
            except shmdisk.DiskNotFoundError:
                counts[base + _R_NOTFOUND] += 1
                time.sleep(0.001)
                continue
            my_gen = gen.value
        try:
            size = disk.get_info().size_sectors
            ss = disk.sector_size
            count = max(1, min(size, rng.randint(1, 24)))
            start = rng.randrange(0, max(1, size - count + 1))
            op = rng.random()
            if op < 0.45:
                seq += 1
                writer = (my_gen << 8) | (idx + 1)
                write_request(disk, start, stamp.make_request(writer, seq, start, count, ss), rng)
            elif op < 0.9:
                buf = read_request(disk, start, count, rng)
                v = stamp.parse(buf, start, ss)
                if v.corrupt:
                    counts[base + _R_CORRUPT] += 1
                if any((w >> 8) < floor for (w, _, _, _) in v.keys):
                    counts[base + _R_STALE] += 1
            elif op < 0.95:
                disk.discard(start, count)
            else:
                disk.extents()
            counts[base + _R_OPS] += 1
        except shmdisk.OutOfRangeError:
            counts[base + _R_OOR] += 1  # the disk shrank between get_info and the request
        except shmdisk.DisconnectedError:
            counts[base + _R_DISC] += 1
            disk.disconnect()
            disk = None
        except Exception as e:
            # Anything but our typed errors breaks the promise; count it, report it, go on.
            counts[base + _R_UNTYPED] += 1
            if counts[base + _R_UNTYPED] == 1:
                print(f"io worker {idx}: untyped {e!r}", file=sys.stderr)
            disk.disconnect()
            disk = None
    if disk is not None:
        disk.disconnect()


def _resizer(
    name: str, seed: int, run: tuple[Any, int, float], lo: int, hi: int, counts: Any
) -> None:
    stop_at = start_together(*run)
    rng = random.Random(seed)
    disk: shmdisk.Disk | None = None
    while time.monotonic() < stop_at:
        try:
            if disk is None:
                disk = shmdisk.connect(name, create=False)
            old = disk.get_info().size_sectors
            new = rng.randint(lo, hi)
            disk.resize(new)
            counts[0 if new >= old else 1] += 1
        except shmdisk.DiskNotFoundError:
            time.sleep(0.001)
        except shmdisk.DisconnectedError:
            counts[2] += 1
            if disk is not None:
                disk.disconnect()
            disk = None
        except Exception as e:
            counts[3] += 1
            if counts[3] == 1:
                print(f"resizer: untyped {e!r}", file=sys.stderr)
            if disk is not None:
                disk.disconnect()
            disk = None
        time.sleep(rng.random() * 0.005)
    if disk is not None:
        disk.disconnect()


def _destroyer(
    name: str,
    seed: int,
    run: tuple[Any, int, float],
    size: int,
    max_size: int,
    gen: Any,
    counts: Any,
) -> None:
    """Destroy and re-create; every operation on the old handle must raise DisconnectedError."""
    stop_at = start_together(*run)
    rng = random.Random(seed)
    buf = bytearray(512)
    ops: list[tuple[str, Callable[[shmdisk.Disk], object]]] = [
        ("read", lambda d: d.read(0, buf)),
        ("write", lambda d: d.write(0, bytes(512))),
        ("read_at", lambda d: d.read_at(1, buf)),
        ("write_at", lambda d: d.write_at(1, b"x")),
        ("get_info", lambda d: d.get_info()),
        ("resize", lambda d: d.resize(8)),
        ("discard", lambda d: d.discard(0, 1)),
        ("write_zeroes", lambda d: d.write_zeroes(0, 1)),
        ("seek_mapped", lambda d: d.seek_mapped(0)),
        ("seek_unmapped", lambda d: d.seek_unmapped(0)),
        ("extents", lambda d: d.extents()),
        ("mapped_pages", lambda d: d.mapped_pages()),
        ("flush", lambda d: d.flush()),
    ]
    while time.monotonic() < stop_at:
        time.sleep(0.02 + rng.random() * 0.08)
        try:
            old = shmdisk.connect(name, create=False)
        except shmdisk.DiskNotFoundError:
            old = None
        shmdisk.destroy(name)
        # Only now: a worker that reads the new generation before connecting must never reach
        # the incarnation being destroyed (its data would look stale to that worker).
        gen.value += 1
        counts[0] += 1
        if old is not None:
            label, fn = rng.choice(ops)
            try:
                fn(old)
                counts[2] += 1
                print(f"destroyer: {label} on a destroyed disk did not fail", file=sys.stderr)
            except shmdisk.DisconnectedError:
                counts[3] += 1
            except Exception as e:
                counts[2] += 1
                print(f"destroyer: {label} on a destroyed disk raised {e!r}", file=sys.stderr)
            old.disconnect()
        shmdisk.create(name, size, max_size_sectors=max_size).disconnect()
        counts[1] += 1


_D_ROUNDS, _D_OK, _D_DISC, _D_UNTYPED, _D_HANGS, _D_FIELDS = range(6)


def _disconnector(seed: int, run: tuple[Any, int, float], counts: Any, errors: Any) -> None:
    """Threads do I/O on one handle while the main thread disconnects it under them.

    A call racing ``disconnect`` must complete or raise ``DisconnectedError``; anything else
    (a closed descriptor, an unmapped view) is a broken promise. Uses a disk of its own.
    """
    rng = random.Random(seed)
    name = unique_name("disc")
    base = shmdisk.create(name, 4096)
    stop_at = start_together(*run)
    seen: set[str] = set()
    try:
        base.write(0, os.urandom(4096 * 512))
        while time.monotonic() < stop_at:
            d = shmdisk.connect(name, create=False)
            stop = threading.Event()

            def io(seed: int, d: shmdisk.Disk = d, stop: threading.Event = stop) -> None:
                trng = random.Random(seed)
                buf = bytearray(64 * 512)
                while not stop.is_set():
                    s = trng.randrange(0, 4096 - 64)
                    op = trng.random()
                    try:
                        if op < 0.4:
                            d.read(s, buf)
                        elif op < 0.8:
                            d.write(s, buf)
                        elif op < 0.9:
                            d.discard(s, 64)
                        else:
                            d.extents(s, s + 64)
                        counts[_D_OK] += 1
                    except shmdisk.DisconnectedError:
                        counts[_D_DISC] += 1
                        return
                    except Exception as e:
                        counts[_D_UNTYPED] += 1
                        msg = f"{type(e).__name__}: {e}"[:120]
                        if msg not in seen and len(seen) < 5:
                            seen.add(msg)
                            errors.put(msg)
                        return

            threads = [
                threading.Thread(target=io, args=(rng.randrange(1 << 30),)) for _ in range(3)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.random() * 0.01)
            d.disconnect()
            stop.set()
            for t in threads:
                t.join(10)
                counts[_D_HANGS] += t.is_alive()
            counts[_D_ROUNDS] += 1
    finally:
        base.disconnect()
        shmdisk.destroy(name)


def run_resize_destroy(opt: Options) -> Result:
    """Resize and destroy/re-create under I/O: no signal deaths, typed errors only."""
    r = Result("resize-destroy")
    bad = _engines.problem(opt.engines)
    if bad:
        r.fail(bad)
        return r
    rng = opt.rng(3)
    n_io = max(2, opt.processes - 2)
    lo, hi, max_size = 8, 4096, 8192
    t0 = time.monotonic()
    name = unique_name("rd")
    shmdisk.create(name, 1024, max_size_sectors=max_size).disconnect()
    gen = SPAWN.Value(ctypes.c_int64, 1, lock=True)
    counts = SPAWN.Array(ctypes.c_int64, n_io * _R_FIELDS, lock=False)
    rcounts = SPAWN.Array(ctypes.c_int64, 4, lock=False)
    dcounts = SPAWN.Array(ctypes.c_int64, 32, lock=False)
    n_procs = n_io + 3
    run = (SPAWN.Value(ctypes.c_int64, 0, lock=True), n_procs, opt.duration)
    procs = [
        SPAWN.Process(target=_rd_worker, args=(name, i, rng.randrange(1 << 30), run, gen, counts))
        for i in range(n_io)
    ]
    procs.append(
        SPAWN.Process(target=_resizer, args=(name, rng.randrange(1 << 30), run, lo, hi, rcounts))
    )
    discounts = SPAWN.Array(ctypes.c_int64, _D_FIELDS, lock=False)
    diserrors = SPAWN.Queue()
    procs.append(
        SPAWN.Process(
            target=_disconnector, args=(rng.randrange(1 << 30), run, discounts, diserrors)
        )
    )
    procs.append(
        SPAWN.Process(
            target=_destroyer,
            args=(name, rng.randrange(1 << 30), run, 1024, max_size, gen, dcounts),
        )
    )
    try:
        # Every process alternates engines with --engines mixed: I/O, resizer, disconnector
        # and destroyer of either engine share the disk.
        for i, p in enumerate(procs):
            _engines.start(p, _engines.plan(opt.engines, i))

        def line() -> str:
            ops = sum(counts[i * _R_FIELDS + _R_OPS] for i in range(n_io))
            return (
                f"ops {ops}  resizes {rcounts[0] + rcounts[1]}  destroys {dcounts[0]}  "
                f"disconnected {sum(counts[i * _R_FIELDS + _R_DISC] for i in range(n_io))}"
            )

        progress_loop(opt, "resize-destroy", procs, None, line)
        stuck = join_all(procs, 30)
    finally:
        shmdisk.destroy(name)
    r.seconds = time.monotonic() - t0

    def tot(f: int) -> int:
        return sum(counts[i * _R_FIELDS + f] for i in range(n_io))

    r.figures = {
        "engines": opt.engines,
        "io_processes": n_io,
        "io_ops": tot(_R_OPS),
        "grows": rcounts[0],
        "shrinks": rcounts[1],
        "destroys": dcounts[0],
        "recreates": dcounts[1],
        "destroyed_handle_ops_raising_disconnected": dcounts[3],
        "destroyed_handle_ops_wrong": dcounts[2],
        "io_disconnected_errors": tot(_R_DISC),
        "io_out_of_range_after_shrink": tot(_R_OOR),
        "reconnects_waiting_for_recreate": tot(_R_NOTFOUND),
        "untyped_errors": tot(_R_UNTYPED) + rcounts[3],
        "corrupt_sectors_seen": tot(_R_CORRUPT),
        "stale_data_seen": tot(_R_STALE),
        "disconnect_races": discounts[_D_ROUNDS],
        "disconnect_race_calls_ok": discounts[_D_OK],
        "disconnect_race_calls_disconnected": discounts[_D_DISC],
        "disconnect_race_untyped_errors": discounts[_D_UNTYPED],
        "signal_deaths": sum(1 for p in procs if (p.exitcode or 0) < 0 and p not in stuck),
        "hangs": len(stuck),
    }
    for p in procs:
        if p.exitcode != 0 and p not in stuck:
            code = p.exitcode or 0
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            r.fail(f"process {p.name} ended with {how}")
    if stuck:
        r.fail(f"{len(stuck)} processes hung")
    if discounts[_D_UNTYPED] or discounts[_D_HANGS]:
        msgs: list[str] = []
        with contextlib.suppress(Exception):
            while len(msgs) < 5:
                msgs.append(diserrors.get(timeout=0.2))
        r.fail(
            f"{discounts[_D_UNTYPED]} calls racing disconnect() raised untyped errors, "
            f"{discounts[_D_HANGS]} hung: {msgs}"
        )
    if tot(_R_UNTYPED) + rcounts[3]:
        r.fail(f"{tot(_R_UNTYPED) + rcounts[3]} operations raised an untyped error")
    if dcounts[2]:
        r.fail(f"{dcounts[2]} operations on destroyed handles did not raise DisconnectedError")
    if tot(_R_CORRUPT) or tot(_R_STALE):
        r.fail(f"{tot(_R_CORRUPT)} corrupt and {tot(_R_STALE)} stale reads")
    if dcounts[0] == 0 or rcounts[0] + rcounts[1] == 0:
        r.fail("no destroy or no resize happened")
    return r
