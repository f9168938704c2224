"""What the status page charts: per breaker, outcomes and latency in 10-second buckets.

A bucket is `[start_wall, success, failure, rejected, fallbacks, p50_ms, p95_ms]`, its start a
multiple of BUCKET_S in epoch seconds. The live-status ticker samples every breaker once a
second into the bucket under way: counts are differences of the cumulative counters, and
p50/p95 come from the difference of the upstream-call duration histogram since the bucket
began (interpolated as Prometheus does). At start-up the buckets of the last KEPT_S seconds are
put back from the `circuit_breaker_metrics` snapshots, so a restart does not wipe the charts;
buckets rebuilt that way have no fallback count (None).

Fed by the ticker and read by the documents, never by requests: it costs nothing per call.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from proxy.runtime.metrics import Metrics
from proxy.runtime.persistence import quantiles
from proxy.runtime.registry import Registry

BUCKET_S = 10
KEPT = 90  # buckets per breaker: 15 minutes
KEPT_S = BUCKET_S * KEPT
TAIL = 2  # buckets in every snapshot: the one under way and the one before (a boundary passed)
_QUANTILES = (0.5, 0.95)

Bucket = list[Any]
Counts = tuple[int, int, int, int]  # success, failure, rejected, fallbacks
Durations = list[tuple[float, float]]  # cumulative [(upper bound, count)]


def bucket_start(wall: float) -> int:
    return int(math.floor(wall / BUCKET_S) * BUCKET_S)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _larger(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _since(now: Durations, before: Durations | None) -> Durations:
    """The histogram of the calls between two readings; all of `now` after a reset."""
    if before is None or len(before) != len(now) or any(c < b for (_, c), (_, b) in zip(now, before)):
        return now
    return [(bound, c - b) for (bound, c), (_, b) in zip(now, before)]


class History:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics
        self._series: dict[str, deque[Bucket]] = {}
        self._last_counts: dict[str, Counts] = {}
        self._last_durations: dict[str, Durations] = {}
        self._bucket_base: dict[str, Durations | None] = {}  # the histogram when the bucket began
        self._carried: dict[str, tuple[float | None, float | None]] = {}  # a restored bucket's p50, p95

    def sample(self, wall: float) -> None:
        """One tick: what each breaker did since the previous tick goes into the bucket under way."""
        start = bucket_start(wall)
        fallbacks = self._metrics.fallback_counts()
        durations = self._metrics.call_duration_buckets()
        routes = self._registry.routes
        for name, runtime in routes.items():
            view = runtime.breaker.view()
            counts = (view.calls_success, view.calls_failure, view.calls_rejected, fallbacks.get(name, 0))
            last = self._last_counts.get(name, counts)
            # A reset (or a breaker rebuilt by a reload) starts its counts again from zero.
            delta = [now - before if now >= before else now for now, before in zip(counts, last)]
            self._last_counts[name] = counts
            now_durations = durations.get(name, [])
            series = self._series.get(name)
            if series is None:
                series = self._series[name] = deque(maxlen=KEPT)
            if not series or series[-1][0] != start:
                series.append([start, 0, 0, 0, 0, None, None])
                self._bucket_base[name] = self._last_durations.get(name)
                self._carried.pop(name, None)
            elif name not in self._bucket_base:
                # A bucket restored from before a restart goes on: keep its latency in view.
                self._bucket_base[name] = None
                self._carried[name] = (series[-1][5], series[-1][6])
            bucket = series[-1]
            for i, count in enumerate(delta, start=1):
                bucket[i] = (bucket[i] or 0) + count
            p50, p95 = quantiles(_since(now_durations, self._bucket_base.get(name)), _QUANTILES)
            carried = self._carried.get(name, (None, None))
            bucket[5], bucket[6] = _larger(_ms(p50), carried[0]), _larger(_ms(p95), carried[1])
            self._last_durations[name] = now_durations
        for table in (self._series, self._last_counts, self._last_durations, self._bucket_base, self._carried):
            for name in [name for name in table if name not in routes]:
                del table[name]  # its route left the config

    def restore(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """Buckets from stored snapshots (persistence.metrics_history rows, per breaker in time
        order), before anything was sampled; returns how many buckets were put back."""
        restored: dict[str, dict[int, Bucket]] = {}
        previous: dict[str, tuple[int, int, int]] = {}
        for name, at_wall, success, failure, rejected, p50, p95 in rows:
            if name not in self._registry.routes:
                continue
            counts = (success, failure, rejected)
            before = previous.get(name)
            previous[name] = counts
            if before is None:
                continue  # what the first snapshot counted began before the history we have
            delta = [now - b if now >= b else now for now, b in zip(counts, before)]
            # A snapshot ends its interval: the interval belongs to the bucket it ends in.
            start = bucket_start(at_wall - 1e-6)
            bucket = restored.setdefault(name, {}).setdefault(start, [start, 0, 0, 0, None, None, None])
            for i, count in enumerate(delta, start=1):
                bucket[i] += count
            for i, value in ((5, _ms(p50)), (6, _ms(p95))):
                if value is not None:
                    bucket[i] = value if bucket[i] is None else max(bucket[i], value)
        total = 0
        for name, buckets in restored.items():
            live = self._series.get(name, ())
            older = [b for b in sorted(buckets.values(), key=lambda b: b[0]) if not live or b[0] < live[0][0]]
            # Oldest first into a bounded deque: if too many, the oldest fall out.
            self._series[name] = kept = deque([*older, *live], maxlen=KEPT)
            total += max(0, len(kept) - len(live))
        return total

    def series(self, name: str, tail: int | None = None) -> list[Bucket]:
        """Copies of the breaker's buckets, oldest first; the last `tail` only, if given."""
        series = self._series.get(name, ())
        chosen = list(series)[-tail:] if tail else list(series)
        return [list(bucket) for bucket in chosen]
