"""The Fallback protocol and `build_fallback`, the hook the data path calls.

A fallback turns a rejected or failed call into a useful answer (§5). The data path adds the
`X-Circuit-Breaker`, `X-Circuit-State` and `X-Fallback` headers and counts it; a fallback only
builds the response (never prepared), or returns None to let the contract's error stand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from proxy.breaker import BreakerView
    from proxy.config import Route


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


def build_fallback(route: Route, deps: Any) -> Fallback | None:
    """The route's fallback, or None. Filled in by the fallbacks issue."""
    return None
