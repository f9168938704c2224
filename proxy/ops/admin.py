"""/admin/… (§6): manual breaker control and config reload, behind a bearer token.

The token comes from the environment variable named by `admin.token_env`
(CIRCUIT_PROXY_ADMIN_TOKEN by default); when that is unset the proxy makes a random one and
logs it once at start-up, the only time a secret is ever logged. Tokens are compared in
constant time. Every request under /admin is checked before anything else is looked at, so
an unauthenticated caller learns nothing, not even which breakers exist.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping

from aiohttp import web

from proxy.core.breaker import Breaker
from proxy.config.model import Settings
from proxy.config.load import ConfigError
from proxy.runtime.registry import Registry
from proxy.ops.reload import Reloader
from proxy.ops.status import StatusBoard

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


def _json(status: int, document: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(document, status=status, headers={"Cache-Control": "no-store", **(headers or {})})


class Admin:
    def __init__(self, token: str, registry: Registry, board: StatusBoard, reloader: Reloader) -> None:
        self._token = token.encode()
        self._registry = registry
        self._board = board
        self._reloader = reloader

    def install(self, app: web.Application, *, announce_env: str | None = None) -> None:
        """Routes; with `announce_env`, log the generated token once when the app starts."""
        app.router.add_post("/admin/breakers/{breaker}/{action}", self.breaker_action)
        app.router.add_post("/admin/reload", self.reload)
        app.router.add_route("*", "/admin/{tail:.*}", self.other)
        if announce_env is not None:
            token = self._token.decode()

            async def announce(app: web.Application) -> None:
                # Keep the token last on the line: scripts take what follows "admin token: ".
                log.warning("%s is not set, so this run uses a random admin token: %s",
                            announce_env, token)
            app.on_startup.append(announce)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    def _unauthorized(self, request: web.Request) -> web.Response:
        log.info("admin request refused: missing or wrong token",
                 extra={"path": request.path, "client": request.remote})
        return _json(401, {"error": "unauthorized", "detail": "Authorization: Bearer <admin token> required"},
                     {"WWW-Authenticate": 'Bearer realm="circuit-proxy admin"'})

    async def breaker_action(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized(request)
        name, action = request.match_info["breaker"], request.match_info["action"]
        apply = ACTIONS.get(action)
        if apply is None:
            return _json(404, {"error": "not_found", "path": request.path})
        runtime = self._registry.get(name)
        if runtime is None:
            return _json(404, {"error": "unknown_breaker", "breaker": name})
        apply(runtime.breaker)
        log.info("admin %s", action, extra={"breaker": name, "action": action, "client": request.remote})
        return _json(200, self._board.entry(runtime))

    async def reload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized(request)
        try:
            result = await self._reloader.reload()
        except ConfigError as exc:
            return _json(400, {"error": "invalid_config", "errors": exc.problems})
        # §6: reload answers with the list of breakers; what changed rides in headers.
        return _json(200, self._board.entries(), {
            "X-Reload-Added": ",".join(result.added), "X-Reload-Removed": ",".join(result.removed),
            "X-Reload-Changed": ",".join(result.changed), "X-Reload-Kept": ",".join(result.kept)})

    async def other(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized(request)
        known = request.path == "/admin/reload" or (
            request.path.startswith("/admin/breakers/") and request.path.rsplit("/", 1)[-1] in ACTIONS)
        if known:
            return _json(405, {"error": "method_not_allowed", "allow": "POST"}, {"Allow": "POST"})
        return _json(404, {"error": "not_found", "path": request.path})
