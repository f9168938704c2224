"""`static`: a canned response from `fallback_responses/` (§5), placeholders filled per request.

The file is read and its placeholders compiled when the route is built (see `template`); a
request only joins parts. Must never read files or forward anything on the request path.
`Canned` is shared with the cache fallback (its `default_file`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.config.fallback_options import resolve_fallback_file
from proxy.config.model import Route
from proxy.core.messages import Answer, Request
from proxy.core.outcome import retry_after_header
from proxy.core.template import ResponseSpec, TemplateError, load_response_file
from proxy.fallbacks.base import (
    FallbackContext,
    Recorder,
    json_or_none,
    render_context,
    request_body,
)

if TYPE_CHECKING:
    from proxy.fallbacks.build import FallbackDeps

log = logging.getLogger(__name__)

BODY_LIMIT = 65_536  # the request body a `{{body.…}}` placeholder may read
_RETRY_STATUSES = frozenset({429, 503})


def load_spec(deps: FallbackDeps, route: Route, name: str) -> ResponseSpec:
    """The compiled response file `name` (the loader has already checked it)."""
    if deps.fallback_dir is None:
        raise TemplateError(f"{route.breaker_name}: no fallback_responses folder for {name!r}")
    path = resolve_fallback_file(deps.fallback_dir, name)
    if path is None:
        raise TemplateError(f"{route.breaker_name}: {name!r} resolves outside {deps.fallback_dir}")
    return load_response_file(path)


class Canned:
    """One compiled response file, rendered for a request."""

    __slots__ = ("_clock", "spec", "status")

    def __init__(self, spec: ResponseSpec, clock: Any, status: int | None = None) -> None:
        self.spec = spec
        self.status = status or spec.status
        self._clock = clock

    @property
    def needs_body(self) -> bool:
        return self.spec.needs_body

    async def render(self, request: Request, ctx: FallbackContext,
                     extra_headers: tuple[tuple[str, str], ...] = ()) -> Answer:
        spec = self.spec
        body = None
        if spec.needs_body:
            body = json_or_none(await request_body(request, ctx, BODY_LIMIT))
        context = render_context(request, ctx, body, self._clock.wall())
        headers = CIMultiDict((name, value.render_text(context)) for name, value in spec.headers)
        for name, value in extra_headers:
            headers[name] = value
        retry_after = ctx.view.retry_after
        if self.status in _RETRY_STATUSES and retry_after is not None and "Retry-After" not in headers:
            headers["Retry-After"] = retry_after_header(retry_after)
        return Answer(self.status, spec.body.render(context), headers)


class StaticFallback:
    type = "static"

    def __init__(self, route: Route, deps: FallbackDeps) -> None:
        options = route.fallback.options  # type: ignore[union-attr]
        self.on_failure = route.fallback.on_failure  # type: ignore[union-attr]
        self.canned = Canned(load_spec(deps, route, options["file"]), deps.clock, options.get("status"))
        self.buffer_request_bytes = BODY_LIMIT if self.canned.needs_body else 0

    async def serve(self, request: Request, ctx: FallbackContext) -> Answer | None:
        return await self.canned.render(request, ctx)

    def recorder(self, request: Request, status: int, headers: CIMultiDict[str]) -> Recorder | None:
        return None
