"""proxy/window.py: count and time windows, by example and against a brute-force recount."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import WindowSpec
from proxy.core.window import CountWindow, TimeWindow, WindowCounts, make_window

# -- CountWindow ---------------------------------------------------------------------------


def test_count_window_starts_empty() -> None:
    assert CountWindow(3).counts() == WindowCounts(calls=0, failures=0, slow=0)


def test_count_window_fills_then_slides() -> None:
    w = CountWindow(3)
    w.record(True, False, 0.0)
    w.record(False, True, 0.0)
    assert w.counts() == WindowCounts(calls=2, failures=1, slow=1)
    w.record(True, True, 0.0)
    assert w.counts() == WindowCounts(calls=3, failures=2, slow=2)
    # The fourth call pushes out the first (failed, not slow).
    w.record(False, False, 0.0)
    assert w.counts() == WindowCounts(calls=3, failures=1, slow=2)
    # ...the fifth the second (slow).
    w.record(False, False, 0.0)
    assert w.counts() == WindowCounts(calls=3, failures=1, slow=1)


def test_count_window_size_one() -> None:
    w = CountWindow(1)
    w.record(True, True, 0.0)
    assert w.counts() == WindowCounts(calls=1, failures=1, slow=1)
    w.record(False, False, 0.0)
    assert w.counts() == WindowCounts(calls=1, failures=0, slow=0)


def test_count_window_reset() -> None:
    w = CountWindow(2)
    w.record(True, True, 0.0)
    w.record(True, True, 0.0)
    w.reset()
    assert w.counts() == WindowCounts(calls=0, failures=0, slow=0)
    w.record(False, True, 0.0)
    assert w.counts() == WindowCounts(calls=1, failures=0, slow=1)


def test_count_window_ignores_time() -> None:
    w = CountWindow(2)
    w.record(True, False, 0.0)
    assert w.counts(1e9) == WindowCounts(calls=1, failures=1, slow=0)


@pytest.mark.parametrize("size", [0, -1])
def test_count_window_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match=f"count window size must be >= 1, got {size}"):
        CountWindow(size)


# -- TimeWindow ----------------------------------------------------------------------------


def test_time_window_keeps_the_last_seconds() -> None:
    w = TimeWindow(3)
    w.record(True, False, 100.2)  # second 100
    w.record(False, True, 101.9)  # second 101
    w.record(True, True, 102.0)  # second 102
    assert w.counts(102.999) == WindowCounts(calls=3, failures=2, slow=2)
    # At 103.0 second 100 is 3 seconds old: out.
    assert w.counts(103.0) == WindowCounts(calls=2, failures=1, slow=2)
    assert w.counts(103.999) == WindowCounts(calls=2, failures=1, slow=2)
    assert w.counts(104.0) == WindowCounts(calls=1, failures=1, slow=1)
    assert w.counts(105.0) == WindowCounts(calls=0, failures=0, slow=0)


def test_time_window_many_calls_in_one_second() -> None:
    w = TimeWindow(2)
    for i in range(5):
        w.record(i % 2 == 0, False, 10.0 + i / 10)
    assert w.counts(10.5) == WindowCounts(calls=5, failures=3, slow=0)
    assert w.counts(11.99) == WindowCounts(calls=5, failures=3, slow=0)
    assert w.counts(12.0) == WindowCounts(calls=0, failures=0, slow=0)


def test_time_window_jump_far_ahead_clears_everything() -> None:
    w = TimeWindow(4)
    for t in (1.0, 2.0, 3.0, 4.0):
        w.record(True, True, t)
    assert w.counts(4.0) == WindowCounts(calls=4, failures=4, slow=4)
    w.record(False, False, 1_000_000.5)
    assert w.counts(1_000_000.5) == WindowCounts(calls=1, failures=0, slow=0)


def test_time_window_bucket_reuse_after_wrap() -> None:
    # Second 7 lands in the same bucket as second 5 (7 % 2 == 5 % 2): the old one must go.
    w = TimeWindow(2)
    w.record(True, False, 5.0)
    w.record(False, False, 6.0)
    w.record(False, True, 7.0)
    assert w.counts(7.0) == WindowCounts(calls=2, failures=0, slow=1)


def test_time_window_out_of_order_now_lands_in_latest_second() -> None:
    w = TimeWindow(2)
    w.record(False, False, 10.0)
    w.record(True, False, 9.5)  # an earlier `now` than already seen
    assert w.counts(10.0) == WindowCounts(calls=2, failures=1, slow=0)
    assert w.counts(11.0) == WindowCounts(calls=2, failures=1, slow=0)
    assert w.counts(12.0) == WindowCounts(calls=0, failures=0, slow=0)


def test_time_window_reset() -> None:
    w = TimeWindow(3)
    w.record(True, True, 50.0)
    w.reset()
    assert w.counts(50.0) == WindowCounts(calls=0, failures=0, slow=0)
    w.record(True, False, 20.0)  # after a reset any time is a fresh start
    assert w.counts(20.0) == WindowCounts(calls=1, failures=1, slow=0)


@pytest.mark.parametrize("seconds", [0, -5])
def test_time_window_rejects_bad_seconds(seconds: int) -> None:
    with pytest.raises(ValueError, match=f"time window seconds must be >= 1, got {seconds}"):
        TimeWindow(seconds)


# -- make_window ---------------------------------------------------------------------------


def test_make_window_count() -> None:
    w = make_window(WindowSpec(type="count", size=7))
    assert isinstance(w, CountWindow)
    assert w.size == 7


def test_make_window_time() -> None:
    w = make_window(WindowSpec(type="time", size=None, seconds=30))
    assert isinstance(w, TimeWindow)
    assert w.seconds == 30


def test_make_window_rejects_missing_sizes() -> None:
    with pytest.raises(ValueError, match="count window needs a size"):
        make_window(WindowSpec(type="count", size=None))
    with pytest.raises(ValueError, match="time window needs seconds"):
        make_window(WindowSpec(type="time", size=None, seconds=None))


# -- properties: against a brute-force recount ---------------------------------------------

outcomes = st.tuples(st.booleans(), st.booleans())


@settings(max_examples=150, deadline=None)
@given(size=st.integers(min_value=1, max_value=12), calls=st.lists(outcomes, max_size=60))
def test_count_window_matches_recount_of_last_n(
    size: int, calls: list[tuple[bool, bool]]
) -> None:
    w = CountWindow(size)
    seen: list[tuple[bool, bool]] = []
    for failed, slow in calls:
        w.record(failed, slow, 0.0)
        seen.append((failed, slow))
        last = seen[-size:]
        expected = WindowCounts(
            calls=len(last),
            failures=sum(f for f, _ in last),
            slow=sum(s for _, s in last),
        )
        assert w.counts() == expected
        assert (w.calls, w.failures, w.slow) == (expected.calls, expected.failures, expected.slow)


# Steps: move the clock (small, across seconds, past the whole window), then record or look.
advances = st.one_of(
    st.sampled_from([0.0, 0.001, 0.5, 0.999, 1.0, 2.0, 3.0, 7.0, 25.0]),
    st.floats(min_value=0.0, max_value=12.0, allow_nan=False),
)
steps = st.tuples(advances, st.sampled_from(["record", "counts"]), outcomes)


def _recount(records: list[tuple[float, bool, bool]], seconds: int, now: float) -> WindowCounts:
    inside = [(f, s) for t, f, s in records if math.floor(now) - math.floor(t) < seconds]
    return WindowCounts(
        calls=len(inside), failures=sum(f for f, _ in inside), slow=sum(s for _, s in inside)
    )


@settings(max_examples=150, deadline=None)
@given(
    seconds=st.integers(min_value=1, max_value=8),
    start=st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False),
    script=st.lists(steps, max_size=60),
)
def test_time_window_matches_recount_of_last_seconds(
    seconds: int, start: float, script: list[tuple[float, str, tuple[bool, bool]]]
) -> None:
    w = TimeWindow(seconds)
    records: list[tuple[float, bool, bool]] = []
    now = start
    for advance, action, (failed, slow) in script:
        now += advance
        if action == "record":
            w.record(failed, slow, now)
            records.append((now, failed, slow))
            expected = _recount(records, seconds, now)
            assert (w.calls, w.failures, w.slow) == (
                expected.calls,
                expected.failures,
                expected.slow,
            )
        else:
            assert w.counts(now) == _recount(records, seconds, now)
