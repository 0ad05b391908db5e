"""The page map's pure functions, against a simple model."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from shmdisk import _layout as L
from shmdisk import _pagemap

words_st = st.lists(st.integers(0, 2**32 - 1), max_size=64).map(
    lambda xs: np.array(xs, dtype=np.uint32)
)


@given(words_st)
def test_runs_partition_by_mapped_flag(words: np.ndarray) -> None:
    """runs() covers every index once, in order, each run uniformly (un)mapped and maximal."""
    runs = _pagemap.runs(words)
    flags = [int(w) >= L.MAPPED for w in words]
    pos = 0
    for i, (a, b, mapped) in enumerate(runs):
        assert a == pos and b > a
        assert all(f == mapped for f in flags[a:b])
        if i:
            assert runs[i - 1][2] != mapped
        pos = b
    assert pos == len(words)


@given(words_st, st.booleans())
def test_first_finds_first_match(words: np.ndarray, mapped: bool) -> None:
    """first() returns the first index whose flag matches, or -1."""
    expect = next((i for i, w in enumerate(words) if (int(w) >= L.MAPPED) == mapped), -1)
    assert _pagemap.first(words, mapped) == expect


@given(words_st)
def test_writer_protocol_words(words: np.ndarray) -> None:
    """writing() is odd and keeps the flags; done() is even, has the flags asked, and differs."""
    wr = _pagemap.writing(words)
    done = _pagemap.done(words, L.MAPPED)
    gone = _pagemap.done(words, L.ZEROED)
    for w, a, b, c in zip(words.tolist(), wr.tolist(), done.tolist(), gone.tolist(), strict=True):
        assert a & 1 and (a & L.FLAGS) == (w & L.FLAGS)
        assert b % 2 == 0 and b & L.FLAGS == L.MAPPED and (b & L.SEQ_MASK) != (w & L.SEQ_MASK)
        assert c % 2 == 0 and c & L.FLAGS == L.ZEROED and (c & L.SEQ_MASK) != (w & L.SEQ_MASK)
        assert L.word_writing(w) == a and L.word_done(w, L.MAPPED) == b
