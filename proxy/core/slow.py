"""The slow-call threshold of one breaker (§3a): fixed, or learned from the route itself.

`slow_call_duration_ms: auto` makes it `auto_slow_factor` × the p99 of the route's recent
successful calls, never below `auto_slow_floor_ms` nor above `timeout_ms`, and `timeout_ms`
until `AUTO_MIN_SAMPLES` successful calls are in view. The learned value is recomputed once
every `AUTO_RECOMPUTE_EVERY` recorded calls and cached in between, so reading it is one
attribute load and feeding it is amortised O(1).

Pure: no clock (the breaker hands in the `now` it already read), no I/O, fixed memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.core.latency import LatencySketch

if TYPE_CHECKING:
    from proxy.config.model import Policy

AUTO = "auto"
AUTO_MIN_SAMPLES = 100  # fewer successful calls in view say too little about the p99
AUTO_RECOMPUTE_EVERY = 64  # recorded calls between two recomputations of the learned value
AUTO_QUANTILE = 0.99


class SlowThreshold:
    """`seconds`: a call that has taken at least this long is slow."""

    __slots__ = ("_factor", "_floor_s", "_records", "_sketch", "_timeout_s", "learns", "seconds")

    def __init__(self, policy: Policy) -> None:
        self._timeout_s = policy.timeout_ms / 1000
        self._records = 0
        configured = policy.slow_call_duration_ms
        if configured == AUTO:
            self._sketch: LatencySketch | None = LatencySketch()
            self.learns = True  # `note` has something to do (else callers may skip it)
            self._factor = policy.auto_slow_factor
            self._floor_s = policy.auto_slow_floor_ms / 1000
            self.seconds = self._timeout_s  # §3a: before enough calls are seen
        elif isinstance(configured, (int, float)) and not isinstance(configured, bool):
            self._sketch = None
            self.learns = False
            self._factor = self._floor_s = 0.0
            self.seconds = configured / 1000  # units converted once
        else:
            raise ValueError(f"slow_call_duration_ms must be a number or 'auto', got {configured!r}")

    @property
    def samples(self) -> int:
        """Successful calls in the learning view (0 for a fixed threshold)."""
        return 0 if self._sketch is None else self._sketch.count

    def note(self, duration: float, *, failed: bool, now: float) -> None:
        """A recorded call: its duration teaches the normal latency when it succeeded."""
        sketch = self._sketch
        if sketch is None:
            return
        if not failed:
            # Only successes: a failure's duration is a timeout or a refusal, not the route's
            # normal latency.
            sketch.add(duration, now)
            if sketch.count == AUTO_MIN_SAMPLES:
                self._records = AUTO_RECOMPUTE_EVERY  # learned from the 100th call on, not the 128th
        self._records += 1
        if self._records >= AUTO_RECOMPUTE_EVERY:
            self._records = 0
            self.seconds = self._learned(now)

    def reset(self) -> None:
        """Forget what was learned (an operator's reset is a fresh start)."""
        if self._sketch is not None:
            self._sketch.reset()
            self._records = 0
            self.seconds = self._timeout_s

    def _learned(self, now: float) -> float:
        sketch = self._sketch
        assert sketch is not None
        p99 = sketch.quantile(AUTO_QUANTILE, now)
        if p99 is None or sketch.count < AUTO_MIN_SAMPLES:
            return self._timeout_s
        # Clamped in this order: the timeout wins over the floor, since a call cannot run
        # past its timeout to become slow.
        return min(max(self._factor * p99, self._floor_s), self._timeout_s)
