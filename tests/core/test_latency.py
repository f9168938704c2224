"""core/latency.py: quantiles within the resolution of brute force, ageing out, fixed memory."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.latency import BUCKETS, GROWTH, MAX_S, MIN_S, LatencySketch, bucket_of


def brute_quantile(samples: list[float], q: float) -> float:
    """The ⌈q·n⌉-th smallest (the smallest for q = 0): what the sketch estimates."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


durations = st.floats(min_value=MIN_S, max_value=MAX_S, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(durations, min_size=1, max_size=300),
       st.sampled_from([0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0]))
def test_quantile_is_an_upper_bound_within_the_resolution(samples, q):
    sketch = LatencySketch(rotate_every=10_000, rotate_after_s=1e9)
    for s in samples:
        sketch.add(s, now=0.0)
    true = brute_quantile(samples, q)
    estimate = sketch.quantile(q)
    assert estimate is not None
    assert true <= estimate <= max(true * GROWTH, MIN_S) * (1 + 1e-12)
    assert sketch.count == len(samples)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1.0, max_value=2 * MAX_S, allow_nan=False))
def test_each_duration_lands_in_the_bucket_whose_range_holds_it(seconds):
    i = bucket_of(seconds)
    assert 0 <= i < BUCKETS
    sketch = LatencySketch()
    sketch.add(seconds, now=0.0)
    (estimate,) = {sketch.quantile(q) for q in (0.0, 0.5, 1.0)}  # one sample: every quantile
    assert estimate >= seconds
    if MIN_S < seconds <= MAX_S:
        assert estimate < seconds * GROWTH * (1 + 1e-12)


def test_edges_and_outliers():
    sketch = LatencySketch()
    assert sketch.quantile(0.99) is None  # nothing seen
    assert sketch.count == 0
    for tiny in (0.0, -1.0, MIN_S, float("nan")):
        assert bucket_of(tiny) == 0
    sketch.add(MIN_S / 10, now=0.0)
    assert sketch.quantile(0.5) == MIN_S  # the first bucket answers with its upper edge
    # Past the last edge there is no edge: the largest sample seen is the bound.
    sketch.add(500.0, now=0.0)
    sketch.add(300.0, now=0.0)
    assert sketch.quantile(1.0) == 500.0
    assert sketch.quantile(0.0) == MIN_S


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="q must be in"):
        LatencySketch().quantile(1.5)
    with pytest.raises(ValueError, match="rotate_every"):
        LatencySketch(rotate_every=0)
    with pytest.raises(ValueError, match="rotate_after_s"):
        LatencySketch(rotate_after_s=0)


def test_rotation_by_count_ages_out_old_latencies():
    sketch = LatencySketch(rotate_every=100, rotate_after_s=1e9)
    for _ in range(100):
        sketch.add(1.0, now=0.0)  # the 100th rotates: current → previous, still in view
    assert sketch.count == 100
    assert sketch.quantile(0.5) >= 1.0
    for _ in range(99):
        sketch.add(0.010, now=0.0)
    assert sketch.count == 199  # previous 100 + current 99
    assert sketch.quantile(0.99) >= 1.0
    sketch.add(0.010, now=0.0)  # the 100th: the 1 s calls are dropped
    assert sketch.count == 100
    assert 0.010 <= sketch.quantile(1.0) < 0.010 * GROWTH


def test_rotation_by_time_ages_out_old_latencies_even_without_new_samples():
    sketch = LatencySketch(rotate_every=1000, rotate_after_s=30.0)
    for _ in range(10):
        sketch.add(2.0, now=100.0)
    assert sketch.quantile(0.5, now=129.999) >= 2.0
    assert sketch.count == 10
    sketch.add(0.001, now=130.0)  # a period after the first sample: the 2 s ones are previous
    assert sketch.count == 11
    assert 2.0 <= sketch.quantile(1.0) < 2.0 * GROWTH
    assert sketch.quantile(1.0, now=159.999) >= 2.0
    assert sketch.quantile(1.0, now=160.0) < 0.002  # two periods on: only the 1 ms one is left
    assert sketch.count == 1
    assert sketch.quantile(0.5, now=190.0) is None  # and then nothing
    assert sketch.count == 0


def test_a_long_silence_forgets_everything_at_once():
    sketch = LatencySketch(rotate_every=1000, rotate_after_s=30.0)
    sketch.add(1.0, now=0.0)
    sketch.add(1.0, now=29.0)
    assert sketch.quantile(0.5, now=59.999) is not None  # one period after the first: kept
    sketch.add(0.005, now=3600.0)
    assert sketch.count == 1
    assert sketch.quantile(1.0) < 0.006


def test_reset_forgets_everything():
    sketch = LatencySketch()
    for i in range(50):
        sketch.add(i / 100, now=0.0)
    sketch.reset()
    assert (sketch.count, sketch.quantile(0.5)) == (0, None)


def _footprint(sketch: LatencySketch) -> int:
    return sum(sys.getsizeof(getattr(sketch, name)) for name in LatencySketch.__slots__)


def test_memory_is_fixed_whatever_the_number_of_samples():
    sketch = LatencySketch(rotate_every=1000, rotate_after_s=30.0)
    sketch.add(0.001, now=0.0)
    before = _footprint(sketch)
    for i in range(20_000):
        sketch.add((i % 977) / 100, now=i / 100)
    assert _footprint(sketch) == before
    assert not hasattr(sketch, "__dict__")  # nothing can grow beside the slots
    assert BUCKETS < 400  # 0.1 ms to 120 s at 5 %
    assert bucket_of(MAX_S) == BUCKETS - 2 and bucket_of(MAX_S * 2) == BUCKETS - 1
