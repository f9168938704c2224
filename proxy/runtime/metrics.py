"""Prometheus metrics (§6 names are fixed): what changes per request is kept in plain Python
numbers and read at scrape time; what changes per transition uses prometheus-client itself.

A prometheus-client child takes a lock and a few calls per `inc()` / `observe()`; a request
moves six of them. `Tally` and `Timings` are an attribute increment and a bisect instead,
bound once per route like the children were, and `_PerRequest` (a collector) turns them into
the same families at scrape time, exactly (the event loop both counts and scrapes).

No `_created` series: a counter's creation time is one more series per counter child that no
dashboard or rule reads; prometheus-client's public switch turns them off for the process.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client import ProcessCollector, PlatformCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from proxy.config.fallback_options import FALLBACK_TYPES as FALLBACK_KINDS
from proxy.core.breaker import ALL_STATES, BreakerView, State, Transition

RETRY_RESULTS = ("success", "failure", "budget_exhausted", "rejected")
OUTCOMES = ("success", "failure", "rejected")
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_LABELS = tuple(floatToGoString(bound) for bound in _CALL_BUCKETS) + ("+Inf",)

# What a queue with an amount_field has outstanding, and its cap (None: no cap), read at
# scrape time from the queue's own counters.
ExposureReading = Callable[[], tuple[Decimal | float, Decimal | float | None]]

disable_created_metrics()


class Tally:
    """A counter of the proxy's own."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Timings:
    """A histogram of the proxy's own over `_CALL_BUCKETS` (upper bounds inclusive, as
    Prometheus's `le`): per observation one bisect and two additions."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_CALL_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_CALL_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, count of observations ≤ it)], +Inf last."""
        out = []
        total = 0
        for bound, count in zip((*_CALL_BUCKETS, float("inf")), self.counts):
            total += count
            out.append((bound, total))
        return out


class Metrics:
    """All metric families of one proxy process, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.breakers: dict[str, BreakerMetrics] = {}  # current routes, by breaker name
        self.state = Gauge("circuit_breaker_state", "1 for the breaker's current state, 0 for the others",
                           ["breaker", "state"], registry=r)
        self.transitions = Counter("circuit_breaker_transitions_total", "Breaker state transitions",
                                   ["breaker", "from_state", "to_state"], registry=r)
        self.failure_rate = Gauge("circuit_breaker_failure_rate",
                                  "Failure ratio over the window (0 below minimum_calls)", ["breaker"],
                                  registry=r)
        # Beyond §6, set from the same reading as failure_rate (Registry.refresh, at scrape).
        self.slow_call_rate = Gauge("circuit_breaker_slow_call_rate",
                                    "Slow-call ratio over the window (0 below minimum_calls)", ["breaker"],
                                    registry=r)
        self.seconds_to_half_open = Gauge("circuit_breaker_seconds_to_half_open",
                                          "Seconds until an open breaker turns half_open (0 when not open)",
                                          ["breaker"], registry=r)
        r.register(_PerRequest(self))
        self.exposures: dict[str, ExposureReading] = {}  # queue name → its reading
        r.register(_Exposure(self.exposures))
        self.queue_depth = Gauge("fallback_queue_depth", "Requests waiting in a fallback queue",
                                 ["queue"], registry=r)
        self.queue_dead_letters = Gauge("fallback_queue_dead_letters",
                                        "Requests in a fallback queue's dead letters (given up on)",
                                        ["queue"], registry=r)
        self.queue_replayed = Counter("fallback_queue_replayed_total", "Queue replay attempts by result",
                                      ["queue", "result"], registry=r)
        # Beyond §6: the proxy's own machinery, so it can be watched like the breakers.
        self.reloads = Counter("circuit_proxy_config_reloads_total",
                               "Config reloads (SIGHUP, /admin/reload) by result", ["result"],
                               registry=r)
        self.webhook_deliveries = Counter("circuit_proxy_webhook_deliveries_total",
                                          "Alert webhook POSTs by result", ["result"], registry=r)
        self.status_clients = Gauge("circuit_proxy_status_stream_clients",
                                    "Open /status/events connections", registry=r)
        self.status_events_dropped = Counter("circuit_proxy_status_events_dropped_total",
                                             "Live-status events a slow client did not get",
                                             registry=r)

    def watch_queue(self, queue: str, reading: ExposureReading) -> None:
        """Report a queue's exposure (sum of queued amounts) and its cap at each scrape."""
        self.exposures[queue] = reading

    def cluster_connected(self) -> Gauge:
        """§8, only for a proxy with `cluster.share_breakers`: 1 while it shares breakers with
        its fleet, 0 while the database is unreachable and it goes on alone."""
        return Gauge("circuit_proxy_cluster_connected",
                     "1 while breakers are shared with the fleet, 0 while alone", registry=self.registry)

    def for_breaker(self, breaker: str, fallback: str | None, *, retries: bool = False) -> BreakerMetrics:
        metrics = BreakerMetrics(self, breaker, fallback, retries)
        self.breakers[breaker] = metrics
        return metrics

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def call_duration_buckets(self) -> dict[str, list[tuple[float, float]]]:
        """Per breaker, the cumulative upstream-call duration buckets: [(upper bound, count)]."""
        return {name: [(bound, float(count)) for bound, count in m.call_duration.cumulative()]
                for name, m in self.breakers.items()}

    def fallback_counts(self) -> dict[str, int]:
        """Fallbacks served per breaker, all fallback types summed (for the status page)."""
        return {name: sum(tally.value for tally in m.fallbacks.values()) for name, m in self.breakers.items()}


