"""/status/events: Server-Sent Events fan-out of transitions and status snapshots (§6).

Each client has a bounded queue filled with `put_nowait`: a client that reads too slowly
loses events (and is told so by the next snapshot, which carries the whole state) but never
holds up a transition or another client. One ticker task, shared by every client, refreshes
the breakers (open → half_open is due), samples the page's history and sends a snapshot.
Shutdown ends every stream at once, so a drain is never held up by an open status page.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proxy.background import stop_task
from proxy.core.breaker import Transition
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})  # proxies in front must not buffer the stream
        await response.prepare(request)
        if self._closed:
            return response
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE_SIZE)
        # The first snapshot goes out at once: the page shows the state without waiting a tick.
        queue.put_nowait(f"retry: {RETRY_MS}\n\n".encode() + encode_event("snapshot", self._board.document()))
        self._clients.add(queue)
        self._metrics.status_clients.set(len(self._clients))
        try:
            while True:
                message = await queue.get()
                if message is None:
                    break
                await response.write(message)
        except ConnectionResetError:
            pass  # the client went away; nothing to tell it
        finally:
            self._clients.discard(queue)
            self._metrics.status_clients.set(len(self._clients))
        return response

    def close(self) -> None:
        """End every stream now (shutdown); later connections get an empty stream."""
        self._closed = True
        for queue in self._clients:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)


def install(app: web.Application, hub: EventHub) -> None:
    """Route, ticker (for the life of the app) and the early close at shutdown."""
    app.router.add_get("/status/events", hub.handle)

    async def ticker_context(app: web.Application) -> AsyncIterator[None]:
        ticker = asyncio.create_task(hub.run_ticker(), name="status-ticker")
        yield
        await stop_task(ticker)

    async def close_streams(app: web.Application) -> None:
        # on_shutdown runs before the server waits for in-flight handlers: an open page
        # must not hold up the drain (cleanup contexts only run after it).
        hub.close()

    app.cleanup_ctx.append(ticker_context)
    app.on_shutdown.append(close_streams)

