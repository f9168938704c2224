"""A recent-latency sketch: quantiles of call durations in fixed memory (§3a, `auto`).

`LatencySketch` counts durations in log-scale buckets (0.1 ms to 120 s, each bucket 5 %
wider than the one before) and answers a quantile from the bucket counts: the upper edge of
the bucket that holds it, so an estimate is never below the true value and less than 5 %
above it. "Recent" means two histograms: new samples go to the current one, quantiles read
both, and when the current one has `rotate_every` samples or is `rotate_after_s` old, the
previous one is dropped and the current one takes its place. A sample therefore stays in view
for at least `rotate_every` samples or `rotate_after_s` (whichever comes first) and never
more than 2 × `rotate_after_s`.

Pure and O(1) per sample: it never sorts, never keeps a sample, never reads a clock (the
caller hands in `now`, monotonic seconds), and its memory is fixed at construction.
"""

from __future__ import annotations

import math

MIN_S = 1e-4  # 0.1 ms: everything at or below shares the first bucket
MAX_S = 120.0  # everything above shares the overflow bucket
GROWTH = 1.05  # each bucket's upper edge is 5 % above the previous: the resolution


def _edges() -> tuple[float, ...]:
    """Upper edges: bucket 0 is (-inf, MIN_S], bucket i is (edges[i-1], edges[i]]."""
    count = math.ceil(math.log(MAX_S / MIN_S) / math.log(GROWTH))
    return tuple(MIN_S * GROWTH**i for i in range(count + 1))


_EDGES = _edges()
_LOG_GROWTH = math.log(GROWTH)
_OVERFLOW = len(_EDGES)  # the bucket past the last edge (> its value)
BUCKETS = len(_EDGES) + 1


def bucket_of(seconds: float) -> int:
    """The bucket whose range holds `seconds` (a NaN or negative goes to bucket 0)."""
    if not seconds > MIN_S:
        return 0
    if seconds > _EDGES[-1]:
        return _OVERFLOW
    i = math.ceil(math.log(seconds / MIN_S) / _LOG_GROWTH)
    # The logarithm may land one off at an edge; fix it so edges[i-1] < seconds ≤ edges[i]
    # holds exactly, which is what makes every quantile an upper bound.
    if i < _OVERFLOW - 1 and seconds > _EDGES[i]:
        i += 1
    elif i > 0 and seconds <= _EDGES[i - 1]:
        i -= 1
    return i


class LatencySketch:
    __slots__ = ("_current", "_current_max", "_current_n", "_previous_max", "_rotate_after_s",
                 "_rotate_every", "_started", "_view", "count")

    def __init__(self, *, rotate_every: int = 1000, rotate_after_s: float = 30.0) -> None:
        if rotate_every < 1:
            raise ValueError(f"rotate_every must be >= 1, got {rotate_every}")
        if not rotate_after_s > 0:
            raise ValueError(f"rotate_after_s must be > 0, got {rotate_after_s}")
        self._rotate_every = rotate_every
        self._rotate_after_s = rotate_after_s
        # `_view` is previous + current, kept up to date on every add, so a quantile reads one
        # array; only the current one is kept besides (the previous = view - current).
        self._current = [0] * BUCKETS
        self._view = [0] * BUCKETS
        self._current_n = 0
        # Largest sample of each: the answer for a quantile that falls in the overflow bucket,
        # which has no upper edge.
        self._current_max = 0.0
        self._previous_max = 0.0
        # When the current histogram began: its first sample, or the rotation that started it
        # (so a previous one ages out even when no sample comes); None while nothing is held.
        self._started: float | None = None
        self.count = 0  # samples in view (both histograms)

    def add(self, seconds: float, now: float) -> None:
        """One duration, observed at `now` (monotonic seconds)."""
        self.age_out(now)
        if self._started is None:
            self._started = now
        i = bucket_of(seconds)
        self._current[i] += 1
        self._view[i] += 1
        self._current_n += 1
        self.count += 1
        if seconds > self._current_max:
            self._current_max = seconds
        if self._current_n >= self._rotate_every:
            self._rotate(now)

    def age_out(self, now: float) -> None:
        """Rotate as often as the time since the current histogram began calls for."""
        started = self._started
        if started is None or now - started < self._rotate_after_s:
            return
        if now - started >= 2 * self._rotate_after_s:
            self.reset()  # the current one is too old to be the previous: nothing is recent
        else:
            # Periods stay aligned to the first one, so nothing stays in view past 2 periods
            # however sparse the samples.
            self._rotate(started + self._rotate_after_s)

    def quantile(self, q: float, now: float | None = None) -> float | None:
        """An upper bound (within 5 %) of the q-quantile of the samples in view; None if none.

        The q-quantile is the ⌈q·n⌉-th smallest of n samples (the smallest for q = 0).
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if now is not None:
            self.age_out(now)
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        view = self._view
        for i in range(_OVERFLOW):  # a fixed number of buckets: O(1) per question
            seen += view[i]
            if seen >= rank:
                return _EDGES[i]
        return max(self._current_max, self._previous_max)

    def reset(self) -> None:
        for i in range(BUCKETS):
            self._current[i] = self._view[i] = 0
        self._current_n = self.count = 0
        self._current_max = self._previous_max = 0.0
        self._started = None

    def _rotate(self, now: float) -> None:
        # Drop the previous histogram (view - current) from the view; the current one becomes
        # the previous and a fresh one starts. O(buckets), once per `rotate_every` samples or
        # `rotate_after_s`: amortised O(1) per sample.
        current, view = self._current, self._view
        for i in range(BUCKETS):
            view[i] = current[i]
            current[i] = 0
        self.count = self._current_n
        self._current_n = 0
        self._previous_max = self._current_max
        self._current_max = 0.0
        self._started = now
