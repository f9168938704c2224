"""Breakers by "<service>.<route>", each with what its data path needs, built once per config.

A reload builds new routes but keeps the breaker (state and counts) of every route whose
policy did not change, and the stateful fallback (queue, cache) of every route whose fallback
and upstream did not. Stateless fallbacks are rebuilt, so edited response files take effect.
Nothing here does I/O or knows an HTTP client: call settings are plain seconds and statuses.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.core.breaker import Breaker, Permit, State, Transition
from proxy.core.bulkhead import Bulkhead
from proxy.core.retry_budget import RetryBudget
from proxy.core.clock import Clock
from proxy.config.model import Route, Settings
from proxy.fallbacks.base import Fallback
from proxy.runtime.metrics import BreakerMetrics, Metrics
from proxy.core.routing import Router

log = logging.getLogger(__name__)

TransitionListener = Callable[[Transition], None]
ActionListener = Callable[[str, str], None]  # (breaker, admin action: "force-open", …)
# What RouteRuntime.note_failure is told: a status in failure_statuses (detail: the status),
# no connection or a reset (detail: the error's text), the route's timeout, an answer cut off
# mid-body, or a call at or past the slow threshold (detail: seconds).
FAILURE_KINDS = ("http", "unreachable", "timeout", "broken", "slow")
FallbackFactory = Callable[[Route, str], "Fallback | None"]


class RouteRuntime:
    """One route's breaker, bulkhead, metrics, fallback and upstream call settings."""

    __slots__ = ("route", "name", "breaker", "bulkhead", "metrics", "fallback", "upstream", "secure",
                 "plain_refusal",
                 "timeout_s", "connect_timeout_s", "failure_statuses", "retry", "retry_budget",
                 "last_failure")

    def __init__(self, route: Route, upstream: str, breaker: Breaker, bulkhead: Bulkhead,
                 metrics: BreakerMetrics, fallback: Fallback | None) -> None:
        self.route = route
        self.name = route.breaker_name
        self.breaker = breaker
        self.bulkhead = bulkhead
        self.metrics = metrics
        self.fallback = fallback
        self.upstream = upstream
        self.secure = upstream.startswith("https:")  # only then is a TLS context looked up
        policy = route.policy
        self.timeout_s = policy.timeout_ms / 1000
        self.connect_timeout_s = policy.connect_timeout_ms / 1000
        self.failure_statuses = policy.failure_statuses
        # §3b: None when the route does not retry; the budget counts its requests and retries.
        self.retry = policy.retry if policy.retry.attempts > 0 else None
        self.retry_budget = RetryBudget(policy.retry.budget_percent) if self.retry is not None else None
        # A refusal is the contract's 503 and nothing else: no fallback to serve, no retry
        # budget to count (the open path's shortcut, `exchange.refused_at_once`).
        self.plain_refusal = fallback is None and self.retry is None
        # Why the last call went wrong, for the status page: (kind, detail), kind one of
        # FAILURE_KINDS. Replaced, never appended to: a failed call costs one tuple.
        self.last_failure: tuple[str, object] | None = None

    def record(self, permit: Permit, *, failed: bool, marked_slow: bool = False) -> float:
        """The outcome of a permitted call, to its breaker and its metrics; its duration.
        `marked_slow`: the call was counted slow while in flight (§3a), not again now."""
        breaker = self.breaker
        threshold = breaker.slow_threshold_s()
        duration = breaker.record(permit, failed=failed, marked_slow=marked_slow)
        metrics = self.metrics
        (metrics.failure if failed else metrics.success).value += 1  # a Tally, read at scrape
        metrics.call_duration.observe(duration)
        if not marked_slow and duration >= threshold:
            metrics.slow.inc()
            if not failed:
                self.last_failure = ("slow", duration)
        return duration

    def note_failure(self, kind: str, detail: object = None) -> None:
        """Why a call failed (one of FAILURE_KINDS), for the status page; off the healthy path."""
        self.last_failure = (kind, detail)

    def mark_slow(self, permit: Permit) -> None:
        """A call in flight crossed the slow threshold (§3a): slow from this moment, once."""
        self.breaker.mark_slow(permit)
        self.metrics.slow.inc()
        self.last_failure = ("slow", self.breaker.slow_threshold_s())

    def release(self, permit: Permit, *, marked_slow: bool = False) -> None:
        """The call ended as neither success nor failure (client gone, request broken)."""
        self.breaker.release(permit, marked_slow=marked_slow)


@dataclass(slots=True)
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