class _PerRequest:
    """The per-request families, read from each route's own numbers at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        breakers = list(self._metrics.breakers.values())
        calls = CounterMetricFamily("circuit_breaker_calls", "Calls by breaker outcome",
                                    labels=["breaker", "outcome"])
        slow = CounterMetricFamily("circuit_breaker_slow_calls", "Calls at least slow_call_duration_ms long",
                                   labels=["breaker"])
        durations = HistogramMetricFamily("circuit_breaker_call_duration_seconds",
                                          "Duration of calls that reached the upstream", labels=["breaker"])
        fallbacks = CounterMetricFamily("circuit_breaker_fallbacks", "Fallback responses served",
                                        labels=["breaker", "fallback"])
        retries = CounterMetricFamily("circuit_breaker_retries",
                                      "Retries wanted after a failed attempt, by what became of them (§3b)",
                                      labels=["breaker", "result"])
        requests = CounterMetricFamily("proxy_requests", "Requests answered by the proxy",
                                       labels=["breaker", "code"])
        request_durations = HistogramMetricFamily("proxy_request_duration_seconds",
                                                  "Whole request duration at the proxy", labels=["breaker"])
        for m in breakers:
            name = m.name
            for outcome in OUTCOMES:
                calls.add_metric([name, outcome], getattr(m, outcome).value)
            slow.add_metric([name], m.slow.value)
            durations.add_metric([name], _buckets(m.call_duration), m.call_duration.sum)
            for kind, tally in m.fallbacks.items():
                fallbacks.add_metric([name, kind], tally.value)
            for result, tally in m.retries.items():
                retries.add_metric([name, result], tally.value)
            for code, tally in m.codes.items():
                requests.add_metric([name, str(code)], tally.value)
            request_durations.add_metric([name], _buckets(m.request_duration), m.request_duration.sum)
        yield from (calls, slow, durations, fallbacks, retries, requests, request_durations)


class _Exposure:
    """`fallback_queue_exposure` and `fallback_queue_exposure_cap`, for queues with an
    amount_field, read from the queues' counters at scrape time (nothing per request)."""

    def __init__(self, readings: dict[str, ExposureReading]) -> None:
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        exposure = GaugeMetricFamily("fallback_queue_exposure",
                                     "Sum of the amounts waiting in a queue (its amount_field)",
                                     labels=["queue"])
        cap = GaugeMetricFamily("fallback_queue_exposure_cap", "The queue's exposure_cap", labels=["queue"])
        for name, reading in self._readings.items():
            outstanding, limit = reading()
            exposure.add_metric([name], float(outstanding))
            if limit is not None:
                cap.add_metric([name], float(limit))
        yield from (exposure, cap)


