"""A hypothesis state machine: the disk behaves like a plain bytearray with mirage's rules."""

from __future__ import annotations

import numpy as np
from _helpers import new_name
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmdisk

SS = 512
PAGE_SECTORS = 8


class DiskModel(RuleBasedStateMachine):
    """Two handles on one disk (one read-only) against a bytearray model."""

    def __init__(self) -> None:
        super().__init__()
        self.name = new_name("model")
        self.disk = shmdisk.create(self.name, 40, max_size_sectors=400)
        self.ro = shmdisk.connect(self.name, read_only=True, create=False)
        self.model = bytearray(40 * SS)
        self.seed = 0

    @property
    def size(self) -> int:
        return len(self.model) // SS

    def data(self, n: int) -> bytes:
        self.seed += 1
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, 256, n * SS, dtype=np.uint8).tobytes()

    @rule(s=st.integers(-3, 420), n=st.integers(0, 20), split=st.integers(0, 20))
    def write(self, s: int, n: int, split: int) -> None:
        data = self.data(n)
        k = min(split, n) * SS
        bufs = [data[:k], data[k:]]
        if s < 0 or s + n > self.size:
            try:
                self.disk.write(s, bufs)
            except shmdisk.OutOfRangeError:
                return
            raise AssertionError("out-of-range write accepted")
        self.disk.write(s, bufs)
        self.model[s * SS : (s + n) * SS] = data

    @rule(s=st.integers(-3, 420), n=st.integers(0, 30), reader=st.booleans())
    def read(self, s: int, n: int, reader: bool) -> None:
        handle = self.ro if reader else self.disk
        buf = bytearray(n * SS)
        if s < 0 or s + n > self.size:
            try:
                handle.read(s, buf)
            except shmdisk.OutOfRangeError:
                assert buf == bytes(n * SS)
                return
            raise AssertionError("out-of-range read accepted")
        handle.read(s, buf)
        assert buf == self.model[s * SS : (s + n) * SS]

    @rule(s=st.integers(0, 420), n=st.integers(0, 30))
    def discard(self, s: int, n: int) -> None:
        if s + n > self.size:
            try:
                self.disk.discard(s, n)
            except shmdisk.OutOfRangeError:
                return
            raise AssertionError("out-of-range discard accepted")
        self.disk.discard(s, n)
        self.model[s * SS : (s + n) * SS] = bytes(n * SS)

    @rule(n=st.integers(0, 400))
    def resize(self, n: int) -> None:
        self.disk.resize(n)
        if n < self.size:
            del self.model[n * SS :]
        else:
            self.model.extend(bytes((n - self.size) * SS))

    @rule()
    def read_only_refuses(self) -> None:
        try:
            self.ro.write(0, [])
        except shmdisk.IsReadOnlyError:
            return
        raise AssertionError("read-only handle wrote")

    @precondition(lambda self: self.size > 0)
    @rule(s=st.integers(0, 420))
    def seeks(self, s: int) -> None:
        size = self.size
        m = self.disk.seek_mapped(s)
        u = self.ro.seek_unmapped(s)
        if s >= size:
            assert m == s and u == s
            return
        assert s <= m <= size and s <= u <= size
        # Everything before the first mapped sector is zero ...
        assert not any(self.model[s * SS : m * SS])
        # ... and the sector seek_unmapped names is zero, up to the end of its page.
        if u < size:
            page_end = min(size, (u // PAGE_SECTORS + 1) * PAGE_SECTORS)
            assert not any(self.model[u * SS : page_end * SS])

    @invariant()
    def info_agrees(self) -> None:
        assert self.disk.get_info() == shmdisk.DiskInfo(True, SS, self.size)
        assert self.ro.get_info() == shmdisk.DiskInfo(False, SS, self.size)

    @invariant()
    def extents_cover_disk(self) -> None:
        ext = self.disk.extents()
        assert sum(e.n_sectors for e in ext) == self.size
        for e in ext:
            if not e.mapped:
                assert not any(self.model[e.sector * SS : (e.sector + e.n_sectors) * SS])

    def teardown(self) -> None:
        self.ro.disconnect()
        self.disk.disconnect()
        shmdisk.destroy(self.name)


DiskModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDiskModel = DiskModel.TestCase
