"""hostile: hypothesis-driven calls with bad arguments against a model of the disk's bytes, and
forged segments (see forged.py); every refusal must be typed and change nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import shmdisk

from ._common import (
    Options,
    Result,
    unique_name,
)
from .forged import hostile_segments

_RESIZE_LIMIT = 1 << 40  # the default growth limit of a small disk (shmdisk's DEFAULT_MAX_BYTES)
HOSTILE_NAMES = [
    "",
    "/",
    ".",
    "..",
    "a/b",
    "../etc",
    "x" * 201,
    "a\x00b",
    "sp ace",
    "é",
    "a\nb",
    "shm/../x",
    None,
    5,
    1.5,
    b"bytes",
    ["list"],
]


def hostile_api(examples: int, seed: int) -> dict[str, Any]:
    """Hypothesis-driven bad calls against a disk and a model of its bytes.

    Every call is predicted: valid calls must succeed and match the model; invalid ones must
    raise a ShmdiskError and leave the device byte-for-byte unchanged.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    ss = 512
    size = 40  # not a whole number of pages: the last page is partial
    name = unique_name("hostile")
    disk = shmdisk.create(name, size)
    ro = shmdisk.connect(name, read_only=True, create=False)
    gone = shmdisk.connect(name, create=False)
    gone.disconnect()
    model = bytearray(os.urandom(size * ss))
    disk.write(0, model)
    fig = {"calls": 0, "rejected_typed": 0, "accepted": 0, "device_checks": 0}
    problems: list[str] = []

    def device() -> bytes:
        buf = bytearray(len(model))
        disk.read(0, buf)
        return bytes(buf)

    def note(msg: str) -> None:
        if len(problems) < 20:
            problems.append(msg)

    # Weighted towards calls that are nearly right: those reach deepest before a check fails.
    near = st.integers(0, size - 1)
    ints = st.one_of(
        near,
        near,
        near,
        st.integers(-3, size + 3),
        st.integers(0, size * ss),
        st.integers(-(2**70), 2**70),
        st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63), size * ss, 2**62 // ss]),
    )
    junk = st.sampled_from([None, "0", 1.0, 2.5, [0], object(), True, False, np.int64(3)])
    sectors = st.one_of(ints, ints, ints, junk)

    def as_bytes(n: int) -> st.SearchStrategy[Any]:
        return st.sampled_from(["bytes", "bytearray", "mv", "u2", "f8", "2d", "strided"]).map(
            lambda kind: _make_buffer(kind, n)
        )

    whole = st.integers(1, 4).map(lambda k: k * ss)
    lengths = st.one_of(whole, whole, whole, st.integers(0, 3 * ss), st.just(size * ss), st.just(0))
    single = lengths.flatmap(as_bytes)
    buffers = st.one_of(
        single,
        single,
        single,
        st.lists(single, max_size=3),
        st.sampled_from(["text", 7, None, [b"x" * ss, "no"], (bytearray(ss), 3)]),
    )

    # wait= and timeout= of read/write (and timeout= of hold_writes): a bad timeout is refused
    # before anything happens; on an idle disk a good one changes nothing.
    timeouts = st.sampled_from(
        [None, 0, 0.0, -0.0, 0.5, 10**9, float("inf"), -1, -1e-9, float("nan"), True, "1", [1]]
    )
    waits = st.sampled_from([{}, {"wait": True}, {"wait": False}])
    extras: st.SearchStrategy[dict[str, Any]] = st.one_of(
        st.just({}), waits, timeouts.map(lambda t: {"timeout": t})
    )

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hseed(seed)
    @given(
        handle=st.sampled_from(["rw", "rw", "rw", "ro", "gone"]),
        op=st.sampled_from(
            [
                "read",
                "write",
                "read_at",
                "write_at",
                "discard",
                "write_zeroes",
                "seek_mapped",
                "seek_unmapped",
                "extents",
                "resize",
                "hold_writes",
            ]
        ),
        a=sectors,
        b=sectors,
        bufs=buffers,
        kw=extras,
    )
    def one(handle: str, op: str, a: Any, b: Any, bufs: Any, kw: dict[str, Any]) -> None:
        d = {"rw": disk, "ro": ro, "gone": gone}[handle]
        fig["calls"] += 1
        if op not in ("read", "write", "read_at", "write_at", "hold_writes"):
            kw = {}
        elif op == "hold_writes":
            kw = {k: v for k, v in kw.items() if k == "timeout"}
        expect, apply = _predict(op, handle, a, b, bufs, ss, len(model) // ss)
        if expect != "error" and not _timeout_ok(kw.get("timeout")):
            expect = "error"
        if expect == "skip":
            return
        before = device()
        if before != bytes(model):
            note(f"device differs from the model before {op}")
            model[:] = before
        try:
            ret = _call(d, op, a, b, bufs, kw)
        except shmdisk.ShmdiskError as e:
            fig["rejected_typed"] += 1
            if expect == "ok":
                note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}, {kw}) rejected: {e!r}")
            fig["device_checks"] += 1
            if device() != bytes(model):
                note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) failed but changed the disk")
                model[:] = device()
            return
        except Exception as e:
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) raised untyped {e!r}")
            model[:] = device()
            return
        fig["accepted"] += 1
        if expect == "error":
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}, {kw}) succeeded, expected an error")
            model[:] = device()
            return
        problem = apply(model, ret, bufs)
        if problem:
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}): {problem}")
        if device() != bytes(model):
            note(f"{handle}.{op}({a!r}, {b!r}, {_desc(bufs)}) left the disk unlike the model")
            model[:] = device()

    try:
        one()
        # Names: every bad one is refused by every entry point with a typed error.
        for bad in HOSTILE_NAMES:
            entry_points: tuple[tuple[str, Callable[[Any], object]], ...] = (
                ("create", lambda n: shmdisk.create(n, 8)),
                ("connect", lambda n: shmdisk.connect(n)),
                ("connect(create=False)", lambda n: shmdisk.connect(n, create=False)),
                ("destroy", lambda n: shmdisk.destroy(n)),
                ("inspect", lambda n: shmdisk.inspect(n)),
                ("segment_path", lambda n: shmdisk.segment_path(n)),
            )
            for fn_name, fn in entry_points:
                fig["calls"] += 1
                try:
                    fn(bad)
                    note(f"{fn_name}({bad!r}) accepted a bad name")
                except shmdisk.ShmdiskError:
                    fig["rejected_typed"] += 1
                except Exception as e:
                    note(f"{fn_name}({bad!r}) raised untyped {e!r}")
    except Exception as e:  # hypothesis re-raises what it could not shrink away
        note(f"hostile API run stopped: {e!r}")
    finally:
        ro.disconnect()
        disk.disconnect()
        shmdisk.destroy(name)
    return {"figures": fig, "problems": problems}


