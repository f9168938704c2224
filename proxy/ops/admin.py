"""/admin/… (§6): manual breaker control, config reload, dead letters (retry, drop) and demo
scenarios, behind a bearer token (which also guards the queued requests' list, /status/queues/…/items).

The token comes from the environment variable named by `admin.token_env`
(CIRCUIT_PROXY_ADMIN_TOKEN by default); when that is unset the proxy makes a random one and
logs it once at start-up, the only time a secret is ever logged. Tokens are compared in
constant time. Every request under /admin is checked before anything else is looked at, so
an unauthenticated caller learns nothing, not even which breakers exist.

Routing reproduces what the former web framework's router did for these paths: 405 with
`Allow` for a known path and a wrong method, 404 for the rest. Answers are the project's own
`Answer`s; the module never touches a socket or a web framework, and never logs a token
except in `announce_token`.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from proxy.core.breaker import Breaker
from proxy.core.messages import Answer, Request
from proxy.config.model import Settings
from proxy.config.load import ConfigError
from proxy.fallbacks.queue_items import NotDeadLetter, QueueItems, UnknownItem
from proxy.storage.base import StorageError
from proxy.runtime.registry import Registry
from proxy.ops.paths import unquote
from proxy.ops.reload import Reloader, reload_entries
from proxy.ops.status import StatusBoard, json_answer

log = logging.getLogger(__name__)

ACTIONS: dict[str, Callable[[Breaker], None]] = {
    "force-open": Breaker.force_open,
    "force-closed": Breaker.force_closed,
    "disable": Breaker.disable,
    "reset": Breaker.reset,  # back to automatic operation in closed
}

QUEUE_ITEM_ACTIONS: dict[str, Callable[[QueueItems, str, int], Awaitable[dict[str, Any]]]] = {
    "retry": QueueItems.retry,  # a dead letter goes back to pending, attempts from zero
    "drop": QueueItems.drop,  # a dead letter is deleted, never sent
}
# Path shapes: None is a segment of the caller's (a name); a string must be just that.
QUEUE_ITEM_PATH = ("", "admin", "queues", None, "items", None, None)
SCENARIO_PATH = ("", "admin", "scenarios", None)


def _shaped(parts: list[str], shape: tuple[str | None, ...]) -> bool:
    return len(parts) == len(shape) and all(
        part == fixed if fixed is not None else part and "{" not in part and "}" not in part
        for part, fixed in zip(parts, shape))


def resolve_token(settings: Settings, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(token, made here?): the configured variable's value, else a fresh random token."""
    environ = os.environ if environ is None else environ
    token = environ.get(settings.admin.token_env, "").strip()
    if token:
        return token, False
    return secrets.token_urlsafe(24), True


def announce_token(token_env: str, token: str) -> None:
    """The one log line that carries a secret: a token made here, logged once at start."""
    # Keep the token last on the line: scripts take what follows "admin token: ".
    log.warning("%s is not set, so this run uses a random admin token: %s", token_env, token)


def _json(status: int, document: object, headers: dict[str, str] | None = None) -> Answer:
    return json_answer(status, document, {"Cache-Control": "no-store", **(headers or {})})


