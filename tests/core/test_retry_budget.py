"""core/retry_budget.py (§3b): retries within budget_percent of 10 s of requests, ≥ 1 a second."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.retry_budget import WINDOW_S, RetryBudget


def test_one_retry_per_second_is_always_allowed():
    budget = RetryBudget(0.0)  # no share at all: only the floor
    assert budget.try_spend(100.0)
    assert not budget.try_spend(100.5)
    assert not budget.try_spend(100.999)
    assert budget.try_spend(101.0)  # a new second
    assert not budget.try_spend(101.2)
    assert budget.retries == 2


def test_within_percent_of_the_requests_both_sides_of_the_boundary():
    budget = RetryBudget(20.0)
    for _ in range(10):
        budget.note_request(100.0)
    assert budget.try_spend(100.1)  # 1 ≤ 20 % of 10 = 2
    assert budget.try_spend(100.2)  # 2 ≤ 2
    assert not budget.try_spend(100.3)  # 3 > 2, and this second had its retry
    for _ in range(4):
        budget.note_request(100.4)
    assert not budget.try_spend(100.5)  # 3 > 20 % of 14 = 2.8
    budget.note_request(100.6)
    assert budget.try_spend(100.7)  # 3 ≤ 20 % of 15 = 3
    assert (budget.requests, budget.retries) == (15, 3)


def test_percent_is_compared_exactly():
    budget = RetryBudget(10.0)
    for _ in range(30):
        budget.note_request(0.0)
    assert budget.try_spend(0.0)  # the second's free one (and 1 ≤ 3)
    assert budget.try_spend(0.0)
    assert budget.try_spend(0.0)  # 3 ≤ 10 % of 30: float 0.1 × 30 would be 3.0000000000000004
    assert not budget.try_spend(0.0)


def test_the_window_is_the_last_ten_seconds():
    budget = RetryBudget(50.0)
    for _ in range(4):
        budget.note_request(100.0)
    assert budget.try_spend(100.0) and budget.try_spend(100.0)  # 2 ≤ 50 % of 4
    assert not budget.try_spend(100.0)
    # 9.999 s later the requests and retries of second 100 still count...
    budget.note_request(109.999)
    assert (budget.requests, budget.retries) == (5, 2)
    assert budget.try_spend(109.999)  # the free one of second 109
    assert not budget.try_spend(109.999)  # 4 > 2.5
    # ...and at 110.0 they have left the window.
    budget.note_request(110.0)
    assert (budget.requests, budget.retries) == (2, 1)
    assert budget.try_spend(110.0)  # free one of second 110: 2 retries over 2 requests
    assert not budget.try_spend(110.0)


def test_a_clock_jump_clears_everything():
    budget = RetryBudget(100.0)
    for t in range(10):
        budget.note_request(float(t))
        assert budget.try_spend(float(t))
    assert (budget.requests, budget.retries) == (10, 10)
    budget.note_request(1_000_000.0)
    assert (budget.requests, budget.retries) == (1, 0)


def test_an_earlier_now_counts_in_the_latest_second():
    budget = RetryBudget(0.0)
    assert budget.try_spend(5.0)
    assert not budget.try_spend(4.2)  # read before, called after: same second as 5
    assert (budget.requests, budget.retries) == (0, 1)


def test_negative_percent_is_refused():
    with pytest.raises(ValueError, match="percent"):
        RetryBudget(-1.0)


@settings(max_examples=150, deadline=None)
@given(st.floats(min_value=0, max_value=100),
       st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=3)), max_size=200))
def test_matches_a_brute_force_model(percent, events):
    budget = RetryBudget(percent)
    now = 50.0
    requests: list[int] = []  # the second of each
    retries: list[int] = []
    for is_request, step in events:
        now += step
        sec = int(now // 1)
        if is_request:
            budget.note_request(now)
            requests.append(sec)
            continue
        in_window = lambda secs: sum(1 for s in secs if sec - s < WINDOW_S)  # noqa: E731
        allowed = ((in_window(retries) + 1) * 100 <= percent * in_window(requests)
                   or sec not in retries)
        assert budget.try_spend(now) == allowed
        if allowed:
            retries.append(sec)
    assert budget.retries <= max(1, len(retries))


def test_memory_is_fixed():
    budget = RetryBudget(20.0)
    sizes = lambda: sum(sys.getsizeof(getattr(budget, n)) for n in RetryBudget.__slots__)  # noqa: E731
    budget.note_request(0.0)
    before = sizes()
    for i in range(10_000):
        budget.note_request(i / 7)
        budget.try_spend(i / 7)
    assert sizes() == before
