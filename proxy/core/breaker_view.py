"""The breaker's data, as everyone else sees it: states, permits, transitions and views.

Split out of `core/breaker.py` so the state machine stays one readable module; every name
here is re-exported by `proxy.core.breaker`, which callers keep importing. Plain frozen data:
no behaviour, no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.core.window import WindowCounts


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"
    DISABLED = "disabled"


ALL_STATES: tuple[State, ...] = tuple(State)

# What a half-open breaker waits for (BreakerView.waiting_for).
WAITING_FOR_PROBE = "probe"  # the proxy's own probe is the trial; customers get the fallback
WAITING_FOR_TRIAL_REQUEST = "trial_request"  # the next customer request is the trial


@dataclass(slots=True, unsafe_hash=True)
class Permit:
    """One call let through: made on every proxied request. Not frozen, because a frozen
    dataclass's `__init__` sets each field through `object.__setattr__` (2.5 times the cost);
    treat it as immutable all the same."""

    generation: int  # breaker generation when the call was let through
    started: float  # clock.monotonic() at that moment


@dataclass(frozen=True, slots=True)
class Transition:
    breaker: str
    from_state: State
    to_state: State
    at_wall: float
    reason: str  # one of breaker.REASONS


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
    slow_calls: int  # cumulative, whatever the slow-rate threshold; each call at most once
    opened_at_wall: float | None  # open, half_open (when it last opened), forced_open
    retry_at_wall: float | None  # only while open
    retry_after: float | None  # seconds until half_open; only while open
    half_open_in_flight: int
    open_count: int  # opens since the breaker was last closed; drives the backoff
    slow_threshold_ms: float  # §3a: the threshold now in force, fixed or learned
    slow_in_flight: int = 0  # §3a: calls of this generation in flight past the threshold
    waiting_for: str | None = None  # half_open only: WAITING_FOR_PROBE or _TRIAL_REQUEST
