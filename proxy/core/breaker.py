"""The circuit breaker: the pure state machine of CONTRACT §3.

It answers "may this call go?" with a Permit and is told the outcome. It never awaits, does
no I/O, starts no timer and reads the time only through the injected Clock: one monotonic
read in `try_acquire`, one in `record`, plus one wall read when (rarely) a transition happens.
open → half_open is applied lazily by whoever looks next (a call, `state`, `view`), so
readers see half_open as soon as `retry_at` has passed.

Not thread-safe: one event loop owns each breaker. Listeners are called synchronously on
every transition and must not block (metrics set gauges; storage, alerts, status enqueue).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from proxy.core.clock import Clock
from proxy.core.window import CountWindow, TimeWindow, WindowCounts, make_window

if TYPE_CHECKING:
    from proxy.config.model import Policy

log = logging.getLogger(__name__)


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"
    DISABLED = "disabled"


ALL_STATES: tuple[State, ...] = tuple(State)

_ANY = frozenset(State)
_MANUAL = frozenset({State.FORCED_OPEN, State.FORCED_CLOSED, State.DISABLED})

# reason → (states it may leave, states it may enter). Anything else is a bug in this module.
_ALLOWED: dict[str, tuple[frozenset[State], frozenset[State]]] = {
    "consecutive_failures": (frozenset({State.CLOSED}), frozenset({State.OPEN})),
    "failure_rate": (frozenset({State.CLOSED}), frozenset({State.OPEN})),
    "slow_call_rate": (frozenset({State.CLOSED}), frozenset({State.OPEN})),
    "half_open_failure": (frozenset({State.HALF_OPEN}), frozenset({State.OPEN})),
    "open_timeout_elapsed": (frozenset({State.OPEN}), frozenset({State.HALF_OPEN})),
    "success_threshold": (frozenset({State.HALF_OPEN}), frozenset({State.CLOSED})),
    "forced": (_ANY, _MANUAL),  # force_open, force_closed, disable
    "reset": (_ANY, frozenset({State.CLOSED})),
    "restored": (_ANY, _ANY),  # start-up: whatever was stored (§6)
}
REASONS: tuple[str, ...] = tuple(_ALLOWED)


@dataclass(frozen=True, slots=True)
class Permit:
    generation: int  # breaker generation when the call was let through
    started: float  # clock.monotonic() at that moment


@dataclass(frozen=True, slots=True)
class Transition:
    breaker: str
    from_state: State
    to_state: State
    at_wall: float
    reason: str  # one of REASONS


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerView:
    """One consistent reading of a breaker: what status.json, metrics and fallbacks show."""

    name: str
    state: State
    failure_rate: float | None  # 0..1 over the window; None below minimum_calls
    slow_call_rate: float | None  # 0..1 over the window; None below minimum_calls
    window: WindowCounts
    consecutive_failures: int
    calls_success: int  # cumulative since start or the last reset (stale results included)
    calls_failure: int
    calls_rejected: int  # open / forced_open / half-open full, plus bulkhead rejections
    slow_calls: int  # cumulative, whatever the slow-rate threshold
    opened_at_wall: float | None  # open, half_open (when it last opened), forced_open
    retry_at_wall: float | None  # only while open
    retry_after: float | None  # seconds until half_open; only while open
    half_open_in_flight: int
    open_count: int  # opens since the breaker was last closed; drives the backoff


Listener = Callable[[Transition], None]


def _check_policy(policy: Policy) -> None:
    # The loader validates everything; these would wedge the state machine, so say so here too.
    if policy.half_open_max_calls < 1:
        raise ValueError(f"half_open_max_calls must be >= 1, got {policy.half_open_max_calls}")
    if policy.success_threshold < 1:
        raise ValueError(f"success_threshold must be >= 1, got {policy.success_threshold}")
    if not 0.0 <= policy.jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {policy.jitter}")


class Breaker:
    __slots__ = (
        "_calls_failure",
        "_calls_rejected",
        "_calls_success",
        "_clock",
        "_consecutive_failures",
        "_consecutive_successes",
        "_generation",
        "_half_open_in_flight",
        "_listeners",
        "_name",
        "_notifying",
        "_open_count",
        "_opened_at_wall",
        "_pending",
        "_policy",
        "_retry_at",
        "_retry_at_wall",
        "_rng",
        "_slow_calls",
        "_slow_s",
        "_state",
        "_window",
    )

    def __init__(
        self, name: str, policy: Policy, clock: Clock, rng: random.Random | None = None
    ) -> None:
        _check_policy(policy)
        self._name = name
        self._policy = policy
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._listeners: list[Listener] = []
        self._pending: deque[Transition] = deque()
        self._notifying = False
        self._window: CountWindow | TimeWindow = make_window(policy.window)
        self._slow_s = policy.slow_call_duration_ms / 1000  # units converted once
        self._state = State.CLOSED
        self._generation = 0
        self._consecutive_failures = 0
        self._consecutive_successes = 0  # half_open only
        self._half_open_in_flight = 0
        self._calls_success = 0
        self._calls_failure = 0
        self._calls_rejected = 0
        self._slow_calls = 0
        self._open_count = 0
        self._retry_at = math.inf  # monotonic; finite only while open
        self._retry_at_wall: float | None = None
        self._opened_at_wall: float | None = None

    # -- identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def state(self) -> State:
        if self._state is State.OPEN:
            self._advance(self._clock.monotonic())
        return self._state

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    # -- the hot path ------------------------------------------------------------------------

    def try_acquire(self) -> Permit | None:
        """A permit for one call, or None when the call must not reach the upstream."""
        now = self._clock.monotonic()
        state = self._state
        if state is State.OPEN:
            if now < self._retry_at:
                self._calls_rejected += 1
                return None
            self._move_to(State.HALF_OPEN, now, "open_timeout_elapsed")
            state = self._state  # a listener may have moved it on again
        if state is State.HALF_OPEN:
            if self._half_open_in_flight >= self._policy.half_open_max_calls:
                self._calls_rejected += 1
                return None
            self._half_open_in_flight += 1
        elif state is State.FORCED_OPEN or state is State.OPEN:
            self._calls_rejected += 1
            return None
        return Permit(self._generation, now)

    def record(self, permit: Permit, *, failed: bool) -> float:
        """The outcome of a permitted call; returns its duration in seconds."""
        now = self._clock.monotonic()
        duration = now - permit.started
        slow = duration >= self._slow_s  # §3: slow means at least slow_call_duration_ms
        if failed:
            self._calls_failure += 1
        else:
            self._calls_success += 1
        if slow:
            self._slow_calls += 1
        if permit.generation != self._generation:
            # The call began before the last transition: it happened (so the cumulative
            # counters above hold it) but it describes the upstream as it was then and must
            # not close, re-open or trip the breaker now.
            return duration
        state = self._state
        if state is State.HALF_OPEN:
            if self._half_open_in_flight > 0:  # a permit recorded twice frees one slot only
                self._half_open_in_flight -= 1
            if failed:
                self._move_to(State.OPEN, now, "half_open_failure")  # §3: any failure
            else:
                self._consecutive_successes += 1
                if self._consecutive_successes >= self._policy.success_threshold:
                    self._move_to(State.CLOSED, now, "success_threshold")
            return duration
        # closed, forced_closed or disabled: a current permit is never issued while open or
        # forced open. Forced-closed and disabled keep counting but never trip.
        self._window.record(failed, slow, now)
        if failed:
            self._consecutive_failures += 1
        else:
            self._consecutive_failures = 0
        if state is State.CLOSED:
            reason = self._trip_reason()
            if reason is not None:
                self._move_to(State.OPEN, now, reason)
        return duration

    def release(self, permit: Permit) -> None:
        """The client left before the upstream answered: neither success nor failure (§3)."""
        if (
            permit.generation == self._generation
            and self._state is State.HALF_OPEN
            and self._half_open_in_flight > 0
        ):
            self._half_open_in_flight -= 1

    def note_rejected(self) -> None:
        """The bulkhead turned a call away: a rejection, not an upstream failure (§3)."""
        self._calls_rejected += 1

    def _trip_reason(self) -> str | None:
        p = self._policy
        if p.failure_threshold > 0 and self._consecutive_failures >= p.failure_threshold:
            return "consecutive_failures"
        w = self._window
        calls = w.calls  # totals are current: the window was just given `now`
        if calls > 0 and calls >= p.minimum_calls:
            # Compare in percent without dividing: failures / calls ≥ threshold / 100.
            failure_pct, slow_pct = p.failure_rate_threshold, p.slow_call_rate_threshold
            if failure_pct > 0 and w.failures * 100 >= failure_pct * calls:
                return "failure_rate"
            if slow_pct > 0 and w.slow * 100 >= slow_pct * calls:
                return "slow_call_rate"
        return None

    # -- manual control (admin, §6) ----------------------------------------------------------

    def force_open(self) -> None:
        self._force(State.FORCED_OPEN)

    def force_closed(self) -> None:
        self._force(State.FORCED_CLOSED)

    def disable(self) -> None:
        self._force(State.DISABLED)

    def _force(self, to: State) -> None:
        now = self._clock.monotonic()
        self._advance(now)  # so from_state is what readers saw
        if self._state is not to:
            self._move_to(to, now, "forced")

    def reset(self) -> None:
        """Back to automatic operation in closed: counts, window and backoff cleared."""
        self._calls_success = self._calls_failure = self._calls_rejected = 0
        self._slow_calls = 0
        if self._state is State.CLOSED:
            # Not a transition, but calls in flight belong to the time before the reset.
            self._generation += 1
            self._window.reset()
            self._consecutive_failures = 0
            self._open_count = 0
            return
        now = self._clock.monotonic()
        self._advance(now)
        self._move_to(State.CLOSED, now, "reset")

    # -- readers -----------------------------------------------------------------------------

    def view(self) -> BreakerView:
        now = self._clock.monotonic()
        self._advance(now)
        counts = self._window.counts(now)
        p = self._policy
        enough = counts.calls > 0 and counts.calls >= p.minimum_calls
        is_open = self._state is State.OPEN
        return BreakerView(
            name=self._name,
            state=self._state,
            failure_rate=counts.failures / counts.calls if enough else None,
            slow_call_rate=counts.slow / counts.calls if enough else None,
            window=counts,
            consecutive_failures=self._consecutive_failures,
            calls_success=self._calls_success,
            calls_failure=self._calls_failure,
            calls_rejected=self._calls_rejected,
            slow_calls=self._slow_calls,
            opened_at_wall=self._opened_at_wall,
            retry_at_wall=self._retry_at_wall if is_open else None,
            retry_after=self._retry_at - now if is_open else None,
            half_open_in_flight=self._half_open_in_flight,
            open_count=self._open_count,
        )

    def retry_after(self) -> float | None:
        """Seconds until half_open while open; None in every other state (§4)."""
        if self._state is not State.OPEN:
            return None
        now = self._clock.monotonic()
        self._advance(now)
        if self._state is not State.OPEN:
            return None
        return self._retry_at - now

    # -- persistence (storage restores these on restart, §6) ---------------------------------

    def export_state(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "opened_at_wall": self._opened_at_wall,
            "retry_at_wall": self._retry_at_wall,
            "open_count": self._open_count,
        }

    def restore(
        self,
        state: State,
        *,
        opened_at_wall: float | None,
        retry_at_wall: float | None,
        open_count: int,
    ) -> None:
        """Put back a stored state; an open breaker stays open for what remained of it."""
        state = State(state)
        now = self._clock.monotonic()
        wall = self._clock.wall()
        self._open_count = max(0, int(open_count))
        remaining: float | None = None
        if state is State.OPEN:
            self._open_count = max(self._open_count, 1)  # it has opened at least once
            if retry_at_wall is None:
                remaining = self._open_period(self._open_count - 1)
            else:
                # Measured on the wall clock across the restart; never more than the cap,
                # should the wall clock have stepped back meanwhile. ≤ 0: half_open on the
                # next read.
                remaining = min(retry_at_wall - wall, self._policy.max_open_timeout_ms / 1000)
            if opened_at_wall is None:
                opened_at_wall = wall
        if state is not self._state:
            self._move_to(
                state,
                now,
                "restored",
                wall=wall,
                remaining=remaining,
                opened_at_wall=opened_at_wall,
            )
            return
        # Same state: no transition, only its details (calls in flight stay current).
        if state is State.OPEN:
            assert remaining is not None
            self._retry_at = now + remaining
            self._retry_at_wall = wall + remaining
            self._opened_at_wall = opened_at_wall
        elif state is State.HALF_OPEN or state is State.FORCED_OPEN:
            if opened_at_wall is not None:
                self._opened_at_wall = opened_at_wall
        elif state is State.CLOSED:
            self._open_count = 0

    # -- the one place state changes ---------------------------------------------------------

    def _advance(self, now: float) -> None:
        """The lazy open → half_open of §3, applied by whoever looks first."""
        if self._state is State.OPEN and now >= self._retry_at:
            self._move_to(State.HALF_OPEN, now, "open_timeout_elapsed")

    def _open_period(self, k: int) -> float:
        """Seconds to stay open after k re-opens since last closed: backoff, cap, jitter."""
        p = self._policy
        try:
            ms = p.open_timeout_ms * p.backoff_multiplier**k
        except OverflowError:
            ms = math.inf
        ms = min(ms, p.max_open_timeout_ms)
        if p.jitter > 0:
            ms *= self._rng.uniform(1.0 - p.jitter, 1.0)  # ≤ 1: never past the cap (§3)
        return ms / 1000

    def _move_to(
        self,
        to: State,
        now: float,
        reason: str,
        *,
        wall: float | None = None,
        remaining: float | None = None,
        opened_at_wall: float | None = None,
    ) -> None:
        frm = self._state
        sources, targets = _ALLOWED[reason]
        if frm is to or frm not in sources or to not in targets:
            raise RuntimeError(f"breaker {self._name}: {frm} -> {to} ({reason}) is not allowed")
        if wall is None:
            wall = self._clock.wall()
        self._state = to
        # Permits from before now are stale: their results must not steer the new state.
        self._generation += 1
        self._consecutive_failures = 0
        self._consecutive_successes = 0
        self._half_open_in_flight = 0
        if to is State.OPEN:
            if remaining is None:
                # k = re-opens since last closed: 0 on the first open, +1 per half_open failure.
                self._open_count += 1
                remaining = self._open_period(self._open_count - 1)
            self._retry_at = now + remaining
            self._retry_at_wall = wall + remaining
            self._opened_at_wall = wall if opened_at_wall is None else opened_at_wall
        else:
            self._retry_at = math.inf
            self._retry_at_wall = None
            if to is State.CLOSED:
                # A fresh start: old failures must not trip it again, backoff starts over.
                self._window.reset()
                self._open_count = 0
                self._opened_at_wall = None
            elif to is State.FORCED_OPEN:
                self._opened_at_wall = wall if opened_at_wall is None else opened_at_wall
            elif to is State.HALF_OPEN:
                if opened_at_wall is not None:
                    self._opened_at_wall = opened_at_wall
            else:  # forced_closed, disabled: the window is kept, failure_rate stays visible
                self._opened_at_wall = None
        self._notify(Transition(self._name, frm, to, wall, reason))

    def _notify(self, transition: Transition) -> None:
        # A listener that reads or moves the breaker may cause another transition; queue it
        # so every listener sees every transition, in order.
        self._pending.append(transition)
        if self._notifying:
            return
        self._notifying = True
        try:
            while self._pending:
                t = self._pending.popleft()
                for fn in tuple(self._listeners):
                    try:
                        fn(t)
                    except Exception:
                        log.exception(
                            "transition listener %r failed: breaker=%s from_state=%s to_state=%s",
                            fn,
                            t.breaker,
                            t.from_state,
                            t.to_state,
                        )
        finally:
            self._notifying = False
