"""proxy/breaker.py: every transition, both sides of every boundary, on a FakeClock."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from proxy.core.breaker import (
    ALL_STATES,
    Breaker,
    BreakerView,
    Permit,
    State,
    Transition,
)
from proxy.core.clock import FakeClock
from proxy.config.model import Policy, ProbeSpec, WindowSpec
from proxy.core.latency import LatencySketch
from proxy.core.slow import AUTO_MIN_SAMPLES, AUTO_RECOMPUTE_EVERY
from proxy.core.window import WindowCounts

NAME = "payment.charges"
WALL0 = 1_700_000_000.0  # FakeClock defaults
MONO0 = 1000.0


def make_policy(**overrides: object) -> Policy:
    """Small numbers; the rate conditions are off unless a test turns them on."""
    base: dict[str, object] = {
        "failure_threshold": 3,
        "success_threshold": 2,
        "open_timeout_ms": 10_000,
        "max_open_timeout_ms": 60_000,
        "backoff_multiplier": 2.0,
        "jitter": 0.0,
        "half_open_max_calls": 1,
        "window": WindowSpec(type="count", size=10),
        "minimum_calls": 4,
        "failure_rate_threshold": 0,
        "slow_call_duration_ms": 2000,
        "slow_call_rate_threshold": 0,
    }
    base.update(overrides)
    return Policy(**base)  # type: ignore[arg-type]


class Rig:
    def __init__(self, rng: random.Random | None = None, **overrides: object) -> None:
        self.clock = FakeClock()
        self.breaker = Breaker(NAME, make_policy(**overrides), self.clock, rng)
        self.transitions: list[Transition] = []
        self.breaker.add_listener(self.transitions.append)

    def call(self, *, failed: bool, duration: float = 0.0) -> float:
        permit = self.breaker.try_acquire()
        assert permit is not None
        self.clock.advance(duration)
        return self.breaker.record(permit, failed=failed)

    def advance_to(self, t: float) -> None:
        # Exact: t and now are within a factor of 2, so t - now is exact (Sterbenz).
        self.clock.advance(t - self.clock.monotonic())
        assert self.clock.monotonic() == t

    def trip(self) -> None:
        for _ in range(self.breaker.policy.failure_threshold):
            self.call(failed=True)
        assert self.breaker.state is State.OPEN

    def to_half_open(self) -> None:
        self.clock.advance(self.breaker.retry_after())  # type: ignore[arg-type]
        assert self.breaker.state is State.HALF_OPEN

    def tr(self, frm: State, to: State, reason: str) -> Transition:
        return Transition(NAME, frm, to, self.clock.wall(), reason)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_states_are_the_contract_strings_in_order() -> None:
    assert ALL_STATES == (
        State.CLOSED,
        State.OPEN,
        State.HALF_OPEN,
        State.FORCED_OPEN,
        State.FORCED_CLOSED,
        State.DISABLED,
    )
    assert [s.value for s in ALL_STATES] == [
        "closed",
        "open",
        "half_open",
        "forced_open",
        "forced_closed",
        "disabled",
    ]
    assert json.dumps(State.HALF_OPEN) == '"half_open"'


def test_new_breaker_view(rig: Rig) -> None:
    assert rig.breaker.name == NAME
    assert rig.breaker.view() == BreakerView(
        name=NAME,
        state=State.CLOSED,
        failure_rate=None,
        slow_call_rate=None,
        window=WindowCounts(calls=0, failures=0, slow=0),
        consecutive_failures=0,
        calls_success=0,
        calls_failure=0,
        calls_rejected=0,
        slow_calls=0,
        opened_at_wall=None,
        retry_at_wall=None,
        retry_after=None,
        half_open_in_flight=0,
        open_count=0,
        slow_threshold_ms=2000.0,
        slow_in_flight=0,
        waiting_for=None,
    )
    assert rig.breaker.retry_after() is None


def test_permit_carries_generation_and_start(rig: Rig) -> None:
    assert rig.breaker.try_acquire() == Permit(generation=0, started=MONO0)


# -- closed → open --------------------------------------------------------------------------


def test_consecutive_failures_open_at_the_threshold(rig: Rig) -> None:
    rig.call(failed=True)
    rig.call(failed=True)
    assert rig.breaker.state is State.CLOSED
    assert rig.transitions == []
    rig.call(failed=True)
    assert rig.breaker.state is State.OPEN
    assert rig.transitions == [
        Transition(NAME, State.CLOSED, State.OPEN, WALL0, "consecutive_failures")
    ]
    assert rig.breaker.view() == BreakerView(
        name=NAME,
        state=State.OPEN,
        failure_rate=None,  # 3 calls < minimum_calls 4
        slow_call_rate=None,
        window=WindowCounts(calls=3, failures=3, slow=0),  # kept while open: what tripped it
        consecutive_failures=0,
        calls_success=0,
        calls_failure=3,
        calls_rejected=0,
        slow_calls=0,
        opened_at_wall=WALL0,
        retry_at_wall=WALL0 + 10.0,
        retry_after=10.0,
        half_open_in_flight=0,
        open_count=1,
        slow_threshold_ms=2000.0,
        slow_in_flight=0,
        waiting_for=None,
    )


def test_a_success_breaks_the_run_of_failures(rig: Rig) -> None:
    for failed in (True, True, False, True, True):
        rig.call(failed=failed)
    assert rig.breaker.state is State.CLOSED
    assert rig.breaker.view().consecutive_failures == 2


def test_failure_threshold_zero_is_off() -> None:
    rig = Rig(failure_threshold=0)
    for _ in range(50):
        rig.call(failed=True)
    assert rig.breaker.state is State.CLOSED
    assert rig.breaker.view().consecutive_failures == 50


def test_failure_rate_opens_at_the_threshold_only_from_minimum_calls() -> None:
    rig = Rig(failure_threshold=0, failure_rate_threshold=50, minimum_calls=4)
    b = rig.breaker
    for failed in (True, True, True):  # 100 %, but 3 < minimum_calls
        rig.call(failed=failed)
    assert b.state is State.CLOSED
    assert b.view().failure_rate is None
    rig.call(failed=True)  # 4 calls, 100 %
    assert b.state is State.OPEN
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "failure_rate")]


def test_failure_rate_just_below_and_at_the_threshold() -> None:
    rig = Rig(failure_threshold=0, failure_rate_threshold=50, minimum_calls=4)
    b = rig.breaker
    for failed in (False, True, False, False, True):  # 2 of 5 = 40 %
        rig.call(failed=failed)
    assert b.state is State.CLOSED
    assert b.view().failure_rate == 0.4
    rig.call(failed=True)  # 3 of 6 = 50 %
    assert b.state is State.OPEN
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "failure_rate")]
    assert b.view().failure_rate == 0.5


def test_slow_means_at_least_the_duration(rig: Rig) -> None:
    rig.call(failed=False, duration=1.999)
    assert rig.breaker.view().slow_calls == 0
    assert rig.call(failed=False, duration=2.0) == 2.0
    view = rig.breaker.view()
    assert view.slow_calls == 1
    assert view.window == WindowCounts(calls=2, failures=0, slow=1)


def test_slow_call_rate_opens_at_the_threshold() -> None:
    rig = Rig(failure_threshold=0, slow_call_rate_threshold=60, minimum_calls=5)
    b = rig.breaker
    for duration in (0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 2.0):  # 4 of 7 = 57 %
        rig.call(failed=False, duration=duration)
    assert b.state is State.CLOSED
    rig.call(failed=False, duration=2.0)  # 5 of 8 = 62.5 %
    assert b.state is State.OPEN
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "slow_call_rate")]
    view = b.view()
    assert view.slow_call_rate == 0.625
    assert view.failure_rate == 0.0
    assert (view.calls_success, view.slow_calls) == (8, 5)


def test_rate_thresholds_zero_are_off() -> None:
    rig = Rig(failure_threshold=0, failure_rate_threshold=0, slow_call_rate_threshold=0)
    for _ in range(30):
        rig.call(failed=True, duration=5.0)
    assert rig.breaker.state is State.CLOSED
    view = rig.breaker.view()
    assert (view.failure_rate, view.slow_call_rate) == (1.0, 1.0)


def test_time_window_rates_forget_old_calls() -> None:
    rig = Rig(
        failure_threshold=0,
        failure_rate_threshold=50,
        minimum_calls=4,
        window=WindowSpec(type="time", size=None, seconds=10),
    )
    b = rig.breaker
    for _ in range(3):
        rig.call(failed=True)
    rig.clock.advance(10.0)  # those three are now out of the window
    for failed in (False, False, False, True):  # 1 of 4 = 25 %
        rig.call(failed=failed)
    assert b.state is State.CLOSED
    assert b.view().window == WindowCounts(calls=4, failures=1, slow=0)
    rig.call(failed=True)  # 2 of 5
    rig.call(failed=True)  # 3 of 6 = 50 %
    assert b.state is State.OPEN


# -- open ------------------------------------------------------------------------------------


def test_open_rejects_and_counts_until_retry_at(rig: Rig) -> None:
    rig.trip()  # at MONO0: retry_at = MONO0 + 10
    b = rig.breaker
    assert b.try_acquire() is None
    rig.advance_to(MONO0 + 9.999)  # 1 ms before retry_at
    assert b.try_acquire() is None
    rig.advance_to(MONO0 + 10.0 - 1e-9)  # and just before it
    assert b.try_acquire() is None
    assert b.state is State.OPEN
    assert b.retry_after() == pytest.approx(1e-9, abs=1e-12)
    assert b.view().calls_rejected == 3
    assert len(rig.transitions) == 1
    rig.advance_to(MONO0 + 10.0)  # at it
    assert b.try_acquire() == Permit(generation=2, started=MONO0 + 10.0)
    assert rig.transitions[1:] == [rig.tr(State.OPEN, State.HALF_OPEN, "open_timeout_elapsed")]
    assert b.view().calls_rejected == 3


@pytest.mark.parametrize(
    "read",
    [
        lambda b: b.state,
        lambda b: b.view().state,
        lambda b: State(b.export_state()["state"]),
        lambda b: State.HALF_OPEN if b.retry_after() is None else State.OPEN,
    ],
    ids=["state", "view", "export_state", "retry_after"],
)
def test_every_reader_sees_half_open_from_retry_at(
    rig: Rig, read: Callable[[Breaker], State]
) -> None:
    rig.trip()
    rig.advance_to(MONO0 + 9.999)
    assert read(rig.breaker) is State.OPEN
    rig.advance_to(MONO0 + 10.0)
    assert read(rig.breaker) is State.HALF_OPEN
    assert rig.transitions[1:] == [rig.tr(State.OPEN, State.HALF_OPEN, "open_timeout_elapsed")]


def test_half_open_view(rig: Rig) -> None:
    rig.trip()
    rig.to_half_open()
    assert rig.breaker.view() == BreakerView(
        name=NAME,
        state=State.HALF_OPEN,
        failure_rate=None,
        slow_call_rate=None,
        window=WindowCounts(calls=3, failures=3, slow=0),
        consecutive_failures=0,
        calls_success=0,
        calls_failure=3,
        calls_rejected=0,
        slow_calls=0,
        opened_at_wall=WALL0,
        retry_at_wall=None,
        retry_after=None,
        half_open_in_flight=0,
        open_count=1,
        slow_threshold_ms=2000.0,
        slow_in_flight=0,
        waiting_for="trial_request",
    )


# -- half_open -------------------------------------------------------------------------------


def test_half_open_lets_at_most_max_calls_through() -> None:
    rig = Rig(half_open_max_calls=2)
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    p1 = b.try_acquire()
    p2 = b.try_acquire()
    assert p1 is not None and p2 is not None
    assert b.try_acquire() is None
    assert b.view().half_open_in_flight == 2
    assert b.view().calls_rejected == 1
    b.release(p1)  # the client left: slot free again, nothing counted
    assert b.view().half_open_in_flight == 1
    p3 = b.try_acquire()
    assert p3 is not None
    assert b.try_acquire() is None
    b.record(p2, failed=False)  # an outcome frees its slot too
    assert b.view().half_open_in_flight == 1
    assert b.state is State.HALF_OPEN
    view = b.view()
    assert (view.calls_success, view.calls_failure, view.calls_rejected) == (1, 3, 2)


def test_release_is_neither_success_nor_failure(rig: Rig) -> None:
    rig.trip()
    rig.to_half_open()
    b = rig.breaker
    for _ in range(5):
        p = b.try_acquire()
        assert p is not None
        b.release(p)
    assert b.state is State.HALF_OPEN
    view = b.view()
    assert (view.calls_success, view.calls_failure, view.half_open_in_flight) == (0, 3, 0)


def test_success_threshold_closes_and_starts_afresh(rig: Rig) -> None:
    rig.trip()
    rig.to_half_open()
    rig.call(failed=False)
    assert rig.breaker.state is State.HALF_OPEN
    rig.call(failed=False)
    assert rig.breaker.state is State.CLOSED
    assert rig.transitions[2:] == [rig.tr(State.HALF_OPEN, State.CLOSED, "success_threshold")]
    view = rig.breaker.view()
    assert view.window == WindowCounts(calls=0, failures=0, slow=0)
    assert (view.open_count, view.opened_at_wall, view.retry_at_wall) == (0, None, None)
    assert (view.calls_success, view.calls_failure) == (2, 3)
    # Backoff starts over: the next open lasts the base period again.
    rig.trip()
    assert rig.breaker.view().retry_at_wall == rig.clock.wall() + 10.0


def test_half_open_failure_reopens(rig: Rig) -> None:
    rig.trip()
    rig.to_half_open()
    rig.call(failed=False)
    rig.call(failed=True)
    assert rig.breaker.state is State.OPEN
    assert rig.transitions[2:] == [rig.tr(State.HALF_OPEN, State.OPEN, "half_open_failure")]
    view = rig.breaker.view()
    assert (view.open_count, view.opened_at_wall) == (2, rig.clock.wall())


def test_slow_success_in_half_open_still_counts_as_success(rig: Rig) -> None:
    rig.trip()
    rig.to_half_open()
    rig.call(failed=False, duration=5.0)
    rig.call(failed=False, duration=5.0)
    assert rig.breaker.state is State.CLOSED
    assert rig.breaker.view().slow_calls == 2


# -- backoff, cap, jitter --------------------------------------------------------------------


def test_backoff_grows_on_each_reopen_up_to_the_cap(rig: Rig) -> None:
    rig.trip()
    periods = [rig.breaker.view().retry_after]
    for _ in range(4):
        rig.to_half_open()
        rig.call(failed=True)
        periods.append(rig.breaker.view().retry_after)
    assert periods == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert rig.breaker.view().open_count == 5


def test_backoff_multiplier_one_is_constant() -> None:
    rig = Rig(backoff_multiplier=1.0)
    rig.trip()
    for _ in range(3):
        rig.to_half_open()
        rig.call(failed=True)
        assert rig.breaker.view().retry_at_wall == rig.clock.wall() + 10.0


def test_backoff_never_overflows() -> None:
    rig = Rig(backoff_multiplier=10.0)
    rig.trip()
    for _ in range(400):  # 10.0 ** 400 would overflow a float
        rig.to_half_open()
        rig.call(failed=True)
    assert rig.breaker.view().retry_at_wall == rig.clock.wall() + 60.0


def test_jitter_scales_the_period_by_the_injected_rng() -> None:
    rig = Rig(rng=random.Random(42), jitter=0.5)
    expected_rng = random.Random(42)
    rig.trip()
    for base in (10.0, 20.0, 40.0, 60.0, 60.0):
        factor = expected_rng.uniform(0.5, 1.0)
        assert rig.breaker.view().retry_at_wall == rig.clock.wall() + base * 1000 * factor / 1000
        rig.to_half_open()
        rig.call(failed=True)


def test_jitter_stays_within_bounds_and_never_exceeds_the_cap() -> None:
    for seed in range(200):
        rig = Rig(rng=random.Random(seed), jitter=0.3, max_open_timeout_ms=15_000)
        rig.trip()
        first = rig.breaker.view().retry_at_wall - rig.clock.wall()  # type: ignore[operator]
        assert 7.0 - 1e-6 <= first <= 10.0 + 1e-6
        rig.to_half_open()
        rig.call(failed=True)  # 20 s capped at 15 s, then jittered
        second = rig.breaker.view().retry_at_wall - rig.clock.wall()  # type: ignore[operator]
        assert 10.5 - 1e-6 <= second <= 15.0 + 1e-6


# -- stale permits ---------------------------------------------------------------------------


def test_stale_result_counts_but_does_not_steer(rig: Rig) -> None:
    b = rig.breaker
    old = b.try_acquire()
    assert old is not None
    rig.trip()
    window_before = b.view().window
    rig.clock.advance(3.0)
    assert b.record(old, failed=False) == 3.0  # began in closed, ends while open
    view = b.view()
    assert view.state is State.OPEN
    assert view.window == window_before
    assert (view.calls_success, view.calls_failure, view.slow_calls) == (1, 3, 1)


def test_stale_results_do_not_close_or_reopen_half_open(rig: Rig) -> None:
    b = rig.breaker
    stale = [b.try_acquire() for _ in range(3)]
    rig.trip()
    rig.to_half_open()
    trial = b.try_acquire()
    assert trial is not None
    b.record(stale[0], failed=False)  # type: ignore[arg-type]
    b.record(stale[1], failed=False)  # type: ignore[arg-type]  # would be success_threshold
    assert b.state is State.HALF_OPEN
    b.record(stale[2], failed=True)  # type: ignore[arg-type]  # would re-open
    assert b.state is State.HALF_OPEN
    assert b.view().half_open_in_flight == 1  # the real trial still holds its slot
    b.record(trial, failed=False)
    assert b.view().half_open_in_flight == 0
    assert len(rig.transitions) == 2


def test_stale_release_does_not_free_a_new_trial_slot() -> None:
    rig = Rig(half_open_max_calls=1)
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    first = b.try_acquire()
    assert first is not None
    b.record(first, failed=True)  # re-open
    rig.to_half_open()
    current = b.try_acquire()
    assert current is not None
    b.release(first)  # from the previous half-open period: nothing to free
    assert b.view().half_open_in_flight == 1
    assert b.try_acquire() is None


def test_release_in_closed_changes_nothing(rig: Rig) -> None:
    p = rig.breaker.try_acquire()
    assert p is not None
    rig.breaker.release(p)
    assert rig.breaker.view() == Rig().breaker.view()


def test_note_rejected_counts_rejections_only(rig: Rig) -> None:
    rig.breaker.note_rejected()
    rig.breaker.note_rejected()
    view = rig.breaker.view()
    assert (view.calls_rejected, view.calls_failure, view.state) == (2, 0, State.CLOSED)


# -- manual states ---------------------------------------------------------------------------


def test_forced_open_rejects_everything_without_retry_after(rig: Rig) -> None:
    b = rig.breaker
    b.force_open()
    assert rig.transitions == [rig.tr(State.CLOSED, State.FORCED_OPEN, "forced")]
    for _ in range(3):
        assert b.try_acquire() is None
        rig.clock.advance(1000.0)
    assert b.retry_after() is None
    view = b.view()
    assert view.state is State.FORCED_OPEN
    assert (view.retry_after, view.retry_at_wall, view.opened_at_wall) == (None, None, WALL0)
    assert view.calls_rejected == 3


def test_forced_closed_lets_everything_through_and_never_trips() -> None:
    rig = Rig(failure_rate_threshold=50, slow_call_rate_threshold=50)
    b = rig.breaker
    b.force_closed()
    for _ in range(20):
        rig.call(failed=True, duration=3.0)
    view = b.view()
    assert view.state is State.FORCED_CLOSED
    assert view.window == WindowCounts(calls=10, failures=10, slow=10)
    assert (view.failure_rate, view.consecutive_failures, view.calls_failure) == (1.0, 20, 20)
    assert rig.transitions == [Transition(NAME, State.CLOSED, State.FORCED_CLOSED, WALL0, "forced")]


def test_disabled_is_shadow_mode_even_from_open() -> None:
    rig = Rig(failure_rate_threshold=50)
    b = rig.breaker
    rig.trip()
    b.disable()
    assert rig.transitions[1:] == [rig.tr(State.OPEN, State.DISABLED, "forced")]
    for failed in (True, False, True, True):
        rig.call(failed=failed)
    view = b.view()
    assert view.state is State.DISABLED
    assert view.window == WindowCounts(calls=7, failures=6, slow=0)  # kept from closed
    assert view.failure_rate == 6 / 7
    assert (view.retry_after, view.opened_at_wall, view.consecutive_failures) == (None, None, 2)


def test_forcing_the_current_state_is_not_a_transition(rig: Rig) -> None:
    rig.breaker.force_open()
    rig.breaker.force_open()
    rig.breaker.disable()
    rig.breaker.disable()
    assert [t.to_state for t in rig.transitions] == [State.FORCED_OPEN, State.DISABLED]


def test_manual_states_move_between_each_other(rig: Rig) -> None:
    b = rig.breaker
    b.force_open()
    b.disable()
    b.force_closed()
    b.force_open()
    assert [(t.from_state, t.to_state, t.reason) for t in rig.transitions] == [
        (State.CLOSED, State.FORCED_OPEN, "forced"),
        (State.FORCED_OPEN, State.DISABLED, "forced"),
        (State.DISABLED, State.FORCED_CLOSED, "forced"),
        (State.FORCED_CLOSED, State.FORCED_OPEN, "forced"),
    ]


def test_forcing_after_retry_at_leaves_half_open(rig: Rig) -> None:
    rig.trip()
    rig.clock.advance(10.0)
    rig.breaker.force_open()
    assert [(t.from_state, t.to_state, t.reason) for t in rig.transitions[1:]] == [
        (State.OPEN, State.HALF_OPEN, "open_timeout_elapsed"),
        (State.HALF_OPEN, State.FORCED_OPEN, "forced"),
    ]


@pytest.mark.parametrize(
    ("manual", "state"),
    [
        ("force_open", State.FORCED_OPEN),
        ("force_closed", State.FORCED_CLOSED),
        ("disable", State.DISABLED),
    ],
)
def test_reset_returns_to_automatic_closed(rig: Rig, manual: str, state: State) -> None:
    b = rig.breaker
    rig.trip()
    getattr(b, manual)()
    b.reset()
    assert rig.transitions[1:] == [
        rig.tr(State.OPEN, state, "forced"),
        rig.tr(state, State.CLOSED, "reset"),
    ]
    assert b.view() == Rig().breaker.view()
    rig.trip()  # automatic again
    assert rig.transitions[-1].reason == "consecutive_failures"


def test_reset_from_open_clears_counts_window_and_backoff(rig: Rig) -> None:
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    rig.call(failed=True)  # open_count 2: 20 s
    assert b.try_acquire() is None
    b.reset()
    assert rig.transitions[-1] == rig.tr(State.OPEN, State.CLOSED, "reset")
    view = b.view()
    assert view == Rig().breaker.view()
    rig.trip()
    assert b.view().retry_at_wall == rig.clock.wall() + 10.0


def test_reset_while_closed_is_not_a_transition_but_clears(rig: Rig) -> None:
    b = rig.breaker
    in_flight = b.try_acquire()
    assert in_flight is not None
    rig.call(failed=True)
    rig.call(failed=True)
    b.note_rejected()
    b.reset()
    assert rig.transitions == []
    assert b.view() == Rig().breaker.view()
    b.record(in_flight, failed=True)  # began before the reset: counted, but not in the window
    view = b.view()
    assert (view.calls_failure, view.consecutive_failures, view.window.calls) == (1, 0, 0)


# -- listeners -------------------------------------------------------------------------------


def test_a_failing_listener_is_logged_and_the_others_still_run(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(t: Transition) -> None:
        raise ValueError("boom")

    after: list[Transition] = []
    rig.breaker.add_listener(broken)
    rig.breaker.add_listener(after.append)
    with caplog.at_level(logging.ERROR, logger="proxy.core.breaker"):
        rig.trip()
    assert after == rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "consecutive_failures")]
    assert len(caplog.records) == 1
    assert "breaker=payment.charges from_state=closed to_state=open" in caplog.records[0].message
    assert caplog.records[0].exc_info is not None
    assert rig.breaker.try_acquire() is None  # the breaker carried on


def test_listener_sees_the_breaker_already_moved(rig: Rig) -> None:
    seen: list[tuple[State, dict]] = []
    rig.breaker.add_listener(lambda t: seen.append((t.to_state, rig.breaker.export_state())))
    rig.trip()
    assert seen == [
        (
            State.OPEN,
            {
                "state": "open",
                "opened_at_wall": WALL0,
                "retry_at_wall": WALL0 + 10.0,
                "open_count": 1,
            },
        )
    ]


def test_transitions_caused_inside_a_listener_reach_everyone_in_order(rig: Rig) -> None:
    b = rig.breaker
    b.add_listener(lambda t: b.view())  # reading after retry_at applies open → half_open
    later: list[Transition] = []
    b.add_listener(later.append)
    b.restore(State.OPEN, opened_at_wall=WALL0 - 100, retry_at_wall=WALL0 - 1, open_count=1)
    expected = [
        rig.tr(State.CLOSED, State.OPEN, "restored"),
        rig.tr(State.OPEN, State.HALF_OPEN, "open_timeout_elapsed"),
    ]
    assert rig.transitions == expected
    assert later == expected


def test_remove_listener(rig: Rig) -> None:
    rig.breaker.remove_listener(rig.transitions.append)
    rig.trip()
    assert rig.transitions == []


# -- persistence -----------------------------------------------------------------------------


def test_export_state_is_json(rig: Rig) -> None:
    assert rig.breaker.export_state() == {
        "state": "closed",
        "opened_at_wall": None,
        "retry_at_wall": None,
        "open_count": 0,
    }
    rig.trip()
    json.dumps(rig.breaker.export_state())


def test_restore_open_stays_open_for_what_remained(rig: Rig) -> None:
    b = rig.breaker
    b.restore(State.OPEN, opened_at_wall=WALL0 - 30, retry_at_wall=WALL0 + 30, open_count=2)
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "restored")]
    view = b.view()
    assert (view.state, view.retry_after, view.retry_at_wall) == (State.OPEN, 30.0, WALL0 + 30)
    assert (view.opened_at_wall, view.open_count) == (WALL0 - 30, 2)
    rig.advance_to(MONO0 + 29.999)
    assert b.try_acquire() is None
    rig.advance_to(MONO0 + 30.0)
    assert b.state is State.HALF_OPEN
    # The open_count came back too: the next re-open is the third (k = 2): 40 s.
    rig.call(failed=True)
    assert b.view().retry_at_wall == rig.clock.wall() + 40.0


def test_restore_open_already_past_reads_half_open(rig: Rig) -> None:
    b = rig.breaker
    b.restore(State.OPEN, opened_at_wall=WALL0 - 90, retry_at_wall=WALL0 - 30, open_count=1)
    assert b.state is State.HALF_OPEN
    assert rig.transitions == [
        rig.tr(State.CLOSED, State.OPEN, "restored"),
        rig.tr(State.OPEN, State.HALF_OPEN, "open_timeout_elapsed"),
    ]
    assert b.view().opened_at_wall == WALL0 - 90


def test_restore_open_never_longer_than_the_cap(rig: Rig) -> None:
    rig.breaker.restore(State.OPEN, opened_at_wall=None, retry_at_wall=WALL0 + 9999, open_count=1)
    view = rig.breaker.view()
    assert (view.retry_after, view.retry_at_wall, view.opened_at_wall) == (60.0, WALL0 + 60, WALL0)


def test_restore_open_without_retry_at_takes_a_fresh_period(rig: Rig) -> None:
    # A plain string, as read back from SQLite, is accepted too.
    stored: Any = "open"
    rig.breaker.restore(stored, opened_at_wall=WALL0, retry_at_wall=None, open_count=2)
    view = rig.breaker.view()
    assert (view.state, view.retry_after, view.open_count) == (State.OPEN, 20.0, 2)


@pytest.mark.parametrize(
    ("state", "opened_at_wall"),
    [(State.FORCED_OPEN, WALL0 - 5), (State.FORCED_CLOSED, None), (State.DISABLED, None)],
)
def test_restore_manual_states_as_they_were(
    rig: Rig, state: State, opened_at_wall: float | None
) -> None:
    rig.breaker.restore(state, opened_at_wall=opened_at_wall, retry_at_wall=None, open_count=0)
    rig.clock.advance(10_000.0)
    assert rig.breaker.state is state
    assert rig.transitions == [Transition(NAME, State.CLOSED, state, WALL0, "restored")]
    assert rig.breaker.export_state() == {
        "state": state.value,
        "opened_at_wall": opened_at_wall,
        "retry_at_wall": None,
        "open_count": 0,
    }


def test_restore_half_open_allows_trials(rig: Rig) -> None:
    b = rig.breaker
    b.restore(State.HALF_OPEN, opened_at_wall=WALL0 - 60, retry_at_wall=None, open_count=3)
    assert rig.transitions == [rig.tr(State.CLOSED, State.HALF_OPEN, "restored")]
    rig.call(failed=True)
    assert b.view().retry_after == 60.0  # k = 3: 80 s, capped


def test_restore_closed_on_closed_is_not_a_transition(rig: Rig) -> None:
    rig.breaker.restore(State.CLOSED, opened_at_wall=None, retry_at_wall=None, open_count=0)
    assert rig.transitions == []
    assert rig.breaker.view() == Rig().breaker.view()


def test_restore_same_open_state_updates_its_period(rig: Rig) -> None:
    rig.trip()
    rig.breaker.restore(State.OPEN, opened_at_wall=WALL0, retry_at_wall=WALL0 + 5, open_count=1)
    assert len(rig.transitions) == 1
    assert rig.breaker.view().retry_after == 5.0


def test_export_then_restore_across_a_restart() -> None:
    before = Rig()
    before.trip()
    before.to_half_open()
    before.call(failed=True)  # open for 20 s, open_count 2
    stored = json.loads(json.dumps(before.breaker.export_state()))
    after = Rig()
    after.clock = FakeClock(start_wall=before.clock.wall() + 5.0)  # restarted 5 s later
    after.breaker = Breaker(NAME, make_policy(), after.clock)
    after.breaker.add_listener(after.transitions.append)
    after.breaker.restore(
        State(stored["state"]),
        opened_at_wall=stored["opened_at_wall"],
        retry_at_wall=stored["retry_at_wall"],
        open_count=stored["open_count"],
    )
    view = after.breaker.view()
    assert view.state is State.OPEN
    assert view.retry_at_wall == before.breaker.view().retry_at_wall
    assert view.retry_after == 15.0
    assert view.open_count == 2


# -- the table, the policy, the clock --------------------------------------------------------


def test_move_to_refuses_transitions_outside_the_table(rig: Rig) -> None:
    with pytest.raises(RuntimeError, match=r"closed -> half_open \(success_threshold\)"):
        rig.breaker._move_to(State.HALF_OPEN, MONO0, "success_threshold")
    with pytest.raises(RuntimeError, match=r"closed -> closed \(reset\)"):
        rig.breaker._move_to(State.CLOSED, MONO0, "reset")
    assert rig.transitions == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"half_open_max_calls": 0}, "half_open_max_calls must be >= 1, got 0"),
        ({"success_threshold": 0}, "success_threshold must be >= 1, got 0"),
        ({"jitter": 1.5}, r"jitter must be in \[0, 1\], got 1.5"),
    ],
)
def test_policies_that_would_wedge_it_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Breaker(NAME, make_policy(**overrides), FakeClock())


class CountingClock(FakeClock):
    __slots__ = ("monotonic_reads", "wall_reads")

    def __init__(self) -> None:
        super().__init__()
        self.monotonic_reads = self.wall_reads = 0

    def monotonic(self) -> float:
        self.monotonic_reads += 1
        return super().monotonic()

    def wall(self) -> float:
        self.wall_reads += 1
        return super().wall()


def test_one_clock_read_in_try_acquire_and_one_in_record() -> None:
    clock = CountingClock()
    b = Breaker(NAME, make_policy(), clock)
    permit = b.try_acquire()
    assert (clock.monotonic_reads, clock.wall_reads) == (1, 0)
    b.record(permit, failed=True)  # type: ignore[arg-type]
    assert (clock.monotonic_reads, clock.wall_reads) == (2, 0)
    b.record(b.try_acquire(), failed=True)  # type: ignore[arg-type]
    b.record(b.try_acquire(), failed=True)  # type: ignore[arg-type]  # opens: + 1 wall read
    assert (clock.monotonic_reads, clock.wall_reads) == (6, 1)
    assert b.try_acquire() is None
    assert (clock.monotonic_reads, clock.wall_reads) == (7, 1)


# -- §3a hang detection: slow from the moment it crosses the threshold -----------------------


def test_fixed_threshold_is_the_configured_one(rig: Rig) -> None:
    assert rig.breaker.slow_threshold_s() == 2.0
    assert rig.breaker.view().slow_threshold_ms == 2000.0


def test_mark_slow_counts_once_and_record_does_not_count_again(rig: Rig) -> None:
    b = rig.breaker
    p = b.try_acquire()
    assert p is not None
    rig.clock.advance(2.0)
    b.mark_slow(p)
    view = b.view()
    assert (view.slow_calls, view.slow_in_flight, view.calls_success) == (1, 1, 0)
    rig.clock.advance(5.0)
    assert b.record(p, failed=False, marked_slow=True) == 7.0
    view = b.view()
    assert (view.slow_calls, view.slow_in_flight, view.calls_success) == (1, 0, 1)
    assert view.window == WindowCounts(calls=1, failures=0, slow=1)


def test_a_marked_call_that_fails_is_a_failure_as_well(rig: Rig) -> None:
    b = rig.breaker
    p = b.try_acquire()
    assert p is not None
    b.mark_slow(p)
    b.record(p, failed=True, marked_slow=True)
    view = b.view()
    assert (view.slow_calls, view.calls_failure, view.consecutive_failures) == (1, 1, 1)
    assert view.window == WindowCounts(calls=1, failures=1, slow=1)


def test_a_marked_call_is_slow_even_if_the_threshold_moved_since(rig: Rig) -> None:
    # marked_slow wins over the duration: the call was slow when it was marked.
    b = rig.breaker
    p = b.try_acquire()
    assert p is not None
    b.mark_slow(p)
    b.record(p, failed=False, marked_slow=True)  # 0 s long, but marked
    assert b.view().window.slow == 1
    assert b.view().slow_calls == 1


def test_an_unmarked_call_is_still_judged_at_its_end(rig: Rig) -> None:
    rig.call(failed=False, duration=1.999)
    rig.call(failed=False, duration=2.0)
    view = rig.breaker.view()
    assert (view.slow_calls, view.slow_in_flight, view.window.slow) == (1, 0, 1)


def test_max_slow_in_flight_opens_at_n_not_before() -> None:
    rig = Rig(max_slow_in_flight=2)
    b = rig.breaker
    permits = [b.try_acquire() for _ in range(3)]
    assert all(permits)
    b.mark_slow(permits[0])  # type: ignore[arg-type]
    assert b.state is State.CLOSED and b.view().slow_in_flight == 1
    b.mark_slow(permits[1])  # type: ignore[arg-type]
    assert b.state is State.OPEN
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "slow_in_flight")]
    view = b.view()
    assert (view.slow_in_flight, view.slow_calls, view.open_count) == (0, 2, 1)  # reset on the move
    # The calls in flight keep running; their ends are stale and steer nothing.
    b.mark_slow(permits[2])  # type: ignore[arg-type]
    assert (b.view().slow_in_flight, b.view().slow_calls) == (0, 3)
    for p in permits:
        b.record(p, failed=False, marked_slow=True)  # type: ignore[arg-type]
    view = b.view()
    assert (view.state, view.slow_in_flight, view.slow_calls, view.calls_success) == (State.OPEN, 0, 3, 3)
    assert len(rig.transitions) == 1


def test_slow_calls_that_ended_are_no_longer_in_flight() -> None:
    rig = Rig(max_slow_in_flight=2)
    b = rig.breaker
    first, second = b.try_acquire(), b.try_acquire()
    b.mark_slow(first)  # type: ignore[arg-type]
    b.record(first, failed=False, marked_slow=True)  # type: ignore[arg-type]
    b.mark_slow(second)  # type: ignore[arg-type]  # one at a time: never 2 at once
    assert (b.state, b.view().slow_in_flight) == (State.CLOSED, 1)
    b.release(second, marked_slow=True)  # type: ignore[arg-type]  # the client left
    assert (b.state, b.view().slow_in_flight, b.view().slow_calls) == (State.CLOSED, 0, 2)
    third, fourth = b.try_acquire(), b.try_acquire()
    b.mark_slow(third)  # type: ignore[arg-type]
    b.mark_slow(fourth)  # type: ignore[arg-type]
    assert b.state is State.OPEN


def test_max_slow_in_flight_zero_is_off(rig: Rig) -> None:
    b = rig.breaker
    permits = [b.try_acquire() for _ in range(50)]
    for p in permits:
        b.mark_slow(p)  # type: ignore[arg-type]
    assert (b.state, b.view().slow_in_flight) == (State.CLOSED, 50)


def test_max_slow_in_flight_one_opens_on_the_first() -> None:
    rig = Rig(max_slow_in_flight=1)
    p = rig.breaker.try_acquire()
    rig.breaker.mark_slow(p)  # type: ignore[arg-type]
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "slow_in_flight")]


def test_stale_permits_never_touch_the_slow_in_flight_count() -> None:
    rig = Rig(max_slow_in_flight=2)
    b = rig.breaker
    stale = b.try_acquire()
    b.mark_slow(stale)  # type: ignore[arg-type]
    b.reset()  # not a transition, but a new generation
    assert b.view().slow_in_flight == 0
    current = b.try_acquire()
    b.mark_slow(current)  # type: ignore[arg-type]
    b.release(stale, marked_slow=True)  # type: ignore[arg-type]
    b.record(stale, failed=False, marked_slow=True)  # type: ignore[arg-type]
    assert b.view().slow_in_flight == 1
    b.mark_slow(b.try_acquire())  # type: ignore[arg-type]
    assert b.state is State.OPEN


def test_a_slow_trial_in_half_open_does_nothing_special() -> None:
    rig = Rig(max_slow_in_flight=1, half_open_max_calls=2)
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    t1, t2 = b.try_acquire(), b.try_acquire()
    b.mark_slow(t1)  # type: ignore[arg-type]
    b.mark_slow(t2)  # type: ignore[arg-type]
    assert (b.state, b.view().slow_in_flight, len(rig.transitions)) == (State.HALF_OPEN, 2, 2)
    b.record(t1, failed=False, marked_slow=True)  # type: ignore[arg-type]
    assert b.view().slow_in_flight == 1
    b.record(t2, failed=False, marked_slow=True)  # type: ignore[arg-type]
    assert b.state is State.CLOSED  # two successes: slow, but successes (§3)
    assert b.view().slow_calls == 2


@pytest.mark.parametrize("manual", ["force_closed", "disable"])
def test_manual_closed_states_count_slow_in_flight_but_never_trip(manual: str) -> None:
    rig = Rig(max_slow_in_flight=1)
    b = rig.breaker
    getattr(b, manual)()
    for _ in range(3):
        b.mark_slow(b.try_acquire())  # type: ignore[arg-type]
    assert (b.view().slow_in_flight, len(rig.transitions)) == (3, 1)


def test_slow_in_flight_opens_only_from_closed_in_the_table(rig: Rig) -> None:
    with pytest.raises(RuntimeError, match=r"half_open -> open \(slow_in_flight\)"):
        rig.trip()
        rig.to_half_open()
        rig.breaker._move_to(State.OPEN, rig.clock.monotonic(), "slow_in_flight")


def test_mark_slow_reads_the_clock_only_to_trip() -> None:
    clock = CountingClock()
    b = Breaker(NAME, make_policy(max_slow_in_flight=2), clock)
    p1, p2 = b.try_acquire(), b.try_acquire()
    b.mark_slow(p1)  # type: ignore[arg-type]
    assert (clock.monotonic_reads, clock.wall_reads) == (2, 0)
    b.mark_slow(p2)  # type: ignore[arg-type]
    assert (clock.monotonic_reads, clock.wall_reads) == (3, 1)


# -- §3a `slow_call_duration_ms: auto` ---------------------------------------------------------


def auto_rig(**overrides: object) -> Rig:
    base: dict[str, object] = {"slow_call_duration_ms": "auto", "timeout_ms": 5000,
                               "failure_threshold": 0}
    base.update(overrides)
    return Rig(**base)


def learned(durations: list[float], factor: float = 4.0) -> float:
    sketch = LatencySketch()
    for d in durations:
        sketch.add(d, now=0.0)
    return factor * sketch.quantile(0.99)  # type: ignore[operator]


def test_auto_is_the_timeout_until_enough_successes_were_seen() -> None:
    assert (AUTO_MIN_SAMPLES, AUTO_RECOMPUTE_EVERY) == (100, 64)
    rig = auto_rig()
    assert rig.breaker.slow_threshold_s() == 5.0
    # 2 × 64 records, of which only 99 successes: not enough.
    for _ in range(29):
        rig.call(failed=True, duration=0.1)
    for _ in range(99):
        rig.call(failed=False, duration=0.1)
    assert rig.breaker.slow_threshold_s() == 5.0
    # The same with 100 successes: learned at the 128th record.
    rig = auto_rig()
    for _ in range(28):
        rig.call(failed=True, duration=0.1)
    for _ in range(99):
        rig.call(failed=False, duration=0.1)
    assert rig.breaker.slow_threshold_s() == 5.0  # 127 records: not recomputed yet
    rig.call(failed=False, duration=0.1)
    assert rig.breaker.slow_threshold_s() == learned([0.1] * 100)
    assert 0.4 <= rig.breaker.slow_threshold_s() < 0.4 * 1.05
    assert rig.breaker.view().slow_threshold_ms == rig.breaker.slow_threshold_s() * 1000


def test_auto_is_learned_at_the_100th_success_then_recomputed_every_64_records_only() -> None:
    rig = auto_rig()
    for _ in range(99):
        rig.call(failed=False, duration=0.1)
    assert rig.breaker.slow_threshold_s() == 5.0  # timeout_ms until 100 calls were seen
    rig.call(failed=False, duration=0.1)
    first = rig.breaker.slow_threshold_s()
    assert first == learned([0.1] * 100)
    for _ in range(63):
        rig.call(failed=False, duration=0.5)  # p99 moves at once, the cached value does not
    assert rig.breaker.slow_threshold_s() == first
    rig.call(failed=False, duration=0.5)
    assert rig.breaker.slow_threshold_s() == learned([0.1] * 100 + [0.5] * 64)
    assert rig.breaker.slow_threshold_s() >= 2.0


def test_auto_is_clamped_to_the_floor_and_the_timeout() -> None:
    rig = auto_rig(auto_slow_floor_ms=10)
    for _ in range(128):
        rig.call(failed=False, duration=0.0005)  # 4 × ~0.5 ms = 2 ms < 10 ms
    assert rig.breaker.slow_threshold_s() == 0.010
    rig = auto_rig(auto_slow_floor_ms=1)
    for _ in range(128):
        rig.call(failed=False, duration=0.0005)
    assert rig.breaker.slow_threshold_s() == learned([0.0005] * 128)
    assert 0.002 <= rig.breaker.slow_threshold_s() < 0.0022
    rig = auto_rig(timeout_ms=1000)
    for _ in range(128):
        rig.call(failed=False, duration=0.3)  # 4 × 0.3 = 1.2 s > 1 s
    assert rig.breaker.slow_threshold_s() == 1.0


def test_auto_factor_scales_the_p99() -> None:
    rig = auto_rig(auto_slow_factor=1.5)
    durations = [0.01 * (i % 50 + 1) for i in range(128)]  # p99 ~ 0.5 s
    for d in durations:
        rig.call(failed=False, duration=d)
    assert rig.breaker.slow_threshold_s() == learned(durations, factor=1.5)


def test_auto_learns_only_from_successes() -> None:
    rig = auto_rig()
    for _ in range(200):
        rig.call(failed=True, duration=0.1)
    assert rig.breaker.slow_threshold_s() == 5.0


def test_auto_threshold_decides_slow_calls() -> None:
    rig = auto_rig(slow_call_rate_threshold=50, minimum_calls=4, window=WindowSpec(type="count", size=4))
    for _ in range(128):
        rig.call(failed=False, duration=0.1)
    threshold = rig.breaker.slow_threshold_s()
    rig.call(failed=False, duration=threshold - 0.001)
    assert rig.breaker.view().slow_calls == 0
    rig.call(failed=False, duration=threshold)
    assert rig.breaker.view().slow_calls == 1
    rig.call(failed=False, duration=threshold)
    assert rig.transitions == [rig.tr(State.CLOSED, State.OPEN, "slow_call_rate")]


def test_auto_survives_transitions_but_reset_forgets_it() -> None:
    rig = auto_rig(failure_threshold=3)
    for _ in range(128):
        rig.call(failed=False, duration=0.1)
    learned_s = rig.breaker.slow_threshold_s()
    assert learned_s < 5.0
    rig.trip()
    rig.to_half_open()
    assert rig.breaker.slow_threshold_s() == learned_s
    rig.breaker.reset()
    assert rig.breaker.slow_threshold_s() == 5.0


def test_auto_ages_out_old_latencies() -> None:
    rig = auto_rig()
    for _ in range(128):
        rig.call(failed=False, duration=1.0)  # learned ~4 s
    assert rig.breaker.slow_threshold_s() >= 4.0
    for _ in range(2048):  # two rotations of the sketch later, only the new latency is left
        rig.call(failed=False, duration=0.01)
    assert 0.04 <= rig.breaker.slow_threshold_s() < 0.043


def test_a_policy_with_a_bad_slow_value_is_refused() -> None:
    with pytest.raises(ValueError, match="slow_call_duration_ms must be a number or 'auto'"):
        Breaker(NAME, make_policy(slow_call_duration_ms="fast"), FakeClock())


# -- probes: the proxy's own half-open trials --------------------------------------------------

PROBE = ProbeSpec(path="/health")


def test_with_a_probe_customers_are_never_the_trial() -> None:
    rig = Rig(probe=PROBE, half_open_max_calls=2)
    b = rig.breaker
    rig.trip()
    rig.advance_to(MONO0 + 10.0)
    assert b.try_acquire() is None  # the customer's look applies open → half_open, then rejects
    assert rig.transitions[1:] == [rig.tr(State.OPEN, State.HALF_OPEN, "open_timeout_elapsed")]
    assert b.try_acquire() is None
    view = b.view()
    assert (view.state, view.calls_rejected, view.half_open_in_flight) == (State.HALF_OPEN, 2, 0)
    assert view.waiting_for == "probe"


def test_trial_permits_respect_half_open_max_calls() -> None:
    rig = Rig(probe=PROBE, half_open_max_calls=2)
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    t1, t2 = b.try_acquire_trial(), b.try_acquire_trial()
    assert t1 == t2 == Permit(generation=2, started=rig.clock.monotonic())
    assert b.try_acquire_trial() is None
    b.release(t1)  # type: ignore[arg-type]
    assert b.try_acquire_trial() is not None
    view = b.view()
    assert (view.half_open_in_flight, view.calls_rejected) == (2, 0)  # a full prober is no rejection


def test_try_acquire_trial_applies_the_lazy_move_at_retry_at_not_before() -> None:
    rig = Rig(probe=PROBE)
    b = rig.breaker
    rig.trip()
    rig.advance_to(MONO0 + 9.999)
    assert b.try_acquire_trial() is None
    assert (b.view().state, b.view().calls_rejected) == (State.OPEN, 0)
    rig.advance_to(MONO0 + 10.0)
    assert b.try_acquire_trial() == Permit(generation=2, started=MONO0 + 10.0)
    assert rig.transitions[1:] == [rig.tr(State.OPEN, State.HALF_OPEN, "open_timeout_elapsed")]


@pytest.mark.parametrize("manual", [None, "force_open", "force_closed", "disable"])
def test_no_trial_outside_half_open(manual: str | None) -> None:
    rig = Rig(probe=PROBE)
    if manual:
        getattr(rig.breaker, manual)()
    assert rig.breaker.try_acquire_trial() is None


def test_success_threshold_probes_close_it() -> None:
    rig = Rig(probe=PROBE)  # success_threshold 2
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    b.record(b.try_acquire_trial(), failed=False)  # type: ignore[arg-type]
    assert b.state is State.HALF_OPEN
    assert b.try_acquire() is None  # still no customer
    b.record(b.try_acquire_trial(), failed=False)  # type: ignore[arg-type]
    assert b.state is State.CLOSED
    assert rig.transitions[-1] == rig.tr(State.HALF_OPEN, State.CLOSED, "success_threshold")
    assert b.try_acquire() is not None  # customers again
    assert b.try_acquire_trial() is None
    assert b.view().waiting_for is None


def test_a_failed_probe_reopens_it() -> None:
    rig = Rig(probe=PROBE)
    b = rig.breaker
    rig.trip()
    rig.to_half_open()
    b.record(b.try_acquire_trial(), failed=False)  # type: ignore[arg-type]
    b.record(b.try_acquire_trial(), failed=True)  # type: ignore[arg-type]
    assert rig.transitions[-1] == rig.tr(State.HALF_OPEN, State.OPEN, "half_open_failure")
    assert b.view().retry_after == 20.0  # the backoff as for any half-open failure


def test_without_a_probe_customers_are_the_trial_and_the_view_says_so(rig: Rig) -> None:
    b = rig.breaker
    assert b.view().waiting_for is None
    rig.trip()
    assert b.view().waiting_for is None  # open: waiting for the period to end
    rig.to_half_open()
    assert b.view().waiting_for == "trial_request"
    assert b.try_acquire() is not None
    b.force_open()
    assert b.view().waiting_for is None


def test_one_clock_read_in_try_acquire_trial() -> None:
    clock = CountingClock()
    b = Breaker(NAME, make_policy(probe=PROBE), clock)
    assert b.try_acquire_trial() is None
    assert (clock.monotonic_reads, clock.wall_reads) == (1, 0)


# -- refuses(): the open path's shortcut, before any permit --------------------------------------


def test_refuses_only_while_open_or_forced_open_and_changes_nothing(rig) -> None:
    b = rig.breaker
    assert (b.refuses(), b.refusing) == (None, False)  # closed: ask try_acquire
    rig.trip()
    retry_at = MONO0 + b.retry_after()  # type: ignore[operator]
    assert b.refuses() == retry_at - rig.clock.monotonic() > 0
    assert (b.refusing, b.view().calls_rejected) == (True, 0)  # counting is the caller's (note_rejected)
    rig.advance_to(retry_at)  # the open period is over: the shortcut steps aside, moving nothing
    assert (b.refuses(), b._state) == (None, State.OPEN)
    assert b.try_acquire() is not None and b.state is State.HALF_OPEN
    assert (b.refuses(), b.refusing) == (None, False)  # half-open: trials are try_acquire's business
    b.force_open()
    assert (b.refuses(), b.refusing) == (-1.0, True)  # no retry time when forced open
    b.disable()
    assert (b.refuses(), b.refusing) == (None, False)
