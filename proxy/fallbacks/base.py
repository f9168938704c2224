"""The Fallback protocol and `build_fallback`, the hook the data path calls.

A fallback turns a rejected or failed call into a useful answer (§5). The data path adds the
`X-Circuit-Breaker`, `X-Circuit-State` and `X-Fallback` headers and counts it; a fallback only
builds the response (never prepared), or returns None to let the contract's error stand.
Each type lives in its own module (static, cache, queue, table); what they share is here.
A fallback never forwards to the upstream on the request path and never reads the disk there
(only the queue awaits its group commit).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from aiohttp import web

from proxy.core.routing import split_service

if TYPE_CHECKING:
    from aiohttp import ClientSession

    from proxy.core.breaker import BreakerView
    from proxy.core.clock import Clock
    from proxy.config.model import Route
    from proxy.fallbacks.queue import QueueBook
    from proxy.core.template import RenderContext
    from proxy.runtime.metrics import Metrics
    from proxy.runtime.registry import Registry
    from proxy.storage.sqlite import Storage

# Reasons for which the call was let through and got no answer: its body went upstream.
LET_THROUGH = frozenset({"unreachable", "timeout"})
# request[DETAIL_KEY]: what the fallback_logs row should say about this request (a queue id).
DETAIL_KEY = web.RequestKey("fallback_detail", str)


@dataclass(frozen=True, slots=True)
class FallbackContext:
    view: BreakerView
    reason: str  # "open", "forced_open", "half_open_full", "bulkhead_full", "unreachable", "timeout"
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

    async def serve(self, request: web.Request, ctx: FallbackContext) -> web.Response | None: ...

    def recorder(self, request: web.Request, status: int, headers: Any) -> Recorder | None: ...


@dataclass(slots=True, kw_only=True)
class FallbackDeps:
    """What building fallbacks needs; one per app. `registry` is set once it exists."""

    clock: Clock
    fallback_dir: Path | None
    storage: Storage | None = None
    metrics: Metrics | None = None
    session: Callable[[], ClientSession | None] = lambda: None
    queues: QueueBook | None = None
    registry: Registry | None = None


def build_fallback(route: Route, deps: FallbackDeps | None) -> Fallback | None:
    """The route's fallback, built once per config (files read, templates compiled)."""
    spec = route.fallback
    if spec is None or deps is None:
        return None
    if spec.type == "static":
        from proxy.fallbacks.static import StaticFallback
        return StaticFallback(route, deps)
    if spec.type == "cache":
        from proxy.fallbacks.cache import CacheFallback
        return CacheFallback(route, deps)
    if spec.type == "table":
        from proxy.fallbacks.table import TableFallback
        return TableFallback(route, deps)
    if spec.type == "queue":
        if deps.queues is None:
            raise RuntimeError(f"{route.breaker_name}: a queue fallback needs storage")
        return deps.queues.fallback(route)
    raise ValueError(f"{route.breaker_name}: unknown fallback type {spec.type!r}")


# -- shared by the fallback types -------------------------------------------------------------

async def request_body(request: web.Request, ctx: FallbackContext, limit: int) -> bytes | None:
    """The request body, or None when it is over `limit` bytes or already went upstream."""
    if ctx.body is not None:
        return ctx.body
    if not request.body_exists:
        return b""
    if ctx.reason in LET_THROUGH:
        return None  # streamed to the upstream, not buffered: nothing left to read
    length = request.content_length
    if length is not None:
        return await request.read() if length <= limit else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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


def service_target(request: web.Request) -> tuple[str, str]:
    """(service, path + query after /<service>) as the data path forwards it, byte for byte."""
    raw = request.raw_path
    query_at = raw.find("?")
    path = raw if query_at < 0 else raw[:query_at]
    service, rest = split_service(path)
    return service, rest if query_at < 0 else rest + raw[query_at:]


def render_context(request: web.Request, ctx: FallbackContext, body: Any, now_wall: float) -> RenderContext:
    from proxy.core.template import RenderContext
    view = ctx.view
    raw = request.raw_path
    path = raw.split("?", 1)[0]
    _, rest = split_service(path)
    return RenderContext(
        breaker=view.name, state=view.state.value, reason=ctx.reason, retry_after=view.retry_after,
        retry_at_wall=view.retry_at_wall, method=request.method, path=path, query=request.query,
        headers=request.headers, segments=[unquote(s) for s in rest.split("/") if s],
        body=body, now_wall=now_wall)

