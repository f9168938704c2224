"""Sliding windows of call outcomes: the last N calls, or the last S seconds.

Both keep running totals that move on every record, so nothing is ever recounted: a record
is O(1) (amortised for the time window) and memory is fixed at construction.

Pure: no asyncio, aiohttp, SQLite or Prometheus, and no clock. The time is handed in as `now`
(monotonic seconds) by the caller, which has already read it once for the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config.model import WindowSpec



@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Totals over a window at one moment."""

    calls: int
    failures: int
    slow: int


EMPTY_COUNTS = WindowCounts(calls=0, failures=0, slow=0)


class Window(Protocol):
    # Totals as of the last `record` or `counts`: the breaker reads these right after a
    # record, so the hot path never allocates a WindowCounts.
    calls: int
    failures: int
    slow: int

    def record(self, failed: bool, slow: bool, now: float) -> None: ...

    def counts(self, now: float) -> WindowCounts: ...

    def reset(self) -> None: ...


class CountWindow:
    """Outcomes of the last `size` calls."""

    __slots__ = ("_next", "_ring", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"count window size must be >= 1, got {size}")
        self._ring = bytearray(size)  # per call: bit 0 failed, bit 1 slow
        self._next = self.calls = self.failures = self.slow = 0

    @property
    def size(self) -> int:
        return len(self._ring)

    def record(self, failed: bool, slow: bool, now: float = 0.0) -> None:
        ring = self._ring
        if self.calls == len(ring):  # full: the slot we overwrite leaves the totals
            old = ring[self._next]
            self.failures -= old & 1
            self.slow -= old >> 1
        else:
            self.calls += 1
        ring[self._next] = failed | (slow << 1)
        self.failures += failed
        self.slow += slow
        self._next = (self._next + 1) % len(ring)

    def counts(self, now: float = 0.0) -> WindowCounts:
        return WindowCounts(calls=self.calls, failures=self.failures, slow=self.slow)

    def reset(self) -> None:
        self._ring[:] = bytes(len(self._ring))
        self._next = self.calls = self.failures = self.slow = 0


class TimeWindow:
    """Outcomes of the calls recorded in the last `seconds` whole seconds.

    A call recorded at `t` is in the window at `now` while
    `floor(now) - floor(t) < seconds`: the current second's bucket plus the `seconds - 1`
    before it. Each bucket is stamped with the integer second it holds; moving to a later
    second subtracts and clears the buckets that fell out, at most `seconds` of them however
    far the clock jumped.
    """

    __slots__ = (
        "_calls",
        "_failures",
        "_head",
        "_seconds",
        "_slow",
        "_stamps",
        "calls",
        "failures",
        "slow",
    )

    def __init__(self, seconds: int) -> None:
        if seconds < 1:
            raise ValueError(f"time window seconds must be >= 1, got {seconds}")
        self._seconds = seconds
        self._stamps: list[int | None] = [None] * seconds  # second held by each bucket
        self._calls = [0] * seconds
        self._failures = [0] * seconds
        self._slow = [0] * seconds
        self._head: int | None = None  # latest second seen
        self.calls = self.failures = self.slow = 0

    @property
    def seconds(self) -> int:
        return self._seconds

    def _advance(self, now: float) -> int:
        """Move to the second of `now`, dropping buckets that left the window; its index."""
        second = math.floor(now)
        head = self._head
        if head is None:
            self._head = second
        elif second > head:
            # Only the `seconds` most recent seconds can hold anything still in the window.
            for sec in range(max(head + 1, second - self._seconds + 1), second + 1):
                i = sec % self._seconds
                if self._stamps[i] != sec:
                    self.calls -= self._calls[i]
                    self.failures -= self._failures[i]
                    self.slow -= self._slow[i]
                    self._calls[i] = self._failures[i] = self._slow[i] = 0
                    self._stamps[i] = sec
            self._head = second
        else:
            # A monotonic clock never goes back; an out-of-order `now` (two callers that read
            # the clock in one order and record in the other) lands in the latest second.
            second = head
        i = second % self._seconds
        self._stamps[i] = second
        return i

    def record(self, failed: bool, slow: bool, now: float) -> None:
        i = self._advance(now)
        self._calls[i] += 1
        self._failures[i] += failed
        self._slow[i] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def counts(self, now: float) -> WindowCounts:
        self._advance(now)
        return WindowCounts(calls=self.calls, failures=self.failures, slow=self.slow)

    def reset(self) -> None:
        n = self._seconds
        self._stamps = [None] * n
        self._calls = [0] * n
        self._failures = [0] * n
        self._slow = [0] * n
        self._head = None
        self.calls = self.failures = self.slow = 0


def make_window(spec: WindowSpec) -> CountWindow | TimeWindow:
    if spec.type == "count":
        if spec.size is None:
            raise ValueError("count window needs a size")
        return CountWindow(spec.size)
    if spec.type == "time":
        if spec.seconds is None:
            raise ValueError("time window needs seconds")
        return TimeWindow(spec.seconds)
    raise ValueError(f"unknown window type {spec.type!r}")
