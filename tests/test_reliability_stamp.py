"""The sector-stamp checker of the reliability suite: it must see tearing, and only tearing."""

from __future__ import annotations

import numpy as np
import pytest
import stamp  # tools/stamp.py, on pytest's pythonpath (pyproject.toml)

SS = 512


def _disk(*requests: tuple[int, int, int, int]) -> np.ndarray:
    """A 64-sector image with the given (writer, seq, start, count) requests applied in order."""
    img = np.zeros(64 * SS, dtype=np.uint8)
    for w, s, start, count in requests:
        img[start * SS : (start + count) * SS] = stamp.make_request(w, s, start, count, SS)
    return img


def test_overlapping_whole_writes_are_consistent() -> None:
    """Later whole writes covering parts of earlier ones read as consistent."""
    img = _disk((1, 1, 0, 10), (2, 1, 5, 10), (3, 4, 2, 2))
    v = stamp.check_read(img[: 20 * SS], 0, SS)
    assert v.ok, (v.torn, v.corrupt)
    assert [k[:2] for k in v.keys] == [(1, 1), (2, 1), (3, 4)]


def test_two_requests_each_over_the_other_is_torn() -> None:
    """A sector of A inside B's part while B shows inside A's range is an impossible order."""
    img = _disk((1, 1, 0, 10), (2, 1, 5, 10))
    img[7 * SS : 8 * SS] = stamp.make_request(1, 1, 0, 10, SS)[7 * SS : 8 * SS]
    v = stamp.check_read(img[: 20 * SS], 0, SS)
    assert v.torn and not v.corrupt


def test_zeros_inside_a_visible_request_are_torn_unless_allowed() -> None:
    """A never-written sector inside a request is torn, unless the run allows zeros."""
    img = _disk((1, 1, 0, 10))
    img[3 * SS : 4 * SS] = 0
    assert stamp.check_read(img[: 10 * SS], 0, SS).torn
    assert stamp.check_read(img[: 10 * SS], 0, SS, zeros_may_follow=True).ok


def test_one_writer_seen_out_of_order_is_torn() -> None:
    """A writer's older request showing inside its newer one's range is torn."""
    img = _disk((1, 1, 0, 10), (1, 2, 2, 4))
    img[3 * SS : 4 * SS] = stamp.make_request(1, 1, 0, 10, SS)[3 * SS : 4 * SS]
    assert stamp.check_read(img[: 10 * SS], 0, SS).torn


@pytest.mark.parametrize("where", [0, 17, 39, 100, 511])
def test_any_flipped_byte_is_corrupt(where: int) -> None:
    """A single flipped bit anywhere in a sector (header or fill) is caught."""
    img = _disk((1, 1, 0, 4))
    img[2 * SS + where] ^= 0x10
    v = stamp.check_read(img[: 4 * SS], 0, SS)
    assert v.corrupt and v.labels[2] == -2


def test_sector_in_the_wrong_place_is_corrupt() -> None:
    """A whole, valid sector copied to another position is caught by its sector number."""
    img = _disk((1, 1, 0, 4))
    img[3 * SS : 4 * SS] = img[1 * SS : 2 * SS]
    assert stamp.check_read(img[: 4 * SS], 0, SS).corrupt


def test_partial_views_and_count_of() -> None:
    """A read that starts inside a request is judged alone; count_of counts intact sectors."""
    img = _disk((5, 9, 4, 8))
    assert stamp.check_read(img[6 * SS : 9 * SS], 6, SS).ok
    assert stamp.count_of(img[4 * SS : 12 * SS], SS, (5, 9, 4, 8)) == 8
    img[5 * SS] ^= 1
    assert stamp.count_of(img[4 * SS : 12 * SS], SS, (5, 9, 4, 8)) == 7


def test_writer_zero_is_reserved() -> None:
    """Writer 0 would be indistinguishable from never-written sectors, so it is refused."""
    with pytest.raises(ValueError):
        stamp.make_request(0, 1, 0, 1, SS)