def _buckets(timings: Timings) -> list[tuple[str, float]]:
    return [(label, float(count)) for label, (_, count) in zip(_BUCKET_LABELS, timings.cumulative())]


class BreakerMetrics:
    """One breaker's numbers, bound once: requests touch only these."""

    __slots__ = ("_metrics", "name", "_states", "success", "failure", "rejected", "slow",
                 "call_duration", "failure_rate", "slow_call_rate", "seconds_to_half_open", "fallback",
                 "fallbacks", "request_duration", "codes", "_removed", "retries")

    def __init__(self, metrics: Metrics, breaker: str, fallback: str | None,
                 retries: bool = False) -> None:
        self._metrics = metrics
        self.name = breaker
        self._states = {state: metrics.state.labels(breaker, state.value) for state in ALL_STATES}
        self.success = Tally()
        self.failure = Tally()
        self.rejected = Tally()
        self.slow = Tally()
        self.call_duration = Timings()
        self.failure_rate = metrics.failure_rate.labels(breaker)
        self.slow_call_rate = metrics.slow_call_rate.labels(breaker)
        self.seconds_to_half_open = metrics.seconds_to_half_open.labels(breaker)
        self.fallbacks: dict[str, Tally] = {}  # fallback type → served (a reload may change it)
        self.fallback: Tally | None = None
        self.set_fallback(fallback)
        self.request_duration = Timings()
        # Only routes that retry have retry series (§3b); result → tally.
        self.retries = {result: Tally() for result in RETRY_RESULTS} if retries else {}
        self.codes: dict[int | str, Tally] = {}
        self._removed = False
        self.show_state(State.CLOSED)

    def set_fallback(self, fallback: str | None) -> None:
        self.fallback = self.fallbacks.setdefault(fallback, Tally()) if fallback else None

    def show_view(self, view: BreakerView) -> None:
        """The window's rates and the time to half-open, from one reading (at scrape time)."""
        self.failure_rate.set(view.failure_rate or 0.0)
        self.slow_call_rate.set(view.slow_call_rate or 0.0)
        self.seconds_to_half_open.set(max(view.retry_after or 0.0, 0.0))

    def show_state(self, state: State) -> None:
        for each, child in self._states.items():
            child.set(1 if each is state else 0)

    def on_transition(self, transition: Transition) -> None:
        self.show_state(transition.to_state)
        self._metrics.transitions.labels(self.name, transition.from_state.value,
                                         transition.to_state.value).inc()

    def count_request(self, code: int | str, seconds: float) -> None:
        """`code`: the status the client got, or "truncated" for an answer cut off mid-body."""
        tally = self.codes.get(code)
        if tally is None:
            if self._removed:
                return  # a call that outlived its route (reload): no series may come back
            tally = self.codes[code] = Tally()
        tally.value += 1
        self.request_duration.observe(seconds)

    def remove(self) -> None:
        """Drop every series of this breaker (its route left the config, or was rebuilt)."""
        self._removed = True
        m = self._metrics
        if m.breakers.get(self.name) is self:
            del m.breakers[self.name]
        for family, label_sets in (
            (m.state, [(self.name, s.value) for s in ALL_STATES]),
            (m.failure_rate, [(self.name,)]),
            (m.slow_call_rate, [(self.name,)]),
            (m.seconds_to_half_open, [(self.name,)]),
            (m.transitions, [(self.name, a.value, b.value) for a in ALL_STATES for b in ALL_STATES]),
        ):
            for labels in label_sets:
                try:
                    family.remove(*labels)
                except KeyError:
                    pass


__all__ = ["FALLBACK_KINDS", "Metrics", "BreakerMetrics", "Tally", "Timings"]
