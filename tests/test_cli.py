"""The shmdisk command line, run as real subprocesses against real disks."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import as_other_user

import shmdisk
from shmdisk import _layout  # only to forge a segment of a future layout version

ROOT = Path(__file__).resolve().parents[1]
LS_TOOL = ROOT / "tools" / "shmdisk-ls"
PAGE = 4096
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}


def run(
    *args: str, input: bytes | None = None, timeout: float = 60, tool: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m shmdisk ARGS`` (or ``tool ARGS``) and capture its output."""
    cmd = [str(tool), *args] if tool else [sys.executable, "-m", "shmdisk", *args]
    return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=ENV)


def ok(*args: str, input: bytes | None = None, tool: Path | None = None) -> str:
    """Run a command that must succeed; its stdout as text."""
    r = run(*args, input=input, tool=tool)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def fails(*args: str, code: int = 1, input: bytes | None = None) -> str:
    """Run a command that must fail with ``code`` and one error line; that line."""
    r = run(*args, input=input)
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.decode().splitlines()
    if code == 1:
        assert len(lines) == 1, lines
    assert lines[-1].startswith("shmdisk: error: ") or lines[-1].startswith("shmdisk "), lines
    return lines[-1]


@pytest.fixture
def names() -> Iterator[list[str]]:
    """A list to add disk names to; every one is destroyed after the test."""
    made: list[str] = []
    yield made
    for n in made:
        shmdisk.destroy(n)


def new(names: list[str], tag: str = "cli") -> str:
    """A fresh unique disk name, registered for clean-up."""
    n = f"test-{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    names.append(n)
    return n


def read_all(name: str) -> bytes:
    """Every byte of a disk, through the library."""
    with shmdisk.connect(name, create=False, read_only=True) as d:
        info = d.get_info()
        buf = bytearray(info.size_sectors * info.sector_size)
        d.read(0, buf)
        return bytes(buf)


def mapped_pages(name: str) -> set[int]:
    """Page numbers the library reports as holding data."""
    with shmdisk.connect(name, create=False, read_only=True) as d:
        pages: set[int] = set()
        for x in d.extents():
            if x.mapped:
                first = x.sector * d.sector_size // PAGE
                last = ((x.sector + x.n_sectors) * d.sector_size - 1) // PAGE
                pages.update(range(first, last + 1))
        return pages


def nonzero_pages(data: bytes) -> set[int]:
    """Page numbers of ``data`` holding a non-zero byte."""
    zero = bytes(PAGE)
    return {
        i // PAGE
        for i in range(0, len(data), PAGE)
        if data[i : i + PAGE] != zero[: len(data[i : i + PAGE])]
    }


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """A file's data ranges by SEEK_DATA/SEEK_HOLE."""
    ranges = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        off = 0
        while off < size:
            try:
                start = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, end))
            off = end
    return ranges


def page_runs(pages: set[int]) -> list[tuple[int, int]]:
    """Byte ranges of runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][1] == p * PAGE:
            runs[-1] = (runs[-1][0], (p + 1) * PAGE)
        else:
            runs.append((p * PAGE, (p + 1) * PAGE))
    return runs


def sparse_image(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    """Write a sparse image file with ``pieces`` at their offsets; its full contents."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------
# ls, tools/shmdisk-ls, info