def _make_buffer(kind: str, n: int) -> Any:
    raw = os.urandom(n)
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "mv":
        return memoryview(bytearray(raw))
    if kind == "u2":
        return np.frombuffer(bytearray(raw[: n - n % 2]), dtype="<u2").copy()
    if kind == "f8":
        return np.frombuffer(bytearray(raw[: n - n % 8]), dtype="<f8").copy()
    if kind == "2d":
        return (
            np.frombuffer(bytearray(raw[: n - n % 2]), dtype=np.uint8).reshape(-1, 2).copy()
            if (n >= 2)
            else bytearray(raw)
        )
    # strided: every other byte of a twice-as-long buffer; not C-contiguous
    return memoryview(bytearray(os.urandom(2 * n)))[::2]


def _nbytes(b: Any) -> int:
    return memoryview(b).nbytes


def _desc(bufs: Any) -> str:
    if isinstance(bufs, (list, tuple)):
        return "[" + ", ".join(_desc(b) for b in bufs) + "]"
    try:
        m = memoryview(bufs)
        return f"<{type(bufs).__name__} {m.nbytes} B{' ro' if m.readonly else ''}>"
    except TypeError:
        return repr(bufs)[:40]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _buf_ok(b: Any, writable: bool, ss: int | None) -> bool:
    """Is ``b`` a buffer the contract accepts (C-contiguous, whole sectors if ``ss``)?"""
    try:
        m = memoryview(b)
    except TypeError:
        return False
    if writable and m.readonly:
        return False
    if ss is not None and not m.c_contiguous:
        return False
    return ss is None or m.nbytes % ss == 0


