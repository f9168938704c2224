"""Whole upstream calls outside a client exchange (queue replay), on the proxy's own pool.

The same connections, the same framing, Host and timeouts as the exchange, and the same
outcome rules (`core.outcome`): a refused or timed-out connect was never sent; a reset or a
timeout after sending may have reached the upstream. The response body is read whole (replay
keeps a short excerpt of an error for its dead letters), bounded by `MAX_BODY`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.core.outcome import Reason, UpstreamReply
from proxy.http.deadlines import Deadlines
from proxy.http.head import ResponseHead
from proxy.http.tls import connect_error
from proxy.http.upstream import UpstreamConnection, UpstreamPool

MAX_BODY = 64 * 1024  # what is kept of a reply's body; the rest is read and dropped
_DROP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect"})


class _Call:
    """One request and its reply, reported by an `UpstreamConnection`."""

    __slots__ = ("future", "connection", "status", "chunks", "size", "request_sent", "deadline",
                 "slow_at")

    def __init__(self, future: asyncio.Future[UpstreamReply]) -> None:
        self.future = future
        self.connection: UpstreamConnection | None = None
        self.status = 0
        self.chunks: list[bytes] = []
        self.size = 0
        self.request_sent = True  # the whole request goes in one write
        self.deadline = 0.0
        self.slow_at = 0.0  # replay does not judge slowness in flight

    def _settle(self, reply: UpstreamReply) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def on_response_head(self, head: ResponseHead, body_mode: int) -> None:
        self.status = head.status

    def on_response_body(self, data: bytes) -> None:
        if self.size < MAX_BODY:
            self.chunks.append(data[:MAX_BODY - self.size])
        self.size += len(data)

    def on_response_end(self) -> None:
        self.connection = None
        self._settle(UpstreamReply(self.status, b"".join(self.chunks), sent=True))

    def on_upstream_lost(self, error: str, got_response_bytes: bool) -> None:
        self.connection = None
        self._settle(UpstreamReply(None, reason=Reason.UNREACHABLE, sent=True, detail=error))

    def on_upstream_writable(self, writable: bool) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_slow(self) -> None:
        pass

    def on_deadline(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
        self._settle(UpstreamReply(None, reason=Reason.TIMEOUT, sent=True, detail="timed out"))


class UpstreamClient:
    """`fallbacks.base.UpstreamClient` on the proxy's pool and deadline sweeper."""

    def __init__(self, pool: UpstreamPool, deadlines: Deadlines,
                 tls_for: Callable[[str], Any] | None = None) -> None:
        self.pool = pool
        self.deadlines = deadlines
        self.tls_for = tls_for  # upstream URL → its TLS context (None: the default)

    async def call(self, upstream: str, method: str, target: str, headers: list[tuple[str, str]],
                   body: bytes, *, timeout_s: float, connect_timeout_s: float) -> UpstreamReply:
        pool = self.pool
        where = pool.target(upstream, self.tls_for(upstream) if self.tls_for is not None else None)
        connection = pool.acquire(where)
        if connection is None:
            try:
                connection = await pool.connect(where, min(connect_timeout_s or timeout_s, timeout_s))
            except TimeoutError:
                return UpstreamReply(None, reason=Reason.TIMEOUT, sent=False, detail="connect timed out")
            except OSError as exc:  # refused, DNS, TLS: never sent
                return UpstreamReply(None, reason=Reason.UNREACHABLE, sent=False,
                                     detail=connect_error(exc))
        lines = [f"{method} ".encode(), where.base_path, target.encode("latin-1"),
                 b" HTTP/1.1\r\nHost: ", where.host_header, b"\r\n"]
        for name, value in headers:
            if name.lower() not in _DROP and "\r" not in value and "\n" not in value:
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        call = _Call(asyncio.get_running_loop().create_future())
        call.connection = connection
        self.deadlines.add(call, timeout_s)
        connection.send(call, b"".join(lines), head_only=method == "HEAD")
        try:
            return await call.future
        finally:
            self.deadlines.discard(call)
            if call.connection is not None:  # cancelled mid-call: the connection is not reusable
                call.connection.close()
