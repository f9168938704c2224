"""Per-route cap on calls in flight (`max_concurrent`, §3).

`try_enter` never waits: a call over the cap is turned away at once (fallback or 503) and is
not an upstream failure. Pure: no asyncio, aiohttp, SQLite, Prometheus, clock or I/O. Not
thread-safe: one event loop owns it.
"""

from __future__ import annotations


class Bulkhead:
    __slots__ = ("_in_flight", "_limit")

    def __init__(self, limit: int = 0) -> None:
        self._limit = self._checked(limit)  # 0 = unlimited
        self._in_flight = 0

    @staticmethod
    def _checked(limit: int) -> int:
        if limit < 0:
            raise ValueError(f"bulkhead limit must be >= 0 (0 = unlimited), got {limit}")
        return limit

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        # Hot reload: calls already in flight over a lowered limit finish; new ones are
        # turned away until the count drops below it.
        self._limit = self._checked(limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def is_full(self) -> bool:
        return self._limit > 0 and self._in_flight >= self._limit

    def try_enter(self) -> bool:
        if self._limit > 0 and self._in_flight >= self._limit:
            return False
        self._in_flight += 1
        return True

    def leave(self) -> None:
        if self._in_flight == 0:
            raise RuntimeError("Bulkhead.leave() without a matching try_enter()")
        self._in_flight -= 1