def _predict(
    op: str, handle: str, a: Any, b: Any, bufs: Any, ss: int, size: int
) -> tuple[str, Callable[[bytearray, Any, Any], str | None]]:
    """('ok' | 'error', how the model changes on success) for one call."""

    def nothing(model: bytearray, ret: Any, bufs: Any) -> str | None:
        return None

    if handle == "gone":
        return "error", nothing
    items = list(bufs) if isinstance(bufs, (list, tuple)) else [bufs]
    writes = op in ("write", "write_at", "discard", "write_zeroes", "resize")
    if handle == "ro" and writes:
        return "error", nothing
    if op in ("read", "write"):
        if not _is_int(a) or not all(_buf_ok(x, op == "read", ss) for x in items):
            if (
                op == "write"
                and _is_int(a)
                and not isinstance(bufs, (list, tuple))
                and _buf_ok(bufs, False, None)
                and _nbytes(bufs) % ss == 0
                and 0 <= int(a) * ss <= size * ss - _nbytes(bufs)
            ):
                # Not C-contiguous but otherwise fine: refusing is allowed, and so is copying
                # it correctly (the core's fast path for 1-D byte memoryviews does).
                return "either", _apply_io(op, int(a) * ss, items)
            return "error", nothing
        total = sum(_nbytes(x) for x in items)
        off = int(a) * ss
        if off < 0 or off + total > size * ss:
            return "error", nothing
        return "ok", _apply_io(op, off, items)
    if op in ("read_at", "write_at"):
        if isinstance(bufs, (list, tuple)):
            return "error", nothing
        if not _is_int(a) or not _buf_ok(bufs, op == "read_at", None):
            return "error", nothing
        if not memoryview(bufs).c_contiguous:
            return "error", nothing
        off, total = int(a), _nbytes(bufs)
        if off < 0 or off + total > size * ss:
            return "error", nothing
        return "ok", _apply_io(op, off, items)
    if op in ("discard", "write_zeroes"):
        if not (_is_int(a) and _is_int(b)):
            return "error", nothing
        s, n = int(a), int(b)
        if s < 0 or n < 0 or s + n > size:
            return "error", nothing

        def zero(model: bytearray, ret: Any, bufs: Any) -> str | None:
            model[s * ss : (s + n) * ss] = bytes(n * ss)
            return None

        return "ok", zero
    if op in ("seek_mapped", "seek_unmapped"):
        if not _is_int(a) or int(a) < 0:
            return "error", nothing
        s = int(a)

        def seek(model: bytearray, ret: Any, bufs: Any) -> str | None:
            if s >= size:
                return None if ret == s else f"returned {ret}, expected {s} past the end"
            if not s <= ret <= size:
                return f"returned {ret} outside [{s}, {size}]"
            if op == "seek_mapped" and any(model[s * ss : ret * ss]):
                return f"skipped data: sectors [{s}, {ret}) are not all zero"
            if op == "seek_unmapped" and ret < size and any(model[ret * ss : (ret + 1) * ss]):
                return f"sector {ret} holds data, not 'certainly zero'"
            return None

        return "ok", seek
    if op == "extents":
        if not _is_int(a) or not (b is None or _is_int(b)):
            return "error", nothing
        lo = int(a)
        hi = size if b is None else int(b)
        if not 0 <= lo <= hi <= size:
            return "error", nothing

        def ext(model: bytearray, ret: Any, bufs: Any) -> str | None:
            s = lo
            for e in ret:
                if e.sector != s or e.n_sectors <= 0:
                    return f"extents not contiguous at {s}: {e}"
                if not e.mapped and any(model[e.sector * ss : (e.sector + e.n_sectors) * ss]):
                    return f"extent {e} called zero holds data"
                s += e.n_sectors
            return None if s == hi else f"extents end at {s}, not {hi}"

        return "ok", ext
    if op == "hold_writes":
        # Holds every writer off for an empty block: only a read-write handle can.
        return ("error" if handle == "ro" else "ok"), nothing
    if op == "resize":
        # The model keeps one size, so a valid resize is only tried to the current size; other
        # valid sizes are skipped (a resize to 2**31 sectors is legal, and reading that disk
        # back after every call is not). Negative, huge and non-int sizes must be refused.
        if not _is_int(a) or int(a) < 0 or int(a) > _RESIZE_LIMIT // ss:
            return "error", nothing
        return ("ok" if int(a) == size else "skip"), nothing
    raise AssertionError(op)