def test_ls_json_and_text_match_the_library(names: list[str]) -> None:
    """ls --json and the text columns report what shmdisk.inspect sees, holders included."""
    a, b = new(names), new(names)
    with shmdisk.create(a, 2048) as d:
        d.write(0, b"\x01" * 4096)
        d.write(1024, b"\x02" * 8192)
    shmdisk.create(b, 64, sector_size=4096, mode=0o640).disconnect()
    holder_code = (
        "import shmdisk, sys; d = shmdisk.connect(sys.argv[1], create=False);"
        " print('ready', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, a],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"
        doc = json.loads(ok("ls", "--json", a, b))
        text = ok(
            "-b", "-o", "NAME,SIZE,SECTOR,PAGE,MAPPED,MEM,RW,MODE,HOLDERS,STATE", a, b, tool=LS_TOOL
        )
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert doc["version"] == 1
    disks = {e["name"]: e for e in doc["disks"]}
    assert sorted(disks) == sorted([a, b])
    for n in (a, b):
        info = shmdisk.inspect(n)
        e = disks[n]
        for key in (
            "state",
            "sector_size",
            "page_size",
            "size_sectors",
            "max_size_sectors",
            "mapped_pages",
            "generation",
            "created_ns",
            "creator_pid",
            "uid",
            "gid",
            "allocated_bytes",
        ):
            assert e[key] == getattr(info, key), key
        assert info.sector_size is not None and info.size_sectors is not None
        assert e["size_bytes"] == info.size_sectors * info.sector_size
        assert e["mode"] == f"{info.mode:04o}"
        assert e["path"] == shmdisk.segment_path(n)
    assert disks[a]["mapped_pages"] == 3
    assert disks[a]["mapped_bytes"] == 3 * 4096
    assert disks[b]["mode"] == "0640" and disks[b]["mapped_bytes"] == 0
    if os.geteuid() == 0:  # root sees every process, so the count is exact
        assert disks[a]["holder_pids"] == sorted([holder.pid])
        assert disks[a]["holders"] == 1
        assert disks[b]["holders"] == 0

    lines = text.splitlines()
    assert lines[0].split() == [
        "NAME",
        "SIZE",
        "SECTOR",
        "PAGE",
        "MAPPED",
        "MEM",
        "RW",
        "MODE",
        "HOLDERS",
        "STATE",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    for n in (a, b):
        e = disks[n]
        expected = [n, e["size_bytes"], e["sector_size"], e["page_size"], e["mapped_bytes"]]
        assert rows[n][:5] == [str(v) for v in expected]
        assert rows[n][6:8] == ["rw", e["mode"]] and rows[n][9] == "ok"
    if os.geteuid() == 0:
        assert rows[a][8] == "1" and rows[b][8] == "0"


def test_ls_default_columns_and_units(names: list[str]) -> None:
    """Plain ls prints the lsblk-style header and human sizes (1M for 2048 x 512 bytes)."""
    n = new(names)
    shmdisk.create(n, 2048).disconnect()
    lines = ok("ls", n).splitlines()
    assert lines[0].split() == [
        "NAME",
        "SIZE",
        "SECTOR",
        "PAGE",
        "MAPPED",
        "USE%",
        "MEM",
        "RW",
        "OWNER",
        "MODE",
        "CREATED",
        "HOLDERS",
        "BASE",
        "STATE",
    ]
    row = lines[1].split()
    assert row[:7] == [n, "1M", "512", "4096", "0B", "0.0%", row[6]]
    assert row[-2:] == ["-", "ok"]
    assert ok("ls", "--noheadings", "-o", "name,size", n).split() == [n, "1M"]


def test_ls_lists_corrupt_and_other_version_segments_untouched(names: list[str]) -> None:
    """Garbage, empty, old- and future-version segments are listed with their state, untouched."""
    real = new(names)
    shmdisk.create(real, 16).disconnect()
    garbage = f"test-cli-garbage-{os.getpid()}-{secrets.token_hex(4)}"
    empty = f"test-cli-empty-{os.getpid()}-{secrets.token_hex(4)}"
    future = f"test-cli-future-{os.getpid()}-{secrets.token_hex(4)}"
    old = f"test-cli-old-{os.getpid()}-{secrets.token_hex(4)}"
    paths = [Path(shmdisk.segment_path(n)) for n in (garbage, empty, future, old)]
    fields = _layout.N_FIELDS - 2
    header = _layout.HEADER.pack(_layout.MAGIC, _layout.VERSION + 1, *[0] * fields)
    v1_header = _layout.HEADER.pack(_layout.MAGIC, 1, 4096, 512, 4096, *[0] * (fields - 3))
    try:
        paths[0].write_bytes(os.urandom(5000))
        paths[1].write_bytes(b"")
        paths[2].write_bytes(header.ljust(8192, b"\0"))
        paths[3].write_bytes(v1_header.ljust(8192, b"\0"))
        before = [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths]
        text = ok("ls")
        doc = json.loads(ok("--json", tool=LS_TOOL))
        one = json.loads(ok("info", "--json", garbage))
        after = [(p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths]
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    assert after == before
    rows = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "corrupt" in rows[garbage] and "corrupt" in rows[empty]
    assert "unsupported-version" in rows[future]
    assert "old-version" in rows[old] and "version 1" in rows[old]
    assert rows[real].split()[-1] == "ok"
    disks = {e["name"]: e for e in doc["disks"]}
    assert disks[garbage]["state"] == "corrupt" and disks[garbage]["problem"]
    assert disks[garbage]["size_sectors"] is None and disks[garbage]["file_bytes"] == 5000
    assert disks[empty]["state"] == "corrupt"
    assert disks[old]["state"] == "old-version"
    assert disks[future]["state"] == "unsupported-version"
    assert one["disk"]["state"] == "corrupt"


def test_ls_and_info_describe_fifos_directories_and_symlinks_without_hanging() -> None:
    """Non-files wearing our prefix are listed as corrupt, never opened (a FIFO would block)."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    fifo, folder, link = (f"test-cli-{kind}-{tag}" for kind in ("fifo", "dir", "link"))
    try:
        os.mkfifo(shmdisk.segment_path(fifo), 0o600)
        os.mkdir(shmdisk.segment_path(folder), 0o700)
        os.symlink("/dev/null", shmdisk.segment_path(link))
        r = run("ls", "-n", "-o", "NAME,STATE", fifo, folder, link, timeout=30)
        one = json.loads(ok("info", "--json", fifo))
    finally:
        Path(shmdisk.segment_path(fifo)).unlink(missing_ok=True)
        Path(shmdisk.segment_path(link)).unlink(missing_ok=True)
        if os.path.isdir(shmdisk.segment_path(folder)):
            os.rmdir(shmdisk.segment_path(folder))
    assert r.returncode == 0, r.stderr.decode()
    rows = [line.split(None, 1) for line in r.stdout.decode().splitlines()]
    assert rows == [[n, "corrupt: not a regular file"] for n in (fifo, folder, link)]
    assert one["disk"]["state"] == "corrupt" and one["disk"]["problem"] == "not a regular file"
    assert one["disk"]["size_sectors"] is None


def test_ls_named_missing_disk_fails_but_lists_the_rest(names: list[str]) -> None:
    """ls NAME... reports a missing name on stderr, exits 1 and still lists the others."""
    n = new(names)
    shmdisk.create(n, 16).disconnect()
    missing = f"test-cli-missing-{os.getpid()}"
    r = run("ls", "-n", "-o", "NAME", n, missing)
    assert r.returncode == 1
    assert r.stdout.decode().split() == [n]
    assert r.stderr.decode() == f"shmdisk: error: no such disk: {missing}\n"
    r = run("--bytes", missing, tool=LS_TOOL)
    assert r.returncode == 1 and r.stderr.decode().startswith("shmdisk-ls: error: no such disk")


def test_info_text_and_json(names: list[str]) -> None:
    """info prints the same facts as inspect, as text and as versioned JSON."""
    n = new(names)
    with shmdisk.create(n, 1000, sector_size=1024) as d:
        d.write(10, b"z" * 1024)
    doc = json.loads(ok("info", "--json", n))
    info = shmdisk.inspect(n)
    assert doc["version"] == 1
    assert doc["disk"]["size_sectors"] == 1000 == info.size_sectors
    assert doc["disk"]["sector_size"] == 1024 and doc["disk"]["mapped_pages"] == info.mapped_pages
    fields = dict(line.split(":", 1) for line in ok("info", n).splitlines() if ":" in line)
    assert fields["name"].strip() == n
    assert fields["state"].strip() == "ok"
    assert fields["size"].strip() == "1000 KiB (1024000 bytes), 1000 sectors"
    assert fields["sector size"].strip() == "1024 bytes"
    assert fields["engine"].strip() == f"{shmdisk.ENGINE} (this process)"
    assert doc["engine"] == shmdisk.ENGINE
    missing = f"test-cli-nothere-{os.getpid()}"
    assert fails("info", missing) == f"shmdisk: error: no such disk: {missing}"


def test_version_names_the_engine() -> None:
    """--version says the version and which engine runs (native, or python without the C
    extension or with SHMDISK_NO_EXTENSIONS=1)."""
    assert ok("--version").strip() == f"shmdisk {shmdisk.__version__} ({shmdisk.ENGINE} engine)"
    env = {**ENV, "SHMDISK_NO_EXTENSIONS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "shmdisk", "--version"], capture_output=True, env=env, timeout=60
    )
    assert r.stdout.decode().strip() == f"shmdisk {shmdisk.__version__} (python engine)"


def test_tools_shmdisk_ls_runs_from_a_checkout_without_install() -> None:
    """tools/shmdisk-ls runs with no PYTHONPATH from another directory and prints JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(LS_TOOL), "--json"], cwd="/", capture_output=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 1


@pytest.mark.parametrize("missing", ["numpy"])
def test_tools_shmdisk_ls_names_a_missing_dependency_in_one_line(missing: str) -> None:
    """Without numpy tools/shmdisk-ls says what to install, not a traceback."""
    hide = (
        f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = [sys.argv[1]];"
        " runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", hide, str(LS_TOOL)], capture_output=True, timeout=60, env=env
    )
    assert r.returncode == 1 and r.stdout == b""
    (line,) = r.stderr.decode().splitlines()
    assert line.startswith(f"shmdisk-ls: error: the Python package {missing} is missing;")
    assert "python3 -m pip install 'numpy>=1.24'" in line


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_ls_and_info_as_another_user_list_every_disk(names: list[str]) -> None:
    """uid 65534 sees root's 0600 disk as unreadable with RW --, the 0644 one as ro; exit 0."""
    from shmdisk import cli

    private, shared = new(names), new(names)
    shmdisk.create(private, 2048).disconnect()
    with shmdisk.create(shared, 2048, mode=0o644) as d:
        d.write(0, b"\x01" * 4096)
    code, out, err = as_other_user(lambda: cli.main(["ls", "--json"]))
    assert (code, err) == (0, ""), err
    disks = {e["name"]: e for e in json.loads(out)["disks"]}
    p, s = disks[private], disks[shared]
    assert (p["state"], p["access"], p["owner"], p["mode"]) == ("unreadable", "--", "root", "0600")
    assert p["size_sectors"] is None and p["uid"] == 0
    assert p["allocated_bytes"] == shmdisk.inspect(private).allocated_bytes
    assert (s["state"], s["access"], s["size_sectors"], s["mapped_pages"]) == ("ok", "ro", 2048, 1)

    code, out, err = as_other_user(
        lambda: cli.ls_main(["-o", "NAME,SIZE,RW,OWNER,MODE,STATE", private, shared])
    )
    assert (code, err) == (0, ""), err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows[private] == ["-", "--", "root", "0600", "unreadable"]
    assert rows[shared] == ["1M", "ro", "root", "0644", "ok"]

    code, out, err = as_other_user(lambda: cli.main(["info", private]))
    assert (code, err) == (0, ""), err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["state"].strip() == "unreadable"
    assert fields["owner"].strip() == "root:root, mode 0600 (-- for you)"


# ------------------------------------------------------------------------------------------
# create, destroy, resize, map


def test_create_makes_what_the_library_sees(names: list[str]) -> None:
    """create with units, sector size, mode and max size; the library agrees on each."""
    n = new(names)
    doc = json.loads(
        ok(
            "create",
            n,
            "1M",
            "--sector-size",
            "4K",
            "--mode",
            "0640",
            "--max-size",
            "4MiB",
            "--json",
        )
    )
    with shmdisk.connect(n, create=False) as d:
        info = d.get_info()
        assert (info.size_sectors, info.sector_size, info.read_write) == (256, 4096, True)
    seg = shmdisk.inspect(n)
    assert seg.mode == 0o640 and seg.max_size_sectors == 1024
    assert doc["disk"]["size_sectors"] == 256 and doc["disk"]["mode"] == "0640"
    m = new(names)
    assert ok("create", m, "2048") == f"created disk {m}: 1 MiB (2048 sectors of 512 bytes)\n"
    assert shmdisk.inspect(m).size_sectors == 2048
    assert "exists" in fails("create", m, "16")
    assert "not a whole number of 512-byte sectors" in fails("create", new(names), "1000B")
    assert "invalid size" in fails("create", new(names), "12 parsecs")
    assert "invalid disk name" in fails("create", "bad/name", "16")
    fails("create", new(names), "16", "--sector-size", "1000", code=2)


def test_destroy(names: list[str]) -> None:
    """destroy removes disks; a missing name fails unless -f."""
    a, b = new(names), new(names)
    for n in (a, b):
        shmdisk.create(n, 16).disconnect()
    assert ok("destroy", "-v", a, b) == f"destroyed disk {a}\ndestroyed disk {b}\n"
    assert a not in shmdisk.list_disks() and b not in shmdisk.list_disks()
    assert fails("destroy", a) == f"shmdisk: error: no such disk: {a}"
    assert ok("destroy", "-f", a) == ""


def test_resize(names: list[str]) -> None:
    """resize grows absolute or relative; shrinking needs --shrink and keeps the head's data."""
    n = new(names)
    with shmdisk.create(n, 2048) as d:
        d.write(0, b"k" * 512)
    assert ok("resize", n, "+1M") == f"resized disk {n}: 1 MiB -> 2 MiB (4096 sectors)\n"
    assert shmdisk.inspect(n).size_sectors == 4096
    assert "--shrink" in fails("resize", n, "1M")
    assert shmdisk.inspect(n).size_sectors == 4096
    doc = json.loads(ok("resize", "--shrink", "--json", n, "--", "-1536K"))
    assert doc == {
        "version": 1,
        "name": n,
        "sector_size": 512,
        "old_size_sectors": 4096,
        "size_sectors": 1024,
    }
    assert read_all(n)[:513] == b"k" * 512 + b"\0"
    assert ok("resize", "-q", n, "3000") == ""
    assert shmdisk.inspect(n).size_sectors == 3000
    assert "no such disk" in fails("resize", f"test-cli-nothere-{os.getpid()}", "1M")


def test_limits_are_explained_in_the_command_lines_terms(names: list[str]) -> None:
    """Growing past --max-size, or a --max-size below SIZE, names the option, not the API."""
    n = new(names)
    ok("create", n, "1M", "--max-size", "2M")
    line = fails("resize", n, "3M")
    assert line == (
        f"shmdisk: error: disk {n} may grow to 4096 sectors (2 MiB) at most, the limit set"
        " when it was created (shmdisk create --max-size); nothing changed"
    )
    assert shmdisk.inspect(n).size_sectors == 2048
    line = fails("create", new(names), "1M", "--max-size", "512K")
    assert line.startswith("shmdisk: error: --max-size 512K (1024 sectors) must lie between SIZE")
    for text in (line, fails("create", new(names), "1M", "--max-size", "1P")):
        assert "max_size_sectors" not in text and "create(" not in text


def test_unusable_segments_name_the_destroy_command(names: list[str]) -> None:
    """A corrupt or never-finished segment: the error says `shmdisk destroy NAME`, not Python."""
    garbage, empty = new(names, "garbage"), new(names, "empty")
    Path(shmdisk.segment_path(garbage)).write_bytes(b"\x5a" * 5000)
    Path(shmdisk.segment_path(empty)).write_bytes(b"")  # a creator that died before its header
    for name, state in ((garbage, "corrupt"), (empty, "corrupt")):
        line = fails("map", name)
        assert line.startswith(f"shmdisk: error: disk {name} cannot be used ({state}"), line
        assert line.endswith(f"; `shmdisk destroy {name}` removes it")
        assert "shmdisk.destroy(" not in line
    ok("destroy", garbage, empty)


def test_map_json_matches_extents_and_picture(names: list[str]) -> None:
    """map --json is Disk.extents; the picture shades each cell by how much of it holds data."""
    n = new(names)
    with shmdisk.create(n, 1024) as d:
        d.write(0, b"a" * 4096)
        d.write(512, b"b" * 4096)
        d.write(960, b"c" * 32768)
        extents = d.extents()
    doc = json.loads(ok("map", "--json", n))
    assert doc["version"] == 1 and doc["size_sectors"] == 1024
    assert [(e["sector"], e["n_sectors"], e["mapped"]) for e in doc["extents"]] == [
        (x.sector, x.n_sectors, x.mapped) for x in extents
    ]
    assert doc["mapped_sectors"] == 8 + 8 + 64
    lines = ok("map", "--ascii", "--width", "16", "--rows", "1", n).splitlines()
    # 16 cells of 64 sectors: cells 0 and 8 hold 8 data sectors each, cell 15 is all data.
    assert lines[2] == "0B -.......-......#"
    assert "# data" in lines[3] and ". hole" in lines[3]
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("START")) :]
    assert table[0].split() == ["START", "END", "SECTORS", "OFFSET", "LENGTH", "TYPE"]
    assert [r.split()[-1] for r in table[1:]] == ["data" if x.mapped else "hole" for x in extents]
    assert "no such disk" in fails("map", f"test-cli-nothere-{os.getpid()}")


