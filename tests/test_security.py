"""shmdisk on a shared machine, attacked as another user would: squatted names, foreign owners,
hostile modes, killed creators and destroyers, stopped lock holders, damaged live headers,
poisonous buffers, exhausted descriptors and a full tmpfs.

The attacker is a real other user: a forked child that dropped to uid/gid 65534 ("nobody") with
no supplementary groups, as any unprivileged account on the machine could act. Those tests need
root (to drop to another uid) and are skipped without it. Calls that could kill their process
(SIGBUS from a truncated mapping, SIGSEGV from a bad buffer) run in forked children, whose exit
status the test checks, so that a regression fails one test instead of ending the run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import new_name

import shmdisk
from shmdisk import _layout as L
from shmdisk import _segment
from shmdisk import cli as shmdisk_cli
from shmdisk import disk as disk_module

NOBODY = 65534
OTHER = 65533  # a second unprivileged uid (no passwd entry needed), for user-to-user sharing
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}


def needs_root(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that acts as another uid: it needs root, and is skipped without it."""
    skip = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
    return pytest.mark.root(skip(fn))


# ------------------------------------------------------------------------------------------
# Children: other users, and calls that might die of a signal


def run_child(fn: Callable[[], Any], *, uid: int | None = None, timeout: float = 60.0) -> Any:
    """``fn()`` in a forked child, as ``uid`` (gid the same, no other groups) if given.

    Returns what ``fn`` returned (it travels as JSON). Fails the test if the child raised,
    hung past ``timeout`` seconds, or died of a signal (SIGBUS, SIGSEGV): that is exactly what
    the tests here must never see. The child imports nothing new after dropping privileges
    (fork after import), so a tree another uid may not read is no obstacle.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 0
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            payload = json.dumps({"result": fn()})
        except BaseException:
            payload = json.dumps({"error": traceback.format_exc()})
            code = 1
        try:
            data = payload.encode()
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"child (uid {uid}) hung for {timeout} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        pytest.fail(f"child (uid {uid}) died of {signal.Signals(-code).name}")
    doc = json.loads(b"".join(chunks) or b"{}")
    assert code == 0 and "error" not in doc, doc.get("error", f"exit code {code}")
    return doc["result"]


def as_nobody(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``run_child`` as uid/gid 65534."""
    return run_child(fn, uid=NOBODY, timeout=timeout)


def outcome(call: Callable[[], object]) -> str:
    """``ok`` or the name of the shmdisk error ``call`` raised; anything else is "untyped"."""
    try:
        result = call()
        if isinstance(result, shmdisk.Disk):
            result.disconnect()
    except shmdisk.ShmdiskError as e:
        return type(e).__name__
    except Exception as e:
        return f"untyped {type(e).__name__}: {e}"
    return "ok"


def error_of(call: Callable[[], object]) -> BaseException:
    """The exception ``call`` raises (failing the test if it returns)."""
    try:
        result = call()
    except BaseException as e:
        return e
    if isinstance(result, shmdisk.Disk):
        result.disconnect()
    pytest.fail(f"expected an error, got {result!r}")


