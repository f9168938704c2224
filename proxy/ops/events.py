"""/status/events: Server-Sent Events fan-out of transitions and status snapshots (§6).

Each client has a bounded queue filled with `put_nowait`: a client that reads too slowly
loses events (and is told so by the next snapshot, which carries the whole state) but never
holds up a transition or another client. One ticker task, shared by every client, refreshes
the breakers (open → half_open is due), samples the page's history and sends a snapshot.
Shutdown ends every stream at once, so a drain is never held up by an open status page.

A stream is an async generator of bytes handed to the HTTP server in an `Answer`; the server
writes each chunk with back-pressure and closes the generator when the client leaves. This
module never touches a socket or a web framework, and never lets a client slow a producer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from proxy.core.breaker import Transition
from proxy.core.messages import Answer
from proxy.runtime.metrics import Metrics
from proxy.ops.status import StatusBoard, iso

log = logging.getLogger(__name__)

CLIENT_QUEUE_SIZE = 64  # events; a snapshot a second plus bursts of transitions
RETRY_MS = 2000  # how soon an EventSource reconnects after the stream ends


def encode_event(event: str, data: Any) -> bytes:
    """One SSE message; JSON has no raw newlines, so the data fits on one `data:` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class EventHub:
    """The set of connected clients, the transition listener and the snapshot ticker."""

    def __init__(self, board: StatusBoard, metrics: Metrics, *, interval_s: float = 1.0) -> None:
        self._board = board
        self._metrics = metrics
        self._interval_s = interval_s
        self._clients: set[asyncio.Queue[bytes | None]] = set()  # None: end of stream
        self._closed = False

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- producers ---------------------------------------------------------------------------

    def publish(self, message: bytes) -> None:
        for queue in self._clients:
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._metrics.status_events_dropped.inc()

    def on_transition(self, transition: Transition) -> None:
        """A breaker listener: encoded once, queued for every client, never waits."""
        if self._clients:
            self.publish(encode_event("transition", {
                "breaker": transition.breaker, "from_state": transition.from_state.value,
                "to_state": transition.to_state.value, "at": iso(transition.at_wall)}))

    def tick(self) -> None:
        """One beat: due transitions happen (reading a breaker applies them), history moves
        on, and clients, if any, get the whole state."""
        self._board.sample()
        if self._clients:
            self.publish(encode_event("snapshot", self._board.document()))

    async def run_ticker(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001  (a bad tick must not end the live page)
                log.exception("status snapshot failed")
            await asyncio.sleep(self._interval_s)

    # -- the stream --------------------------------------------------------------------------

    def answer(self, *, head: bool = False) -> Answer:
        """200 text/event-stream; for HEAD the headers only (no client is registered)."""
        # Proxies in front must not buffer the stream (X-Accel-Buffering).
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                   "X-Accel-Buffering": "no"}
        return Answer(200, headers=headers, stream=None if head else self.stream())

    async def stream(self) -> AsyncIterator[bytes]:
        """One client's messages until close() or until the server closes the iterator.

        The client is registered at the first `__anext__`, so an iterator that is never
        started holds nothing. The server ends it with `aclose()` between chunks, or by
        cancelling a pending `__anext__`: either way `finally` forgets the client.
        """
        if self._closed:
            return  # shutting down: an empty stream; the EventSource reconnects to what serves next
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE_SIZE)
        # The first snapshot goes out at once: the page shows the state without waiting a tick.
        queue.put_nowait(f"retry: {RETRY_MS}\n\n".encode() + encode_event("snapshot", self._board.document()))
        self._clients.add(queue)
        self._metrics.status_clients.set(len(self._clients))
        try:
            while True:
                message = await queue.get()
                if message is None:
                    return
                yield message
        finally:
            self._clients.discard(queue)
            self._metrics.status_clients.set(len(self._clients))

    def close(self) -> None:
        """End every stream now (shutdown); later connections get an empty stream."""
        self._closed = True
        for queue in self._clients:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
