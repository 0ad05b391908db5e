"""Point-in-time copies: ``shmdisk.copy`` and ``shmdisk export`` while other processes write.

The consistency check: stamping writers (``_overlay_workers.stamping_writer``) number their
rounds on pages spread over the disk, in ascending order, one request per page. An image of
one point in time shows, for each writer, some round ``c`` on its first pages and ``c - 1`` on
the rest; an image read piece by piece while they write shows later rounds further on. The
tests prove the check has teeth: a copy whose holding of writers is switched off, and an
export read slowly, fail it whenever writers move on in the middle.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import _overlay_workers as w
import _workers
import pytest
from _helpers import new_name
from _overlay_model import Layer, pattern, random_ops

import shmdisk

SPAWN = multiprocessing.get_context("spawn")
SS = 512
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
WRITERS = 3
STAMPS = 16  # pages per writer, spread over the disk


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """Unique disk names for one test; all destroyed afterwards, the last made first."""
    made: list[str] = []

    def new(tag: str = "cp") -> str:
        made.append(new_name(tag))
        return made[-1]

    yield new
    for n in reversed(made):
        shmdisk.destroy(n, force=True)


def read_all(disk: shmdisk.Disk) -> bytes:
    buf = bytearray(disk.size_sectors * disk.sector_size)
    disk.read(0, buf)
    return bytes(buf)


def stamp_pages(pages: int, writer: int) -> list[int]:
    """The pages ``writer`` stamps: one in each of STAMPS equal slices of the disk."""
    stride = pages // STAMPS
    return [j * stride + writer + 1 for j in range(STAMPS)]


def rounds(image: bytes, page: int, pages: int) -> list[list[int]]:
    """The round each writer's stamps show in ``image``, page by page."""
    out = []
    for k in range(WRITERS):
        seen = []
        for p in stamp_pages(pages, k):
            m = re.match(rb"writer (\d+) count +(\d+)\n", image[p * page : p * page + 64])
            assert m is not None and int(m.group(1)) == k, image[p * page : p * page + 64]
            seen.append(int(m.group(2)))
        out.append(seen)
    return out


def one_point_in_time(seen: list[list[int]]) -> bool:
    """Each writer's rounds read ``c, ..., c, c - 1, ..., c - 1`` in page order."""
    return all(all(a >= b for a, b in itertools.pairwise(s)) and s[0] - s[-1] <= 1 for s in seen)


