"""Failure modes of a fake upstream (§7): parsing, validation and decisions.

Pure: no asyncio, aiohttp or clock reads. A `ModeState` is handed the monotonic time
and answers, per request, what the server must do with it (`Decision`); the server
(`server.py`) carries that out. Decisions are deterministic: `error` with a `rate`
uses a counter, not a random draw, and `flap` derives its phase from the time since
the mode was set, so tests can predict every outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum
from fractions import Fraction
from typing import Any, Final


class Mode(StrEnum):
    HEALTHY = "healthy"  # answer normally
    ERROR = "error"  # answer `status` instead, for a `rate` share of requests
    SLOW = "slow"  # wait `latency_ms`, then answer normally
    HANG = "hang"  # accept the request and never answer
    DOWN = "down"  # no listener, no connections: connections are refused
    FLAP = "flap"  # healthy and error alternate every `period_s` seconds


class Action(StrEnum):
    PASS = "pass"  # hand the request to the service
    ERROR = "error"  # answer `Decision.status` with an injected-failure body
    DELAY = "delay"  # sleep `Decision.delay_s`, then hand over to the service
    HANG = "hang"  # never answer; the connection is dropped when the mode changes
    DROP = "drop"  # close the connection without an answer


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    status: int | None = None  # for Action.ERROR
    delay_s: float = 0.0  # for Action.DELAY


PASS: Final = Decision(Action.PASS)
HANG: Final = Decision(Action.HANG)
DROP: Final = Decision(Action.DROP)

# The options each mode takes, with their defaults (§7).
MODE_OPTIONS: Final[dict[Mode, dict[str, float]]] = {
    Mode.HEALTHY: {},
    Mode.ERROR: {"status": 500, "rate": 1.0},
    Mode.SLOW: {"latency_ms": 1000.0},
    Mode.HANG: {},
    Mode.DOWN: {},
    Mode.FLAP: {"period_s": 5.0, "status": 500},
}

MAX_LATENCY_MS: Final = 600_000.0  # ten minutes: longer than any client waits
MAX_PERIOD_S: Final = 86_400.0
_MODE_VALUES: Final = frozenset(m.value for m in Mode)
_MODE_NAMES: Final = ", ".join(m.value for m in Mode)


class ModeError(ValueError):
    """A mode request that cannot be applied; `problems` holds one line per fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeSpec:
    """A validated mode with every option it takes filled in (others stay None)."""

    mode: Mode = Mode.HEALTHY
    status: int | None = None  # error, flap
    rate: float | None = None  # error
    latency_ms: float | None = None  # slow
    period_s: float | None = None  # flap

    def options(self) -> dict[str, Any]:
        """The options of this mode, as shown by `GET /services`."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "mode" and getattr(self, f.name) is not None
        }

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, **self.options()}


def make_mode(mode: str, **options: Any) -> ModeSpec:
    """`make_mode("error", status=503)`: the programmatic twin of `parse_mode`."""
    return parse_mode({"mode": mode, **options})


def parse_mode(body: object) -> ModeSpec:
    """Validate a `PUT /services/<name>/mode` body; raise ModeError naming every fault."""
    if not isinstance(body, dict):
        raise ModeError(['body must be a JSON object such as {"mode": "error", "status": 503}'])
    mode = _parse_mode_name(body.get("mode"))
    allowed = MODE_OPTIONS[mode]
    problems: list[str] = []
    for key in body:
        if key != "mode" and key not in allowed:
            takes = ", ".join(allowed) or "no options"
            problems.append(f"mode {mode.value!r} takes no option {key!r} (it takes {takes})")
    values: dict[str, Any] = {}
    for key, default in allowed.items():
        value = body.get(key, default)
        problem = _check_option(key, value)
        if problem:
            problems.append(problem)
        else:
            values[key] = int(value) if key == "status" else float(value)
    if problems:
        raise ModeError(problems)
    return ModeSpec(mode=mode, **values)


def _parse_mode_name(value: object) -> Mode:
    if value is None:
        raise ModeError([f"mode is required: one of {_MODE_NAMES}"])
    if not isinstance(value, str) or value not in _MODE_VALUES:
        raise ModeError([f"unknown mode {value!r}: expected one of {_MODE_NAMES}"])
    return Mode(value)


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `"rate": true` is a mistake, not 1.
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _check_option(key: str, value: object) -> str | None:
    """The problem with one option's value, or None when it is valid."""
    if key == "status":
        if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
            return f"status must be an integer from 400 to 599, got {value!r}"
    elif key == "rate":
        if not _is_number(value) or not 0 <= value <= 1:  # type: ignore[operator]
            return f"rate must be a number from 0 to 1, got {value!r}"
    elif key == "latency_ms":
        if not _is_number(value) or not 0 <= value <= MAX_LATENCY_MS:  # type: ignore[operator]
            return f"latency_ms must be a number from 0 to {MAX_LATENCY_MS:.0f}, got {value!r}"
    elif key == "period_s":
        if not _is_number(value) or not 0 < value <= MAX_PERIOD_S:  # type: ignore[operator]
            return f"period_s must be a number above 0, at most {MAX_PERIOD_S:.0f}, got {value!r}"
    return None


class ModeState:
    """A mode in force since `since` (monotonic seconds), and its request counter."""

    __slots__ = ("spec", "since", "calls", "_rate")

    def __init__(self, spec: ModeSpec, since: float) -> None:
        self.spec = spec
        self.since = since
        self.calls = 0
        # Exact arithmetic so that rate 0.1 fails exactly 1 call in 10.
        self._rate = Fraction(repr(spec.rate)) if spec.rate is not None else Fraction(0)

    def decide(self, now: float) -> Decision:
        """What to do with the next request, arriving at monotonic time `now`."""
        self.calls += 1
        mode = self.spec.mode
        if mode is Mode.ERROR:
            return self._error_by_rate()
        if mode is Mode.FLAP:
            return self._error() if self.flap_phase(now) is Mode.ERROR else PASS
        if mode is Mode.SLOW:
            return Decision(Action.DELAY, delay_s=(self.spec.latency_ms or 0.0) / 1000)
        if mode is Mode.HANG:
            return HANG
        if mode is Mode.DOWN:
            # Only a request already under way when the listener closed gets here.
            return DROP
        return PASS

    def flap_phase(self, now: float) -> Mode:
        """HEALTHY during the first period after the mode was set, then ERROR, and so on."""
        period = self.spec.period_s or MODE_OPTIONS[Mode.FLAP]["period_s"]
        elapsed = max(0.0, now - self.since)
        return Mode.ERROR if int(elapsed // period) % 2 else Mode.HEALTHY

    def _error_by_rate(self) -> Decision:
        # Call n fails when ceil(n * rate) grows: the first call fails for any rate
        # above 0, and exactly ceil(n * rate) of the first n calls fail.
        n = self.calls
        if math.ceil(n * self._rate) > math.ceil((n - 1) * self._rate):
            return self._error()
        return PASS

    def _error(self) -> Decision:
        return Decision(Action.ERROR, status=self.spec.status or 500)