class Admin:
    def __init__(self, token: str, registry: Registry, board: StatusBoard, reloader: Reloader) -> None:
        self._token = token.encode()
        self._registry = registry
        self._board = board
        self._reloader = reloader

    async def handle(self, request: Request, route_path: str) -> Answer:
        """Any request under /admin/; `route_path` is its path as routes match it (paths.py)."""
        if not self.authorized(request):
            return self.unauthorized(request)
        if route_path == "/admin/reload" and request.method == "POST":
            return await self.reload(request)
        parts = route_path.split("/")  # "", "admin", "breakers", <breaker>, <action>
        if (request.method == "POST" and len(parts) == 5 and parts[2] == "breakers"
                and all(part and "{" not in part and "}" not in part for part in parts[3:])):
            request.match = {"breaker": unquote(parts[3]), "action": unquote(parts[4])}
            return await self.breaker_action(request)
        if request.method == "POST" and _shaped(parts, QUEUE_ITEM_PATH):
            return await self.queue_item_action(request, unquote(parts[3]), unquote(parts[5]),
                                                unquote(parts[6]))
        if request.method == "POST" and _shaped(parts, SCENARIO_PATH):
            return await self.start_scenario(request, unquote(parts[3]))
        return self.other(request)

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the admin token (also asked for the queued requests' list)."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    def unauthorized(self, request: Request) -> Answer:
        log.info("admin request refused: missing or wrong token",
                 extra={"path": unquote(request.path), "client": request.client_ip})
        return _json(401, {"error": "unauthorized", "detail": "Authorization: Bearer <admin token> required"},
                     {"WWW-Authenticate": 'Bearer realm="circuit-proxy admin"'})

    async def breaker_action(self, request: Request) -> Answer:
        name, action = request.match["breaker"], request.match["action"]
        apply = ACTIONS.get(action)
        if apply is None:
            return _json(404, {"error": "not_found", "path": unquote(request.path)})
        runtime = self._registry.get(name)
        if runtime is None:
            return _json(404, {"error": "unknown_breaker", "breaker": name})
        apply(runtime.breaker)
        self._registry.announce_action(name, action)  # §8: a fleet applies it everywhere
        log.info("admin %s", action, extra={"breaker": name, "action": action, "client": request.client_ip})
        return _json(200, self._board.entry(runtime))

    async def reload(self, request: Request) -> Answer:
        try:
            result = await self._reloader.reload()
        except ConfigError as exc:
            return _json(400, {"error": "invalid_config", "errors": exc.problems})
        # §6: reload answers with the list of breakers; what changed rides in headers.
        return _json(200, reload_entries(self._registry), {
            "X-Reload-Added": ",".join(result.added), "X-Reload-Removed": ",".join(result.removed),
            "X-Reload-Changed": ",".join(result.changed), "X-Reload-Kept": ",".join(result.kept)})

    async def queue_item_action(self, request: Request, queue: str, item: str, action: str) -> Answer:
        """Retry or drop one dead letter: 404 for an unknown queue, request or action, 409 for a
        request that is not a dead letter."""
        act = QUEUE_ITEM_ACTIONS.get(action)
        items = self._board.queue_items
        if act is None:
            return _json(404, {"error": "not_found", "path": unquote(request.path)})
        if items is None or not items.knows(queue):
            return _json(404, {"error": "unknown_queue", "queue": queue})
        if not (item.isascii() and item.isdigit() and len(item) <= 18):  # an id SQLite can hold
            return _json(404, {"error": "unknown_item", "queue": queue, "id": item})
        try:
            result = await act(items, queue, int(item))
        except UnknownItem:
            return _json(404, {"error": "unknown_item", "queue": queue, "id": int(item)})
        except NotDeadLetter as exc:
            return _json(409, {"error": "not_dead_letter", "queue": queue, "id": int(item), "state": exc.state})
        except StorageError as exc:
            return _json(503, {"error": "storage_unavailable", "detail": str(exc)})
        log.info("admin queue item %s", action, extra={"queue": queue, "item": item, "client": request.client_ip})
        return _json(200, result)

    async def start_scenario(self, request: Request, name: str) -> Answer:
        scenarios = self._board.scenarios
        if scenarios is None:
            return _json(404, {"error": "not_found", "path": unquote(request.path)})
        try:
            await scenarios.start(name)
        except KeyError:
            return _json(404, {"error": "unknown_scenario", "scenario": name})
        log.info("admin scenario started", extra={"scenario": name, "client": request.client_ip})
        return _json(200, {"started": name, "running": scenarios.running()})

    def other(self, request: Request) -> Answer:
        """Authorized, but no route took it: 405 on a known path, else 404 (as the router did)."""
        path = unquote(request.path)
        parts = path.split("/")
        known = path == "/admin/reload" or (
            path.startswith("/admin/breakers/") and path.rsplit("/", 1)[-1] in ACTIONS) or (
            _shaped(parts, QUEUE_ITEM_PATH) and parts[-1] in QUEUE_ITEM_ACTIONS) or (
            _shaped(parts, SCENARIO_PATH) and self._board.scenarios is not None)
        if known:
            return _json(405, {"error": "method_not_allowed", "allow": "POST"}, {"Allow": "POST"})
        return _json(404, {"error": "not_found", "path": path})
