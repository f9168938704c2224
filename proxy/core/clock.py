"""Clock protocol and the system clock.

Pure: no asyncio, aiohttp, SQLite or Prometheus. Everything that needs the time is handed a
Clock, so the breaker can be driven by a fake one in tests.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; for deadlines and durations."""
        ...

    def wall(self) -> float:
        """Epoch seconds; only for what is stored or shown."""
        ...


class SystemClock:
    """The clocks themselves, not wrappers: read on every request, a Python frame around them
    would cost as much again."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


class FakeClock:
    """A clock that moves only when told to (tests, simulations)."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, start_wall: float = 1_700_000_000.0) -> None:
        self._mono = 1000.0
        self._wall = start_wall

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += seconds