def _apply_io(op: str, off: int, items: list[Any]) -> Callable[[bytearray, Any, Any], str | None]:
    def apply(model: bytearray, ret: Any, bufs: Any) -> str | None:
        o = off
        for x in items:
            data = memoryview(x).tobytes()  # any shape, any strides: the bytes in C order
            n = len(data)
            if op.startswith("write"):
                model[o : o + n] = data
            elif data != bytes(model[o : o + n]):
                return f"read bytes [{o}, {o + n}) differ from the model"
            o += n
        return None

    return apply


def _timeout_ok(t: Any) -> bool:
    """Whether ``timeout=t`` is one the API takes: None or a number >= 0 (not a bool, not NaN)."""
    if t is None:
        return True
    return not isinstance(t, bool) and isinstance(t, (int, float)) and t >= 0


def _call(d: shmdisk.Disk, op: str, a: Any, b: Any, bufs: Any, kw: dict[str, Any]) -> Any:
    if op in ("read", "write", "read_at", "write_at"):
        return getattr(d, op)(a, bufs, **kw)
    if op == "hold_writes":
        with d.hold_writes(**kw):
            return None
    if op in ("discard", "write_zeroes"):
        return getattr(d, op)(a, b)
    if op in ("seek_mapped", "seek_unmapped", "resize"):
        return getattr(d, op)(a)
    if op == "extents":
        return d.extents(a, b)
    raise AssertionError(op)


def run_hostile(opt: Options) -> Result:
    """Bad arguments against a model, and forged segments in a child process."""
    r = Result("hostile")
    t0 = time.monotonic()
    seed = opt.rng(5).randrange(1 << 30)
    api = hostile_api(opt.examples, seed)
    opt.say(f"hostile       {time.monotonic() - t0:6.1f}s  API calls {api['figures']['calls']}")
    seg = hostile_segments(max(40, opt.examples // 4), seed)
    r.seconds = time.monotonic() - t0
    r.figures = {
        "api_calls": api["figures"]["calls"],
        "api_rejected_typed": api["figures"]["rejected_typed"],
        "api_accepted_and_matched_model": api["figures"]["accepted"],
        "api_unchanged_checks": api["figures"]["device_checks"],
        "forged_segments": seg["figures"]["segments"],
        "forged_entry_point_calls": seg["figures"]["entry_point_calls"],
        "forged_typed_errors": seg["figures"]["typed_errors"],
        "forged_disturbed_by_other_processes": seg["figures"]["disturbed_by_other_processes"],
        "crashes": seg["figures"]["crashes"],
        "hangs": seg["figures"]["hangs"],
        "seed": seed,
    }
    for prob in api["problems"] + seg["problems"]:
        r.fail(prob)
    return r
