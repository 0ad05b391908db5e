"""permissions: modes and owners, seen from other users. Needs root, to fork children that drop
to other uids.

* A disk made with the default mode is ``0600``: uid 65534 gets ``PermissionDeniedError`` from
  every entry point. A ``0644`` disk it may read through a read-only handle, never write or
  destroy; and that handle takes no lock, so stopping the reader (SIGSTOP) in the middle of
  its reads never holds up the owner's writes.
* A disk made by uid 65534 is *not trusted* by other users (root included): ``connect``
  raises ``UntrustedOwnerError`` unless ``owner=`` names 65534; named, a third user (65533)
  may read it read-only, root may use it; ``destroy`` by root removes it without locking it.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable

import shmdisk

from ._common import (
    Options,
    Result,
    unique_name,
)

NOBODY = 65534
THIRD = 65533  # a second unprivileged user


def _as_user(uid: int, fn: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Run ``fn`` in a forked child that dropped to ``uid``/``uid``; its (call, outcome) list."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            res = fn()
            os.write(wfd, json.dumps(res).encode())
        except BaseException:
            os.write(wfd, json.dumps([("child", traceback.format_exc())]).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        b = os.read(rfd, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status):
        return [("child", f"died: status {status}")]
    return [(str(a), str(b)) for a, b in json.loads(b"".join(chunks) or b"[]")]


def _outcome(fn: Callable[[], object]) -> str:
    try:
        v = fn()
        if isinstance(v, shmdisk.Disk):
            v.disconnect()
            return "ok"
        return "ok" if v is None or not isinstance(v, (bytes, bytearray)) else "ok:" + v.hex()[:16]
    except shmdisk.ShmdiskError as e:
        return type(e).__name__
    except Exception as e:
        return "untyped " + repr(e)


def _read(name: str, owner: int | None = None) -> bytes:
    with shmdisk.connect(name, read_only=True, create=False, owner=owner) as d:
        buf = bytearray(512)
        d.read(0, buf)
        return bytes(buf)


def _write(name: str, read_only: bool, owner: int | None = None) -> None:
    with shmdisk.connect(name, read_only=read_only, create=False, owner=owner) as d:
        d.write(0, bytes(512))


def _hold_writes_read_only(name: str) -> None:
    with shmdisk.connect(name, read_only=True, create=False) as d, d.hold_writes(timeout=1):
        pass


def _stopped_reader_vs_owner(disk: shmdisk.Disk, rounds: int) -> tuple[float, str]:
    """Another user reads ``disk`` read-only in a loop; stopped at random moments, it must never
    hold up our writes. The longest write while it was stopped, and what went wrong."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with shmdisk.connect(disk.name, read_only=True, create=False) as d:
                buf = bytearray(64 * 1024)
                d.read(0, buf)
                os.write(wfd, b"r")
                while True:
                    d.read(0, buf)
        finally:
            os._exit(1)
    os.close(wfd)
    longest, problem = 0.0, ""
    try:
        if os.read(rfd, 1) != b"r":
            return 0.0, "the other user's reader did not start"
        data = os.urandom(64 * 1024)
        for _ in range(rounds):
            time.sleep(0.0005 + (os.urandom(1)[0] / 255) * 0.002)  # anywhere in a read
            os.kill(pid, signal.SIGSTOP)
            t = time.monotonic()
            try:
                disk.write(0, data, timeout=1.0)
            except shmdisk.LockTimeoutError:
                problem = "a write timed out while another user's read-only reader was stopped"
            longest = max(longest, time.monotonic() - t)
            os.kill(pid, signal.SIGCONT)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(rfd)
    return longest, problem


