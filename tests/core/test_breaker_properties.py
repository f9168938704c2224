"""proxy/breaker.py under random sequences of calls, clock moves and admin actions.

A hypothesis rule-based machine drives a Breaker on a FakeClock and checks, after every
step, the invariants of §3: trials in flight ≤ half_open_max_calls, no permit while
open before retry_at, never one in forced_open, always one in closed / forced_closed /
disabled, and cumulative counts equal to what the machine did.
"""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.core.breaker import ALL_STATES, Breaker, Permit, State, Transition
from proxy.core.clock import FakeClock
from proxy.config.model import Policy, WindowSpec

ALWAYS_PERMIT = (State.CLOSED, State.FORCED_CLOSED, State.DISABLED)


class BreakerMachine(RuleBasedStateMachine):
    window = WindowSpec(type="count", size=6)

    def __init__(self) -> None:
        super().__init__()
        self.policy = Policy(
            failure_threshold=3,
            success_threshold=2,
            open_timeout_ms=1000,
            max_open_timeout_ms=5000,
            backoff_multiplier=2.0,
            jitter=0.5,
            half_open_max_calls=2,
            window=self.window,
            minimum_calls=3,
            failure_rate_threshold=60,
            slow_call_duration_ms=1000,
            slow_call_rate_threshold=80,
        )
        self.clock = FakeClock()
        self.breaker = Breaker("shipping.quotes", self.policy, self.clock, random.Random(1))
        self.transitions: list[Transition] = []
        self.breaker.add_listener(self.transitions.append)
        # Outstanding permits: (permit, state it was issued in, transitions seen by then).
        self.outstanding: list[tuple[Permit, State, int]] = []
        self.success = self.failure = self.rejected = 0
        self.trial_successes = (-1, 0)  # (transitions seen when counting, successes)

    # -- calls -----------------------------------------------------------------------------

    @rule(times=st.integers(min_value=1, max_value=3))
    def acquire(self, times: int) -> None:
        for _ in range(times):
            self._acquire_one()

    def _acquire_one(self) -> None:
        before = self.breaker.state  # applies the lazy open → half_open
        in_flight = self.breaker.view().half_open_in_flight
        permit = self.breaker.try_acquire()
        if before in ALWAYS_PERMIT:
            assert permit is not None
        elif before is State.FORCED_OPEN or before is State.OPEN:
            assert permit is None
        else:
            assert (permit is not None) == (in_flight < self.policy.half_open_max_calls)
        if permit is None:
            self.rejected += 1
        else:
            self.outstanding.append((permit, before, len(self.transitions)))

    @precondition(lambda self: self.outstanding)
    @rule(
        back=st.integers(min_value=0, max_value=5),
        failed=st.booleans(),
        duration=st.sampled_from([0.0, 0.2, 0.999, 1.0, 3.0]),
    )
    def record(self, back: int, failed: bool, duration: float) -> None:
        # Mostly the latest permits (the ones still current), sometimes an older, stale one.
        self._record(max(0, len(self.outstanding) - 1 - back), failed, duration)

    @precondition(lambda self: self.breaker.state is State.HALF_OPEN)
    @rule(failed=st.booleans())
    def trial(self, failed: bool) -> None:
        # A shortcut through half_open: one trial call let through and answered.
        self._acquire_one()
        if self.outstanding and self.outstanding[-1][1] is State.HALF_OPEN:
            self._record(len(self.outstanding) - 1, failed, 0.0)

    def _record(self, index: int, failed: bool, duration: float) -> None:
        permit, issued_in, seen = self.outstanding.pop(index)
        self.clock.advance(duration)
        stale = seen != len(self.transitions)
        count_before = len(self.transitions)
        took = self.breaker.record(permit, failed=failed)
        assert took == self.clock.monotonic() - permit.started
        if failed:
            self.failure += 1
        else:
            self.success += 1
        if stale:  # began before a transition: must not cause another
            assert len(self.transitions) == count_before
        elif issued_in is State.HALF_OPEN and failed:
            assert self.transitions[-1].reason == "half_open_failure"
        elif issued_in is State.HALF_OPEN:
            # Consecutive trial successes within this half-open period.
            period, successes = self.trial_successes
            successes = successes + 1 if period == seen else 1
            self.trial_successes = (seen, successes)
            closes = successes >= self.policy.success_threshold
            assert (len(self.transitions) > count_before) == closes
            if closes:
                assert self.transitions[-1].reason == "success_threshold"

    @precondition(lambda self: self.breaker.state is State.CLOSED)
    @rule()
    def fail_until_open(self) -> None:
        # A shortcut to the deep states: failure_threshold failures in a row open it (the
        # failure rate may open it sooner).
        for _ in range(self.policy.failure_threshold):
            if self.breaker.state is not State.CLOSED:
                break
            self._acquire_one()
            self._record(len(self.outstanding) - 1, True, 0.0)
        assert self.breaker.state is State.OPEN

    @precondition(lambda self: self.outstanding)
    @rule(back=st.integers(min_value=0, max_value=5))
    def release(self, back: int) -> None:
        permit, _, _ = self.outstanding.pop(max(0, len(self.outstanding) - 1 - back))
        count_before = len(self.transitions)
        self.breaker.release(permit)
        assert len(self.transitions) == count_before

    @rule()
    def bulkhead_rejects(self) -> None:
        self.breaker.note_rejected()
        self.rejected += 1

    # -- time ------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.001, 0.3, 1.0, 2.5, 7.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.breaker.state is State.OPEN)
    @rule()
    def advance_to_just_before_retry_at(self) -> None:
        remaining = self.breaker.retry_after()
        assert remaining is not None
        if remaining > 0.001:
            self.clock.advance(remaining - 0.001)
        assert self.breaker.state is State.OPEN
        assert self.breaker.try_acquire() is None
        self.rejected += 1

    @precondition(lambda self: self.breaker.state is State.OPEN)
    @rule()
    def advance_to_retry_at(self) -> None:
        remaining = self.breaker.retry_after()
        assert remaining is not None
        self.clock.advance(remaining)  # exact: now and retry_at are close (Sterbenz)
        assert self.breaker.state is State.HALF_OPEN

    # -- admin -----------------------------------------------------------------------------

    @rule(action=st.sampled_from(["force_open", "force_closed", "disable", "reset"]))
    def admin(self, action: str) -> None:
        getattr(self.breaker, action)()
        expected = {
            "force_open": State.FORCED_OPEN,
            "force_closed": State.FORCED_CLOSED,
            "disable": State.DISABLED,
            "reset": State.CLOSED,
        }[action]
        assert self.breaker.state is expected
        if action == "reset":
            self.success = self.failure = self.rejected = 0

    @rule()
    def restore_own_export(self) -> None:
        exported = self.breaker.export_state()
        count_before = len(self.transitions)
        self.breaker.restore(
            State(exported["state"]),
            opened_at_wall=exported["opened_at_wall"],
            retry_at_wall=exported["retry_at_wall"],
            open_count=exported["open_count"],
        )
        assert self.breaker.state is State(exported["state"])
        assert len(self.transitions) == count_before

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def trials_within_limit(self) -> None:
        view = self.breaker.view()
        assert 0 <= view.half_open_in_flight <= self.policy.half_open_max_calls
        if view.state is State.HALF_OPEN:
            # Exactly the permits let through since the breaker last became half_open.
            current = [
                p
                for p, issued_in, seen in self.outstanding
                if issued_in is State.HALF_OPEN and seen == len(self.transitions)
            ]
            assert view.half_open_in_flight == len(current)
        else:
            assert view.half_open_in_flight == 0

    @invariant()
    def counts_are_what_happened(self) -> None:
        view = self.breaker.view()
        assert (view.calls_success, view.calls_failure, view.calls_rejected) == (
            self.success,
            self.failure,
            self.rejected,
        )
        assert view.slow_calls <= view.calls_success + view.calls_failure

    @invariant()
    def retry_only_while_open(self) -> None:
        view = self.breaker.view()
        assert view.state in ALL_STATES
        if view.state is State.OPEN:
            assert view.retry_after is not None and view.retry_at_wall is not None
            assert 0 < view.retry_after <= self.policy.max_open_timeout_ms / 1000 + 1e-6
            assert view.open_count >= 1
        else:
            assert (view.retry_after, view.retry_at_wall) == (None, None)
            assert self.breaker.retry_after() is None
        if view.state is State.HALF_OPEN:
            assert view.open_count >= 1
        if view.state is State.CLOSED:
            assert view.open_count == 0

    @invariant()
    def rates_only_from_minimum_calls(self) -> None:
        view = self.breaker.view()
        enough = view.window.calls >= self.policy.minimum_calls
        assert (view.failure_rate is not None) == enough
        assert (view.slow_call_rate is not None) == enough
        if enough:
            assert view.failure_rate == view.window.failures / view.window.calls

    @invariant()
    def transitions_chain(self) -> None:
        for a, b in zip(self.transitions, self.transitions[1:]):
            assert a.to_state is b.from_state
        for t in self.transitions:
            assert t.from_state is not t.to_state


class TimeWindowBreakerMachine(BreakerMachine):
    window = WindowSpec(type="time", size=None, seconds=5)


_settings = settings(max_examples=75, stateful_step_count=50, deadline=None)
TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = _settings
TestTimeWindowBreakerMachine = TimeWindowBreakerMachine.TestCase
TestTimeWindowBreakerMachine.settings = _settings
