"""Which transitions a breaker may make, and telling its listeners about each one.

Split out of `core/breaker.py`: the table of reasons (`ALLOWED`, `REASONS`) and `Notifier`,
the in-order, re-entrancy-safe fan-out of `Transition`s. `proxy.core.breaker` re-exports
`REASONS` and `Listener`. Pure: no clock, no I/O; listeners are called synchronously and must
not block.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from proxy.core.breaker_view import State, Transition

_ANY = frozenset(State)
_MANUAL = frozenset({State.FORCED_OPEN, State.FORCED_CLOSED, State.DISABLED})
_CLOSED_TO_OPEN = (frozenset({State.CLOSED}), frozenset({State.OPEN}))

# reason → (states it may leave, states it may enter). Anything else is a bug in the breaker.
ALLOWED: dict[str, tuple[frozenset[State], frozenset[State]]] = {
    "consecutive_failures": _CLOSED_TO_OPEN,
    "failure_rate": _CLOSED_TO_OPEN,
    "slow_call_rate": _CLOSED_TO_OPEN,
    "slow_in_flight": _CLOSED_TO_OPEN,  # §3a: max_slow_in_flight calls hanging at once
    "half_open_failure": (frozenset({State.HALF_OPEN}), frozenset({State.OPEN})),
    "open_timeout_elapsed": (frozenset({State.OPEN}), frozenset({State.HALF_OPEN})),
    "success_threshold": (frozenset({State.HALF_OPEN}), frozenset({State.CLOSED})),
    "forced": (_ANY, _MANUAL),  # force_open, force_closed, disable
    "reset": (_ANY, frozenset({State.CLOSED})),
    "restored": (_ANY, _ANY),  # start-up: whatever was stored (§6)
    # §8: the fleet's word, not this breaker's own counts. Open adopts another proxy's open
    # period (a quorum has it open, or the fleet's half-open trial failed); closed follows the
    # proxy whose trial succeeded.
    "fleet_open": (frozenset({State.CLOSED, State.HALF_OPEN}), frozenset({State.OPEN})),
    "fleet_closed": (frozenset({State.OPEN, State.HALF_OPEN}), frozenset({State.CLOSED})),
}
REASONS: tuple[str, ...] = tuple(ALLOWED)


def is_allowed(frm: State, to: State, reason: str) -> bool:
    sources, targets = ALLOWED[reason]
    return frm is not to and frm in sources and to in targets


Listener = Callable[[Transition], None]


class Notifier:
    """A breaker's listeners: each hears every transition, in order, even one a listener
    causes (it is queued until the current one has reached everybody)."""

    __slots__ = ("_listeners", "_log", "_notifying", "_pending")

    def __init__(self, log: logging.Logger) -> None:
        self._log = log  # the breaker's logger, so a failing listener is logged as the breaker's
        self._listeners: list[Listener] = []
        self._pending: deque[Transition] = deque()
        self._notifying = False

    def add(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def notify(self, transition: Transition) -> None:
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
                        # One broken listener must not keep the others, or the breaker, from
                        # carrying on.
                        self._log.exception(
                            "transition listener %r failed: breaker=%s from_state=%s to_state=%s",
                            fn, t.breaker, t.from_state, t.to_state,
                        )
        finally:
            self._notifying = False
