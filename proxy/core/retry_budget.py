"""A route's retry budget (§3b): may one more retry be made now?

Retries are allowed only while the route's retries over the last 10 s stay within
`budget_percent` % of the client requests it received in those 10 s, and at least one retry
per second is always allowed. So an upstream that fails everything sees at most
(1 + percent/100) × the client traffic, plus one retry a second, never a retry storm.

Ten 1-second buckets in a ring, each stamped with the integer second it holds, with running
totals: O(1) per call (at most ten buckets cleared however far the clock jumped) and fixed
memory. Pure: no clock of its own (the caller hands in `now`, monotonic seconds), no I/O.
"""

from __future__ import annotations

import math

WINDOW_S = 10  # §3b: "over the last 10 s"


class RetryBudget:
    __slots__ = ("_head", "_percent", "_requests", "_retries", "_stamps", "requests", "retries")

    def __init__(self, percent: float) -> None:
        if not percent >= 0:
            raise ValueError(f"percent must be >= 0, got {percent}")
        self._percent = percent
        self._stamps: list[int | None] = [None] * WINDOW_S  # the second each bucket holds
        self._requests = [0] * WINDOW_S
        self._retries = [0] * WINDOW_S
        self._head: int | None = None  # the latest second seen
        self.requests = 0  # totals over the window, as of the last call
        self.retries = 0

    @property
    def percent(self) -> float:
        return self._percent

    def note_request(self, now: float) -> None:
        """A client request arrived (retries are not client requests: never note those)."""
        i = self._advance(now)
        self._requests[i] += 1
        self.requests += 1

    def try_spend(self, now: float) -> bool:
        """Whether a retry may be made now; if so, it is counted as made."""
        i = self._advance(now)
        # retries + 1 ≤ percent/100 × requests, in integers times 100 so 20 % of 5 is exact.
        within = (self.retries + 1) * 100 <= self._percent * self.requests
        if within or self._retries[i] == 0:  # §3b: one retry per second is always allowed
            self._retries[i] += 1
            self.retries += 1
            return True
        return False

    def _advance(self, now: float) -> int:
        """Move to the second of `now`, dropping buckets that left the window; its index."""
        second = math.floor(now)
        head = self._head
        if head is None:
            self._head = head = second
        elif second > head:
            # Only the WINDOW_S most recent seconds can still be in the window.
            for sec in range(max(head + 1, second - WINDOW_S + 1), second + 1):
                i = sec % WINDOW_S
                if self._stamps[i] != sec:
                    self.requests -= self._requests[i]
                    self.retries -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
                    self._stamps[i] = sec
            self._head = head = second
        # An earlier `now` (two callers that read the clock in one order and call in the
        # other) counts in the latest second: a monotonic clock never goes back further.
        i = head % WINDOW_S
        self._stamps[i] = head
        return i
