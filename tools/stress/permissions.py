"""permissions: another user (uid 65534) against root's disks of every usual mode, and root
against a disk of that user.

1. **Modes.** root makes disks of mode 0600, 0640, 0640 with group 65534, 0644 and 0666; the
   other user tries connect (read-write, read-only, creating), read, write through either
   handle, destroy and inspect on each. It gets exactly what the mode grants (reading needs
   the read bit, writing the write bit) and never the right to destroy another user's disk,
   whatever the mode; afterwards every disk holds what it should.
2. **Owner trust.** The other user makes a valid disk at a name root then connects to: root
   refuses it (``UntrustedOwnerError``) unless it names that user (``owner=``).
3. **Readers never stall the owner.** The other user reads root's 0644 disk in a loop through
   a read-only handle (which takes no lock: taking a mutex writes to it) and is stopped with
   SIGSTOP again and again, mid-read; root's writes to the very pages it reads never wait
   (each has a 1 s timeout), and none of its reads is torn.
4. **The limit.** On the 0666 disk the other user may write, and so may hold the page locks:
   stopped while holding them, it stalls root's writes (``LockTimeoutError`` after the
   timeout) until it dies, when root goes on at once. Write access is trust (RELIABILITY.md,
   Threat model).

Needs root, to drop to uid 65534 in forked children (fork after import: the child needs to
read nothing of the checkout).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import shmdisk

from ._common import Options, Result, unique_name

NOBODY = 65534
PD = "PermissionDeniedError"
SECTOR = 512

# label: (mode, group of the segment file or None for root's)
MODES: dict[str, tuple[int, int | None]] = {
    "0600": (0o600, None),
    "0640": (0o640, None),
    "0640 group 65534": (0o640, NOBODY),
    "0644": (0o644, None),
    "0666": (0o666, None),
}


def _payload(label: str) -> bytes:
    return f"disk {label} of root".encode().ljust(SECTOR, b".")


def _expected(label: str) -> dict[str, str]:
    """What uid 65534 (no supplementary groups) gets for each call on root's disk ``label``."""
    mode, group = MODES[label]
    bits = mode & 0o007 if group is None else (mode & 0o070) >> 3
    readable, writable = bool(bits & 4), bool(bits & 2)
    read = "ok:" + _payload(label).hex()[:16] if readable else PD
    return {
        "connect": "ok" if readable and writable else PD,
        "connect create=True": "ok" if readable and writable else PD,
        "connect read_only": "ok" if readable else PD,
        "read": read,
        "write through read_only": "IsReadOnlyError" if readable else PD,
        "write": "ok" if readable and writable else PD,
        "destroy": PD,  # never, whatever the mode: only the owner or root
        "inspect": "ok" if readable else "unreadable",
    }


def _outcome(fn: Callable[[], object]) -> str:
    try:
        v = fn()
    except shmdisk.ShmdiskError as e:
        return type(e).__name__
    except Exception as e:
        return f"untyped {e!r}"
    if isinstance(v, shmdisk.Disk):
        v.disconnect()
        return "ok"
    if isinstance(v, (bytes, bytearray)):
        return "ok:" + bytes(v).hex()[:16]
    if isinstance(v, shmdisk.SegmentInfo):
        return v.state
    return "ok"


# ---------------------------------------------------------------- children as uid 65534


