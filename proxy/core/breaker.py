"""The circuit breaker: the pure state machine of §3.

It answers "may this call go?" with a Permit and is told the outcome. It never awaits, does
no I/O, starts no timer and reads the time only through the injected Clock: one monotonic
read in `try_acquire`, one in `record`, plus one wall read when (rarely) a transition happens.
open → half_open is applied lazily by whoever looks next (a call, `state`, `view`), so
readers see half_open as soon as `retry_at` has passed.

§3a hang detection: whoever watches calls in flight (the exchange's deadline sweep) calls
`mark_slow` once a call crosses `slow_threshold_s()`; `max_slow_in_flight` such calls at once
open a closed breaker without waiting for any of them to end. With a `probe` configured, a
half-open breaker's trials are the prober's (`try_acquire_trial`), never a customer's.
§8 fleet hooks (driven by `runtime/cluster.py`, never by a request): `hold_trials` keeps a
half-open breaker from running trials while another proxy of the fleet runs them,
`adopt_open` opens it with another proxy's open period, `follow_close` closes it after another
proxy's trial succeeded.
Split along seams: the data types live in `core/breaker_view.py`, the transition table and
the listener fan-out in `core/transitions.py`, the slow threshold in `core/slow.py`.

Not thread-safe: one event loop owns each breaker. Listeners are called synchronously on
every transition and must not block (metrics set gauges; storage, alerts, status enqueue).
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Any

from proxy.core.breaker_view import (ALL_STATES, WAITING_FOR_PROBE, WAITING_FOR_TRIAL_REQUEST,
                                     BreakerView, Permit, State, Transition)
from proxy.core.clock import Clock
from proxy.core.slow import SlowThreshold
from proxy.core.transitions import REASONS, Listener, Notifier, is_allowed
from proxy.core.window import CountWindow, TimeWindow, make_window

if TYPE_CHECKING:
    from proxy.config.model import Policy

__all__ = [  # the data types are re-exported: callers import them all from here
    "ALL_STATES", "REASONS", "WAITING_FOR_PROBE", "WAITING_FOR_TRIAL_REQUEST", "Breaker",
    "BreakerView", "Listener", "Permit", "State", "Transition", "WAITING_FOR_FLEET_TRIAL",
]

log = logging.getLogger(__name__)

# The states as module globals: on Python 3.11 `State.OPEN` is a metaclass attribute lookup
# (about 0.1 µs), and the hot path reads several per call.
CLOSED, OPEN, HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN
FORCED_OPEN, FORCED_CLOSED, DISABLED = State.FORCED_OPEN, State.FORCED_CLOSED, State.DISABLED

# §8: half-open, and another proxy of the fleet runs the trial (BreakerView.waiting_for).
WAITING_FOR_FLEET_TRIAL = "fleet_trial"


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
        "_calls_failure", "_calls_rejected", "_calls_success", "_clock", "_consecutive_failures",
        "_consecutive_successes", "_generation", "_half_open_in_flight", "_name", "_notifier",
        "_open_count", "_opened_at_wall", "_policy", "_retry_at", "_retry_at_wall", "_rng",
        "_slow", "_slow_calls", "_slow_in_flight", "_state", "_trials_held", "_window", "refusing",
    )

    def __init__(
        self, name: str, policy: Policy, clock: Clock, rng: random.Random | None = None
    ) -> None:
        _check_policy(policy)
        self._name = name
        self._policy = policy
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._notifier = Notifier(log)
        self._window: CountWindow | TimeWindow = make_window(policy.window)
        self._slow = SlowThreshold(policy)
        self._state = CLOSED
        # Open or forced open: a call may be refused without a permit (`refuses`). One
        # attribute read lets the healthy path skip the open path's shortcut.
        self.refusing = False
        self._generation = 0
        self._consecutive_failures = 0
        self._consecutive_successes = 0  # half_open only
        self._half_open_in_flight = 0
        self._calls_success = 0
        self._calls_failure = 0
        self._calls_rejected = 0
        self._slow_calls = 0
        self._slow_in_flight = 0  # §3a: current-generation calls marked slow, not yet ended
        self._open_count = 0
        self._retry_at = math.inf  # monotonic; finite only while open
        self._retry_at_wall: float | None = None
        self._opened_at_wall: float | None = None
        self._trials_held = False  # §8: another proxy of the fleet runs the half-open trials

    # -- identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def state(self) -> State:
        if self._state is OPEN:
            self._advance(self._clock.monotonic())
        return self._state

    def add_listener(self, fn: Listener) -> None:
        self._notifier.add(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._notifier.remove(fn)

    # -- the hot path ------------------------------------------------------------------------

    def try_acquire(self) -> Permit | None:
        """A permit for one call, or None when the call must not reach the upstream."""
        now = self._clock.monotonic()
        state = self._state
        if state is OPEN:
            if now < self._retry_at:
                self._calls_rejected += 1
                return None
            self._move_to(HALF_OPEN, now, "open_timeout_elapsed")
            state = self._state  # a listener may have moved it on again
        if state is HALF_OPEN:
            # With a probe, the trials are the prober's (try_acquire_trial): customers keep
            # getting the fallback until the probes have closed it.
            if (self._policy.probe is not None or self._trials_held
                    or self._half_open_in_flight >= self._policy.half_open_max_calls):
                self._calls_rejected += 1
                return None
            self._half_open_in_flight += 1
        elif state is FORCED_OPEN or state is OPEN:
            self._calls_rejected += 1
            return None
        return Permit(self._generation, now)

    def refuses(self) -> float | None:
        """The open path's shortcut, before any permit is asked: when a call now would be
        refused outright (open before its retry time, or forced open), the seconds until
        half-open (-1.0 when forced open: there is none); the caller that refuses it says
        so with `note_rejected`. None: the call must ask `try_acquire` (closed, half-open,
        or the open period is over). Changes nothing."""
        state = self._state
        if state is OPEN:
            remaining = self._retry_at - self._clock.monotonic()
            return remaining if remaining > 0.0 else None
        if state is FORCED_OPEN:
            return -1.0
        return None

    def try_acquire_trial(self) -> Permit | None:
        """A half-open trial permit for the prober, or None (not half-open, or no free slot).

        Applies the lazy open → half_open itself, so the prober may call it as soon as the
        open period ends. A None here is not a rejection: no customer was turned away.
        """
        now = self._clock.monotonic()
        self._advance(now)
        if (self._state is not HALF_OPEN or self._trials_held
                or self._half_open_in_flight >= self._policy.half_open_max_calls):
            return None
        self._half_open_in_flight += 1
        return Permit(self._generation, now)

    def slow_threshold_s(self) -> float:
        """Seconds after which a call is slow (§3a): fixed, or learned with `auto`."""
        return self._slow.seconds

    def mark_slow(self, permit: Permit) -> None:
        """A call still in flight has just crossed `slow_threshold_s()`; once per call (§3a).

        It is slow from now on, not when it ends: counted here, and its `record` or `release`
        must then say `marked_slow=True` so it is neither counted again nor left in flight.
        """
        self._slow_calls += 1
        if permit.generation != self._generation:
            return  # began before the last transition: the count in flight is not its business
        self._slow_in_flight += 1
        limit = self._policy.max_slow_in_flight
        # §3a: N calls hanging at once open it now, without waiting for any of them to end;
        # they keep running. Half-open trials have their own rule: only their outcome counts.
        if self._state is CLOSED and 0 < limit <= self._slow_in_flight:
            self._move_to(OPEN, self._clock.monotonic(), "slow_in_flight")

    def record(self, permit: Permit, *, failed: bool, marked_slow: bool = False) -> float:
        """The outcome of a permitted call; returns its duration in seconds."""
        now = self._clock.monotonic()
        duration = now - permit.started
        # §3: slow means at least the threshold; §3a: a call marked slow while in flight was
        # slow, and counted, already (a threshold learned meanwhile cannot undo that).
        slow = marked_slow or duration >= self._slow.seconds
        if failed:
            self._calls_failure += 1
        else:
            self._calls_success += 1
        if slow and not marked_slow:
            self._slow_calls += 1
        if self._slow.learns:
            self._slow.note(duration, failed=failed, now=now)
        if permit.generation != self._generation:
            # The call began before the last transition: it happened (so the cumulative
            # counters above hold it) but it describes the upstream as it was then and must
            # not close, re-open or trip the breaker now.
            return duration
        if marked_slow and self._slow_in_flight > 0:
            self._slow_in_flight -= 1
        state = self._state
        if state is HALF_OPEN:
            if self._half_open_in_flight > 0:  # a permit recorded twice frees one slot only
                self._half_open_in_flight -= 1
            if failed:
                self._move_to(OPEN, now, "half_open_failure")  # §3: any failure
            else:
                self._consecutive_successes += 1
                if self._consecutive_successes >= self._policy.success_threshold:
                    self._move_to(CLOSED, now, "success_threshold")
            return duration
        # closed, forced_closed or disabled: a current permit is never issued while open or
        # forced open. Forced-closed and disabled keep counting but never trip.
        window = self._window
        window.record(failed, slow, now)
        if failed:
            self._consecutive_failures += 1
        else:
            self._consecutive_failures = 0
        # A success into a window with no failure and no slow call cannot trip anything.
        if state is CLOSED and (failed or slow or window.failures or window.slow):
            reason = self._trip_reason()
            if reason is not None:
                self._move_to(OPEN, now, reason)
        return duration

    def release(self, permit: Permit, *, marked_slow: bool = False) -> None:
        """The client left before the upstream answered: neither success nor failure (§3)."""
        if permit.generation != self._generation:
            return
        if marked_slow and self._slow_in_flight > 0:
            self._slow_in_flight -= 1  # it stays counted in slow_calls: it was slow (§3a)
        if self._state is HALF_OPEN and self._half_open_in_flight > 0:
            self._half_open_in_flight -= 1

    def note_rejected(self) -> None:
        """A call turned away without a permit (the bulkhead, or the open path's shortcut
        after `refuses`): a rejection, not an upstream failure (§3)."""
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
        self._force(FORCED_OPEN)

    def force_closed(self) -> None:
        self._force(FORCED_CLOSED)

    def disable(self) -> None:
        self._force(DISABLED)

    def _force(self, to: State) -> None:
        now = self._clock.monotonic()
        self._advance(now)  # so from_state is what readers saw
        if self._state is not to:
            self._move_to(to, now, "forced")

    def reset(self) -> None:
        """Back to automatic operation in closed: counts, window and backoff cleared."""
        self._calls_success = self._calls_failure = self._calls_rejected = 0
        self._slow_calls = 0
        self._slow.reset()  # a fresh start forgets the learned latency too
        if self._state is CLOSED:
            # Not a transition, but calls in flight belong to the time before the reset.
            self._generation += 1
            self._slow_in_flight = 0
            self._window.reset()
            self._consecutive_failures = 0
            self._open_count = 0
            return
        now = self._clock.monotonic()
        self._advance(now)
        self._move_to(CLOSED, now, "reset")

    # -- the fleet (§8) -----------------------------------------------------------------------

    def hold_trials(self, held: bool) -> None:
        """While held, half-open lets no trial through (customers get the fallback): another
        proxy of the fleet runs the trial. Outside half-open it changes nothing."""
        self._trials_held = held

    def adopt_open(self, *, retry_at_wall: float, opened_at_wall: float | None, open_count: int) -> bool:
        """Open with another proxy's period: the same `retry_at`, not a backoff of our own.
        Only from closed or half-open (an operator's state stays); False when nothing changed
        (another state, or that period is already over)."""
        now = self._clock.monotonic()
        self._advance(now)
        if self._state is not CLOSED and self._state is not HALF_OPEN:
            return False
        wall = self._clock.wall()
        remaining = min(retry_at_wall - wall, self._policy.max_open_timeout_ms / 1000)
        if remaining <= 0:
            return False
        # Their backoff step, so the next re-open here waits as long as theirs would.
        self._open_count = max(self._open_count, int(open_count), 1)
        exact = retry_at_wall if remaining == retry_at_wall - wall else None  # not capped
        self._move_to(OPEN, now, "fleet_open", wall=wall, remaining=remaining,
                      opened_at_wall=opened_at_wall, retry_at_wall=exact)
        return True

    def follow_close(self) -> bool:
        """Close because another proxy's half-open trial succeeded; False unless open or
        half-open."""
        now = self._clock.monotonic()
        if self._state is not OPEN and self._state is not HALF_OPEN:
            return False
        self._move_to(CLOSED, now, "fleet_closed")
        return True

    # -- readers -----------------------------------------------------------------------------

    def view(self) -> BreakerView:
        now = self._clock.monotonic()
        self._advance(now)
        counts = self._window.counts(now)
        p = self._policy
        enough = counts.calls > 0 and counts.calls >= p.minimum_calls
        state = self._state
        is_open = state is OPEN
        waiting_for = None
        if state is HALF_OPEN and self._trials_held:
            waiting_for = WAITING_FOR_FLEET_TRIAL
        elif state is HALF_OPEN:
            waiting_for = WAITING_FOR_TRIAL_REQUEST if p.probe is None else WAITING_FOR_PROBE
        return BreakerView(
            name=self._name,
            state=state,
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
            slow_threshold_ms=self._slow.seconds * 1000,
            slow_in_flight=self._slow_in_flight,
            waiting_for=waiting_for,
        )

    def retry_after(self) -> float | None:
        """Seconds until half_open while open; None in every other state (§4)."""
        if self._state is not OPEN:
            return None
        now = self._clock.monotonic()
        self._advance(now)
        if self._state is not OPEN:
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
        if state is OPEN:
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
        if state is OPEN:
            assert remaining is not None
            self._retry_at = now + remaining
            self._retry_at_wall = wall + remaining
            self._opened_at_wall = opened_at_wall
        elif state is HALF_OPEN or state is FORCED_OPEN:
            if opened_at_wall is not None:
                self._opened_at_wall = opened_at_wall
        elif state is CLOSED:
            self._open_count = 0

    # -- the one place state changes ---------------------------------------------------------

    def _advance(self, now: float) -> None:
        """The lazy open → half_open of §3, applied by whoever looks first."""
        if self._state is OPEN and now >= self._retry_at:
            self._move_to(HALF_OPEN, now, "open_timeout_elapsed")

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
        retry_at_wall: float | None = None,
    ) -> None:
        frm = self._state
        if not is_allowed(frm, to, reason):
            raise RuntimeError(f"breaker {self._name}: {frm} -> {to} ({reason}) is not allowed")
        if wall is None:
            wall = self._clock.wall()
        self._state = to
        self.refusing = to is OPEN or to is FORCED_OPEN
        # Permits from before now are stale: their results must not steer the new state.
        self._generation += 1
        self._consecutive_failures = 0
        self._consecutive_successes = 0
        self._half_open_in_flight = 0
        self._slow_in_flight = 0  # those calls are stale now: they never touch it again
        if to is OPEN:
            if remaining is None:
                # k = re-opens since last closed: 0 on the first open, +1 per half_open failure.
                self._open_count += 1
                remaining = self._open_period(self._open_count - 1)
            self._retry_at = now + remaining
            # An adopted period keeps the other proxy's retry_at to the bit (§8: the same).
            self._retry_at_wall = wall + remaining if retry_at_wall is None else retry_at_wall
            self._opened_at_wall = wall if opened_at_wall is None else opened_at_wall
        else:
            self._retry_at = math.inf
            self._retry_at_wall = None
            if to is CLOSED:
                # A fresh start: old failures must not trip it again, backoff starts over.
                self._window.reset()
                self._open_count = 0
                self._opened_at_wall = None
            elif to is FORCED_OPEN:
                self._opened_at_wall = wall if opened_at_wall is None else opened_at_wall
            elif to is HALF_OPEN:
                if opened_at_wall is not None:
                    self._opened_at_wall = opened_at_wall
            else:  # forced_closed, disabled: the window is kept, failure_rate stays visible
                self._opened_at_wall = None
        self._notifier.notify(Transition(self._name, frm, to, wall, reason))
