"""Request bodies a fallback or a control-plane handler reads from the client connection.

A `BodyReader` is fed by the connection as body bytes arrive and answers `read(limit)` once
the body is complete (or as soon as it grew past `limit`: the rest is then dropped, never
held). `SENT_UPSTREAM` stands for a body that was streamed to the upstream and not kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class BodyReader:
    __slots__ = ("_chunks", "_size", "_limit", "_done", "_failed", "_waiter", "_on_first_read")

    def __init__(self, on_first_read: Callable[[], None] | None = None) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit: int | None = None
        self._done = False
        self._failed = False
        self._waiter: asyncio.Future[None] | None = None
        self._on_first_read = on_first_read  # e.g. send 100 Continue: the body is wanted now

    def feed(self, data: bytes) -> None:
        if self._failed:
            return
        self._size += len(data)
        if self._limit is not None and self._size > self._limit:
            self._chunks.clear()  # over the reader's limit: nothing more is kept
            self._wake()
            return
        self._chunks.append(data)

    def end(self) -> None:
        self._done = True
        self._wake()

    def fail(self) -> None:
        """The client left or broke the request: a reader waiting gets nothing."""
        self._failed = True
        self._chunks.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self, limit: int) -> bytes | None:
        self._limit = limit
        if self._on_first_read is not None:
            on_first_read, self._on_first_read = self._on_first_read, None
            on_first_read()
        while not (self._done or self._failed or self._size > limit):
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        if self._failed or self._size > limit:
            self._chunks.clear()
            return None
        return b"".join(self._chunks)


class _SentUpstream:
    """A body that went to the upstream as it came: nothing is left to read."""

    async def read(self, limit: int) -> bytes | None:
        return None


SENT_UPSTREAM = _SentUpstream()