class Registry:
    def __init__(self, settings: Settings, clock: Clock, metrics: Metrics,
                 fallback_factory: FallbackFactory | None = None, rng: random.Random | None = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self._fallback_factory = fallback_factory or (lambda route, upstream: None)
        self._rng = rng or random.Random()
        self._listeners: list[TransitionListener] = []
        self._action_listeners: list[ActionListener] = []
        self.settings = settings
        self.routes: dict[str, RouteRuntime] = {}
        self.router: Router[RouteRuntime] = Router((), lambda r: None)
        self.apply(settings)

    def add_action_listener(self, listener: ActionListener) -> None:
        """Called with (breaker, action) after an operator's action (admin, §6), so a fleet
        can apply it everywhere (§8). Not called for what the fleet itself applies."""
        self._action_listeners.append(listener)

    def announce_action(self, name: str, action: str) -> None:
        for listener in self._action_listeners:
            listener(name, action)

    def add_listener(self, listener: TransitionListener) -> None:
        """Called with every transition of every breaker, present and future."""
        self._listeners.append(listener)
        for runtime in self.routes.values():
            runtime.breaker.add_listener(listener)

    def get(self, name: str) -> RouteRuntime | None:
        return self.routes.get(name)

    def refresh(self) -> None:
        """Apply due time-based transitions (open → half_open) so readers see them."""
        for runtime in self.routes.values():
            view = runtime.breaker.view()
            runtime.metrics.show_view(view)  # rates and time to half-open, read at scrape time

    def apply(self, settings: Settings) -> ReloadResult:
        result = ReloadResult()
        old = self.routes
        new: dict[str, RouteRuntime] = {}
        for service in settings.services:
            for route in service.routes:
                name = route.breaker_name
                previous = old.get(name)
                new[name] = self._runtime(route, service.upstream, previous)
                if previous is None:
                    result.added.append(name)
                elif previous.breaker is new[name].breaker:
                    result.kept.append(name)
                else:
                    result.changed.append(name)
        for name, runtime in old.items():
            if name not in new:
                result.removed.append(name)
                runtime.metrics.remove()
            if name not in new or new[name].breaker is not runtime.breaker:
                self._retire(runtime.breaker, runtime.metrics)
        self.settings = settings
        self.routes = new
        by_name = new
        self.router = Router(settings.services, lambda route: by_name[route.breaker_name])
        return result

    def _retire(self, breaker: Breaker, metrics: BreakerMetrics) -> None:
        """A breaker a reload replaced or removed: calls still in flight on it may move it,
        but metrics, storage, alerts and the status page must not take that for the current
        breaker of that name."""
        for listener in (metrics.on_transition, *self._listeners):
            breaker.remove_listener(listener)

    def _runtime(self, route: Route, upstream: str, previous: RouteRuntime | None) -> RouteRuntime:
        fallback_type = route.fallback.type if route.fallback else None
        if previous is not None and previous.route.policy == route.policy:
            breaker, bulkhead, metrics = previous.breaker, previous.bulkhead, previous.metrics
            metrics.set_fallback(fallback_type)
        else:
            if previous is not None:
                previous.metrics.remove()
            breaker = Breaker(route.breaker_name, route.policy, self.clock,
                              random.Random(self._rng.random()))
            bulkhead = Bulkhead(route.policy.max_concurrent)
            metrics = self.metrics.for_breaker(route.breaker_name, fallback_type,
                                               retries=route.policy.retry.attempts > 0)
            breaker.add_listener(metrics.on_transition)
            for listener in self._listeners:
                breaker.add_listener(listener)
            if previous is not None:
                # Settings changed: fresh counts, but a state an operator set stays set.
                _MANUAL.get(previous.breaker.state, lambda b: None)(breaker)
        if (previous is not None and previous.route.fallback == route.fallback
                and previous.upstream == upstream and route.fallback is not None
                and route.fallback.type in _STATEFUL_FALLBACKS):
            fallback = previous.fallback
        else:
            fallback = self._fallback_factory(route, upstream)
        runtime = RouteRuntime(route, upstream, breaker, bulkhead, metrics, fallback)
        if previous is not None and previous.breaker is breaker:
            runtime.last_failure = previous.last_failure  # same breaker, same story
        return runtime


# Their state (queued requests and their replay worker, remembered answers) must survive a
# reload; static and table fallbacks are rebuilt from the files and config they read.
_STATEFUL_FALLBACKS = frozenset({"queue", "cache"})

_MANUAL: dict[State, Callable[[Breaker], None]] = {
    State.FORCED_OPEN: Breaker.force_open,
    State.FORCED_CLOSED: Breaker.force_closed,
    State.DISABLED: Breaker.disable,
}
