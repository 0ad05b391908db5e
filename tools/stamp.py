"""Self-describing sector stamps, and the checks that find torn or corrupt reads.

Every sector a stress writer puts on a disk describes the request it belongs to::

    offset  size  field
    0       4     magic  b"STMP"
    4       4     writer   (who wrote it; 0 is never used, so all-zero sectors stand out)
    8       8     seq      (the writer's request counter, strictly increasing)
    16      8     sector   (where this sector was meant to land)
    24      8     start    (first sector of the request)
    32      4     count    (sectors in the request)
    36      4     csum     (crc32 of writer, seq, start, count)
    40      ...   fill     (8-byte words derived from csum and sector)

So one read can be judged on its own, without a log of what was written: each sector must be
intact (magic, position, checksum, fill) and the requests it shows must be consistent with *some*
order in which whole writes happened. If request A shows in a sector that request B also covered
and B shows elsewhere in A's range, A and B were each written over the other: a torn read. The
same holds for a never-written (zero) sector inside a visible request, and for two requests of one
writer seen in the wrong order. Those facts form a graph; a cycle in it is a torn read.

Sector sizes from 48 bytes up, in multiples of 8, are supported; shmdisk's are 512..65536.
"""

from __future__ import annotations

import functools
import itertools
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = 0x504D5453  # b"STMP" read as little-endian u32
HEADER_BYTES = 40
_FILL_KEY = np.uint64(0x9E3779B97F4A7C15)
_KEY = struct.Struct("<IQQI")


