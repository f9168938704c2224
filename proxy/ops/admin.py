"""/admin/… (§6): manual breaker control and config reload, behind a bearer token.

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
from collections.abc import Callable, Mapping

from proxy.core.breaker import Breaker
from proxy.core.messages import Answer, Request
from proxy.config.model import Settings
from proxy.config.load import ConfigError
from proxy.runtime.registry import Registry
from proxy.ops.paths import unquote
from proxy.ops.reload import Reloader
from proxy.ops.status import StatusBoard, json_answer

log = logging.getLogger(__name__)

ACTIONS: dict[str, Callable[[Breaker], None]] = {
    "force-open": Breaker.force_open,
    "force-closed": Breaker.force_closed,
    "disable": Breaker.disable,
    "reset": Breaker.reset,  # back to automatic operation in closed
}


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
        if not self._authorized(request):
            return self._unauthorized(request)
        if route_path == "/admin/reload" and request.method == "POST":
            return await self.reload(request)
        parts = route_path.split("/")  # "", "admin", "breakers", <breaker>, <action>
        if (request.method == "POST" and len(parts) == 5 and parts[2] == "breakers"
                and all(part and "{" not in part and "}" not in part for part in parts[3:])):
            request.match = {"breaker": unquote(parts[3]), "action": unquote(parts[4])}
            return await self.breaker_action(request)
        return self.other(request)

    def _authorized(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    def _unauthorized(self, request: Request) -> Answer:
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
        log.info("admin %s", action, extra={"breaker": name, "action": action, "client": request.client_ip})
        return _json(200, self._board.entry(runtime))

    async def reload(self, request: Request) -> Answer:
        try:
            result = await self._reloader.reload()
        except ConfigError as exc:
            return _json(400, {"error": "invalid_config", "errors": exc.problems})
        # §6: reload answers with the list of breakers; what changed rides in headers.
        return _json(200, self._board.entries(), {
            "X-Reload-Added": ",".join(result.added), "X-Reload-Removed": ",".join(result.removed),
            "X-Reload-Changed": ",".join(result.changed), "X-Reload-Kept": ",".join(result.kept)})

    def other(self, request: Request) -> Answer:
        """Authorized, but no route took it: 405 on a known path, else 404 (as the router did)."""
        path = unquote(request.path)
        known = path == "/admin/reload" or (
            path.startswith("/admin/breakers/") and path.rsplit("/", 1)[-1] in ACTIONS)
        if known:
            return _json(405, {"error": "method_not_allowed", "allow": "POST"}, {"Allow": "POST"})
        return _json(404, {"error": "not_found", "path": path})
