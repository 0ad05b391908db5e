"""The command line of overlays and copies (create --backing, freeze, copy, destroy --force, and
what ls, info and map say of them), run as real subprocesses against real disks."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _helpers import new_name
from _overlay_model import Layer, random_ops

import shmdisk

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
SS = 512
MiB = 1 << 20


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """``python -m shmdisk ARGS``, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "shmdisk", *args],
        capture_output=True,
        timeout=60,
        env=ENV,
        **kw,  # type: ignore[arg-type]
    )


def ok(*args: str) -> str:
    """A command that must succeed: its stdout."""
    r = run(*args)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def fails(*args: str, code: int = 1) -> str:
    """A command that must fail with ``code`` and one line on stderr: that line."""
    r = run(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    (line,) = r.stderr.decode().splitlines()
    assert line.startswith(("shmdisk: error: ", "shmdisk create: error: ")), line
    return line


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """Unique disk names; all destroyed after the test, the last made first."""
    made: list[str] = []

    def new(tag: str = "cli") -> str:
        made.append(new_name(tag))
        return made[-1]

    yield new
    for n in reversed(made):
        shmdisk.destroy(n, force=True)


def read_all(name: str) -> bytes:
    with shmdisk.connect(name, create=False, read_only=True) as d:
        buf = bytearray(d.size_sectors * d.sector_size)
        d.read(0, buf)
        return bytes(buf)


def golden(name: str, sectors: int = 2048) -> Layer:
    """A disk with random data and holes, made through the library; its model."""
    model = Layer.empty(name, sectors)
    with shmdisk.create(name, sectors) as d:
        random_ops(model, d, seed=3, count=30)
    return model


def test_create_backing_and_freeze(names: Callable[[str], str]) -> None:
    """create --backing makes an overlay of a frozen disk, sized as its base by default; SIZE
    is needed otherwise, the base must be frozen, and bad geometry fails in one line."""
    base = names("base")
    bm = golden(base)
    ovl = names("ovl")
    line = fails("create", ovl, code=2)
    assert line == (
        "shmdisk create: error: SIZE is needed (only an overlay, --backing BASE, takes its base's)"
    )
    line = fails("create", ovl, "--backing", base)
    assert "is not frozen" in line and "shmdisk freeze" in line
    assert ok("freeze", base) == f"disk {base} is frozen: read-only for good\n"
    assert ok("freeze", base) == f"disk {base} was frozen already\n"
    (entry,) = json.loads(ok("freeze", "--json", base))["disks"]
    assert (entry["name"], entry["frozen"], entry["access"]) == (base, True, "ro")
    assert ok("create", ovl, "--backing", base) == (
        f"created disk {ovl}: 1 MiB (2048 sectors of 512 bytes), an overlay of {base}\n"
    )
    assert read_all(ovl) == bm.data
    big = names("big")
    doc = json.loads(ok("create", "--json", big, "2M", "--backing", base))["disk"]
    assert (doc["backing"], doc["size_sectors"], doc["frozen"]) == (base, 4096, False)
    assert read_all(big) == bm.data + bytes(MiB)
    assert "sector size 4096 differs from 512" in fails(
        "create", names("x"), "--backing", base, "--sector-size", "4K"
    )
    assert "smaller than backing disk" in fails("create", names("x"), "1000", "--backing", base)
    assert f"no such disk: {ovl}x" in fails("create", names("x"), "--backing", f"{ovl}x")
    r = run("freeze", base, f"{base}-missing")
    assert r.returncode == 1 and r.stderr.decode().count("error:") == 1
    with shmdisk.connect(base, create=False) as d, pytest.raises(shmdisk.IsReadOnlyError):
        d.write(0, bytes(SS))


def test_destroy_orders_a_chain_and_force_breaks_it(names: Callable[[str], str]) -> None:
    """destroy of a base with overlays fails naming them (nothing removed); named together,
    overlays go first whatever the order; --force removes a base under its overlays, which
    ls and info then call gone, and which fail in one line."""
    base, mid, top, other = names("base"), names("mid"), names("top"), names("other")
    golden(base)
    ok("freeze", base)
    ok("create", "-q", mid, "--backing", base)
    ok("freeze", mid)
    ok("create", "-q", top, "--backing", mid)
    ok("create", "-q", other, "--backing", base)
    line = fails("destroy", base)
    assert line == (
        f"shmdisk: error: disk {base} backs {', '.join(sorted([mid, other]))}: destroy them"
        " first, or destroy it with --force (they then lose their base)"
    )
    assert base in shmdisk.list_disks()
    r = run("destroy", "-v", base, mid, top)  # base still backs `other`
    assert r.returncode == 1
    assert r.stdout.decode() == f"destroyed disk {top}\ndestroyed disk {mid}\n"
    (line,) = r.stderr.decode().splitlines()
    assert line.startswith(f"shmdisk: error: disk {base} backs {other}: destroy them first")
    assert {top, mid} & set(shmdisk.list_disks()) == set()
    assert base in shmdisk.list_disks()
    ok("destroy", "--force", base)
    assert base not in shmdisk.list_disks()
    row = ok("ls", "-o", "NAME,BASE,STATE", "--noheadings", other).split()
    assert row == [other, base, "(gone)", "ok"]
    info = ok("info", other)
    assert f"backing:     {base} (gone: the overlay cannot be used)" in info
    assert "does not exist any more" in fails("map", other)
    ok("destroy", other)


def test_ls_and_info_show_bases_frozen_disks_and_overlays(names: Callable[[str], str]) -> None:
    """ls has a BASE column and says frozen, RW is ro for a frozen disk; --json has frozen,
    backing and backing_lost; info of a base lists its overlays."""
    base, ovl = names("base"), names("ovl")
    golden(base)
    ok("freeze", base)
    ok("create", "-q", ovl, "--backing", base)
    rows = {
        r.split()[0]: r.split()[1:]
        for r in ok("ls", "-o", "NAME,RW,BASE,STATE", "-n", base, ovl).splitlines()
    }
    assert rows == {base: ["ro", "-", "frozen"], ovl: ["rw", base, "ok"]}
    disks = {e["name"]: e for e in json.loads(ok("ls", "--json", base, ovl))["disks"]}
    assert (disks[base]["frozen"], disks[base]["backing"], disks[base]["access"]) == (
        True,
        None,
        "ro",
    )
    assert disks[base]["state"] == "ok" and disks[base]["backing_lost"] is None
    assert (disks[ovl]["frozen"], disks[ovl]["backing"], disks[ovl]["backing_lost"]) == (
        False,
        base,
        False,
    )
    assert disks[ovl]["mapped_pages"] == 0  # an overlay's MAPPED is its own data
    lines = dict(line.split(":", 1) for line in ok("info", base).splitlines())
    assert lines["frozen"].strip() == "yes: read-only for good"
    assert lines["overlays"].strip() == ovl
    doc = json.loads(ok("info", "--json", base))["disk"]
    assert doc["overlays"] == [ovl] and doc["frozen"] is True
    lines = dict(line.split(":", 1) for line in ok("info", ovl).splitlines())
    assert lines["frozen"].strip() == "no" and lines["backing"].strip().startswith(base)


def test_map_tells_an_overlays_own_data_from_its_bases(names: Callable[[str], str]) -> None:
    """map of an overlay: --json gives each extent's layer and disk, the table a TYPE (data,
    base, hole) and FROM column, the picture base glyphs and their legend."""
    base, ovl = names("base"), names("ovl")
    with shmdisk.create(base, 1024) as d:
        d.write(0, b"a" * 64 * SS)  # the first of 16 cells (64 sectors each)
        d.freeze()
    ok("create", "-q", ovl, "--backing", base)
    with shmdisk.connect(ovl, create=False) as d:
        d.write(512, b"b" * 64 * SS)  # cell 8: own data
        d.discard(32, 32)  # half of the base's data hidden
        layers = d.layer_extents()
    doc = json.loads(ok("map", "--json", ovl))
    assert doc["backing"] == base and doc["own_sectors"] == 64 and doc["mapped_sectors"] == 96
    assert [(e["sector"], e["n_sectors"], e["layer"], e["disk"]) for e in doc["extents"]] == [
        tuple(x) for x in layers
    ]
    assert [(e["layer"], e["disk"]) for e in doc["extents"]] == [
        (1, base),
        (None, None),
        (0, ovl),
        (None, None),
    ]
    lines = ok("map", "--ascii", "--width", "16", "--rows", "1", ovl).splitlines()
    assert lines[0].endswith(f"in 2 extents, 32 KiB of it its own, the rest from {base}")
    assert lines[2] == "0B :.......#......."  # half a cell of base data, a cell of own data
    assert lines[3].split() == [
        *["#", "own", "data", "+", "mostly", "-", "some"],
        *["%", "base", "data", "=", "mostly", ":", "some"],
        *[".", "hole", "(one", "cell", "=", "32K)"],
    ]
    table = lines[lines.index(next(x for x in lines if x.startswith("START"))) :]
    assert table[0].split() == ["START", "END", "SECTORS", "OFFSET", "LENGTH", "TYPE", "FROM"]
    assert [r.split()[-2:] for r in table[1:]] == [
        ["base", base],
        ["hole", "-"],
        ["data", ovl],
        ["hole", "-"],
    ]
    # A fresh overlay: the first cell is all base data.
    fresh = names("fresh")
    ok("create", "-q", fresh, "--backing", base)
    assert ok("map", "--ascii", "--width", "16", "--rows", "1", fresh).splitlines()[2] == (
        "0B %..............."
    )


def test_copy_command_makes_a_flat_sparse_copy(names: Callable[[str], str]) -> None:
    """copy makes DST with SRC's bytes, holes, geometry and mode (or --mode), flat for an
    overlay; --json describes it; a taken DST, a missing SRC, a bad --timeout fail cleanly."""
    base, ovl, dst = names("base"), names("ovl"), names("dst")
    bm = golden(base)
    ok("freeze", base)
    ok("create", "-q", ovl, "3000", "--backing", base)
    with shmdisk.connect(ovl, create=False) as d:
        om = Layer.over(ovl, bm, 3000)
        random_ops(om, d, seed=9, count=30)
    out = ok("copy", ovl, dst)
    assert out.startswith(f"copied disk {ovl} to {dst}: 1.5 MiB, ") and "one point in time" in out
    assert read_all(dst) == om.data
    info = shmdisk.inspect(dst)
    assert info.backing is None and info.mode == 0o600
    with shmdisk.connect(dst, create=False) as d:
        assert d.extents() == om.extents()
    dst2 = names("dst")
    doc = json.loads(ok("copy", "--json", "--mode", "0640", base, dst2))
    assert (doc["source"], doc["name"], doc["size_bytes"]) == (base, dst2, 2048 * SS)
    assert doc["data_bytes"] == sum(x.n_sectors for x in bm.extents() if x.mapped) * SS
    assert doc["disk"]["mode"] == "0640" and doc["disk"]["frozen"] is False
    before = read_all(dst2)
    assert "exists already" in fails("copy", ovl, dst2)
    assert read_all(dst2) == before
    assert f"no such disk: {dst}-x" in fails("copy", f"{dst}-x", names("y"))
    r = run("copy", "--timeout", "-1", ovl, names("y"))
    assert r.returncode == 2 and b"must be 0 or more" in r.stderr


def test_copy_draws_progress_on_a_terminal_only(names: Callable[[str], str]) -> None:
    """On a terminal copy draws a progress bar on stderr and ends its line; into a pipe it
    draws nothing."""
    src = names("src")
    with shmdisk.create(src, 16384) as d:
        d.write(0, b"p" * (4 * MiB))
    r = run("copy", "-q", src, names("piped"))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    master, slave = pty.openpty()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "shmdisk", "copy", "-q", src, names("tty")],
            stdout=subprocess.PIPE,
            stderr=slave,
            env=ENV,
            timeout=60,
        )
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert p.returncode == 0
    assert drawn.startswith(b"\rcopy " + src.encode()) and b"100.0%" in drawn
    assert drawn.endswith(b"\r\n")  # the terminal turns the bar's final newline into CRLF
