"""fake_upstreams.modes: parsing every mode, and each decision on a hand-set clock."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fake_upstreams.modes import (
    Action,
    Decision,
    Mode,
    ModeError,
    ModeSpec,
    ModeState,
    make_mode,
    parse_mode,
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"mode": "healthy"}, ModeSpec(mode=Mode.HEALTHY)),
        ({"mode": "error"}, ModeSpec(mode=Mode.ERROR, status=500, rate=1.0)),
        ({"mode": "error", "status": 503, "rate": 0.25}, ModeSpec(mode=Mode.ERROR, status=503, rate=0.25)),
        ({"mode": "error", "rate": 0}, ModeSpec(mode=Mode.ERROR, status=500, rate=0.0)),
        ({"mode": "slow"}, ModeSpec(mode=Mode.SLOW, latency_ms=1000.0)),
        ({"mode": "slow", "latency_ms": 20}, ModeSpec(mode=Mode.SLOW, latency_ms=20.0)),
        ({"mode": "hang"}, ModeSpec(mode=Mode.HANG)),
        ({"mode": "down"}, ModeSpec(mode=Mode.DOWN)),
        ({"mode": "flap"}, ModeSpec(mode=Mode.FLAP, period_s=5.0, status=500)),
        ({"mode": "flap", "period_s": 0.2, "status": 502}, ModeSpec(mode=Mode.FLAP, period_s=0.2, status=502)),
    ],
)
def test_parse_fills_in_defaults(body: dict[str, object], expected: ModeSpec) -> None:
    assert parse_mode(body) == expected


def test_make_mode_is_parse_mode_with_keywords() -> None:
    assert make_mode("error", status=429, rate=0.5) == ModeSpec(mode=Mode.ERROR, status=429, rate=0.5)


def test_as_dict_shows_mode_and_its_options_only() -> None:
    assert make_mode("error", status=503).as_dict() == {"mode": "error", "status": 503, "rate": 1.0}
    assert make_mode("down").as_dict() == {"mode": "down"}


@pytest.mark.parametrize(
    ("body", "problems"),
    [
        ([], ['body must be a JSON object such as {"mode": "error", "status": 503}']),
        ({}, ["mode is required: one of healthy, error, slow, hang, down, flap"]),
        ({"mode": "broken"}, ["unknown mode 'broken': expected one of healthy, error, slow, hang, down, flap"]),
        ({"mode": 3}, ["unknown mode 3: expected one of healthy, error, slow, hang, down, flap"]),
        ({"mode": "error", "status": 600}, ["status must be an integer from 400 to 599, got 600"]),
        ({"mode": "error", "status": 399}, ["status must be an integer from 400 to 599, got 399"]),
        ({"mode": "error", "status": "500"}, ["status must be an integer from 400 to 599, got '500'"]),
        ({"mode": "error", "status": True}, ["status must be an integer from 400 to 599, got True"]),
        ({"mode": "error", "rate": 1.5}, ["rate must be a number from 0 to 1, got 1.5"]),
        ({"mode": "error", "rate": -0.1}, ["rate must be a number from 0 to 1, got -0.1"]),
        ({"mode": "slow", "latency_ms": -1}, ["latency_ms must be a number from 0 to 600000, got -1"]),
        ({"mode": "slow", "latency_ms": None}, ["latency_ms must be a number from 0 to 600000, got None"]),
        ({"mode": "flap", "period_s": 0}, ["period_s must be a number above 0, at most 86400, got 0"]),
        ({"mode": "healthy", "status": 500}, ["mode 'healthy' takes no option 'status' (it takes no options)"]),
        ({"mode": "slow", "status": 500}, ["mode 'slow' takes no option 'status' (it takes latency_ms)"]),
        (
            {"mode": "error", "status": 700, "rate": 2, "latency_ms": 5},
            [
                "mode 'error' takes no option 'latency_ms' (it takes status, rate)",
                "status must be an integer from 400 to 599, got 700",
                "rate must be a number from 0 to 1, got 2",
            ],
        ),
    ],
)
def test_parse_names_every_problem(body: object, problems: list[str]) -> None:
    with pytest.raises(ModeError) as caught:
        parse_mode(body)
    assert caught.value.problems == problems
    assert str(caught.value) == "; ".join(problems)


def outcomes(state: ModeState, count: int, now: float = 0.0) -> list[Action]:
    return [state.decide(now).action for _ in range(count)]


def test_healthy_passes_everything() -> None:
    assert outcomes(ModeState(ModeSpec(), 0.0), 3) == [Action.PASS] * 3


def test_error_rate_one_fails_every_call_with_its_status() -> None:
    state = ModeState(make_mode("error", status=503), 0.0)
    assert [state.decide(0.0) for _ in range(3)] == [Decision(Action.ERROR, status=503)] * 3


def test_error_rate_half_alternates_starting_with_a_failure() -> None:
    state = ModeState(make_mode("error", rate=0.5), 0.0)
    assert outcomes(state, 4) == [Action.ERROR, Action.PASS, Action.ERROR, Action.PASS]


def test_error_rate_tenth_fails_exactly_one_call_in_ten() -> None:
    state = ModeState(make_mode("error", rate=0.1), 0.0)
    assert outcomes(state, 20).count(Action.ERROR) == 2


def test_error_rate_zero_never_fails() -> None:
    assert outcomes(ModeState(make_mode("error", rate=0), 0.0), 10) == [Action.PASS] * 10


@given(rate=st.floats(min_value=0, max_value=1), calls=st.integers(min_value=0, max_value=200))
def test_error_count_is_ceil_of_calls_times_rate(rate: float, calls: int) -> None:
    state = ModeState(make_mode("error", rate=rate), 0.0)
    expected = math.ceil(calls * Fraction(repr(rate)))
    assert outcomes(state, calls).count(Action.ERROR) == expected


def test_slow_delays_by_latency() -> None:
    state = ModeState(make_mode("slow", latency_ms=250), 0.0)
    assert state.decide(0.0) == Decision(Action.DELAY, delay_s=0.25)


def test_hang_and_down() -> None:
    assert ModeState(make_mode("hang"), 0.0).decide(0.0) == Decision(Action.HANG)
    assert ModeState(make_mode("down"), 0.0).decide(0.0) == Decision(Action.DROP)


def test_flap_is_healthy_first_then_error_each_other_period() -> None:
    state = ModeState(make_mode("flap", period_s=2, status=502), since=100.0)
    error = Decision(Action.ERROR, status=502)
    assert state.decide(100.0) == Decision(Action.PASS)
    assert state.decide(101.999) == Decision(Action.PASS)
    assert state.decide(102.0) == error
    assert state.decide(103.999) == error
    assert state.decide(104.0) == Decision(Action.PASS)
    assert state.decide(106.5) == error
    assert state.flap_phase(106.5) is Mode.ERROR
    assert state.flap_phase(99.0) is Mode.HEALTHY  # a clock before `since` is period 0


def test_every_decision_is_counted() -> None:
    state = ModeState(make_mode("hang"), 0.0)
    outcomes(state, 3)
    assert state.calls == 3
