"""The control plane (§6): what answers the reserved paths, and what keeps them current.

One `ControlPlane` per app builds the status board, the live-events hub, the alerter, the
reloader and the admin API, connects them to the registry's transitions and to each other,
and answers every request whose first path segment is `status`, `status.json`, `metrics`,
`healthz` or `admin`, in-process, as the project's own `Answer`s. The HTTP server owns the
wire: it sends no body for HEAD, writes an `Answer.stream` chunk by chunk and closes it.

Every answer is the one the aiohttp app gave for the same request, including the requests
that used to fall through to the proxy route (a POST to /healthz is an unknown service).
This module never touches a socket, never imports the HTTP server, and never logs a token
except the generated one, once, at start.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.background import stop_task
from proxy.config.load import RESERVED_SERVICE_NAMES
from proxy.config.model import Settings
from proxy.core.messages import Answer, Request
from proxy.core.outcome import unknown_service
from proxy.core.routing import split_service
from proxy.ops.admin import Admin, announce_token, resolve_token
from proxy.ops.alerts import Alerter
from proxy.ops.events import EventHub
from proxy.ops.paths import route_path, unquote
from proxy.ops.reload import Reloader
from proxy.fallbacks.queue import QueueBook
from proxy.fallbacks.queue_items import QueueItems
from proxy.ops.history import KEPT_S
from proxy.ops.wording import shop_term
from proxy.ops.status import (
    QueueSource,
    Scenarios,
    StatusBoard,
    StatusPage,
    json_answer,
    status_json_answer,
)
from proxy.runtime.metrics import Metrics
from proxy.runtime.persistence import metrics_history
from proxy.runtime.registry import Registry
from proxy.storage.base import BatchedStorage as Storage
from proxy.storage.base import StorageError

log = logging.getLogger(__name__)

RESERVED = RESERVED_SERVICE_NAMES  # the first path segments `handle` answers; no service has them
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
_READ = frozenset({"GET", "HEAD"})  # a GET route also answers HEAD


class ControlPlane:
    """The reserved paths' handlers and the background work behind them, for one app."""

    def __init__(self, settings: Settings, registry: Registry, metrics: Metrics, *,
                 queues: QueueSource | None = None, admin_token: str | None = None,
                 queue_book: QueueBook | None = None, storage: Storage | None = None,
                 scenarios: Scenarios | None = None) -> None:
        """`queues` lists the fallback queues ([{"name", "depth", "dead_letter"}]);
        `admin_token` overrides the environment (tests), else `resolve_token` reads or makes one.
        `queue_book`: the queued requests' listing and dead-letter actions; `storage`: where the
        charts' history is read back from at start; `scenarios`: the demo's, shown as buttons."""
        self._registry = registry
        self._metrics = metrics
        self._token_env = settings.admin.token_env
        self._storage = storage
        self.board = StatusBoard(registry, metrics)
        if queues is not None:
            self.board.queues = queues
        if queue_book is not None:
            self.board.queue_items = QueueItems(queue_book)
        self.board.scenarios = scenarios
        self.hub = EventHub(self.board, metrics)
        self.alerter = Alerter(settings.alerts, metrics)
        self.reloader = Reloader(registry, metrics, settings.config_path)
        self.reloader.add_listener(lambda new, result: self.alerter.configure(new.alerts))
        # Board first: a transition event on the page finds its transition list already updated.
        for listener in (self.board.on_transition, self.hub.on_transition, self.alerter.on_transition):
            registry.add_listener(listener)
        self.token_generated = False
        if admin_token is None:
            admin_token, self.token_generated = resolve_token(settings)
        self.admin_token: str = admin_token
        self.admin = Admin(admin_token, registry, self.board, self.reloader)
        self._page = StatusPage()
        self._ticker: asyncio.Task[None] | None = None
        self._announced = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """The charts' history back, webhook delivery, the status ticker, and the generated
        token's one log line."""
        if self._storage is not None and self._ticker is None:
            await self._restore_history(self._storage)
        await self.alerter.start()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self.hub.run_ticker(), name="status-ticker")
        if self.token_generated and not self._announced:
            self._announced = True
            announce_token(self._token_env, self.admin_token)

    async def _restore_history(self, storage: Storage) -> None:
        since = self._registry.clock.wall() - KEPT_S
        try:
            rows = await metrics_history(storage, since)
        except StorageError as exc:
            log.warning("status history not restored: %s", exc)
            return
        log.info("status history restored: %d buckets", self.board.history.restore(rows))

    def close_streams(self) -> None:
        """Shutdown begins: every /status/events stream ends now, so none holds up the drain."""
        self.hub.close()

    async def stop(self) -> None:
        """After the drain. The ticker first: no alert is queued once delivery has stopped."""
        if self._ticker is not None:
            ticker, self._ticker = self._ticker, None
            await stop_task(ticker)
        await self.alerter.stop()

    # -- requests ------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Answer:
        """Answer a request whose first path segment is one of RESERVED."""
        path = route_path(request.path)  # how aiohttp's routes matched it
        if path.startswith("/admin/"):
            return await self.admin.handle(request, path)  # 401 before anything else
        if request.method in _READ:
            if path == "/healthz":
                return json_answer(200, {"status": "ok"})
            if path == "/metrics":
                self._registry.refresh()  # /metrics reports half_open once retry_at has passed (§3)
                return Answer(200, self._metrics.render(), content_type=METRICS_CONTENT_TYPE)
            if path == "/status":
                return self._page.answer()
            if path == "/status.json":
                return status_json_answer(self.board, request.query_string)
            if path == "/status/events":
                return self.hub.answer(head=request.method == "HEAD")
            if path.startswith("/status/queues/") and path.count("/") == 3:
                return await self.queue_listing(unquote(path.rsplit("/", 1)[1]), with_items=False)
            if path.startswith("/status/queues/") and path.count("/") == 4 and path.endswith("/items"):
                # Amounts and Idempotency-Keys: the admin token first, as for /admin/ (401 before
                # the queue is even looked up).
                if not self.admin.authorized(request):
                    return self.admin.unauthorized(request)
                return await self.queue_listing(unquote(path.split("/")[3]), with_items=True)
        if path.startswith("/status/"):
            return json_answer(404, {"error": "not_found", "path": unquote(request.path)})
        # Everything else went on to the proxy route, which knows no such service (config
        # validation refuses the reserved names); it answered with the raw first segment.
        return unknown_service(split_service(request.path)[0])

    async def queue_listing(self, name: str, *, with_items: bool) -> Answer:
        """GET /status/queues/<queue>: the queue's figures (depth, dead letters, exposure and its
        limits, the oldest request's age, the next replay), for anyone; `with_items`
        (GET /status/queues/<queue>/items, admin token) also its requests (pending oldest first,
        then the newest dead letters). Read from storage per request."""
        items = self.board.queue_items
        if items is None or not items.knows(name):
            return json_answer(404, {"error": "unknown_queue", "queue": name})
        try:
            listing = await items.listing(name)
        except StorageError as exc:
            return json_answer(503, {"error": "storage_unavailable", "detail": str(exc)})
        listing["label"] = shop_term(name.split(".", 1)[0], "queue")
        if not with_items:
            del listing["items"], listing["listed"]
        return json_answer(200, listing, {"Cache-Control": "no-store"})