@functools.cache
def sector_dtype(sector_size: int) -> np.dtype:
    """The structured dtype of one stamped sector of ``sector_size`` bytes."""
    if sector_size < HEADER_BYTES + 8 or sector_size % 8:
        raise ValueError(f"sector size {sector_size} cannot hold a stamp")
    return np.dtype(
        [
            ("magic", "<u4"),
            ("writer", "<u4"),
            ("seq", "<u8"),
            ("sector", "<u8"),
            ("start", "<u8"),
            ("count", "<u4"),
            ("csum", "<u4"),
            ("fill", "<u8", ((sector_size - HEADER_BYTES) // 8,)),
        ]
    )


def request_checksum(writer: int, seq: int, start: int, count: int) -> int:
    """The checksum every sector of one request carries."""
    return zlib.crc32(_KEY.pack(writer, seq, start, count))


def _fill(csum: np.ndarray, sectors: np.ndarray) -> np.ndarray:
    return ((csum.astype(np.uint64) << np.uint64(32)) | (sectors & np.uint64(0xFFFFFFFF))) ^ (
        _FILL_KEY
    )


def make_request(writer: int, seq: int, start: int, count: int, sector_size: int) -> np.ndarray:
    """A ``uint8`` array of ``count`` stamped sectors for the request (writer, seq, start)."""
    if writer <= 0:
        raise ValueError("writer 0 is reserved for never-written sectors")
    arr = np.empty(count, dtype=sector_dtype(sector_size))
    csum = request_checksum(writer, seq, start, count)
    sectors = np.arange(start, start + count, dtype=np.uint64)
    arr["magic"] = MAGIC
    arr["writer"] = writer
    arr["seq"] = seq
    arr["sector"] = sectors
    arr["start"] = start
    arr["count"] = count
    arr["csum"] = csum
    arr["fill"] = _fill(np.full(count, csum, dtype=np.uint64), sectors)[:, None]
    return arr.view(np.uint8)


RequestKey = tuple[int, int, int, int]  # (writer, seq, start, count)


@dataclass
class Verdict:
    """What one read showed: the requests seen, and anything wrong with them."""

    keys: list[RequestKey] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    corrupt: list[str] = field(default_factory=list)  # sectors that are not a valid stamp
    torn: list[str] = field(default_factory=list)  # requests seen in an impossible order

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.torn


def parse(
    buf: bytes | bytearray | memoryview | np.ndarray, first: int, sector_size: int
) -> Verdict:
    """Check each sector of ``buf`` (read from sector ``first``) on its own.

    ``labels[i]`` is the index in ``keys`` of the request sector ``i`` belongs to, or -1 for a
    sector that is all zeros (never written). Damaged sectors are reported in ``corrupt`` and
    labelled -2.
    """
    raw = np.frombuffer(buf, dtype=np.uint8)
    n = raw.size // sector_size
    arr = raw[: n * sector_size].view(sector_dtype(sector_size))
    verdict = Verdict(labels=np.full(n, -2, dtype=np.int64))
    if n == 0:
        return verdict
    words = raw[: n * sector_size].view("<u8").reshape(n, sector_size // 8)
    zero = ~words.any(axis=1)
    verdict.labels[zero] = -1
    stamped = arr["magic"] == MAGIC
    for i in np.flatnonzero(~zero & ~stamped)[:4]:
        verdict.corrupt.append(f"sector {first + int(i)}: neither zero nor a stamp")
    idx = np.flatnonzero(stamped)
    if idx.size == 0:
        return verdict
    where = np.arange(first, first + n, dtype=np.uint64)[idx]
    sub = arr[idx]
    # writer < 2**24 and seq < 2**40 in every run, so one u64 names a request; start and count
    # are taken from the first sector seen and the checksum catches any sector that disagrees.
    ident = (sub["writer"].astype(np.uint64) << np.uint64(40)) | sub["seq"]
    uniq, first_at, inverse = np.unique(ident, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    csums = np.empty(len(uniq), dtype=np.uint64)
    for k, i in enumerate(first_at.tolist()):
        rec = sub[i]
        key = (int(rec["writer"]), int(rec["seq"]), int(rec["start"]), int(rec["count"]))
        verdict.keys.append(key)
        csums[k] = request_checksum(*key)
    good = sub["sector"] == where
    good &= (sub["start"] <= where) & (where < sub["start"] + sub["count"].astype(np.uint64))
    good &= sub["csum"].astype(np.uint64) == csums[inverse]
    good &= (sub["fill"] == _fill(csums[inverse], where)[:, None]).all(axis=1)
    verdict.labels[idx[good]] = inverse[good]
    for i in idx[~good][:4]:
        verdict.corrupt.append(f"sector {first + int(i)}: stamp fails its own checks")
    return verdict


def check_read(
    buf: bytes | bytearray | memoryview | np.ndarray,
    first: int,
    sector_size: int,
    *,
    zeros_may_follow: bool = False,
) -> Verdict:
    """Judge one whole read: every sector intact, every request seen consistent (not torn).

    ``zeros_may_follow`` allows zeros inside a visible request, for runs where discard, shrink
    or a killed writer may legitimately leave them; then only the order between stamped
    requests is checked.
    """
    verdict = parse(buf, first, sector_size)
    if verdict.corrupt:
        return verdict
    labels = verdict.labels
    n = labels.size
    keys = verdict.keys
    # after[a] = requests that must have been written after request a.
    after: dict[int, set[int]] = {k: set() for k in range(-1, len(keys))}
    for a, (_, _, start, count) in enumerate(keys):
        lo = max(start - first, 0)
        hi = min(start + count - first, n)
        seen = set(np.unique(labels[lo:hi]).tolist())
        seen.discard(a)
        if -1 in seen and not zeros_may_follow:
            verdict.torn.append(f"request {keys[a]} seen with zeros inside its range")
        seen.discard(-1)
        after[a] |= seen
    # One writer's requests happen in seq order.
    by_writer: dict[int, list[tuple[int, int]]] = {}
    for a, (writer, seq, _, _) in enumerate(keys):
        by_writer.setdefault(writer, []).append((seq, a))
    for reqs in by_writer.values():
        reqs.sort()
        for (_, a), (_, b) in itertools.pairwise(reqs):
            after[a].add(b)
    cycle = _find_cycle(after)
    if cycle:
        verdict.torn.append(
            "requests seen in an impossible order: " + " -> ".join(str(keys[c]) for c in cycle)
        )
    return verdict


def _find_cycle(after: dict[int, set[int]]) -> list[int]:
    """A cycle in the 'written after' graph, or [] if there is none (iterative DFS)."""
    state = dict.fromkeys(after, 0)  # 0 new, 1 on the stack, 2 done
    for root in after:
        if state[root]:
            continue
        stack: list[tuple[int, list[int]]] = [(root, sorted(after[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(after[nxt])))
    return []


def count_of(
    buf: bytes | bytearray | memoryview | np.ndarray, sector_size: int, key: RequestKey
) -> int:
    """How many sectors of ``buf`` carry an intact stamp of request ``key``."""
    start = key[2]
    verdict = parse(buf, start, sector_size)
    if key not in verdict.keys:
        return 0
    return int(np.count_nonzero(verdict.labels == verdict.keys.index(key)))
