"""The upstream deadlines of the calls in flight, swept every `tick` seconds while there are any.

A timer handle per call costs more to create and cancel than everything else an exchange does
in Python; a sweep over the calls in flight costs next to nothing, and a route's timeout fires
at most `tick` (5 ms) late; so does a call turning slow, which bounds how many calls a hang
can take before `max_slow_in_flight` cuts it off. Anything with `deadline` and `slow_at` attributes (loop time; 0: none)
and `on_deadline()` / `on_slow()` methods can be registered: client exchanges and replay
calls alike. `slow_at` is when a call in flight becomes slow (§3a): the same sweep sees it,
so hang detection costs no timer either.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class HasDeadline(Protocol):
    deadline: float
    slow_at: float

    def on_deadline(self) -> None: ...
    def on_slow(self) -> None: ...


class Deadlines:
    __slots__ = ("_loop", "_tick", "_pending", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = 0.005) -> None:
        self._loop = loop
        self._tick = tick
        self._pending: set[HasDeadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, call: HasDeadline, timeout_s: float, slow_s: float = 0.0) -> None:
        """`call.on_deadline()` in `timeout_s`, and `call.on_slow()` in `slow_s` if sooner."""
        now = self._loop.time()
        call.deadline = now + timeout_s
        call.slow_at = now + slow_s if 0.0 < slow_s < timeout_s else 0.0
        self._pending.add(call)
        if self._handle is None:
            self._handle = self._loop.call_later(self._tick, self._sweep)

    def discard(self, call: HasDeadline) -> None:
        self._pending.discard(call)

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        due = []
        slow = []
        for call in self._pending:
            if call.deadline <= now:
                due.append(call)
            elif 0.0 < call.slow_at <= now:
                slow.append(call)
        for call in slow:
            call.slow_at = 0.0
            call.on_slow()
        for call in due:
            self._pending.discard(call)
            call.on_deadline()
        if self._pending:
            self._handle = self._loop.call_later(self._tick, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending.clear()
