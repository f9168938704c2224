"""proxy/bulkhead.py: the per-route in-flight cap never waits (§3)."""

from __future__ import annotations

import pytest

from proxy.core.bulkhead import Bulkhead


def test_enters_up_to_the_limit_then_refuses_at_once() -> None:
    b = Bulkhead(2)
    assert (b.try_enter(), b.try_enter(), b.try_enter()) == (True, True, False)
    assert (b.in_flight, b.is_full) == (2, True)


def test_leaving_makes_room() -> None:
    b = Bulkhead(1)
    assert b.try_enter() is True
    assert b.try_enter() is False
    b.leave()
    assert (b.in_flight, b.is_full) == (0, False)
    assert b.try_enter() is True


def test_zero_is_unlimited() -> None:
    b = Bulkhead(0)
    assert all(b.try_enter() for _ in range(10_000))
    assert (b.in_flight, b.is_full) == (10_000, False)


def test_default_is_unlimited() -> None:
    assert Bulkhead().limit == 0


def test_lowering_the_limit_lets_calls_in_flight_finish() -> None:
    b = Bulkhead(3)
    for _ in range(3):
        assert b.try_enter() is True
    b.limit = 1  # hot reload
    assert b.try_enter() is False
    b.leave()
    b.leave()
    assert b.try_enter() is False  # 1 in flight: at the new limit
    b.leave()
    assert b.try_enter() is True
    assert (b.in_flight, b.limit) == (1, 1)


def test_raising_the_limit_admits_more_at_once() -> None:
    b = Bulkhead(1)
    assert b.try_enter() is True
    b.limit = 2
    assert b.try_enter() is True
    b.limit = 0
    assert b.try_enter() is True
    assert b.in_flight == 3


def test_leave_without_enter_is_a_bug() -> None:
    b = Bulkhead(1)
    with pytest.raises(RuntimeError, match=r"Bulkhead.leave\(\) without a matching try_enter\(\)"):
        b.leave()
    assert b.in_flight == 0


@pytest.mark.parametrize("limit", [-1, -100])
def test_negative_limits_are_refused(limit: int) -> None:
    message = f"bulkhead limit must be >= 0 \\(0 = unlimited\\), got {limit}"
    with pytest.raises(ValueError, match=message):
        Bulkhead(limit)
    b = Bulkhead(5)
    with pytest.raises(ValueError):
        b.limit = limit
    assert b.limit == 5
