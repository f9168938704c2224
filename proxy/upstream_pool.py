"""Keep-alive connections to the upstreams for the fast server: raw asyncio protocols, pooled
per upstream, each carrying one exchange at a time.

An `UpstreamConnection` writes the request it is given, parses the response head and body
(Content-Length, chunked, or until close; none for HEAD, 1xx, 204, 304) and hands what it
reads to its exchange through four calls: `on_response_head`, `on_response_body`,
`on_response_end`, `on_upstream_lost`; at the end of each read `flush()` lets the exchange
write everything it collected to its client in one call. It never decides anything about
breakers: that is the exchange's business.

Idle connections are reused last-in first-out (the warmest socket), closed after
`keepalive_s` idle, and dropped as soon as the upstream closes them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
from typing import Any, Protocol
from urllib.parse import urlsplit

from proxy.fastserver_parse import ChunkedDecoder, HttpError, ResponseHead, parse_response_head

MAX_RESPONSE_HEAD = 64 * 1024

# How a response body is delimited.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)


class Exchange(Protocol):
    """What an upstream connection reports to (see fastserver.Exchange)."""

    def on_response_head(self, head: ResponseHead, body_mode: int) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_upstream_lost(self, error: str, got_response_bytes: bool) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...
    def flush(self) -> None: ...


class UpstreamTarget:
    """One upstream URL, parsed once: where to connect and what to send as Host."""

    __slots__ = ("url", "host", "port", "ssl", "host_header", "base_path", "idle", "numeric")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if secure else None
        default_port = (443 if secure else 80)
        netloc_host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (netloc_host if self.port == default_port
                            else f"{netloc_host}:{self.port}").encode("idna" if not _is_ip(self.host) else "ascii")
        self.base_path = parts.path.rstrip("/").encode()
        self.idle: list[UpstreamConnection] = []
        self.numeric = _is_ip(self.host)  # no resolver round trip for IP literals


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "target", "transport", "exchange", "_buf", "_mode", "_left", "_decoder",
                 "_head_only", "reused", "got_bytes", "closed", "idle_since", "_keep_alive",
                 "_in_body", "_write_paused")

    def __init__(self, pool: UpstreamPool, target: UpstreamTarget) -> None:
        self.pool = pool
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self._buf = b""
        self._mode = NO_BODY
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._head_only = False
        self.reused = False  # this exchange is not the connection's first
        self.got_bytes = False  # any byte of the current response arrived
        self.closed = False
        self.idle_since = 0.0
        self._keep_alive = True
        self._in_body = False
        self._write_paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open_count += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.open_count -= 1
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._in_body and self._mode == UNTIL_CLOSE:
            exchange.on_response_end()  # a close-delimited body ends with the connection
            exchange.flush()
            return
        exchange.on_upstream_lost(type(exc).__name__ if exc else "connection closed by the upstream",
                                  self.got_bytes)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.exchange is not None:
            self.exchange.on_upstream_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.exchange is not None:
            self.exchange.on_upstream_writable(True)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Nothing was asked: a late or unsolicited response. The connection cannot be
            # trusted for the next request.
            self.close()
            return
        self.got_bytes = True
        try:
            self._parse(exchange, data)
        except HttpError as exc:
            self.exchange = None
            self.close()
            exchange.on_upstream_lost(exc.detail, True)
        if self.exchange is exchange:
            exchange.flush()

    # -- sending -------------------------------------------------------------------------------

    def send(self, exchange: Exchange, data: bytes, *, head_only: bool) -> None:
        """Start an exchange: `data` is the request head (and whatever body is at hand)."""
        self.exchange = exchange
        self._buf = b""
        self._head_only = head_only
        self._in_body = False
        self.got_bytes = False
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    @property
    def writable(self) -> bool:
        return not self._write_paused

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.exchange = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()  # mid-exchange: nothing more of it may be sent or read

    # -- response parsing ------------------------------------------------------------------

    def _parse(self, exchange: Exchange, data: bytes) -> None:
        while data:
            if not self._in_body:
                buf = self._buf + data if self._buf else data
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_RESPONSE_HEAD:
                        raise HttpError(502, "response head from the upstream too large")
                    self._buf = buf
                    return
                self._buf = b""
                head = parse_response_head(buf[:end])
                data = buf[end + 4:]
                status = head.status
                if status < 200:
                    if status == 101:
                        raise HttpError(502, "the upstream switched protocols")
                    continue  # 100 Continue, 103 Early Hints: informational, not the answer
                self._keep_alive = head.keep_alive
                if self._head_only or status == 204 or status == 304:
                    mode = NO_BODY
                elif head.chunked:
                    mode = CHUNKED
                    self._decoder = ChunkedDecoder()
                elif head.content_length is not None:
                    mode = LENGTH if head.content_length else NO_BODY
                    self._left = head.content_length
                else:
                    mode = UNTIL_CLOSE
                    self._keep_alive = False
                self._mode = mode
                self._in_body = True
                exchange.on_response_head(head, mode)
                if mode == NO_BODY:
                    self._finish(exchange, data)
                    return
                continue
            mode = self._mode
            if mode == LENGTH:
                left = self._left
                if len(data) <= left:
                    self._left = left - len(data)
                    exchange.on_response_body(data)
                    data = b""
                else:
                    exchange.on_response_body(data[:left])
                    self._left = 0
                    data = data[left:]
                if self._left == 0:
                    self._finish(exchange, data)
                    return
            elif mode == CHUNKED:
                decoder = self._decoder
                assert decoder is not None
                for piece in decoder.feed(data):
                    exchange.on_response_body(piece)
                if decoder.done:
                    self._finish(exchange, decoder.rest)
                return
            else:  # UNTIL_CLOSE
                exchange.on_response_body(data)
                return

    def _finish(self, exchange: Exchange, rest: bytes) -> None:
        self._in_body = False
        self.exchange = None
        if rest or not self._keep_alive or not getattr(exchange, "request_sent", True):
            # Bytes after the response (nothing to pair them with), or an answer that came
            # before the whole request body went up: not at a message boundary any more.
            self.close()
        else:
            self.pool.release(self)
        exchange.on_response_end()


class UpstreamPool:
    """Idle keep-alive connections per upstream URL; new ones on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, keepalive_s: float = 30.0,
                 max_idle: int = 256) -> None:
        self.loop = loop
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        self.targets: dict[str, UpstreamTarget] = {}
        self.open_count = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def target(self, url: str) -> UpstreamTarget:
        target = self.targets.get(url)
        if target is None:
            target = self.targets[url] = UpstreamTarget(url)
        return target

    def acquire(self, target: UpstreamTarget) -> UpstreamConnection | None:
        idle = target.idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return None

    async def connect(self, target: UpstreamTarget, timeout: float) -> UpstreamConnection:
        """A new connection; raises OSError (refused, unreachable, DNS) or TimeoutError."""
        host: Any = target.host
        kwargs: dict[str, Any] = {}
        if target.ssl is not None:
            kwargs = {"ssl": target.ssl, "server_hostname": target.host}
        async with asyncio.timeout(timeout):
            _, connection = await self.loop.create_connection(
                lambda: UpstreamConnection(self, target), host, target.port, **kwargs)
        connection.reused = False
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        target = connection.target
        if len(target.idle) >= self.max_idle:
            connection.close()
            return
        connection.idle_since = self.loop.time()
        target.idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_s / 2, self._sweep)

    def forget(self, connection: UpstreamConnection) -> None:
        idle = connection.target.idle
        if connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        self._sweeper = None
        limit = self.loop.time() - self.keepalive_s
        pending = False
        for target in self.targets.values():
            keep = []
            for connection in target.idle:
                if connection.idle_since < limit:
                    if connection.transport is not None:
                        connection.closed = True
                        connection.transport.close()
                else:
                    keep.append(connection)
            target.idle[:] = keep
            pending = pending or bool(keep)
        if pending:
            self._sweeper = self.loop.call_later(self.keepalive_s / 2, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for target in self.targets.values():
            for connection in target.idle:
                if connection.transport is not None:
                    connection.closed = True
                    connection.transport.close()
            target.idle.clear()