def run_permissions(opt: Options) -> Result:
    """Other users and a disk's mode and owner: refused, read-only, or trusted when named."""
    r = Result("permissions")
    t0 = time.monotonic()
    if os.geteuid() != 0:
        r.skipped = "needs root to drop to another uid"
        return r
    private, shared, theirs = (
        unique_name("perm600"),
        unique_name("perm644"),
        unique_name("permnobody"),
    )
    d1 = shmdisk.create(private, 64)
    d2 = shmdisk.create(shared, 128, mode=0o644)
    try:
        payload = bytes(range(256)) * 2
        d1.write(0, payload)
        d2.write(0, payload)
        modes = {
            "default": os.stat(shmdisk.segment_path(private)).st_mode & 0o777,
            "0644": os.stat(shmdisk.segment_path(shared)).st_mode & 0o777,
        }
        if modes["default"] != 0o600:
            r.fail(f"default mode is {modes['default']:o}, not 600")
        if modes["0644"] != 0o644:
            r.fail(f"mode=0o644 gave {modes['0644']:o}")

        def nobody() -> list[tuple[str, str]]:
            def make_theirs() -> None:
                with shmdisk.create(theirs, 64, mode=0o644) as d:
                    d.write(0, payload)

            return [
                ("connect 0600", _outcome(lambda: shmdisk.connect(private))),
                (
                    "connect 0600 create=False",
                    _outcome(lambda: shmdisk.connect(private, create=False)),
                ),
                (
                    "connect 0600 read_only",
                    _outcome(lambda: shmdisk.connect(private, read_only=True, create=False)),
                ),
                ("inspect 0600", _outcome(lambda: shmdisk.inspect(private))),
                ("destroy 0600", _outcome(lambda: shmdisk.destroy(private))),
                ("create over 0600", _outcome(lambda: shmdisk.create(private, 8))),
                ("connect 0644 rw", _outcome(lambda: shmdisk.connect(shared, create=False))),
                ("read 0644 read_only", _outcome(lambda: _read(shared))),
                ("write via read_only 0644", _outcome(lambda: _write(shared, True))),
                (
                    "hold_writes via read_only 0644",
                    _outcome(lambda: _hold_writes_read_only(shared)),
                ),
                ("destroy 0644", _outcome(lambda: shmdisk.destroy(shared))),
                ("create own 0644", _outcome(make_theirs)),
            ]

        got = {f"uid {NOBODY}: {k}": v for k, v in _as_user(NOBODY, nobody)}

        def third() -> list[tuple[str, str]]:
            return [
                ("connect read_only", _outcome(lambda: _read(theirs))),
                ("connect read_only owner=65534", _outcome(lambda: _read(theirs, NOBODY))),
                ("connect rw owner=65534", _outcome(lambda: _write(theirs, False, NOBODY))),
            ]

        if got.get(f"uid {NOBODY}: create own 0644") == "ok":
            got |= {f"uid {THIRD} on {NOBODY}'s disk: {k}": v for k, v in _as_user(THIRD, third)}
            got["root on 65534's disk: connect"] = _outcome(
                lambda: shmdisk.connect(theirs, create=False)
            )
            got["root on 65534's disk: connect read_only"] = _outcome(lambda: _read(theirs))
            got["root on 65534's disk: connect owner=65534"] = _outcome(
                lambda: _read(theirs, NOBODY)
            )
            got["root on 65534's disk: write owner='nobody'"] = _outcome(
                lambda: _write(theirs, False, "nobody")  # type: ignore[arg-type]
            )
            got["root on 65534's disk: destroy"] = _outcome(lambda: shmdisk.destroy(theirs))
            got["root on 65534's disk: gone after destroy"] = (
                "ok" if not os.path.exists(shmdisk.segment_path(theirs)) else "still there"
            )
        read_back = "ok:" + payload.hex()[:16]
        expected = {
            f"uid {NOBODY}: connect 0600": "PermissionDeniedError",
            f"uid {NOBODY}: connect 0600 create=False": "PermissionDeniedError",
            f"uid {NOBODY}: connect 0600 read_only": "PermissionDeniedError",
            f"uid {NOBODY}: inspect 0600": "ok|PermissionDeniedError",
            f"uid {NOBODY}: destroy 0600": "PermissionDeniedError",
            f"uid {NOBODY}: create over 0600": "DiskExistsError|PermissionDeniedError",
            f"uid {NOBODY}: connect 0644 rw": "PermissionDeniedError",
            f"uid {NOBODY}: read 0644 read_only": read_back,
            f"uid {NOBODY}: write via read_only 0644": "IsReadOnlyError",
            f"uid {NOBODY}: hold_writes via read_only 0644": "IsReadOnlyError",
            f"uid {NOBODY}: destroy 0644": "PermissionDeniedError",
            f"uid {NOBODY}: create own 0644": "ok",
            f"uid {THIRD} on {NOBODY}'s disk: connect read_only": "UntrustedOwnerError",
            f"uid {THIRD} on {NOBODY}'s disk: connect read_only owner=65534": read_back,
            f"uid {THIRD} on {NOBODY}'s disk: connect rw owner=65534": "PermissionDeniedError",
            "root on 65534's disk: connect": "UntrustedOwnerError",
            "root on 65534's disk: connect read_only": "UntrustedOwnerError",
            "root on 65534's disk: connect owner=65534": read_back,
            "root on 65534's disk: write owner='nobody'": "ok",
            "root on 65534's disk: destroy": "ok",
            "root on 65534's disk: gone after destroy": "ok",
        }
        for call, want in expected.items():
            if got.get(call) not in want.split("|"):
                r.fail(f"{call} gave {got.get(call)!r}, expected {want}")
        for call, outcome in got.items():
            if call.endswith("child"):
                r.fail(f"{call}: {outcome}")
        # Nothing the other users did may have changed or removed our disks.
        for d in (d1, d2):
            buf = bytearray(512)
            d.read(0, buf)
            if buf != payload:
                r.fail(f"disk {d.name} changed under another user's calls")
        longest, problem = _stopped_reader_vs_owner(d2, 200)
        if problem:
            r.fail(problem)
        r.figures = {
            "default_mode": f"{modes['default']:o}",
            "calls_as_other_users": len(expected),
            "as_expected": sum(1 for c, w in expected.items() if got.get(c) in w.split("|")),
            "owner_writes_while_another_users_reader_was_stopped": 200,
            "owner_longest_write_then_ms": round(longest * 1e3, 2),
            "outcomes": got,
        }
    finally:
        d1.disconnect()
        d2.disconnect()
        shmdisk.destroy(private)
        shmdisk.destroy(shared)
        if os.path.exists(shmdisk.segment_path(theirs)):
            shmdisk.destroy(theirs)
    r.seconds = time.monotonic() - t0
    return r