# ------------------------------------------------------------------------------------------
# import and export


def test_import_export_round_trip_keeps_holes(names: list[str], tmp_path: Path) -> None:
    """A sparse image goes in and out byte-exact; holes stay holes on the disk and in the file."""
    size = 4 << 20
    pieces = {
        0: os.urandom(10000),
        (1 << 20) + 3 * PAGE: os.urandom(65536),
        2 << 20: bytes(65536),  # written zeros: data to the file system, a hole to us
        size - PAGE: os.urandom(PAGE),
    }
    image = sparse_image(tmp_path / "in.img", size, pieces)
    want = nonzero_pages(image)
    n = new(names)
    with shmdisk.create(n, size // 512) as d:
        d.write(0, b"\xaa" * size)  # old data everywhere: holes in the image must clear it
    out = ok("import", n, str(tmp_path / "in.img"))
    assert out.startswith(f"imported {tmp_path / 'in.img'} into disk {n}: 4 MiB, ")
    assert read_all(n) == image
    assert mapped_pages(n) == want
    assert shmdisk.inspect(n).mapped_pages == len(want)

    doc = json.loads(ok("export", "--json", n, str(tmp_path / "out.img")))
    assert doc["image_bytes"] == size and doc["data_bytes"] == len(want) * PAGE
    exported = tmp_path / "out.img"
    assert exported.read_bytes() == image
    assert exported.stat().st_blocks * 512 <= len(want) * PAGE + 65536
    try:
        assert data_ranges(exported) == page_runs(want)
    except OSError as exc:  # a file system without SEEK_DATA: st_blocks above must do
        if exc.errno != errno.EINVAL:
            raise

    # The same round trip through pipes: stdin in, stdout out (holes as zeros on a pipe).
    m = new(names)
    shmdisk.create(m, size // 512).disconnect()
    assert ok("import", "-q", m, "-", input=image) == ""
    assert mapped_pages(m) == want
    r = run("export", m, "-")
    assert r.returncode == 0 and r.stdout == image
    assert r.stderr.decode().startswith(f"exported disk {m} to stdout: 4 MiB")


def test_export_to_redirected_stdout_is_sparse(names: list[str], tmp_path: Path) -> None:
    """export NAME - with stdout redirected to a regular file still leaves the holes."""
    n = new(names)
    with shmdisk.create(n, 4096) as d:
        d.write(2048, b"q" * PAGE)
    target = tmp_path / "redirected.img"
    with open(target, "wb") as f:
        r = subprocess.run(
            [sys.executable, "-m", "shmdisk", "export", n, "-"],
            stdout=f,
            stderr=subprocess.PIPE,
            timeout=60,
            env=ENV,
        )
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == read_all(n)
    assert target.stat().st_blocks * 512 <= 2 * PAGE


def test_export_file_gets_the_disks_mode_and_never_follows_a_symlink(
    names: list[str], tmp_path: Path
) -> None:
    """A new image has the disk's mode (0600 by default); an existing path needs --force."""
    private, shared = new(names), new(names)
    for n, mode in ((private, 0o600), (shared, 0o640)):
        with shmdisk.create(n, 64, mode=mode) as d:
            d.write(0, b"s" * 512)
    for n, mode in ((private, 0o600), (shared, 0o640)):
        out = tmp_path / f"{n}.img"
        r = subprocess.run(
            [sys.executable, "-m", "shmdisk", "export", "-q", n, str(out)],
            capture_output=True,
            timeout=60,
            env=ENV,
            preexec_fn=lambda: os.umask(0o022),  # a umask may narrow the mode, never widen it
        )
        assert r.returncode == 0, r.stderr
        assert out.stat().st_mode & 0o777 == mode
        assert out.read_bytes() == read_all(n)

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    link = tmp_path / "link.img"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling.img"
    dangling.symlink_to(tmp_path / "made-through-a-link")
    assert fails("export", private, str(link)) == (
        f"shmdisk: error: {link} is a symbolic link; nothing written (add --force to overwrite it)"
    )
    assert "symbolic link" in fails("export", private, str(dangling))
    assert not (tmp_path / "made-through-a-link").exists()
    assert victim.read_bytes() == b"keep me"
    existing = tmp_path / f"{private}.img"
    assert fails("export", private, str(existing)).endswith(
        "is there already; nothing written (add --force to overwrite it)"
    )
    ok("export", "-q", "--force", private, str(link))  # asked to: through the link
    assert victim.read_bytes() == read_all(private)


def test_export_to_a_reader_that_goes_away_exits_quietly(names: list[str]) -> None:
    """`shmdisk export NAME - | head -c 100`: status 141 like any filter, nothing on stderr."""
    n = new(names)
    shmdisk.create(n, (64 << 20) // 512).disconnect()  # 64 MiB of zeros: more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmdisk", "export", "-q", n, "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100) == bytes(100)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""


def test_import_refusals_write_nothing(names: list[str], tmp_path: Path) -> None:
    """Too large (file or pipe), missing disk, or ragged size: refused, the disk unchanged."""
    n = new(names)
    with shmdisk.create(n, 2048) as d:
        d.write(8, b"\x07" * 4096)
    before = read_all(n)
    big = tmp_path / "big.img"
    sparse_image(big, (1 << 20) + 512, {0: b"\x09" * 8192})
    line = fails("import", n, str(big))
    assert "holds 1 MiB (1048576 bytes); nothing written" in line
    line = fails("import", n, "-", input=big.read_bytes())
    assert "stdin holds more than disk" in line and "nothing written" in line
    ragged = tmp_path / "ragged.img"
    ragged.write_bytes(b"\x05" * 1000)
    assert "add --pad" in fails("import", n, str(ragged))
    assert read_all(n) == before

    missing = f"test-cli-missing-{os.getpid()}-{secrets.token_hex(4)}"
    assert "no such disk" in fails("import", missing, str(ragged))
    assert missing not in shmdisk.list_disks()

    assert ok("import", "--pad", "-q", n, str(ragged)) == ""
    assert read_all(n)[:1024] == b"\x05" * 1000 + bytes(24)


def test_import_create_sizes_the_disk_from_the_image(names: list[str], tmp_path: Path) -> None:
    """import --create makes a disk exactly the image's size, with the sector size asked for."""
    n = new(names)
    image = sparse_image(tmp_path / "c.img", 64 * 1024, {4096: b"hi" * 2048})
    doc = json.loads(
        ok("import", "--create", "--sector-size", "4096", "--json", n, str(tmp_path / "c.img"))
    )
    assert doc["created"] is True and doc["data_bytes"] == 4096
    info = shmdisk.inspect(n)
    assert (info.size_sectors, info.sector_size) == (16, 4096)
    assert read_all(n) == image


def test_progress_bar_only_when_asked_or_on_a_terminal(names: list[str], tmp_path: Path) -> None:
    """--progress draws on stderr and ends the line; without a terminal nothing is drawn."""
    n = new(names)
    shmdisk.create(n, 2048).disconnect()
    img = tmp_path / "p.img"
    sparse_image(img, 1 << 20, {0: b"p" * 4096})
    r = run("import", "--progress", "-q", n, str(img))
    assert r.returncode == 0 and r.stdout == b""
    assert r.stderr.startswith(b"\rimport ") and r.stderr.endswith(b"\n")
    assert b"100.0%" in r.stderr
    r = run("export", "-q", n, str(tmp_path / "o.img"))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    r = run("export", "--no-progress", n, "-")
    assert r.returncode == 0 and b"%" not in r.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_import_create_stopped_by_a_signal_removes_its_disk(
    names: list[str], tmp_path: Path, signum: int, code: int
) -> None:
    """SIGTERM (kill PID) mid-copy cleans up as Ctrl-C does: the disk import made is gone."""
    n = new(names)
    image = tmp_path / "big.img"
    sparse_image(image, 1 << 20, {0: b"i" * 8192})
    # The signal arrives while the copy runs, deterministically: the copy sends it to itself.
    stop_mid_copy = (
        "import os, sys, time; from shmdisk import cli; from shmdisk.cli import _image;"
        f" _image._copy_in = lambda *a: (os.kill(os.getpid(), {int(signum)}), time.sleep(30));"
        " sys.exit(cli.main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", stop_mid_copy, "import", "--create", n, str(image)],
        capture_output=True,
        timeout=60,
        env=ENV,
    )
    assert r.returncode == code, r.stderr
    assert b"Traceback" not in r.stderr
    assert n not in shmdisk.list_disks()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_import_into_disk_read_only_for_the_user(names: list[str], tmp_path: Path) -> None:
    """A user who may only read the disk (mode 0644, other owner) is refused; nothing written."""
    from shmdisk import cli

    n = new(names)
    shmdisk.create(n, 64, mode=0o644).disconnect()
    before = read_all(n)
    image = tmp_path / "ro.img"
    image.write_bytes(b"\x01" * 4096)
    err = tmp_path / "stderr"
    src = os.open(image, os.O_RDONLY)
    errfd = os.open(err, os.O_WRONLY | os.O_CREAT, 0o666)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child runs the real main() as uid 65534
        code = 99
        try:
            os.dup2(src, 0)
            os.dup2(errfd, 2)
            os.setgid(65534)
            os.setuid(65534)
            # pytest replaced these with in-memory files; the command needs the real fds.
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            code = cli.main(["import", n, "-"])
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(src)
    os.close(errfd)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("import as another user hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 1
    assert (
        err.read_text() == f"shmdisk: error: disk {n} is read-only for this user; nothing written\n"
    )
    assert read_all(n) == before


# ------------------------------------------------------------------------------------------
# demo, help, usage


def test_demo_verifies_and_removes_its_disk() -> None:
    """demo runs its workers, prints the table and the verification line, exits 0, cleans up."""
    r = run("demo", "--workers", "3", "--region", "64K")
    out = r.stdout.decode()
    assert r.returncode == 0, (out, r.stderr)
    assert "3 worker processes share one disk" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert all(row[-1] == "ok" for row in rows)
    assert "verified: every byte as written" in out
    match = re.search(r"disk (demo-\d+-[0-9a-f]+):", out)
    assert match is not None
    name = match.group(1)
    assert f"disk {name} destroyed" in out
    assert name not in shmdisk.list_disks()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_demo_ctrl_c_still_destroys_the_disk(signum: int, code: int) -> None:
    """SIGINT (Ctrl-C) or SIGTERM while the workers start: the demo's disk is gone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmdisk", "demo", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    prefix = f"demo-{proc.pid}-"
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith(prefix) for n in shmdisk.list_disks()):
            assert proc.poll() is None and time.monotonic() < deadline, "demo never made its disk"
            time.sleep(0.002)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for n in shmdisk.list_disks():
            if n.startswith(prefix):
                shmdisk.destroy(n)
                pytest.fail(f"demo left {n} behind")
    # On a loaded machine the demo may finish before the signal lands: then it exits 0.
    assert proc.returncode == code or (proc.returncode == 0 and b"verified" in out), (out, err)
    assert b"destroyed" in out


@pytest.mark.parametrize(
    "command",
    [
        "ls",
        "info",
        "create",
        "destroy",
        "freeze",
        "resize",
        "map",
        "import",
        "export",
        "copy",
        "demo",
    ],
)
def test_every_subcommand_help_has_an_example(command: str) -> None:
    """Each subcommand's --help exits 0 and shows an example invocation."""
    out = ok(command, "--help")
    assert "example" in out and f"shmdisk {command}" in out


def test_export_help_says_holes_where_the_disk_has_holes() -> None:
    """The sparse-file sentence says it the right way round."""
    text = " ".join(ok("export", "--help").split())
    assert "gets holes where the disk has holes" in text and "has none" not in text


def test_usage_errors_exit_2_and_serve_is_registered() -> None:
    """Unknown commands and options are usage errors (2); serve comes from the NBD module."""
    r = run("frobnicate")
    assert r.returncode == 2 and b"invalid choice" in r.stderr
    assert run("ls", "--bogus").returncode == 2
    bare = run()  # no command: a usage error that lists the commands
    assert bare.returncode == 2 and bare.stdout == b""
    commands = ("ls", "info", "create", "destroy", "freeze", "resize", "map", "import", "export")
    for command in (*commands, "copy"):
        assert re.search(rf"^ +{command} +\w", bare.stderr.decode(), re.M), command
    assert run("--bogus", tool=LS_TOOL).returncode == 2
    assert "serve" in ok("--help")
    assert run("serve", "--help").returncode == 0
    assert ok("--version").startswith("shmdisk ")
