"""Forged segments for the hostile scenario: bad headers, truncations, a directory and a FIFO
under a disk's name, fed to every entry point in a child process so a crash or hang shows."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import time
from typing import Any

import shmdisk
from shmdisk import _layout

from ._common import (
    SPAWN,
    unique_name,
)


def _template() -> tuple[bytes, int]:
    """The header and file size of a real, small disk (max 64 sectors: a 40 KiB file)."""
    name = unique_name("tmpl")
    shmdisk.create(name, 64, max_size_sectors=64).disconnect()
    try:
        path = shmdisk.segment_path(name)
        with open(path, "rb") as f:
            raw = f.read(_layout.MAP_OFFSET)  # the header and the lock table
        return raw, os.stat(path).st_size
    finally:
        shmdisk.destroy(name)


def forged_case(i: int, seed: int, tmpl: bytes, size: int) -> tuple[str, str, bytes, int]:
    """Case ``i``: (label, kind, header bytes, file size); kind is 'file', 'dir' or 'fifo'."""
    lay = _layout
    hsize = lay.HEADER.size
    words = list(lay.HEADER.unpack_from(tmpl))
    fixed: list[tuple[str, int, int]] = [
        ("wrong magic", lay.F_MAGIC, 0x0123456789ABCDEF),
        ("no magic (never finished)", lay.F_MAGIC, 0),
        ("version + 1", lay.F_VERSION, lay.VERSION + 1),
        ("version 0", lay.F_VERSION, 0),
        ("header size 0", lay.F_HEADER_SIZE, 0),
        ("sector size 0", lay.F_SECTOR_SIZE, 0),
        ("sector size 513", lay.F_SECTOR_SIZE, 513),
        ("sector size 2**63", lay.F_SECTOR_SIZE, 1 << 63),
        ("page size 0", lay.F_PAGE_SIZE, 0),
        ("page size 1", lay.F_PAGE_SIZE, 1),
        ("size beyond capacity", lay.F_SIZE_SECTORS, 65),
        ("size 2**64-1", lay.F_SIZE_SECTORS, 2**64 - 1),
        ("capacity beyond the file", lay.F_CAPACITY, 1 << 30),
        ("capacity not whole pages", lay.F_CAPACITY, 4097),
        ("max pages 2**40", lay.F_MAX_PAGES, 1 << 40),
        ("max pages 0", lay.F_MAX_PAGES, 0),
        ("data offset 0", lay.F_DATA_OFFSET, 0),
        ("data offset past the file", lay.F_DATA_OFFSET, 1 << 40),
        ("destroyed flag set", lay.F_DESTROYED, 1),
        ("generation 2**64-1", lay.F_GENERATION, 2**64 - 1),
    ]
    specials: list[tuple[str, str, bytes, int]] = [
        ("empty file", "file", b"", 0),
        ("7 bytes", "file", tmpl[:7], 7),
        ("header cut at 100 bytes", "file", tmpl[:100], 100),
        ("header only, no lock table", "file", tmpl[: lay.HEADER_SIZE], lay.HEADER_SIZE),
        ("header and lock table, no map or data", "file", tmpl, len(tmpl)),
        (
            "garbage lock table",
            "file",
            tmpl[: lay.HEADER_SIZE]
            + random.Random(seed).randbytes(lay.MAP_OFFSET - lay.HEADER_SIZE),
            size,
        ),
        ("a lock table never initialised", "file", tmpl[: lay.HEADER_SIZE], size),
        ("file one page short", "file", tmpl, size - 4096),
        ("file one byte short", "file", tmpl, size - 1),
        ("a directory", "dir", b"", 0),
        ("a FIFO", "fifo", b"", 0),
    ]
    if i < len(fixed):
        label, f, value = fixed[i]
        w = list(words)
        w[f] = value
        return label, "file", lay.HEADER.pack(*w) + tmpl[hsize:], size
    i -= len(fixed)
    if i < len(specials):
        return specials[i]
    rng = random.Random(seed * 7919 + i)
    kind = rng.randrange(5)
    if kind == 4:  # a valid header over a garbage page map: odd, mapped, huge counters
        words = [rng.choice([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32)])
                 for _ in range(64)]  # fmt: skip
        return "garbage page map", "file", tmpl + struct.pack("<64I", *words), size
    if kind == 0:  # random bytes, random length
        n = rng.choice([rng.randrange(0, 200), rng.randrange(0, 8192)])
        return f"random {n} bytes", "file", rng.randbytes(n), n
    if kind == 1:  # a valid header, then one word set to a random or boundary value
        w = list(words)
        f = rng.randrange(lay.N_FIELDS)
        w[f] = rng.choice(
            [
                0,
                1,
                2**63,
                2**64 - 1,
                rng.getrandbits(64),
                w[f] + 1,
                w[f] - 1 & 0xFFFF_FFFF_FFFF_FFFF,
            ]
        )
        return f"word {f} = {w[f]:#x}", "file", lay.HEADER.pack(*w) + tmpl[hsize:], size
    if kind == 2:  # a valid header with random bytes flipped
        b = bytearray(tmpl[:hsize])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(hsize)] ^= 1 << rng.randrange(8)
        return "bit flips in the header", "file", bytes(b) + tmpl[hsize:], size
    cut = rng.randrange(0, size + 1)  # truncated anywhere
    return f"truncated to {cut} bytes", "file", tmpl[: min(cut, len(tmpl))], cut


def _make_forged(path: str, kind: str, raw: bytes, size: int) -> None:
    if kind == "dir":
        os.mkdir(path, 0o700)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def _remove_forged(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)


def _forged_worker(first: int, count: int, seed: int, tag: str, out: Any) -> None:
    """Try every entry point on forged segments; report each case before touching it."""
    lay = _layout
    tmpl, size = _template()
    for i in range(first, first + count):
        label, kind, raw, fsize = forged_case(i, seed, tmpl, size)
        name = f"{tag}-{i}"
        path = shmdisk.segment_path(name)
        out.send(("case", i, label))
        res: dict[str, Any] = {"i": i, "label": label, "problems": [], "tried": 0, "typed": 0}
        _make_forged(path, kind, raw, fsize)
        ino = os.lstat(path).st_ino

        def replaced(path: str = path, ino: int = ino) -> bool:
            # A leak guard in a concurrent test run may destroy a segment it cannot attribute
            # (a bad header names no creator); connect() then makes a new disk. Not our finding.
            try:
                return os.lstat(path).st_ino != ino
            except FileNotFoundError:
                return True

        try:
            header_ok = False
            if kind == "file" and fsize >= lay.HEADER_SIZE and len(raw) >= lay.HEADER_SIZE:
                h = lay.Header.unpack(raw[: lay.HEADER_SIZE])
                header_ok = h.problem(fsize) is None
            try:
                info = shmdisk.inspect(name)
                res["tried"] += 1
                if not header_ok and info.state == "ok":
                    res["problems"].append(f"inspect says ok for a bad header ({info})")
            except shmdisk.ShmdiskError:
                res["tried"] += 1
                res["typed"] += 1
            except Exception as e:
                res["problems"].append(f"inspect raised untyped {e!r}")
            for how, kw in (
                ("connect(create=False)", {"create": False}),
                ("connect(read_only=True)", {"read_only": True, "create": False}),
                ("connect()", {}),
            ):
                res["tried"] += 1
                try:
                    d = shmdisk.connect(name, **kw)
                except shmdisk.ShmdiskError:
                    res["typed"] += 1
                    continue
                except Exception as e:
                    res["problems"].append(f"{how} raised untyped {e!r}")
                    continue
                try:
                    if not header_ok and replaced():
                        res["disturbed"] = True
                    elif not header_ok:
                        res["problems"].append(f"{how} accepted a bad header")
                    _exercise(d)
                except shmdisk.ShmdiskError:
                    pass
                except Exception as e:
                    res["problems"].append(f"{how}: I/O on the handle raised untyped {e!r}")
                finally:
                    d.disconnect()
            if kind == "file" and not header_ok and not replaced():
                with open(path, "rb") as f:
                    if f.read(len(raw)) != raw:
                        res["problems"].append("a bad segment was modified by connect")
            res["tried"] += 1
            try:
                shmdisk.destroy(name)
            except shmdisk.ShmdiskError:
                res["typed"] += 1
            except Exception as e:
                res["problems"].append(f"destroy raised untyped {e!r}")
        finally:
            _remove_forged(path)
        out.send(("done", i, res))
    out.send(("end", first + count, None))


def _exercise(d: shmdisk.Disk) -> None:
    """Use an accepted handle everywhere it could fault: first and last sector, both ways."""
    info = d.get_info()
    buf = bytearray(info.sector_size)
    if info.size_sectors:
        d.read(0, buf)
        d.read(info.size_sectors - 1, buf)
        if info.read_write:
            d.write(info.size_sectors - 1, buf)
    d.extents()
    d.mapped_pages()


def hostile_segments(cases: int, seed: int, timeout: float = 60.0) -> dict[str, Any]:
    """Forge ``cases`` segments and feed them to a child; a crash or hang there is a failure."""
    tag = unique_name("forged")
    fig = {
        "segments": 0,
        "entry_point_calls": 0,
        "typed_errors": 0,
        "crashes": 0,
        "hangs": 0,
        "disturbed_by_other_processes": 0,
    }
    problems: list[str] = []
    i = 0
    while i < cases:
        parent, child = SPAWN.Pipe(duplex=False)
        p = SPAWN.Process(target=_forged_worker, args=(i, cases - i, seed, tag, child))
        p.start()
        child.close()
        current = (i, "(starting)")
        deadline = time.monotonic() + timeout
        ended = False
        while time.monotonic() < deadline:
            if not parent.poll(0.1):
                if not p.is_alive() and not parent.poll(0):
                    break
                continue
            try:
                what, j, payload = parent.recv()
            except EOFError:
                break
            if what == "case":
                current = (j, payload)
                deadline = time.monotonic() + 10  # one case may take at most this long
            elif what == "done":
                fig["segments"] += 1
                fig["entry_point_calls"] += payload["tried"]
                fig["typed_errors"] += payload["typed"]
                fig["disturbed_by_other_processes"] += bool(payload.get("disturbed"))
                for prob in payload["problems"]:
                    problems.append(f"case {j} ({payload['label']}): {prob}")
                i = j + 1
            else:
                ended = True
                break
        if not ended:
            if p.is_alive():
                fig["hangs"] += 1
                problems.append(f"case {current[0]} ({current[1]}): hung")
                p.kill()
            p.join(5)
            if p.exitcode is not None and p.exitcode < 0 and p.exitcode != -signal.SIGKILL:
                fig["crashes"] += 1
                problems.append(f"case {current[0]} ({current[1]}): died of signal {-p.exitcode}")
            _remove_forged(shmdisk.segment_path(f"{tag}-{current[0]}"))
            i = current[0] + 1  # go on with the next case in a fresh child
        else:
            p.join(10)
        parent.close()
    return {"figures": fig, "problems": problems}