class Stamping:
    """A 64 MiB disk full of data (with holes) and WRITERS processes stamping rounds on it."""

    def __init__(self, name: str, size: int = 64 * MiB) -> None:
        self.disk = shmdisk.create(name, size // SS)
        self.page = self.disk.page_size
        self.pages = size // self.page
        for off in range(0, size, 8 * MiB):
            self.disk.write_at(off, pattern(8 * MiB, off))
        self.disk.discard((20 * MiB) // SS, (4 * MiB) // SS)  # a hole (but for stamped pages)
        for k in range(WRITERS):
            for p in stamp_pages(self.pages, k):
                self.disk.write_at(p * self.page, w.count_stamp(k, 0, SS))
        self.image = read_all(self.disk)  # what the bytes around the stamps must stay
        self.counters = [SPAWN.Value("q", 0) for _ in range(WRITERS)]
        self.stop = SPAWN.Event()
        ready = [SPAWN.Event() for _ in range(WRITERS)]
        self.procs = [
            SPAWN.Process(
                target=w.stamping_writer,
                args=(name, k, stamp_pages(self.pages, k), self.counters[k], ready[k], self.stop),
            )
            for k in range(WRITERS)
        ]
        for p in self.procs:
            p.start()
        assert all(r.wait(60) for r in ready)
        self.wait_for_rounds(3)

    def round(self) -> int:
        return min(int(c.value) for c in self.counters)

    def wait_for_rounds(self, n: int, timeout: float = 30.0) -> int:
        """Wait until every writer finished ``n`` more rounds (or ``timeout`` passed); how
        many more the slowest finished."""
        start = self.round()
        deadline = time.monotonic() + timeout
        while self.round() < start + n and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.round() - start

    def finish(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        assert [p.exitcode for p in self.procs] == [0] * WRITERS

    def check(self, image: bytes) -> list[list[int]]:
        """The image's rounds; the bytes around the stamps must be the disk's own."""
        assert len(image) == len(self.image)
        stamped = {p for k in range(WRITERS) for p in stamp_pages(self.pages, k)}
        for p in range(0, self.pages, 97):  # a sample of unstamped pages
            if p not in stamped:
                assert (
                    image[p * self.page : (p + 1) * self.page]
                    == self.image[p * self.page : (p + 1) * self.page]
                )
        return rounds(image, self.page, self.pages)


@pytest.fixture
def stamping(names: Callable[[str], str]) -> Iterator[Stamping]:
    """A disk with stamping writers at work; they are stopped after the test."""
    s = Stamping(names("src"))
    try:
        yield s
    finally:
        s.stop.set()
        for p in s.procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()


def test_copy_is_one_point_in_time_while_processes_write(
    stamping: Stamping, names: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy taken while three processes write is one point in time, even though its progress
    callback waits mid-copy for the writers to move on (they cannot: they are held off)."""
    moved: list[int] = []

    def wait_mid_copy(done: int, total: int) -> None:
        if not moved and 0 < done < total:
            moved.append(stamping.wait_for_rounds(2, timeout=0.5))

    dst = shmdisk.copy(stamping.disk.name, names("dst"), progress=wait_mid_copy)
    before = stamping.round()
    image = read_all(dst)
    seen = stamping.check(image)
    assert one_point_in_time(seen), seen
    assert moved == [0], "writers went on while the copy ran"
    assert min(min(s) for s in seen) >= 3  # the writers had been at work
    assert stamping.wait_for_rounds(2) >= 2  # and go on once it is done
    assert stamping.round() > before
    stamping.finish()
    # The teeth of the check: the same copy with its holding of writers switched off, whose
    # progress callback lets the writers move on mid-copy, is caught.
    moved.clear()
    again = Stamping(names("src2"))
    try:
        monkeypatch.setattr(shmdisk.Disk, "hold_writes", lambda self, **kw: _no_hold(self))
        torn = shmdisk.copy(
            again.disk.name, names("torn"), progress=lambda d, t: _mid(again, d, t, moved)
        )
        assert moved and moved[0] >= 2
        assert not one_point_in_time(again.check(read_all(torn)))
    finally:
        again.finish()


@contextlib.contextmanager
def _no_hold(disk: shmdisk.Disk) -> Iterator[shmdisk.Disk]:
    yield disk


def _mid(s: Stamping, done: int, total: int, moved: list[int]) -> None:
    if not moved and 0 < done < total:
        moved.append(s.wait_for_rounds(2, timeout=10))


def test_export_is_one_point_in_time_while_processes_write(
    stamping: Stamping, names: Callable[[str], str], tmp_path: Path
) -> None:
    """`shmdisk export NAME -` read slowly while three processes write: the image is one point
    in time, and the writers wait until the export is done (then go on)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmdisk", "export", "--json", stamping.disk.name, "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(2 * MiB)  # the export is under way, then stalls on the full pipe
    moved = stamping.wait_for_rounds(2, timeout=0.5)
    image = head + proc.stdout.read()
    summary = proc.stderr.read()
    assert proc.wait(60) == 0, summary
    seen = stamping.check(image)
    assert one_point_in_time(seen), seen
    assert moved == 0, "writers went on while the export ran"
    assert b'"snapshot": true' in summary
    assert stamping.wait_for_rounds(2) >= 2
    # To a file too, with holes, while they write.
    out = tmp_path / "disk.img"
    done = subprocess.run(
        [sys.executable, "-m", "shmdisk", "export", "-q", stamping.disk.name, str(out)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert one_point_in_time(stamping.check(out.read_bytes()))


def test_copy_keeps_holes_mode_and_geometry(names: Callable[[str], str]) -> None:
    """The copy has the source's bytes, holes, sector size, size, size limit and mode (or the
    mode asked for), takes about the memory the source's data takes, and is independent."""
    src = shmdisk.create(names("src"), 4096, 4096, mode=0o640, max_size_sectors=10000)
    model = Layer.empty(src.name, 4096, 4096)
    random_ops(model, src, seed=61, count=60)
    dst = shmdisk.copy(src.name, names("dst"))
    assert read_all(dst) == model.data
    assert dst.extents() == model.extents() == src.extents()
    assert dst.mapped_pages() == src.mapped_pages()
    a, b = shmdisk.inspect(src.name), shmdisk.inspect(dst.name)
    assert (b.sector_size, b.size_sectors, b.max_size_sectors) == (4096, 4096, 10000)
    assert b.mode == 0o640 and not b.frozen and b.backing is None
    assert abs(b.allocated_bytes - a.allocated_bytes) <= 16384
    dst.write(0, b"\x01" * 4096)
    assert read_all(src) == model.data
    with shmdisk.copy(src.name, names("dst"), mode=0o600) as other:
        assert shmdisk.inspect(other.name).mode == 0o600


def test_copy_of_an_overlay_is_flat_and_outlives_its_base(names: Callable[[str], str]) -> None:
    """A copy of an overlay of an overlay holds the chain's bytes as its own: no backing disk,
    data where the chain has data, and it reads the same after the chain is destroyed."""
    base = shmdisk.create(names("base"), 2048)
    bm = Layer.empty(base.name, 2048)
    random_ops(bm, base, seed=71, count=40)
    base.freeze()
    mid = shmdisk.create(names("mid"), backing=base.name)
    mm = Layer.over(mid.name, bm)
    random_ops(mm, mid, seed=72, count=40)
    mid.freeze()
    top = shmdisk.create(names("top"), 2500, backing=mid.name)
    tm = Layer.over(top.name, mm, 2500)
    random_ops(tm, top, seed=73, count=40)
    dst = shmdisk.copy(top.name, names("flat"))
    assert dst.backing is None and shmdisk.inspect(dst.name).backing is None
    assert read_all(dst) == tm.data
    assert dst.extents() == tm.extents()
    assert dst.mapped_pages() == sum(1 for x in range(tm.pages) if tm.has_data(x))
    # The copy is nobody's overlay: the chain goes without force, the copy stays whole.
    for d in (top, mid, base):
        d.disconnect()
        shmdisk.destroy(d.name)
    assert read_all(dst) == tm.data


def test_a_copy_appears_only_when_complete(names: Callable[[str], str]) -> None:
    """While a copy runs its name does not exist; a copy that fails leaves no disk, and the
    source's writers are free again."""
    src = shmdisk.create(names("src"), 8192)
    for off in range(0, 4 * MiB, MiB):
        src.write_at(off, pattern(MiB // 2, off))  # four extents
    dst = names("dst")
    calls: list[tuple[int, int, bool]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total, os.path.lexists(shmdisk.segment_path(dst))))
        if len(calls) == 3:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        shmdisk.copy(src.name, dst, progress=progress)
    assert [c[2] for c in calls] == [False] * 3
    assert not os.path.lexists(shmdisk.segment_path(dst))
    src.write(0, b"w" * SS)  # its locks were let go
    calls.clear()
    with shmdisk.copy(src.name, dst, progress=lambda d, t: calls.append((d, t, False))) as d:
        assert read_all(d) == read_all(src)
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1] == 4 * MiB


def test_copy_refuses_bad_requests_before_copying(names: Callable[[str], str]) -> None:
    """A taken or bad destination, a missing source, a bad mode: typed errors, nothing made,
    the existing destination untouched."""
    src = shmdisk.create(names("src"), 64)
    taken = shmdisk.create(names("taken"), 8)
    taken.write(0, b"t" * SS)
    with pytest.raises(shmdisk.DiskExistsError):
        shmdisk.copy(src.name, taken.name)
    assert read_all(taken)[:SS] == b"t" * SS and taken.size_sectors == 8
    new = names("new")
    with pytest.raises(shmdisk.DiskNotFoundError):
        shmdisk.copy(new_name("missing"), new)
    with pytest.raises(shmdisk.InvalidModeError):
        shmdisk.copy(src.name, new, mode=0o7777)
    with pytest.raises(shmdisk.InvalidNameError):
        shmdisk.copy(src.name, "bad/name")
    assert not os.path.lexists(shmdisk.segment_path(new))


def test_copy_times_out_on_a_writer_that_never_finishes(names: Callable[[str], str]) -> None:
    """A process holding pages of the source forever: the copy raises LockTimeoutError after
    its timeout and makes nothing."""
    src = shmdisk.create(names("src"), 64)
    ready = SPAWN.Event()
    holder = SPAWN.Process(target=_workers.hold_lock_then_wait, args=(src.name, ready, 3, 2))
    holder.start()
    try:
        assert ready.wait(60)
        dst = names("dst")
        t0 = time.monotonic()
        with pytest.raises(shmdisk.LockTimeoutError):
            shmdisk.copy(src.name, dst, timeout=0.3)
        assert 0.2 <= time.monotonic() - t0 < 10
        assert not os.path.lexists(shmdisk.segment_path(dst))
    finally:
        holder.kill()
        holder.join()
    src.write(3 * 8, b"x" * SS)  # the dead holder's stripes are repaired and taken


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_export_by_a_user_who_may_only_read_warns_it_is_no_snapshot(
    names: Callable[[str], str],
) -> None:
    """A user who may read a disk but not lock it gets the image all the same, a one-line
    warning that writers were not held off, and "snapshot": false; a frozen disk needs no
    holding, so there the image is a snapshot without a warning."""
    from _helpers import as_other_user

    from shmdisk import cli

    disk = shmdisk.create(names("shared"), 64, mode=0o644)
    disk.write(0, b"r" * SS)
    code, out, err = as_other_user(lambda: cli.main(["export", "--json", disk.name, "-"]))
    assert code == 0, err
    warning, *rest = err.splitlines()
    assert warning.startswith("shmdisk: warning: ") and "not one point in time" in warning
    assert json.loads("\n".join(rest))["snapshot"] is False
    assert out.encode("latin-1") == read_all(disk)
    disk.freeze()
    code, out, err = as_other_user(lambda: cli.main(["export", "--json", disk.name, "-"]))
    assert code == 0 and json.loads(err)["snapshot"] is True, err


def can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


FULL_CHILD = textwrap.dedent(
    """
    import json, os, shmdisk
    # Runs in a private mount namespace with an 8 MiB tmpfs over /dev/shm.
    src = shmdisk.create("src", (16 << 20) // 512)
    src.write(0, b"\\x05" * (5 << 20))
    before = os.statvfs("/dev/shm")
    try:
        shmdisk.copy("src", "dst")
        err = None
    except shmdisk.DiskFullError as e:
        err = type(e).__name__
    after = os.statvfs("/dev/shm")
    src.write(0, b"\\x06" * 512)  # its writers are free again
    print(json.dumps({
        "error": err, "disks": shmdisk.list_disks(),
        "freed": after.f_bfree == before.f_bfree,
    }))
    """
)


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -m (mount namespaces)")
def test_a_copy_into_a_full_tmpfs_fails_cleanly() -> None:
    """A copy that runs out of room raises DiskFullError, leaves no disk and no memory taken,
    and lets the source's writers go (never a SIGBUS)."""
    script = (
        "mount --make-rprivate / && mount -t tmpfs -o size=8m tmpfs /dev/shm && "
        f'exec {sys.executable} -c "$CHILD"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        env={**os.environ, "CHILD": FULL_CHILD, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"error": "DiskFullError", "disks": ["src"], "freed": True}


def test_copy_without_copy_file_range_goes_through_the_mapping(
    names: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel cannot copy between the two files, the copy still comes out whole."""

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    src = shmdisk.create(names("src"), 4096)
    model = Layer.empty(src.name, 4096)
    random_ops(model, src, seed=81, count=40)
    monkeypatch.setattr(os, "copy_file_range", refuse)
    with shmdisk.copy(src.name, names("dst")) as dst:
        assert read_all(dst) == model.data and dst.extents() == model.extents()