def file_state(path: str) -> tuple[int, int, list[tuple[int, bytes]]]:
    """Size, allocated blocks and every allocated byte range of a file (a segment is sparse
    and reserves a large page map: reading it whole would take seconds)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        st = os.fstat(fd)
        ranges, off = [], 0
        while off < st.st_size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, os.pread(fd, end - start, start)))
            off = end
        return st.st_size, st.st_blocks, ranges


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m shmdisk ARGS`` as the test's user."""
    return subprocess.run(
        [sys.executable, "-m", "shmdisk", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Names a test may fill with anything; whatever is there afterwards is removed (as root,
    destroy removes another user's segment, directory, FIFO or symlink without following)."""
    made: list[str] = []
    yield made
    for n in made:
        with contextlib.suppress(shmdisk.ShmdiskError):
            shmdisk.destroy(n, timeout=5)


def fresh(names: list[str], tag: str = "sec") -> str:
    n = new_name(tag)
    names.append(n)
    return n


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, like /tmp, that both users can reach."""
    d = Path(tempfile.mkdtemp(prefix="shmdisk-shared-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# Owners: a name squatted by another user


def squat_plain_file(path: str) -> Callable[[], int]:
    """What the attacker runs: an empty 1 MiB file, world-writable, at our name."""

    def go() -> int:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        os.fchmod(fd, 0o666)
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        return os.getuid()

    return go


def squat_disk(name: str, mode: int = 0o666, payload: bytes = b"") -> Callable[[], int]:
    """What the attacker runs: a perfectly valid disk of its own at the name."""

    def go() -> int:
        with shmdisk.create(name, 64, mode=mode) as d:
            if payload:
                d.write(0, payload)
        return os.getuid()

    return go


def check_untrusted(e: BaseException, name: str) -> None:
    """The refusal of another user's segment: typed twice over, naming that user."""
    assert isinstance(e, shmdisk.UntrustedOwnerError), repr(e)
    assert isinstance(e, shmdisk.ShmdiskError) and isinstance(e, PermissionError)
    assert e.errno == 1 and e.filename == shmdisk.segment_path(name)
    assert getattr(e, "owner_uid", None) == NOBODY
    assert "nobody (uid 65534)" in str(e) and "owner='nobody'" in str(e)


@needs_root
@pytest.mark.parametrize("squatter", ["plain file", "valid disk"])
def test_squatted_name_is_refused_by_every_way_in(names: list[str], squatter: str) -> None:
    """Another user's segment at our name: connect (creating or not, read-write or read-only)
    refuses it naming the owner, create says whose the name is, nothing is written into it, and
    the attacker truncating it afterwards kills nobody (nothing of it was ever mapped)."""
    name = fresh(names)
    path = shmdisk.segment_path(name)
    as_nobody(squat_plain_file(path) if squatter == "plain file" else squat_disk(name))
    before = file_state(path)
    mtime = os.stat(path).st_mtime_ns

    def victim() -> dict[str, str]:
        """Root's calls, in a child: a mapping of the attacker's file would die of SIGBUS."""
        seen = {}
        calls: dict[str, Callable[[], object]] = {
            "connect": lambda: shmdisk.connect(name),
            "connect create=False": lambda: shmdisk.connect(name, create=False),
            "connect read_only": lambda: shmdisk.connect(name, read_only=True),
            "connect read_only create=False": lambda: shmdisk.connect(
                name, read_only=True, create=False
            ),
        }
        for label, call in calls.items():
            e = error_of(call)
            check_untrusted(e, name)
            seen[label] = type(e).__name__
        e = error_of(lambda: shmdisk.create(name, 8))
        assert isinstance(e, shmdisk.DiskExistsError), repr(e)
        assert "belongs to user nobody (uid 65534)" in str(e)
        seen["create"] = type(e).__name__
        return seen

    got = run_child(victim)
    assert set(got.values()) == {"UntrustedOwnerError", "DiskExistsError"}
    assert file_state(path) == before and os.stat(path).st_mtime_ns == mtime  # nothing written

    # The attacker truncates the file it owns: a victim that had mapped it would die of
    # SIGBUS at its next access; refused, it lives and refuses again.
    as_nobody(lambda: os.truncate(path, 0) or 0)
    got = run_child(victim)
    assert set(got.values()) == {"UntrustedOwnerError", "DiskExistsError"}
    assert os.stat(path).st_size == 0


@needs_root
def test_sharing_works_only_for_the_owner_named(names: list[str]) -> None:
    """A disk of another user is used when, and only when, the caller names that user: by name
    or uid; the handle remembers it (pickling reconnects with it); naming anyone else, or a
    user that does not exist, is refused."""
    name = fresh(names)
    payload = b"shared by nobody".ljust(512, b".")
    as_nobody(squat_disk(name, mode=0o644, payload=payload))

    def consumer(owner: object) -> str:
        buf = bytearray(512)
        try:
            with shmdisk.connect(name, read_only=True, create=False, owner=owner) as d:  # type: ignore[arg-type]
                d.read(0, buf)
                again = pickle.loads(pickle.dumps(d))
                again.read(0, buf)
                again.disconnect()
        except shmdisk.ShmdiskError as e:
            return type(e).__name__
        return buf.decode()

    # Root and an unprivileged second user alike.
    for uid in (None, OTHER):
        got = run_child(
            lambda: {
                str(o): consumer(o)
                for o in (None, "nobody", NOBODY, str(NOBODY), 1, "no-such-user-here")
            },
            uid=uid,
        )
        assert got == {
            "None": "UntrustedOwnerError",
            "nobody": payload.decode(),
            "65534": payload.decode(),
            "1": "UntrustedOwnerError",
            "no-such-user-here": "InvalidNameError",
        }, uid


@needs_root
def test_overlay_on_another_users_base_needs_its_owner_named(names: list[str]) -> None:
    """A frozen disk of another user as the backing disk of an overlay: refused by create
    and by every later connect of the overlay unless that user is named (the base is mapped
    and read by the overlay, so it needs the same trust as a disk connected directly)."""
    base, ovl = fresh(names), fresh(names)
    payload = b"golden".ljust(512, b"\0")

    def make_base() -> int:
        with shmdisk.create(base, 64, mode=0o644) as d:
            d.write(0, payload)
            d.freeze()
        return 0

    as_nobody(make_base)
    check_untrusted(error_of(lambda: shmdisk.create(ovl, backing=base)), base)
    assert not os.path.lexists(shmdisk.segment_path(ovl))
    shmdisk.create(ovl, backing=base, owner="nobody").disconnect()
    check_untrusted(error_of(lambda: shmdisk.connect(ovl, create=False)), base)
    with shmdisk.connect(ovl, create=False, owner=NOBODY) as d:
        buf = bytearray(512)
        d.read(0, buf)
        assert buf == payload


@needs_root
def test_cli_refuses_another_users_disk_unless_owner_is_given(
    names: list[str], shared_dir: Path
) -> None:
    """Every command that connects (map, export, import, resize) refuses nobody's disk with one
    line naming the owner and the option; with --owner they work; destroy --owner destroys it
    as its owner would (connected handles are told), destroy alone only takes the name."""
    name = fresh(names)
    payload = b"N" * 4096
    as_nobody(squat_disk(name, mode=0o644, payload=payload))
    path = shmdisk.segment_path(name)
    before = file_state(path)
    image = shared_dir / "in.img"
    image.write_bytes(b"\x01" * 4096)
    out = shared_dir / "out.img"
    for args in (
        ["map", name],
        ["export", name, str(out)],
        ["import", name, str(image)],
        ["resize", name, "128"],
    ):
        r = cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.splitlines() == [
            f"shmdisk: error: disk '{name}' belongs to user nobody (uid 65534), not to you or"
            f" root: refusing it. If you expect nobody to share it with you, connect with"
            f" owner='nobody' (CLI: --owner nobody)"
        ], args
    assert file_state(path) == before and not out.exists()

    assert cli("map", "--owner", "nobody", name).returncode == 0
    r = cli("export", "--owner", "65534", name, str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4096] == payload
    r = cli("import", "-q", "--owner", "nobody", name, str(image))
    assert r.returncode == 0, r.stderr
    assert cli("resize", "-q", "--owner", "nobody", name, "128").returncode == 0
    assert shmdisk.inspect(name).size_sectors == 128
    r = cli("map", "--owner", "no-such-user-here", name)
    assert r.returncode == 1 and "no user named 'no-such-user-here'" in r.stderr

    # destroy --owner: a full destroy, so a handle (root's own, trusting nobody) is told.
    handle = shmdisk.connect(name, create=False, owner="nobody")
    r = cli("destroy", "--owner", "nobody", name)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(path)
    with pytest.raises(shmdisk.DisconnectedError):
        handle.read(0, bytearray(512))
    handle.disconnect()

    # destroy alone: another user's segment is never locked, only unlinked (root may).
    as_nobody(squat_disk(name))
    r = cli("destroy", name)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(path)


@needs_root
@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_squatters_that_are_no_file_are_refused_and_removed_unfollowed(
    names: list[str], kind: str
) -> None:
    """nobody puts a symlink (to root's own disk), a FIFO or a directory at our name: connect
    refuses at once (no hang on the FIFO, never reaching the link's target); an unprivileged
    user's destroy may not remove another's entry (sticky /dev/shm); root's destroy removes it
    without following it, and the disk the link pointed at is untouched."""
    name, real = fresh(names), fresh(names)
    path = shmdisk.segment_path(name)
    with shmdisk.create(real, 64, mode=0o666) as d:
        d.write(0, b"R" * 512)

    def plant() -> int:
        if kind == "symlink":
            os.symlink(shmdisk.segment_path(real), path)
        elif kind == "fifo":
            os.mkfifo(path, 0o666)
        else:
            os.mkdir(path, 0o777)
        return 0

    as_nobody(plant)

    def victim() -> list[str]:
        t0 = time.monotonic()
        got = [
            outcome(lambda: shmdisk.connect(name)),
            outcome(lambda: shmdisk.connect(name, create=False)),
            outcome(lambda: shmdisk.connect(name, read_only=True)),
            outcome(lambda: shmdisk.create(name, 8)),
        ]
        assert time.monotonic() - t0 < 2
        return got

    assert run_child(victim) == [
        "CorruptSegmentError",
        "CorruptSegmentError",
        "CorruptSegmentError",
        "DiskExistsError",
    ]
    assert run_child(lambda: outcome(lambda: shmdisk.destroy(name)), uid=OTHER) == (
        "PermissionDeniedError"
    )
    assert os.path.lexists(path)
    shmdisk.destroy(name)
    assert not os.path.lexists(path)
    with shmdisk.connect(real, create=False) as d:  # the link's target: still whole
        buf = bytearray(512)
        d.read(0, buf)
        assert buf == b"R" * 512


# ------------------------------------------------------------------------------------------
# Modes


@pytest.mark.parametrize(
    "mode",
    [
        "0644",  # a string
        6.0,
        None,
        True,
        -1,
        0o1000,  # beyond the permission bits
        0o4755,  # setuid
        0o2770,  # setgid
        0o1777,  # sticky
        600,  # decimal by mistake: 0o1130
        666,  # decimal by mistake: 0o1232 (sticky, group/other write)
    ],
)
def test_bad_modes_are_refused_before_anything_is_made(names: list[str], mode: object) -> None:
    """A mode that is not an int in 0..0o777 (a typo such as 666 for 0o666 included) raises
    InvalidModeError (a ValueError and an InvalidArgumentError) from create and copy; no segment
    appears."""
    name = fresh(names)
    e = error_of(lambda: shmdisk.create(name, 8, mode=mode))  # type: ignore[arg-type]
    assert isinstance(e, shmdisk.InvalidModeError) and isinstance(e, ValueError)
    assert isinstance(e, shmdisk.InvalidArgumentError)
    assert not os.path.lexists(shmdisk.segment_path(name))
    if mode is not None:  # copy's mode=None means "the source's mode"
        shmdisk.create(name, 8).disconnect()
        copy = fresh(names)
        e = error_of(lambda: shmdisk.copy(name, copy, mode=mode))  # type: ignore[arg-type]
        assert isinstance(e, shmdisk.InvalidModeError)
        assert not os.path.lexists(shmdisk.segment_path(copy))


def test_cli_refuses_bad_modes(names: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`shmdisk create --mode` takes octal 0000-0777 only: 4755 or 1777 is a usage error."""
    for mode in ("4755", "1777", "-1", "rw", "999"):
        name = fresh(names)
        assert shmdisk_cli.main(["create", name, "1M", "--mode", mode]) == 2
        assert "invalid mode" in capsys.readouterr().err, mode
        assert not os.path.lexists(shmdisk.segment_path(name))


# ------------------------------------------------------------------------------------------
# Creators and destroyers: racing, killed, stopped


def test_create_racing_a_destroyer_process_never_hands_out_an_unlinked_disk(name: str) -> None:
    """Another process destroys the name in a loop while this one creates it: every handle
    create() returns is the disk the name holds, or one marked destroyed (its handle then
    says DisconnectedError); never a live-looking disk nobody else can reach."""
    stop = time.monotonic() + 1.5
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the destroyer
        code = 0
        try:
            while time.monotonic() < stop:
                shmdisk.destroy(name)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    made = bad = 0
    try:
        while time.monotonic() < stop:
            try:
                d = shmdisk.create(name, 8)
            except shmdisk.DiskExistsError:
                continue
            made += 1
            seg = d._io.current().seg
            try:
                named = os.lstat(shmdisk.segment_path(name))
                same = (named.st_dev, named.st_ino) == seg.key
            except FileNotFoundError:
                same = False
            if not same and not seg.hq[L.F_DESTROYED]:
                bad += 1
            elif not same:
                with pytest.raises(shmdisk.DisconnectedError):
                    d.write(0, bytes(512))
            d.disconnect()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert made > 20 and bad == 0, (made, bad)


def _create_and_destroy_forever(name: str) -> None:
    """The victim of the random kills below: create, write, destroy, again."""
    while True:
        try:
            with shmdisk.create(name, 64) as d:
                d.write(0, b"v" * 4096)
        except shmdisk.DiskExistsError:
            pass
        shmdisk.destroy(name)


def test_killed_at_any_moment_a_creator_or_destroyer_wedges_nothing(name: str) -> None:
    """A process that creates and destroys a disk in a loop is SIGKILLed at random moments,
    in creation, in destruction (holding every stripe, or between marking and unlinking):
    each time the name is at once absent, a valid disk, or one marked destroyed that connect
    treats as gone; `shmdisk ls` never calls a marked disk "ok"; connect gets a disk in
    well under a second."""
    rng = random.Random(11)
    states: dict[str, int] = {}
    for _ in range(25):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the victim
            try:
                _create_and_destroy_forever(name)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.002, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            info = shmdisk.inspect(name)
            state = info.state
        except shmdisk.DiskNotFoundError:
            state = "absent"
        states[state] = states.get(state, 0) + 1
        assert state in ("absent", "ok", "destroyed"), state
        if state == "destroyed":
            listed = json.loads(cli("ls", "--json", name).stdout)["disks"]
            assert [e["state"] for e in listed] == ["destroyed"]
            with pytest.raises(shmdisk.DiskNotFoundError):
                shmdisk.connect(name, create=False)
        t0 = time.monotonic()
        with shmdisk.connect(name) as d:  # repairs what the victim held, or makes a new disk
            d.write(8, b"w" * 4096)
            buf = bytearray(4096)
            d.read(8, buf)
            assert buf == b"w" * 4096
        assert time.monotonic() - t0 < 1.0
        shmdisk.destroy(name, timeout=5)
    assert states.get("absent", 0) + states.get("ok", 0) > 0


def test_destroyer_killed_between_marking_and_unlinking(name: str) -> None:
    """A destroyer SIGKILLed after it marked the disk, still holding every stripe: handles get
    DisconnectedError, `shmdisk ls` lists it as "destroyed" (not "ok"), and the next connect
    finishes the unlink and gets a fresh disk at once."""
    d = shmdisk.create(name, 64)
    d.write(0, b"old!" * 128)

    def destroy_and_die() -> None:
        def die(*args: object) -> bool:
            os.kill(os.getpid(), signal.SIGKILL)
            return False

        _segment._unlink_if_same = die  # type: ignore[assignment]
        shmdisk.destroy(name)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the destroyer
        try:
            destroy_and_die()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    with pytest.raises(shmdisk.DisconnectedError):
        d.read(0, bytearray(512))
    d.disconnect()
    r = cli("ls", "--json", name)
    assert [e["state"] for e in json.loads(r.stdout)["disks"]] == ["destroyed"]
    t0 = time.monotonic()
    with shmdisk.connect(name) as fresh_disk:
        buf = bytearray(512)
        fresh_disk.read(0, buf)
        assert buf == bytes(512)
        fresh_disk.write(0, b"new!" * 128)
    assert time.monotonic() - t0 < 1.0


def test_destroy_times_out_on_a_stopped_holder_and_changes_nothing(name: str) -> None:
    """A process stopped (SIGSTOP) while it holds off every writer: destroy(timeout=) raises
    LockTimeoutError (a TimeoutError) on time, and the disk is as it was, not marked; once the
    holder is gone destroy goes through at once."""
    with shmdisk.create(name, 64) as d:
        d.write(0, b"k" * 512)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the holder
        with shmdisk.connect(name, create=False) as h, h.hold_writes():
            os.write(w, b"x")
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(60)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"x"
        t0 = time.monotonic()
        e = error_of(lambda: shmdisk.destroy(name, timeout=0.3))
        took = time.monotonic() - t0
        assert isinstance(e, shmdisk.LockTimeoutError) and isinstance(e, TimeoutError), repr(e)
        assert 0.25 < took < 3, took
        info = shmdisk.inspect(name)
        assert info.state == "ok" and info.mapped_pages == 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    t0 = time.monotonic()
    shmdisk.destroy(name, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert not os.path.lexists(shmdisk.segment_path(name))


@needs_root
def test_another_user_with_write_access_may_not_destroy(names: list[str]) -> None:
    """nobody may write root's 0666 disk, but may not remove it (as with any file in the sticky
    /dev/shm): destroy raises PermissionDeniedError and changes nothing, so root's handles
    work on and the disk is not marked destroyed."""
    name = fresh(names)
    d = shmdisk.create(name, 64, mode=0o666)
    d.write(0, b"m" * 512)
    got = as_nobody(
        lambda: [
            outcome(lambda: shmdisk.connect(name, create=False)),
            outcome(lambda: shmdisk.destroy(name)),
            outcome(lambda: shmdisk.destroy(name, owner="root")),
        ]
    )
    assert got == ["ok", "PermissionDeniedError", "PermissionDeniedError"]
    assert shmdisk.inspect(name).state == "ok"
    buf = bytearray(512)
    d.read(0, buf)
    assert buf == b"m" * 512
    d.disconnect()


# ------------------------------------------------------------------------------------------
# A header damaged under a live handle (by a bug, or by a process with write access)

SIZE = 2048  # sectors of the disks below: 1 MiB, 256 pages, reserving the default 1 TiB map


def poke(name: str, field: int, value: int) -> None:
    """Overwrite one header word of the live segment, as a stray writer would."""
    fd = os.open(shmdisk.segment_path(name), os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<Q", value % (1 << 64)), field * 8)
    finally:
        os.close(fd)


def _hold(d: shmdisk.Disk) -> None:
    with d.hold_writes(timeout=1):
        pass


def _read_file(d: shmdisk.Disk) -> None:
    with d.open("rb") as f:
        f.read(8192)


# Every operation on a handle, each on a fresh disk whose header was damaged after connecting.
HANDLE_OPS: dict[str, Callable[[shmdisk.Disk], object]] = {
    "read": lambda d: d.read(0, bytearray(4096)),
    "read last page": lambda d: d.read(SIZE - 8, bytearray(4096)),
    "read list": lambda d: d.read(0, [bytearray(512), bytearray(512)]),
    "read_at": lambda d: d.read_at(100, bytearray(100)),
    "write": lambda d: d.write(0, b"x" * 4096),
    "write last page": lambda d: d.write(SIZE - 8, b"x" * 4096),
    "write list": lambda d: d.write(0, [b"y" * 512, b"z" * 512]),
    "write_at": lambda d: d.write_at(100, b"w" * 100),
    "discard": lambda d: d.discard(0, 16),
    "write_zeroes": lambda d: d.write_zeroes(0, 16, may_unmap=False),
    "seek_mapped": lambda d: d.seek_mapped(0),
    "seek_unmapped": lambda d: d.seek_unmapped(0),
    "extents": lambda d: d.extents(),
    "layer_extents": lambda d: d.layer_extents(),
    "mapped_pages": lambda d: d.mapped_pages(),
    "resize grow": lambda d: d.resize(4 * SIZE),
    "resize shrink": lambda d: d.resize(SIZE // 4),
    "get_info": lambda d: d.get_info(),
    "size_sectors": lambda d: d.size_sectors,
    "flush": lambda d: d.flush(),
    "freeze": lambda d: d.freeze(),
    "hold_writes": _hold,
    "file read": _read_file,
    "pickle": lambda d: pickle.loads(pickle.dumps(d)),
    "connect": lambda d: shmdisk.connect(d.name, create=False),
    "connect read_only": lambda d: shmdisk.connect(d.name, create=False, read_only=True),
}
WRITING = {"write", "write last page", "write list", "write_at", "discard", "write_zeroes"}
WRITING |= {"resize grow", "resize shrink", "freeze"}
SIZED = {"read", "read last page", "read list", "read_at", "seek_mapped", "seek_unmapped"}
SIZED |= {"extents", "layer_extents", "mapped_pages", "get_info", "size_sectors", "flush"}
SIZED |= WRITING | {"file read"}
NEW_HANDLES = {"pickle", "connect", "connect read_only"}
ANY = "ok or typed"

# field, value, and what the operations must give: {op: outcome}, ANY for the others.
CORRUPTIONS: dict[str, tuple[int, int, dict[str, str]]] = {
    # seek_unmapped used to loop for minutes here
    "size beyond the page map": (
        L.F_SIZE_SECTORS,
        1 << 60,
        {op: "CorruptSegmentError" for op in SIZED | NEW_HANDLES},
    ),
    "size negative": (
        L.F_SIZE_SECTORS,
        -1,
        {op: "CorruptSegmentError" for op in SIZED | NEW_HANDLES},
    ),
    "size beyond the capacity": (
        L.F_SIZE_SECTORS,
        (1 << 40) // 512,
        {
            "read last page": "ok",  # inside the capacity still
            **{op: "CorruptSegmentError" for op in NEW_HANDLES - {"pickle"}},
        },
    ),
    "capacity beyond the file": (
        L.F_CAPACITY,
        1 << 40,
        {
            "read": "ok",
            "write": "ok",
            "resize grow": "CorruptSegmentError",
            **{op: "CorruptSegmentError" for op in NEW_HANDLES},
        },
    ),
    # (a grow sets a new, valid capacity: it may heal these two)
    "capacity below the mapping": (
        L.F_CAPACITY,
        4096,
        {"read": "ok", "connect": "CorruptSegmentError"},
    ),
    "capacity unaligned": (
        L.F_CAPACITY,
        (1 << 20) + 5,
        {"read": "ok", "connect": "CorruptSegmentError"},
    ),
    "generation at its limit": (
        L.F_GENERATION,
        -1,
        {op: "ok" for op in HANDLE_OPS},
    ),
    "frozen flag garbage": (
        L.F_FROZEN,
        0xDEADBEEF,
        {
            **{op: "IsReadOnlyError" for op in WRITING - {"freeze"}},  # freezing again: ok
            "read": "ok",
            "connect": "CorruptSegmentError",
        },
    ),
    "destroyed flag garbage": (
        L.F_DESTROYED,
        0xDEADBEEF,
        {
            **{op: "DisconnectedError" for op in SIZED - {"file read"}},
            "connect": "CorruptSegmentError",
        },
    ),
    "magic": (L.F_MAGIC, 0, {"read": "ok", "connect": "CorruptSegmentError"}),
    "sector size": (L.F_SECTOR_SIZE, 3, {"read": "ok", "connect": "CorruptSegmentError"}),
    "page map size": (L.F_MAX_PAGES, 1 << 50, {"read": "ok", "connect": "CorruptSegmentError"}),
    "data offset": (L.F_DATA_OFFSET, 0, {"read": "ok", "connect": "CorruptSegmentError"}),
    "lock table": (L.F_STRIPES, 1, {"write": "ok", "connect": "CorruptSegmentError"}),
}


def _ops_on_damaged_disks(field: int, value: int, read_only: bool) -> dict[str, list[Any]]:
    """Runs in a child: every operation on a fresh disk damaged under an open handle; each
    one's outcome and how long it took."""
    got: dict[str, list[Any]] = {}
    for op, fn in HANDLE_OPS.items():
        name = new_name("hdr")
        with shmdisk.create(name, SIZE) as owner:
            owner.write(0, b"a" * 8192)
            owner.write(SIZE - 8, b"b" * 4096)
        h = shmdisk.connect(name, create=False, read_only=read_only)
        poke(name, field, value)
        t0 = time.monotonic()
        got[op] = [outcome(lambda fn=fn, h=h: fn(h)), time.monotonic() - t0]  # type: ignore[misc]
        h.disconnect()
        poke(name, L.F_DESTROYED, 0)  # so that destroy locks and removes it as usual
        os.unlink(shmdisk.segment_path(name))
    return got


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_live_header_gives_typed_errors_at_once(case: str, read_only: bool) -> None:
    """A header word damaged while a handle is open: every operation of that handle (and of a
    new one) answers at once with a result or a typed error, never a hang, SIGBUS or SIGSEGV
    (the operations run in a child whose exit status is checked)."""
    field, value, expected = CORRUPTIONS[case]
    got = run_child(lambda: _ops_on_damaged_disks(field, value, read_only))
    for op, (result, seconds) in got.items():
        assert seconds < 2.0, (op, seconds)
        assert not result.startswith("untyped"), (op, result)
        want = expected.get(op, ANY)
        if read_only and op in WRITING | {"hold_writes"}:
            want = ANY  # a read-only handle may refuse these first, for its own reason
        if want != ANY:
            assert result == want, (op, result)


def test_capacity_changed_between_check_and_mapping_is_never_mapped(name: str) -> None:
    """Capacity and size grown past the file's end after connect checked them but before it
    mapped the data: the handle maps what was checked, and requests beyond it are refused
    (CorruptSegmentError) instead of touching memory past the file (SIGBUS)."""
    with shmdisk.create(name, SIZE) as d:
        d.write(0, b"c" * 4096)

    def connect_during_damage() -> list[str]:
        real_open = _segment.open_segment

        def open_then_damage(*args: Any, **kw: Any) -> _segment.Made:
            made = real_open(*args, **kw)
            poke(name, L.F_CAPACITY, 1 << 30)
            poke(name, L.F_SIZE_SECTORS, (1 << 30) // 512)
            return made

        disk_module._segment.open_segment = open_then_damage  # type: ignore[attr-defined]
        with shmdisk.connect(name, create=False) as h:
            far = (1 << 30) // 512 - 8  # within the damaged size, beyond the file
            return [
                outcome(lambda: h.read(0, bytearray(4096))),
                outcome(lambda: h.read(far, bytearray(4096))),
                outcome(lambda: h.write(far, b"x" * 4096)),
            ]

    got = run_child(connect_during_damage)
    assert got == ["ok", "CorruptSegmentError", "CorruptSegmentError"]
    poke(name, L.F_CAPACITY, (SIZE * 512))
    poke(name, L.F_SIZE_SECTORS, SIZE)


# ------------------------------------------------------------------------------------------
# Buffers


def _released() -> memoryview:
    m = memoryview(bytearray(4096))
    m.release()
    return m


def _read_only_array() -> Any:
    a = np.zeros(4096, np.uint8)
    a.setflags(write=False)
    return a


# Buffers a disk must refuse (BadBufferError), and for which calls: "rw" both, "r" reads only.
BAD_BUFFERS: dict[str, tuple[Callable[[], Any], str]] = {
    "numpy object array": (lambda: np.empty(512, dtype=object), "rw"),
    "numpy structured array": (lambda: np.zeros(512, dtype=[("a", "<i4"), ("b", "<f4")]), "rw"),
    "numpy datetime array": (lambda: np.zeros(512, dtype="datetime64[ns]"), "rw"),
    "numpy timedelta array": (lambda: np.zeros(512, dtype="timedelta64[s]"), "rw"),
    "numpy unicode array": (lambda: np.zeros(1024, dtype="<U1"), "rw"),
    "pointer memoryview": (lambda: memoryview(bytearray(4096)).cast("P"), "rw"),
    "released memoryview": (_released, "rw"),
    "non-contiguous numpy": (lambda: np.zeros(8192, np.uint8)[::2], "rw"),
    "non-contiguous memoryview": (lambda: memoryview(bytearray(8192))[::2], "rw"),
    "Fortran-ordered 2-D array": (lambda: np.zeros((64, 64), np.uint8, order="F"), "rw"),
    "str": (lambda: "x" * 4096, "rw"),
    "bytes, for reading into": (lambda: bytes(4096), "r"),
    "read-only numpy, for reading into": (_read_only_array, "r"),
}
BUFFER_CALLS: dict[str, tuple[str, Callable[[shmdisk.Disk, Any], object]]] = {
    "read": ("r", lambda d, b: d.read(0, b)),
    "read a list": ("r", lambda d, b: d.read(0, [bytearray(512), b])),
    "read_at": ("r", lambda d, b: d.read_at(0, b)),
    "write": ("w", lambda d, b: d.write(0, b)),
    "write a list": ("w", lambda d, b: d.write(0, [bytes(512), b])),
    "write_at": ("w", lambda d, b: d.write_at(0, b)),
}


def _touch(b: Any) -> None:
    """Use the buffer the way its owner will next: an object array filled with raw bytes
    would crash right here."""
    repr(b)
    if isinstance(b, np.ndarray):
        b.tolist()
        b.copy()


@pytest.mark.parametrize("kind", list(BAD_BUFFERS))
def test_bad_buffers_are_refused_and_the_caller_lives(disk: shmdisk.Disk, kind: str) -> None:
    """Object, structured, datetime, unicode and pointer buffers, released memoryviews, non-
    contiguous and read-only (for reading) buffers: BadBufferError from every read and write
    call, the disk unchanged, and the process alive when it uses the buffer afterwards (the
    calls run in a child whose exit status is checked)."""
    make, uses = BAD_BUFFERS[kind]
    disk.write(0, b"\x11" * 8192)

    def calls() -> dict[str, str]:
        got = {}
        for label, (direction, call) in BUFFER_CALLS.items():
            if direction not in uses:
                continue
            b = make()
            got[label] = outcome(lambda b=b, call=call: call(disk, b))  # type: ignore[misc]
            _touch(b)
            after = bytearray(8192)
            disk.read(0, after)
            assert after == b"\x11" * 8192, label
        return got

    got = run_child(calls)
    assert got and set(got.values()) == {"BadBufferError"}, got


# ------------------------------------------------------------------------------------------
# Descriptors


def _with_free_descriptors(free: int, call: Callable[[], object]) -> str:
    """Runs in a child: ``call`` in a new thread with exactly ``free`` descriptors left."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    top = max(int(x) for x in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    # Every number below the limit is taken now: raising the limit by ``free`` leaves exactly
    # that many (however many holes the process had below its highest descriptor).
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + free, hard))
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(outcome(call)))
    t.start()
    t.join()
    for fd in filler:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return got[0]


def test_running_out_of_descriptors_gives_typed_errors(names: list[str]) -> None:
    """With 0, 1, 2, ... descriptors left, create, connect (new, existing, read-only) and
    destroy in a new thread either work or raise a ShmdiskError (EMFILE as UnknownError), and
    leave nothing half-done: no descriptor kept, no disk made or marked when the call failed."""
    existing = fresh(names)
    with shmdisk.create(existing, 64) as d:
        d.write(0, b"e" * 512)

    def sweep() -> dict[str, list[str]]:
        got: dict[str, list[str]] = {}
        # 0-7 descriptors left, then plenty (a pytest-xdist worker's own threads may hold a
        # few more at any moment than a plain run's).
        for free in [*range(8), 64]:
            for op in ("create", "connect new", "connect", "connect read_only", "destroy"):
                name = new_name("fds")
                if op == "destroy":
                    shmdisk.create(name, 8).disconnect()
                before = len(os.listdir("/proc/self/fd"))
                calls: dict[str, Callable[[], object]] = {
                    "create": lambda name=name: shmdisk.create(name, 8),  # type: ignore[misc]
                    "connect new": lambda name=name: shmdisk.connect(name),  # type: ignore[misc]
                    "connect": lambda: shmdisk.connect(existing, create=False),
                    "connect read_only": lambda: shmdisk.connect(
                        existing, create=False, read_only=True
                    ),
                    "destroy": lambda name=name: shmdisk.destroy(name),  # type: ignore[misc]
                }
                result = _with_free_descriptors(free, calls[op])
                got.setdefault(op, []).append(result)
                after = len(os.listdir("/proc/self/fd"))
                if after > before:
                    # A failed call's descriptors go with its exception, at the latest when the
                    # collector breaks the exception's cycle (its traceback holds its frames).
                    gc.collect()
                    after = len(os.listdir("/proc/self/fd"))
                assert after <= before, (op, free, "descriptors leaked")
                if op in ("create", "connect new") and result != "ok":
                    assert not os.path.lexists(shmdisk.segment_path(name)), (op, free)
                if op == "destroy" and result != "ok":
                    assert shmdisk.inspect(name).state == "ok", (op, free)
                with contextlib.suppress(shmdisk.ShmdiskError):
                    shmdisk.destroy(name)
        return got

    got = run_child(sweep)
    for op, results in got.items():
        assert all(r == "ok" or r == "UnknownError" for r in results), (op, results)
        assert results[0] == "UnknownError" and results[-1] == "ok", (op, results)
    with shmdisk.connect(existing, create=False) as d:  # the existing disk: unharmed
        buf = bytearray(512)
        d.read(0, buf)
        assert buf == b"e" * 512


# ------------------------------------------------------------------------------------------
# A small or full tmpfs


def can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


ZEROES_CHILD = textwrap.dedent(
    """
    import json, os, shmdisk
    # In a private mount namespace with a 4 MiB tmpfs over /dev/shm.
    def used():
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    big = shmdisk.create("big", (1 << 40) // 512)  # 1 TiB, sparse
    big.write(0, b"\\x05" * 8192)
    other = shmdisk.create("other", 2048)
    out = []
    for n_bytes in (64 << 20, 1 << 30, 1 << 40):
        before, mapped = used(), big.mapped_pages()
        try:
            big.write_zeroes(0, n_bytes // 512, may_unmap=False)
            err = None
        except shmdisk.ShmdiskError as e:
            err = [type(e).__name__, e.errno]
        buf = bytearray(8192)
        big.read(0, buf)
        out.append({
            "bytes": n_bytes, "error": err, "intact": buf == b"\\x05" * 8192,
            "mapped_same": big.mapped_pages() == mapped, "used_before": before,
            "used_after": used(),
        })
    other.write(0, b"\\x07" * (1 << 20))  # the tmpfs still has room for others
    big.write_zeroes(0, 64, may_unmap=False)  # one that fits: done, and stays allocated
    print(json.dumps({"zeroings": out, "fits": big.mapped_pages()}))
    """
)


@pytest.mark.root
@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare -m (mount namespaces)")
def test_huge_write_zeroes_on_a_small_tmpfs_is_refused_without_filling_it() -> None:
    """write_zeroes(may_unmap=False) of 64 MiB, 1 GiB and 1 TiB on a 4 MiB tmpfs: DiskFullError
    (ENOSPC) with the disk's data and map unchanged and the tmpfs as full as before (not
    filled on the way to the error: other disks on it still write), while one that fits works."""
    script = (
        "mount --make-rprivate / && mount -t tmpfs -o size=4m tmpfs /dev/shm && "
        f'exec {sys.executable} -c "$CHILD"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        env={**ENV, "CHILD": ZEROES_CHILD},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # SIGBUS would be -7
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    for z in doc["zeroings"]:
        assert z["error"] == ["DiskFullError", 28], z
        assert z["intact"] and z["mapped_same"], z
        assert z["used_after"] == z["used_before"], z
    assert doc["fits"] == 8  # the 32 KiB zeroed: 8 pages, allocated and mapped


# ------------------------------------------------------------------------------------------
# Export and import against another user


@needs_root
def test_export_never_writes_where_another_user_prepared(
    names: list[str], shared_dir: Path
) -> None:
    """In a directory both can write, nobody plants a symlink (to a file it can read) and a
    world-writable file at the names root will export to: both are refused and stay as they
    were; a fresh image gets the disk's mode, so nobody cannot read a 0600 disk's image."""
    name = fresh(names)
    with shmdisk.create(name, 64) as d:
        d.write(0, b"secret!!" * 64)
    trap, planted, new = shared_dir / "trap.img", shared_dir / "planted.img", shared_dir / "new.img"
    loot = shared_dir / "loot"

    def plant() -> int:
        loot.write_bytes(b"")
        loot.chmod(0o666)
        trap.symlink_to(loot)
        planted.write_bytes(b"")
        planted.chmod(0o666)
        return 0

    as_nobody(plant)
    for target in (trap, planted):
        r = cli("export", name, str(target))
        assert r.returncode == 1 and "nothing written (add --force" in r.stderr, r.stderr
    assert loot.read_bytes() == b"" and planted.read_bytes() == b""
    r = cli("export", "-q", name, str(new))
    assert r.returncode == 0, r.stderr
    assert new.stat().st_mode & 0o777 == 0o600 and new.read_bytes()[:8] == b"secret!!"
    assert as_nobody(lambda: outcome(lambda: new.read_bytes())).startswith(
        "untyped PermissionError"
    )


@needs_root
def test_import_refuses_to_write_into_another_users_disk(
    names: list[str], shared_dir: Path
) -> None:
    """root's `import NAME FILE` (and `import --create`) into a name nobody squatted with a
    valid disk: refused with the owner named, not one byte written into the attacker's disk."""
    name = fresh(names)
    as_nobody(squat_disk(name, mode=0o666))
    before = file_state(shmdisk.segment_path(name))
    image = shared_dir / "secret.img"
    image.write_bytes(b"S" * 4096)
    for args in (["import", name, str(image)], ["import", "--create", name, str(image)]):
        r = cli(*args)
        assert r.returncode == 1 and "belongs to user nobody" in r.stderr, (args, r.stderr)
    assert file_state(shmdisk.segment_path(name)) == before


@needs_root
def test_copy_of_another_users_disk_needs_its_owner_named(names: list[str]) -> None:
    """copy() reads its source through connect: another user's disk is refused as source
    unless that user is named, and the copy is then the caller's own disk, mode 0600."""
    src, dst = fresh(names), fresh(names)
    payload = b"copied".ljust(512, b"\0")
    as_nobody(squat_disk(src, mode=0o644, payload=payload))
    check_untrusted(error_of(lambda: shmdisk.copy(src, dst, mode=0o600)), src)
    assert not os.path.lexists(shmdisk.segment_path(dst))
    with shmdisk.copy(src, dst, mode=0o600, owner="nobody") as d:
        buf = bytearray(512)
        d.read(0, buf)
        assert buf == payload
    st = os.stat(shmdisk.segment_path(dst))
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