def _fork_as_nobody(fn: Callable[[int], Any]) -> tuple[int, int]:
    """Start ``fn(ready_fd)`` in a forked child as uid/gid 65534; (pid, fd of its result)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            doc = {"result": fn(wfd)}
        except BaseException:
            doc = {"error": traceback.format_exc()}
            code = 1
        try:
            data = json.dumps(doc).encode()
            while data:
                data = data[os.write(wfd, data) :]
        finally:
            os._exit(code)
    os.close(wfd)
    return pid, rfd


def _wait_ready(rfd: int, timeout: float) -> bool:
    """The child writes one byte b"R" when it is ready (and JSON only at the end)."""
    if not select.select([rfd], [], [], timeout)[0]:
        return False
    return os.read(rfd, 1) == b"R"


def _collect(pid: int, rfd: int, timeout: float) -> Any:
    """The child's result; raises RuntimeError if it failed, hung or died of a signal."""
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise RuntimeError(f"the child as uid {NOBODY} hung")
            b = os.read(rfd, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        raise RuntimeError(f"the child as uid {NOBODY} died of {signal.Signals(-code).name}")
    doc = json.loads(b"".join(chunks) or b"{}")
    if "error" in doc or code:
        raise RuntimeError(f"the child as uid {NOBODY} failed: {doc.get('error', code)}")
    return doc["result"]


def _as_nobody(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    pid, rfd = _fork_as_nobody(lambda _ready: fn())
    return _collect(pid, rfd, timeout)


# ---------------------------------------------------------------- 1. modes


def _calls_on(name: str) -> dict[str, Callable[[], object]]:
    """What the other user tries on root's disk ``name``."""

    def read() -> bytes:
        with shmdisk.connect(name, read_only=True, create=False) as d:
            buf = bytearray(SECTOR)
            d.read(0, buf)
            return bytes(buf)

    def write_ro() -> None:
        with shmdisk.connect(name, read_only=True, create=False) as d:
            d.write(1, b"r" * SECTOR)

    def write() -> None:
        with shmdisk.connect(name, create=False) as d:
            d.write(1, b"w" * SECTOR)  # sector 1: the payload in sector 0 stays

    return {
        "connect": lambda: shmdisk.connect(name, create=False),
        "connect create=True": lambda: shmdisk.connect(name),
        "connect read_only": lambda: shmdisk.connect(name, read_only=True, create=False),
        "read": read,
        "write through read_only": write_ro,
        "write": write,
        "destroy": lambda: shmdisk.destroy(name),
        "inspect": lambda: shmdisk.inspect(name),
    }


def _check_modes(r: Result, disks: dict[str, shmdisk.Disk]) -> dict[str, dict[str, str]]:
    got: dict[str, dict[str, str]] = _as_nobody(
        lambda: {
            label: {call: _outcome(fn) for call, fn in _calls_on(d.name).items()}
            for label, d in disks.items()
        }
    )
    for label, d in disks.items():
        want = _expected(label)
        for call, expected in want.items():
            if got[label].get(call) != expected:
                r.fail(
                    f"as uid {NOBODY} on a {label} disk: {call} gave "
                    f"{got[label].get(call)!r}, expected {expected!r}"
                )
        # Whatever the other user did, the disk is there and holds what the mode allowed.
        if shmdisk.inspect(d.name).state != "ok":
            r.fail(f"the {label} disk is {shmdisk.inspect(d.name).state} after uid {NOBODY}")
        buf = bytearray(2 * SECTOR)
        d.read(0, buf)
        second = b"w" * SECTOR if want["write"] == "ok" else bytes(SECTOR)
        if buf != _payload(label) + second:
            r.fail(f"the {label} disk holds other bytes than its mode allowed uid {NOBODY}")
    return got


# ---------------------------------------------------------------- 2. owner trust


def _check_owner_trust(r: Result) -> dict[str, str]:
    name = unique_name("perm-theirs")
    theirs = b"made by uid 65534".ljust(SECTOR, b".")

    def make() -> int:
        with shmdisk.create(name, 64, mode=0o666) as d:
            d.write(0, theirs)
        return 0

    _as_nobody(make)
    try:

        def read(owner: str | None) -> bytes:
            with shmdisk.connect(name, read_only=True, create=False, owner=owner) as d:
                buf = bytearray(SECTOR)
                d.read(0, buf)
                return bytes(buf)

        got = {
            "root connect": _outcome(lambda: shmdisk.connect(name)),
            "root connect read_only": _outcome(lambda: shmdisk.connect(name, read_only=True)),
            "root create": _outcome(lambda: shmdisk.create(name, 8)),
            "root read, owner named": _outcome(lambda: read("nobody")),
        }
    finally:
        shmdisk.destroy(name)
    want = {
        "root connect": "UntrustedOwnerError",
        "root connect read_only": "UntrustedOwnerError",
        "root create": "DiskExistsError",
        "root read, owner named": "ok:" + theirs.hex()[:16],
    }
    for call, expected in want.items():
        if got[call] != expected:
            r.fail(f"on a disk of uid {NOBODY}: {call} gave {got[call]!r}, expected {expected}")
    return got


# ---------------------------------------------------------------- 3. readers never stall


def _read_loop(name: str, until: float, ready: int) -> dict[str, int]:
    """The other user's reader: whole 16 KiB reads, each of one byte value (or torn)."""
    reads = torn = 0
    with shmdisk.connect(name, read_only=True, create=False) as d:
        buf = bytearray(16384)
        os.write(ready, b"R")
        while time.monotonic() < until:
            d.read(0, buf)
            reads += 1
            if buf.count(buf[0]) != len(buf):
                torn += 1
    return {"reads": reads, "torn": torn}


def _check_reader_never_stalls(r: Result, d: shmdisk.Disk, seconds: float) -> dict[str, Any]:
    d.write(0, b"\xff" * 16384)  # one value from the start: anything mixed is a torn read
    until = time.monotonic() + seconds
    pid, rfd = _fork_as_nobody(lambda ready: _read_loop(d.name, until, ready))
    counts = {"stopped": 0, "running": 0, "timeouts": 0}
    longest = 0.0
    value = 0

    def writes(state: str) -> None:
        nonlocal value, longest
        for _ in range(20):
            value = value % 250 + 1
            t0 = time.monotonic()
            try:
                d.write(0, bytes([value]) * 16384, timeout=1.0)
            except shmdisk.LockTimeoutError:
                counts["timeouts"] += 1
            longest = max(longest, time.monotonic() - t0)
            counts[state] += 1

    try:
        if not _wait_ready(rfd, 30):
            r.fail(f"the reader as uid {NOBODY} did not start")
        while time.monotonic() < until:
            os.kill(pid, signal.SIGSTOP)  # wherever it is: maybe mid-read
            writes("stopped")
            os.kill(pid, signal.SIGCONT)
            writes("running")  # racing its reads: none may come out torn
    finally:
        os.kill(pid, signal.SIGCONT)
    got = _collect(pid, rfd, 30)
    if counts["timeouts"]:
        r.fail(f"{counts['timeouts']} of root's writes waited 1 s for a read-only reader")
    if got["torn"]:
        r.fail(f"{got['torn']} of {got['reads']} reads by uid {NOBODY} were torn")
    if not counts["stopped"] or not got["reads"]:
        r.fail("the reader-stall check did no work")
    return {
        "writes_while_reader_stopped": counts["stopped"],
        "writes_while_reader_runs": counts["running"],
        "longest_write_ms": round(longest * 1000, 2),
        "reads_by_other_uid": got["reads"],
        "torn_reads": got["torn"],
    }


# ---------------------------------------------------------------- 4. write access is trust


def _hold_and_stop(name: str, ready: int) -> int:
    with shmdisk.connect(name, create=False) as d, d.hold_writes():
        os.write(ready, b"R")
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(60)  # killed before this ends
    return 0


def _check_writer_can_stall(r: Result, d: shmdisk.Disk) -> dict[str, Any]:
    pid, rfd = _fork_as_nobody(lambda ready: _hold_and_stop(d.name, ready))
    stalled = "not tried"
    try:
        if not _wait_ready(rfd, 30):
            r.fail(f"the holder as uid {NOBODY} did not start")
        stalled = _outcome(lambda: d.write(0, b"s" * SECTOR, timeout=0.3))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(rfd)
    t0 = time.monotonic()
    after = _outcome(lambda: d.write(0, _payload("0666"), timeout=5.0))
    took = time.monotonic() - t0
    if stalled != "LockTimeoutError":
        r.fail(f"a stopped holder with write access gave root's write {stalled!r}")
    if after != "ok" or took > 1.0:
        r.fail(f"after the holder died root's write gave {after!r} in {took:.2f} s")
    return {"0666_write_while_other_uid_holds": stalled, "0666_write_after_it_died": after}


# ---------------------------------------------------------------- the scenario


def run_permissions(opt: Options) -> Result:
    """Root's disks of each mode against uid 65534; owner trust; readers never stall."""
    r = Result("permissions")
    t0 = time.monotonic()
    if os.geteuid() != 0:
        r.skipped = "needs root to drop to another uid"
        return r
    disks: dict[str, shmdisk.Disk] = {}
    try:
        for label, (mode, group) in MODES.items():
            # The 0600 disk is made with the default mode: it must be that.
            name = unique_name("perm")
            d = shmdisk.create(name, 64) if label == "0600" else shmdisk.create(name, 64, mode=mode)
            disks[label] = d
            if group is not None:
                os.chown(shmdisk.segment_path(d.name), -1, group)
            d.write(0, _payload(label))
            got_mode = shmdisk.inspect(d.name).mode
            if got_mode != mode:
                r.fail(f"mode={mode:#o} gave a {got_mode:#o} segment")
        outcomes = _check_modes(r, disks)
        trust = _check_owner_trust(r)
        stall = _check_reader_never_stalls(r, disks["0644"], max(0.2, opt.duration))
        limit = _check_writer_can_stall(r, disks["0666"])
        calls = sum(len(v) for v in outcomes.values())
        refused = sum(1 for v in outcomes.values() for o in v.values() if not o.startswith("ok"))
        r.figures = {
            "calls_as_other_uid": calls,
            "refused_as_the_mode_says": refused,
            "default_mode": f"{shmdisk.inspect(disks['0600'].name).mode:o}",
            **stall,
            **limit,
            "outcomes": outcomes,
            "owner_trust": trust,
        }
    except (RuntimeError, shmdisk.ShmdiskError) as e:  # a child failed, or a disk broke
        r.fail(f"{type(e).__name__}: {e}")
    finally:
        for d in disks.values():
            d.disconnect()
            shmdisk.destroy(d.name)
    r.seconds = time.monotonic() - t0
    return r
