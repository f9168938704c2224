"""Prometheus metric objects (§6 names are fixed); per-breaker children bound once.

Requests only call `.inc()` / `.observe()` on children resolved when the route was built:
`labels()` validates, stringifies and locks, so it never runs per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import ProcessCollector, PlatformCollector, generate_latest

from proxy.config.fallback_options import FALLBACK_TYPES as FALLBACK_KINDS
from proxy.core.breaker import ALL_STATES, State, Transition

RETRY_RESULTS = ("success", "failure", "budget_exhausted", "rejected")
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """All metric families of one proxy process, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.state = Gauge("circuit_breaker_state", "1 for the breaker's current state, 0 for the others",
                           ["breaker", "state"], registry=r)
        self.transitions = Counter("circuit_breaker_transitions_total", "Breaker state transitions",
                                   ["breaker", "from_state", "to_state"], registry=r)
        self.calls = Counter("circuit_breaker_calls_total", "Calls by breaker outcome",
                             ["breaker", "outcome"], registry=r)
        self.slow_calls = Counter("circuit_breaker_slow_calls_total",
                                  "Calls at least slow_call_duration_ms long", ["breaker"], registry=r)
        self.call_duration = Histogram("circuit_breaker_call_duration_seconds",
                                       "Duration of calls that reached the upstream", ["breaker"],
                                       buckets=_CALL_BUCKETS, registry=r)
        self.failure_rate = Gauge("circuit_breaker_failure_rate",
                                  "Failure ratio over the window (0 below minimum_calls)", ["breaker"],
                                  registry=r)
        self.fallbacks = Counter("circuit_breaker_fallbacks_total", "Fallback responses served",
                                 ["breaker", "fallback"], registry=r)
        self.queue_depth = Gauge("fallback_queue_depth", "Requests waiting in a fallback queue",
                                 ["queue"], registry=r)
        self.queue_dead_letters = Gauge("fallback_queue_dead_letters",
                                        "Requests in a fallback queue's dead letters (given up on)",
                                        ["queue"], registry=r)
        self.queue_replayed = Counter("fallback_queue_replayed_total", "Queue replay attempts by result",
                                      ["queue", "result"], registry=r)
        self.retries = Counter("circuit_breaker_retries_total",
                               "Retries wanted after a failed attempt, by what became of them (§3b)",
                               ["breaker", "result"], registry=r)
        self.requests = Counter("proxy_requests_total", "Requests answered by the proxy",
                                ["breaker", "code"], registry=r)
        self.request_duration = Histogram("proxy_request_duration_seconds",
                                          "Whole request duration at the proxy", ["breaker"],
                                          buckets=_CALL_BUCKETS, registry=r)
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

    def for_breaker(self, breaker: str, fallback: str | None, *, retries: bool = False) -> BreakerMetrics:
        return BreakerMetrics(self, breaker, fallback, retries)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def call_duration_buckets(self) -> dict[str, list[tuple[float, float]]]:
        """Per breaker, the cumulative upstream-call duration buckets: [(upper bound, count)]."""
        buckets: dict[str, list[tuple[float, float]]] = {}
        for family in self.call_duration.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.setdefault(sample.labels["breaker"], []).append(
                        (float(sample.labels["le"]), sample.value))
        return buckets

    def fallback_counts(self) -> dict[str, int]:
        """Fallbacks served per breaker, all fallback types summed (for the status page)."""
        counts: dict[str, int] = {}
        for family in self.fallbacks.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    breaker = sample.labels["breaker"]
                    counts[breaker] = counts.get(breaker, 0) + int(sample.value)
        return counts


class BreakerMetrics:
    """The children of one breaker, resolved once."""

    __slots__ = ("_metrics", "name", "_states", "success", "failure", "rejected", "slow",
                 "call_duration", "failure_rate", "fallback", "request_duration", "_codes", "_removed",
                 "retries")

    def __init__(self, metrics: Metrics, breaker: str, fallback: str | None,
                 retries: bool = False) -> None:
        self._metrics = metrics
        self.name = breaker
        self._states = {state: metrics.state.labels(breaker, state.value) for state in ALL_STATES}
        self.success = metrics.calls.labels(breaker, "success")
        self.failure = metrics.calls.labels(breaker, "failure")
        self.rejected = metrics.calls.labels(breaker, "rejected")
        self.slow = metrics.slow_calls.labels(breaker)
        self.call_duration = metrics.call_duration.labels(breaker)
        self.failure_rate = metrics.failure_rate.labels(breaker)
        self.fallback = None
        self.set_fallback(fallback)
        self.request_duration = metrics.request_duration.labels(breaker)
        # Only routes that retry have retry series (§3b); result → child.
        self.retries = {result: metrics.retries.labels(breaker, result)
                        for result in RETRY_RESULTS} if retries else {}
        self._codes: dict[int | str, object] = {}
        self._removed = False
        self.show_state(State.CLOSED)

    def set_fallback(self, fallback: str | None) -> None:
        self.fallback = self._metrics.fallbacks.labels(self.name, fallback) if fallback else None

    def show_state(self, state: State) -> None:
        for each, child in self._states.items():
            child.set(1 if each is state else 0)

    def on_transition(self, transition: Transition) -> None:
        self.show_state(transition.to_state)
        self._metrics.transitions.labels(self.name, transition.from_state.value,
                                         transition.to_state.value).inc()

    def count_request(self, code: int | str, seconds: float) -> None:
        """`code`: the status the client got, or "truncated" for an answer cut off mid-body."""
        child = self._codes.get(code)
        if child is None:
            if self._removed:
                return  # a call that outlived its route (reload): no series may come back
            child = self._codes[code] = self._metrics.requests.labels(self.name, str(code))
        child.inc()
        self.request_duration.observe(seconds)

    def remove(self) -> None:
        """Drop every series of this breaker (its route left the config)."""
        self._removed = True
        m = self._metrics
        for family, label_sets in (
            (m.state, [(self.name, s.value) for s in ALL_STATES]),
            (m.calls, [(self.name, o) for o in ("success", "failure", "rejected")]),
            (m.slow_calls, [(self.name,)]), (m.call_duration, [(self.name,)]),
            (m.failure_rate, [(self.name,)]), (m.request_duration, [(self.name,)]),
            (m.requests, [(self.name, str(code)) for code in self._codes]),
            (m.transitions, [(self.name, a.value, b.value) for a in ALL_STATES for b in ALL_STATES]),
            (m.fallbacks, [(self.name, kind) for kind in FALLBACK_KINDS]),
            (m.retries, [(self.name, result) for result in RETRY_RESULTS]),
        ):
            for labels in label_sets:
                try:
                    family.remove(*labels)
                except KeyError:
                    pass

