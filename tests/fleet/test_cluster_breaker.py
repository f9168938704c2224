"""The breaker's fleet hooks (§8), pure, on a FakeClock: `adopt_open`, `follow_close`,
`hold_trials`. What the fleet does with them is tests/fleet/test_cluster.py."""

from __future__ import annotations

from proxy.config.model import Policy, ProbeSpec
from proxy.core.breaker import WAITING_FOR_FLEET_TRIAL, Breaker, State, Transition
from proxy.core.clock import FakeClock

NAME = "inventory.stock"


def rig(**overrides: object) -> tuple[FakeClock, Breaker, list[Transition]]:
    policy = Policy(**{"failure_threshold": 2, "success_threshold": 1, "open_timeout_ms": 10_000,
                       "max_open_timeout_ms": 60_000, "jitter": 0.0, "half_open_max_calls": 1,
                       **overrides})  # type: ignore[arg-type]
    clock = FakeClock()
    breaker = Breaker(NAME, policy, clock)
    seen: list[Transition] = []
    breaker.add_listener(seen.append)
    return clock, breaker, seen


def trip(breaker: Breaker) -> None:
    for _ in range(breaker.policy.failure_threshold):
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.record(permit, failed=True)
    assert breaker.state is State.OPEN


def test_adopt_open_keeps_the_other_proxys_retry_at_to_the_bit():
    clock, breaker, seen = rig()
    retry_at = clock.wall() + 7.123456789
    assert breaker.adopt_open(retry_at_wall=retry_at, opened_at_wall=clock.wall() - 1, open_count=3)
    view = breaker.view()
    assert (view.state, view.retry_at_wall, view.opened_at_wall, view.open_count) == (
        State.OPEN, retry_at, clock.wall() - 1, 3)
    assert breaker.try_acquire() is None  # rejects at once, from memory
    assert [(t.from_state, t.to_state, t.reason) for t in seen] == [(State.CLOSED, State.OPEN, "fleet_open")]
    clock.advance(7.1)
    assert breaker.state is State.OPEN
    clock.advance(0.03)
    assert breaker.state is State.HALF_OPEN


def test_adopt_open_is_capped_refuses_a_past_period_and_an_operators_state():
    clock, breaker, _ = rig()
    assert not breaker.adopt_open(retry_at_wall=clock.wall() - 0.001, opened_at_wall=None, open_count=1)
    assert breaker.state is State.CLOSED
    assert breaker.adopt_open(retry_at_wall=clock.wall() + 3600, opened_at_wall=None, open_count=1)
    assert breaker.retry_after() == 60.0  # never past max_open_timeout_ms
    clock2, forced, _ = rig()
    forced.force_closed()
    assert not forced.adopt_open(retry_at_wall=clock2.wall() + 5, opened_at_wall=None, open_count=1)
    assert forced.state is State.FORCED_CLOSED


def test_an_adopted_period_is_the_backoff_step_of_the_next_reopen():
    clock, breaker, _ = rig(backoff_multiplier=2.0)
    breaker.adopt_open(retry_at_wall=clock.wall() + 5, opened_at_wall=None, open_count=2)
    clock.advance(5)
    permit = breaker.try_acquire()  # the trial
    assert permit is not None
    breaker.record(permit, failed=True)
    assert breaker.retry_after() == 40.0  # 10 s × 2^2: step 3, as the other proxy would wait


def test_held_trials_reject_customers_and_the_prober_until_released():
    clock, breaker, _ = rig()
    trip(breaker)
    breaker.hold_trials(True)
    clock.advance(10)
    assert breaker.try_acquire() is None
    assert breaker.try_acquire_trial() is None
    view = breaker.view()
    assert (view.state, view.waiting_for, view.calls_rejected) == (State.HALF_OPEN, WAITING_FOR_FLEET_TRIAL, 1)
    breaker.hold_trials(False)
    assert breaker.view().waiting_for == "trial_request"
    assert breaker.try_acquire() is not None
    assert breaker.try_acquire() is None  # half_open_max_calls is still the limit


def test_holding_changes_nothing_outside_half_open():
    _, breaker, _ = rig()
    breaker.hold_trials(True)
    assert breaker.try_acquire() is not None
    _, probed, _ = rig(probe=ProbeSpec(path="/healthz"))
    probed.hold_trials(True)
    assert probed.try_acquire_trial() is None  # closed: no trial anyway


def test_follow_close_from_open_and_half_open_only():
    clock, breaker, seen = rig()
    assert not breaker.follow_close()
    trip(breaker)
    assert breaker.follow_close()
    assert breaker.state is State.CLOSED and breaker.view().open_count == 0
    trip(breaker)
    clock.advance(10)
    assert breaker.state is State.HALF_OPEN
    assert breaker.follow_close()
    assert [t.reason for t in seen if t.to_state is State.CLOSED] == ["fleet_closed", "fleet_closed"]
    breaker.force_open()
    assert not breaker.follow_close()
    assert breaker.state is State.FORCED_OPEN
