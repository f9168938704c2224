"""The Fallback protocol and what the fallback types share; `build` picks the type for a route.

A fallback turns a rejected or failed call into a useful answer (§5). The data path adds the
`X-Circuit-Breaker`, `X-Circuit-State` and `X-Fallback` headers and counts it; a fallback only
builds an `Answer`, or returns None to let the contract's error stand. It may set
`request.detail` for the fallback_logs row. Each type lives in its own module (static, cache,
queue, table); this module must never import them (they import it), nor any HTTP framework.
A fallback never forwards to the upstream on the request path and never reads the disk there
(only the queue awaits its group commit); queue replay reaches the upstream through an
injected `UpstreamClient`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from multidict import CIMultiDict

from proxy.core.messages import Answer, Request
from proxy.core.outcome import LET_THROUGH, Reason, UpstreamReply
from proxy.core.routing import split_service
from proxy.core.template import RenderContext

if TYPE_CHECKING:
    from proxy.core.breaker import BreakerView


@dataclass(frozen=True, slots=True)
class FallbackContext:
    view: BreakerView
    reason: Reason  # a StrEnum: comparing with "open", "timeout", … still works
    maybe_delivered: bool  # the upstream may have received the request (timeout after sending)
    body: bytes | None  # the request body, when the fallback asked for it to be buffered


class Recorder(Protocol):
    """Sees a successful upstream response as it streams (the cache fallback)."""

    def feed(self, chunk: bytes) -> None: ...
    def finish(self) -> None: ...


class Fallback(Protocol):
    type: str
    on_failure: bool
    # Buffer request bodies up to this many bytes before the upstream call, so the fallback
    # can still use them after the call failed (0: never).
    buffer_request_bytes: int

    async def serve(self, request: Request, ctx: FallbackContext) -> Answer | None: ...

    def recorder(self, request: Request, status: int, headers: CIMultiDict[str]) -> Recorder | None: ...


class UpstreamClient(Protocol):
    """Whole upstream calls made outside a client exchange (queue replay), on the proxy's own
    pooled connections. Never raises for a failed call: the reply says what happened."""

    async def call(self, upstream: str, method: str, target: str, headers: list[tuple[str, str]],
                   body: bytes, *, timeout_s: float, connect_timeout_s: float) -> UpstreamReply:
        """`upstream` is the service's URL (maybe with a base path), `target` the path + query
        after /<service>, byte for byte; `headers` are end-to-end, sent as given."""
        ...


# -- shared by the fallback types -------------------------------------------------------------

async def request_body(request: Request, ctx: FallbackContext, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes or already went upstream."""
    if ctx.body is not None:
        return ctx.body
    if not request.has_body:
        return b""
    if request.body is None and ctx.reason in LET_THROUGH:
        return None  # streamed to the upstream, not buffered: nothing left to read
    return await request.read(limit)


def json_or_none(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def dig(document: Any, path: tuple[str, ...]) -> Any:
    """`document["a"]["b"]` for path ("a", "b"); None where anything is missing."""
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def service_target(request: Request) -> tuple[str, str]:
    """(service, path + query after /<service>) as the data path forwards it, byte for byte."""
    target = request.target
    query_at = target.find("?")
    path = target if query_at < 0 else target[:query_at]
    service, rest = split_service(path)
    return service, rest if query_at < 0 else rest + target[query_at:]


def render_context(request: Request, ctx: FallbackContext, body: Any, now_wall: float) -> RenderContext:
    view = ctx.view
    path = request.path
    _, rest = split_service(path)
    return RenderContext(
        breaker=view.name, state=view.state.value, reason=ctx.reason, retry_after=view.retry_after,
        retry_at_wall=view.retry_at_wall, method=request.method, path=path, query=request.query,
        headers=request.headers, segments=[unquote(s) for s in rest.split("/") if s],
        body=body, now_wall=now_wall)
