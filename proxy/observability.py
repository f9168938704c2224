"""Wires what lets an operator see and steer the proxy into the app (§6).

Status page and document, live events, admin API, alerts and hot reload: each module does
its part; this one creates them once, connects them to the registry's transitions and to
each other, and registers their routes and background tasks with the app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.ops.admin import Admin, resolve_token
from proxy.ops.alerts import Alerter
from proxy.config.model import Settings
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry
from proxy.ops.reload import Reloader
from proxy.ops.events import EventHub
from proxy.ops.events import install as install_events
from proxy.ops.status import QueueSource, StatusBoard, status_json_handler, status_page_handler

log = logging.getLogger(__name__)

BOARD = web.AppKey("status_board", StatusBoard)
EVENTS = web.AppKey("status_events", EventHub)
ALERTER = web.AppKey("alerter", Alerter)
RELOADER = web.AppKey("reloader", Reloader)
ADMIN_TOKEN = web.AppKey("admin_token", str)


def install(app: web.Application, settings: Settings, registry: Registry, metrics: Metrics, *,
            queues: QueueSource | None = None, admin_token: str | None = None) -> None:
    """Routes for /status, /status.json, /status/events and /admin/…, listeners, tasks.

    Call before the proxy's catch-all route is added. `queues` lists the fallback queues
    ([{"name", "depth", "dead_letter"}]). `admin_token` overrides the environment (tests);
    otherwise `resolve_token` reads it or makes one.
    """
    board = StatusBoard(registry, metrics)
    if queues is not None:
        board.queues = queues
    hub = EventHub(board, metrics)
    alerter = Alerter(settings.alerts, metrics)
    reloader = Reloader(registry, metrics, settings.config_path)
    reloader.add_listener(lambda new, result: alerter.configure(new.alerts))
    # Board first: a transition event on the page finds its transition list already updated.
    for listener in (board.on_transition, hub.on_transition, alerter.on_transition):
        registry.add_listener(listener)

    generated = False
    if admin_token is None:
        admin_token, generated = resolve_token(settings)
    admin = Admin(admin_token, registry, board, reloader)

    app[BOARD], app[EVENTS], app[ALERTER], app[RELOADER] = board, hub, alerter, reloader
    app[ADMIN_TOKEN] = admin_token
    app.router.add_get("/status", status_page_handler())
    app.router.add_get("/status.json", status_json_handler(board))
    install_events(app, hub)
    admin.install(app, announce_env=settings.admin.token_env if generated else None)

    async def alerts_context(app: web.Application) -> AsyncIterator[None]:
        await alerter.start()
        yield
        await alerter.stop()
    app.cleanup_ctx.append(alerts_context)
