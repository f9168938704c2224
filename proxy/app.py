"""Builds the aiohttp Application: AppKeys, cleanup contexts, reserved routes, the proxy route."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator

from aiohttp import ClientSession, DummyCookieJar, TCPConnector, web

from proxy import observability
from proxy.core.clock import Clock, SystemClock
from proxy.config.model import Settings
from proxy.fallbacks.base import FallbackDeps, build_fallback
from proxy.fallbacks.log import FallbackLog
from proxy.fallbacks.queue import QueueBook
from proxy.forward import Proxy
from proxy.runtime.metrics import Metrics
from proxy.runtime.persistence import persistence_context
from proxy.runtime.registry import Registry
from proxy.storage.sqlite import Storage

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", Proxy)
CLOCK = web.AppKey("clock", Clock)
STORAGE = web.AppKey("storage", Storage)
QUEUES = web.AppKey("queues", QueueBook)

# Headers the client did not send are not added on its behalf.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def build_app(settings: Settings, *, clock: Clock | None = None,
              rng: random.Random | None = None, admin_token: str | None = None) -> web.Application:
    clock = clock or SystemClock()
    server = settings.server
    app = web.Application(client_max_size=server.max_body_bytes)
    metrics = Metrics()
    storage = Storage(settings.storage.path)
    queues = QueueBook(storage, clock, metrics, session=lambda: proxy.session)
    deps = FallbackDeps(clock=clock, fallback_dir=settings.fallback_dir, storage=storage,
                        metrics=metrics, session=lambda: proxy.session, queues=queues)
    registry = Registry(settings, clock, metrics, lambda route, upstream: build_fallback(route, deps),
                        rng=rng)
    deps.registry = registry
    queues.attach(registry)
    proxy = Proxy(registry, clock, max_body_bytes=server.max_body_bytes,
                  max_header_bytes=server.max_header_bytes)
    proxy.fallback_log = FallbackLog(storage, clock)
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[METRICS] = metrics
    app[REGISTRY] = registry
    app[PROXY] = proxy
    app[STORAGE] = storage
    app[QUEUES] = queues
    # Storage opens first and closes last: everything else may write to it.
    app.cleanup_ctx.append(_storage)
    # Stored breaker states are back before anything is served or replayed (§6).
    app.cleanup_ctx.append(persistence_context(registry, storage, metrics))
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_queue_workers)  # replays need the session

    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics_handler(registry, metrics))
    # /status, /status.json, /status/events, /admin/…; before the catch-alls below.
    observability.install(app, settings, registry, metrics, queues=queues.statuses,
                          admin_token=admin_token)
    app.router.add_route("*", "/status/{tail:.*}", _not_found)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """One pooled keep-alive session for every upstream, for the life of the app."""
    connector = TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30,
                             enable_cleanup_closed=False)
    session = ClientSession(connector=connector, auto_decompress=False, cookie_jar=DummyCookieJar(),
                            skip_auto_headers=_SKIP_AUTO_HEADERS, max_field_size=65536,
                            max_line_size=65536)
    app[PROXY].session = session
    yield
    await session.close()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    await app[STORAGE].open()
    yield
    await app[STORAGE].close()  # writes what is still buffered


async def _queue_workers(app: web.Application) -> AsyncIterator[None]:
    await app[QUEUES].start()
    yield
    await app[QUEUES].stop()


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _not_found(request: web.Request) -> web.Response:
    return web.json_response({"error": "not_found", "path": request.path}, status=404)


def _metrics_handler(registry: Registry, metrics: Metrics):
    async def handler(request: web.Request) -> web.Response:
        registry.refresh()  # /metrics reports half_open once retry_at has passed (§3)
        return web.Response(body=metrics.render(), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    return handler
