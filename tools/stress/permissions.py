"""permissions: a disk made with the default mode is refused to another uid; a 0644 disk lets
it read, never write or destroy. Needs root, to drop to uid 65534 in a forked child."""

from __future__ import annotations

import json
import os
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


def _as_other_user(fn: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534; its (call, outcome) list."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
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


def run_permissions(opt: Options) -> Result:
    """A 0600 disk refuses another uid; a 0644 disk lets it read, never write or destroy."""
    r = Result("permissions")
    t0 = time.monotonic()
    if os.geteuid() != 0:
        r.skipped = "needs root to drop to another uid"
        return r
    private, shared = unique_name("perm600"), unique_name("perm644")
    d1 = shmdisk.create(private, 64)
    d2 = shmdisk.create(shared, 64, mode=0o644)
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

        def other() -> list[tuple[str, str]]:
            def read_shared() -> bytes:
                with shmdisk.connect(shared, read_only=True, create=False) as d:
                    buf = bytearray(512)
                    d.read(0, buf)
                    return bytes(buf)

            def write_shared() -> None:
                with shmdisk.connect(shared, read_only=True, create=False) as d:
                    d.write(0, bytes(512))

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
                ("read 0644 read_only", _outcome(read_shared)),
                ("write via read_only 0644", _outcome(write_shared)),
                ("destroy 0644", _outcome(lambda: shmdisk.destroy(shared))),
            ]

        got = dict(_as_other_user(other))
        expected = {
            "connect 0600": "PermissionDeniedError",
            "connect 0600 create=False": "PermissionDeniedError",
            "connect 0600 read_only": "PermissionDeniedError",
            "inspect 0600": "ok|PermissionDeniedError",
            "destroy 0600": "PermissionDeniedError",
            "create over 0600": "DiskExistsError|PermissionDeniedError",
            "connect 0644 rw": "PermissionDeniedError",
            "read 0644 read_only": "ok:" + payload.hex()[:16],
            "write via read_only 0644": "IsReadOnlyError",
            "destroy 0644": "PermissionDeniedError",
        }
        for call, want in expected.items():
            if got.get(call) not in want.split("|"):
                r.fail(f"as uid {NOBODY}: {call} gave {got.get(call)!r}, expected {want}")
        if "child" in got:
            r.fail(f"child: {got['child']}")
        # Nothing the other user did may have changed or removed the disks.
        for d in (d1, d2):
            buf = bytearray(512)
            d.read(0, buf)
            if buf != payload:
                r.fail(f"disk {d.name} changed under another user's calls")
        r.figures = {
            "default_mode": f"{modes['default']:o}",
            "calls_as_other_uid": len(expected),
            "refused_as_expected": sum(
                1 for c, w in expected.items() if got.get(c) in w.split("|")
            ),
            "outcomes": got,
        }
    finally:
        d1.disconnect()
        d2.disconnect()
        shmdisk.destroy(private)
        shmdisk.destroy(shared)
    r.seconds = time.monotonic() - t0
    return r
