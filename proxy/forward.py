"""The data path: permit → stream upstream → classify → record.

Upstream trouble is data, not an exception: refusals become 502, timeouts 504, rejections 503
with Retry-After, each body from `responses`. Bodies stream both ways; the only body ever held
in memory is one a fallback asked for (a queue must be able to store what failed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import (
    ClientConnectionError,
    ClientConnectorError,
    ClientError,
    ClientPayloadError,
    ClientSession,
    ConnectionTimeoutError,
    hdrs,
    web,
)
from multidict import CIMultiDict
from yarl import URL

from proxy import responses
from proxy.core.breaker import Permit, State
from proxy.core.clock import Clock
from proxy.fallbacks.base import FallbackContext
from proxy.core.headers import downstream_response_headers, upstream_request_headers
from proxy.runtime.registry import Registry, RouteRuntime
from proxy.core.routing import has_dot_segment, split_service

log = logging.getLogger(__name__)

FallbackLog = Callable[[str, str, web.Request, int, str], None]
_REJECTION_REASONS = {State.OPEN: "open", State.FORCED_OPEN: "forced_open"}
_NO_BODY_STATUSES = frozenset({204, 304})


class BodyTooLarge(Exception):
    """A chunked request body grew past max_body_bytes while streaming."""


class _LimitedBody:
    """A body of unknown length, streamed, refused once it passes `limit` bytes.

    aiohttp wraps an exception raised while sending a body into its own connection errors,
    so `exceeded` tells the caller afterwards that the client was at fault, not the upstream.
    """

    __slots__ = ("_content", "_limit", "exceeded")

    def __init__(self, content: Any, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._content.iter_any():
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise BodyTooLarge(seen)
            yield chunk


class Proxy:
    """Forwards requests under `/<service>/` through each route's breaker."""

    __slots__ = ("registry", "clock", "session", "max_body_bytes", "max_header_bytes",
                 "fallback_log")

    def __init__(self, registry: Registry, clock: Clock, *, max_body_bytes: int,
                 max_header_bytes: int) -> None:
        self.registry = registry
        self.clock = clock
        self.session: ClientSession | None = None  # set by the app's cleanup context
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.fallback_log: FallbackLog | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        query_at = raw.find("?")
        path = raw if query_at < 0 else raw[:query_at]
        problem = self._refuse(request, path)
        if problem is not None:
            return problem
        service, rest = split_service(path)
        runtime = self.registry.router.resolve(service, request.method, rest)
        if runtime is None:
            return responses.unknown_service(service)
        target = rest if query_at < 0 else rest + raw[query_at:]
        return await self.call(request, runtime, target)

    def _refuse(self, request: web.Request, path: str) -> web.Response | None:
        """Hostile or malformed requests are answered here and never forwarded (§2, §4)."""
        if has_dot_segment(path):
            return responses.bad_request("dot-segments are not allowed in the path")
        headers = request.headers
        lengths = headers.getall(hdrs.CONTENT_LENGTH, ())
        if lengths and hdrs.TRANSFER_ENCODING in headers:
            return responses.bad_request("both Content-Length and Transfer-Encoding")
        if len(lengths) > 1:
            return responses.bad_request("more than one Content-Length")
        size = 0
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
        if size > self.max_header_bytes:
            return responses.headers_too_large(self.max_header_bytes)
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            return responses.payload_too_large(self.max_body_bytes)
        return None

    async def call(self, request: web.Request, runtime: RouteRuntime, target: str) -> web.StreamResponse:
        started = self.clock.monotonic()
        breaker = runtime.breaker
        if not runtime.bulkhead.try_enter():
            # Excess calls are rejected at once and are not the upstream's fault (§3).
            breaker.note_rejected()
            runtime.metrics.rejected.inc()
            response = await self._fallback(request, runtime, "bulkhead_full", False, None)
            response = response or responses.bulkhead_full(runtime.name)
        else:
            try:
                permit = breaker.try_acquire()
                if permit is None:
                    response = await self._rejected(request, runtime)
                else:
                    response = await self._forward(request, runtime, target, permit)
            finally:
                runtime.bulkhead.leave()
        runtime.metrics.count_request(response.status, self.clock.monotonic() - started)
        return response

    async def _rejected(self, request: web.Request, runtime: RouteRuntime) -> web.StreamResponse:
        runtime.metrics.rejected.inc()
        reason, retry_after = self.rejection(runtime)
        response = await self._fallback(request, runtime, reason, False, None)
        if response is not None:
            return response
        return responses.circuit_open(runtime.name, retry_after)

    @staticmethod
    def rejection(runtime: RouteRuntime) -> tuple[str, float | None]:
        """Why the breaker refused a permit, and the Retry-After for it (None: forced open)."""
        breaker = runtime.breaker
        state = breaker.state
        reason = _REJECTION_REASONS.get(state, "half_open_full")
        retry_after = None if state is State.FORCED_OPEN else (breaker.retry_after() or 0.0)
        return reason, retry_after

    async def _fallback(self, request: web.Request, runtime: RouteRuntime, reason: str,
                        maybe_delivered: bool, body: bytes | None) -> web.Response | None:
        fallback = runtime.fallback
        if fallback is None:
            return None
        view = runtime.breaker.view()
        response = await fallback.serve(request, FallbackContext(view, reason, maybe_delivered, body))
        if response is None:
            return None
        response.headers["X-Circuit-Breaker"] = runtime.name
        response.headers["X-Circuit-State"] = view.state.value
        response.headers["X-Fallback"] = fallback.type
        if runtime.metrics.fallback is not None:
            runtime.metrics.fallback.inc()
        if self.fallback_log is not None:
            self.fallback_log(runtime.name, fallback.type, request, response.status, reason)
        return response

    def _request_body(self, request: web.Request, runtime: RouteRuntime) -> Any:
        if not request.body_exists:
            return None
        if request.content_length is not None:
            return request.content
        return _LimitedBody(request.content, self.max_body_bytes)

    async def _forward(self, request: web.Request, runtime: RouteRuntime, target: str,
                       permit: Permit) -> web.StreamResponse:
        breaker = runtime.breaker
        buffered: bytes | None = None
        fallback = runtime.fallback
        length = request.content_length
        data: Any = None
        try:
            if (fallback is not None and fallback.on_failure and fallback.buffer_request_bytes
                    and request.body_exists and length is not None
                    and length <= fallback.buffer_request_bytes):
                # The fallback must be able to store this body if the call fails.
                buffered = await request.read()
                data = buffered
            else:
                data = self._request_body(request, runtime)
            headers = upstream_request_headers(
                request.headers.items(), request.headers.getall(hdrs.CONNECTION, ()),
                client_ip=request.remote, proto=request.scheme, host=request.host)
            url = URL(runtime.upstream + target, encoded=True)
            assert self.session is not None
            upstream = await self.session.request(
                request.method, url, headers=headers, data=data, timeout=runtime.timeout,
                allow_redirects=False)
        except asyncio.CancelledError:
            breaker.release(permit)  # the client left; the upstream is not to blame (§3)
            raise
        except (BodyTooLarge, ClientError, asyncio.TimeoutError) as exc:
            if isinstance(exc, BodyTooLarge) or getattr(data, "exceeded", False):
                breaker.release(permit)  # the client's body was too large, not an upstream fault
                return responses.payload_too_large(self.max_body_bytes)
            reason, maybe_delivered, detail = _classify(exc)
            return await self._failed(request, runtime, permit, reason, maybe_delivered, buffered, detail)
        return await self._stream_back(request, runtime, permit, upstream)

    async def _stream_back(self, request: web.Request, runtime: RouteRuntime, permit: Permit,
                           upstream: Any) -> web.StreamResponse:
        breaker = runtime.breaker
        status = upstream.status
        failed = status in runtime.failure_statuses  # 4xx are the client's fault (§3)
        fallback = runtime.fallback
        recorder = None
        if fallback is not None and 200 <= status < 300:
            recorder = fallback.recorder(request, status, upstream.headers)
        response = web.StreamResponse(status=status, reason=upstream.reason, headers=CIMultiDict(
            downstream_response_headers(upstream.headers.items(),
                                        upstream.headers.getall(hdrs.CONNECTION, ()))))
        try:
            await response.prepare(request)
            content = upstream.content
            while True:
                try:
                    chunk = await content.readany()
                except (ClientPayloadError, ClientConnectionError, asyncio.TimeoutError):
                    # The upstream broke off mid-body: a failure, and the client must see a
                    # broken response rather than a short one that looks complete.
                    runtime.record(permit, failed=True)
                    upstream.close()
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if not chunk:
                    break
                await response.write(chunk)
                if recorder is not None:
                    recorder.feed(chunk)
            await response.write_eof()
        except asyncio.CancelledError:
            breaker.release(permit)
            upstream.close()
            raise
        except ConnectionResetError:
            breaker.release(permit)  # the client went away mid-response
            upstream.close()
            return response
        upstream.release()
        runtime.record(permit, failed=failed)
        if recorder is not None and not failed:
            recorder.finish()
        return response

    async def _failed(self, request: web.Request, runtime: RouteRuntime, permit: Permit, reason: str,
                      maybe_delivered: bool, buffered: bytes | None, detail: str = "") -> web.Response:
        """A call let through got no response: the fallback if it is safe, else 502 / 504 (§4)."""
        runtime.record(permit, failed=True)
        fallback = runtime.fallback
        if fallback is not None and fallback.on_failure:
            response = await self._fallback(request, runtime, reason, maybe_delivered, buffered)
            if response is not None:
                return response
        if reason == "timeout":
            return responses.upstream_timeout(runtime.name, runtime.timeout_s)
        return responses.upstream_unreachable(runtime.name, detail or "connection failed")


def _classify(exc: BaseException) -> tuple[str, bool, str]:
    """(reason, may the upstream have received the request, detail) for a call with no answer."""
    if isinstance(exc, ConnectionTimeoutError):
        return "timeout", False, ""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", True, ""  # sent, then no answer in time: outcome unknown
    if isinstance(exc, ClientConnectorError):
        return "unreachable", False, str(exc.os_error or exc)  # refused, DNS: never sent
    return "unreachable", True, type(exc).__name__  # reset or broken mid-exchange
