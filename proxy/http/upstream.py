"""Keep-alive connections to the upstreams: asyncio protocols parsing responses with llhttp,
pooled per upstream, each carrying one call at a time.

An `UpstreamConnection` writes the request it is given and reports what it reads to its call
through `on_response_head`, `on_response_body`, `on_response_end` and `on_upstream_lost`; at
the end of each read `flush()` lets the call write what it collected to its client in one go.
It never decides anything about breakers: that is the exchange's business.

Idle connections are reused last-in first-out (the warmest socket), closed after
`keepalive_s` idle, and dropped as soon as the upstream closes them. One TLS context per
upstream serves every connection to it (certificate and hostname checked, SNI sent).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections import deque
from typing import Any, Protocol
from urllib.parse import urlsplit

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser

from proxy.http.head import HttpError, ResponseHead

MAX_RESPONSE_HEAD = 64 * 1024
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

# How a response body is delimited.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)


class Call(Protocol):
    """What an upstream connection reports to (an exchange, or a replay call)."""

    request_sent: bool

    def on_response_head(self, head: ResponseHead, body_mode: int) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_upstream_lost(self, error: str, got_response_bytes: bool) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...
    def flush(self) -> None: ...


def _is_ip(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            continue
    return False


class UpstreamTarget:
    """One upstream URL, parsed once: where to connect, how (TLS), and what to send as Host."""

    __slots__ = ("url", "host", "port", "ssl", "host_header", "base_path", "idle", "open", "waiters",
                 "retired")

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if secure else None
        netloc_host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if secure else 80
        host_header = netloc_host if self.port == default_port else f"{netloc_host}:{self.port}"
        self.host_header = host_header.encode("ascii" if _is_ip(self.host) else "idna")
        self.base_path = parts.path.rstrip("/").encode()
        self.idle: list[UpstreamConnection] = []
        self.open = 0  # connections being made or open (the pool's bound counts these)
        self.waiters: deque[PoolWaiter] = deque()  # calls waiting for a connection, in order
        self.retired = False  # replaced in the pool (its TLS settings changed): no reuse


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("counted", "pool", "target", "transport", "call", "parser", "reused", "got_bytes", "closed",
                 "idle_since", "_head_only", "_fields", "_reason", "_head_size", "_in_head",
                 "_informational", "_mode", "_keep_alive", "_complete", "_extra", "_write_paused",
                 "_left", "_raw")

    def __init__(self, pool: UpstreamPool, target: UpstreamTarget) -> None:
        self.pool = pool
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.call: Call | None = None
        self.parser = HttpResponseParser(self)
        self.reused = False  # this call is not the connection's first
        self.counted = False  # holds one of its target's `open` slots (UpstreamPool.connect)
        self.got_bytes = False  # any byte of the current response arrived
        self.closed = False
        self.idle_since = 0.0
        self._head_only = False
        self._fields: list[tuple[bytes, bytes, bytes]] = []
        self._reason = b""
        self._head_size = 0
        self._in_head = True
        self._informational = False
        self._mode = NO_BODY
        self._keep_alive = True
        self._complete = False  # the response ended during this read
        self._extra = False  # bytes came that belong to no response we asked for
        self._write_paused = False
        self._left = 0  # body bytes still to come (Content-Length)
        self._raw = False  # counting the rest of a Content-Length body without llhttp

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pool.open_count += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.open_count -= 1
        self.pool.forget(self)
        if self.counted:
            self.counted = False
            self.target.open -= 1
            self.pool.slot_freed(self.target)
        call, self.call = self.call, None
        if call is None:
            return
        if not self._in_head and self._mode == UNTIL_CLOSE:
            call.on_response_end()  # a close-delimited body ends with the connection
            return
        call.on_upstream_lost(type(exc).__name__ if exc else "connection closed by the upstream",
                              self.got_bytes)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.call is not None:
            self.call.on_upstream_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.call is not None:
            self.call.on_upstream_writable(True)

    def data_received(self, data: bytes) -> None:
        call = self.call
        if call is None:
            # Nothing was asked: a late or unsolicited response. The connection cannot be
            # trusted for the next request.
            self.close()
            return
        self.got_bytes = True
        if self._raw:
            self._raw_body(call, data)
            return
        error: str | None = None
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            error = cause.detail if isinstance(cause, HttpError) else f"bad response: {cause!r}"
        except HttpParserError as exc:
            error = f"malformed response from the upstream: {exc}"
        if self.call is not call:
            return  # the call gave the connection up meanwhile (it is closed)
        if error is not None:
            self.close()
            call.on_upstream_lost(error, True)
            return
        if self._complete:
            self._finish(call)
            return
        if self._mode == LENGTH and not self._in_head and self._left:
            # The head was llhttp's to read; what is left of a Content-Length body is only
            # counted, and handed on as it came (llhttp would copy every byte of it). The
            # parser is replaced before the next response.
            self._raw = True
        call.flush()

    def _raw_body(self, call: Call, data: bytes) -> None:
        left = self._left
        if len(data) < left:
            self._left = left - len(data)
            call.on_response_body(data)
            call.flush()
            return
        if len(data) > left:
            self._extra = True  # bytes past the response: not at a message boundary
            data = data[:left]
        self._left = 0
        self._raw = False
        self.parser = HttpResponseParser(self)
        call.on_response_body(data)
        self._finish(call)

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete or self._raw:
            self._extra = True  # a second response to one request
        self._fields = []
        self._reason = b""
        self._head_size = 0
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers of a chunked body: not forwarded (the client never asked for them)
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_RESPONSE_HEAD:
            raise HttpError(502, "response head from the upstream too large")
        self._fields.append((name, name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                raise HttpError(502, "the upstream switched protocols")
            self._informational = True  # 100 Continue, 103 Early Hints: not the answer
            return
        if self._complete or self.call is None:
            self._extra = True
            return
        head = ResponseHead(status, self._reason, self._fields, self.parser.should_keep_alive())
        self._keep_alive = head.keep_alive
        if self._head_only or status == 204 or status == 304:
            mode = NO_BODY
        elif head.chunked:
            mode = CHUNKED
        elif head.content_length is not None:
            mode = LENGTH if head.content_length else NO_BODY
        else:
            mode = UNTIL_CLOSE
            self._keep_alive = False
        self._mode = mode
        self._left = head.content_length or 0
        self._in_head = False
        self.call.on_response_head(head, mode)
        if self._head_only:
            # llhttp cannot be told a HEAD response has no body: it ends here, and the parser
            # is replaced before the connection is used again.
            self._complete = True

    def on_body(self, body: bytes) -> None:
        if self._complete or self.call is None:
            self._extra = True
            return
        self._left -= len(body)
        self.call.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._head_only:
            return
        self._complete = True

    # -- sending --------------------------------------------------------------------------------

    def send(self, call: Call, data: bytes, *, head_only: bool) -> None:
        """Start a call: `data` is the request head (and whatever body is at hand)."""
        self.call = call
        self._head_only = head_only
        self._in_head = True
        self._complete = False
        self._extra = False
        self._raw = False
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
        """Mid-call: nothing more of it may be sent or read. The connection is reset, not
        closed, so that an upstream reading a request to the end of the stream never takes
        what it got for a complete request."""
        self.call = None
        if not self.closed and self.transport is not None:
            self.closed = True
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except OSError:
                    pass  # already gone
            self.transport.abort()

    def _finish(self, call: Call) -> None:
        self._complete = False
        self._in_head = True
        self.call = None
        head_only, self._head_only = self._head_only, False
        if self._extra or not self._keep_alive or not call.request_sent:
            # Bytes after the response (nothing to pair them with), or an answer that came
            # before the whole request body went up: not at a message boundary any more.
            self.close()
        else:
            if head_only:
                self.parser = HttpResponseParser(self)
            self.pool.release(self)
        call.on_response_end()


class PoolWaiter(Protocol):
    """A call waiting for a connection of a full pool (`UpstreamPool.wait`)."""

    def on_pool_connection(self, connection: UpstreamConnection) -> None: ...
    def on_pool_slot(self) -> None: ...


class UpstreamPool:
    """Idle keep-alive connections per upstream URL; new ones on demand, at most
    `max_per_upstream` open per upstream when that is set (0: no bound). A call that finds the
    bound reached waits, in order, for a connection given back or a slot freed; its own
    deadline covers the wait (a queue of calls, never a timer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, keepalive_s: float = 30.0,
                 max_idle: int = 256, max_per_upstream: int = 0) -> None:
        self.loop = loop
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle if not max_per_upstream else max(max_idle, max_per_upstream)
        self.max_per_upstream = max_per_upstream
        self.targets: dict[str, UpstreamTarget] = {}
        self.open_count = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def target(self, url: str, ssl_context: ssl.SSLContext | None = None) -> UpstreamTarget:
        target = self.targets.get(url)
        if target is None or (ssl_context is not None and target.ssl is not ssl_context):
            if target is not None:
                target.retired = True
                self._close_idle(target)  # the TLS settings changed (reload)
            target = self.targets[url] = UpstreamTarget(url, ssl_context)
        return target

    def acquire(self, target: UpstreamTarget) -> UpstreamConnection | None:
        idle = target.idle
        while idle:
            connection = idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return None

    def may_connect(self, target: UpstreamTarget) -> bool:
        """Whether a new connection to `target` stays within the bound."""
        return not self.max_per_upstream or target.open < self.max_per_upstream

    def wait(self, target: UpstreamTarget, waiter: PoolWaiter) -> None:
        target.waiters.append(waiter)

    def unwait(self, target: UpstreamTarget, waiter: PoolWaiter) -> None:
        """The waiter gave up (its deadline, its client gone): off the queue."""
        try:
            target.waiters.remove(waiter)
        except ValueError:
            pass

    def slot_freed(self, target: UpstreamTarget) -> None:
        """A connection of `target` closed (or was never made): the next waiter may connect."""
        if target.waiters and self.may_connect(target):
            target.waiters.popleft().on_pool_slot()

    def reserve(self, target: UpstreamTarget) -> None:
        """Take a slot for a connection about to be made (`connect(..., reserved=True)`)."""
        target.open += 1

    def unreserve(self, target: UpstreamTarget) -> None:
        """A reserved slot whose connection was never made."""
        target.open -= 1
        self.slot_freed(target)

    async def connect(self, target: UpstreamTarget, timeout: float, *,
                      reserved: bool = False) -> UpstreamConnection:
        """A new connection; raises OSError (refused, unreachable, DNS, TLS) or TimeoutError.
        `reserved`: the caller took its slot (`reserve`) and gives it back if this fails."""
        kwargs: dict[str, Any] = {}
        if target.ssl is not None:
            kwargs = {"ssl": target.ssl, "server_hostname": target.host}
        if not reserved:
            target.open += 1  # counted from now: a connection being made holds its slot
        try:
            async with asyncio.timeout(timeout):
                _, connection = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, target), target.host, target.port, **kwargs)
        except BaseException:
            if not reserved:
                self.unreserve(target)
            raise
        connection.reused = False
        connection.counted = True  # from here on its connection_lost gives the slot back
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        target = connection.target
        if target.retired:
            connection.close()
            return
        if target.waiters:
            connection.reused = True
            target.waiters.popleft().on_pool_connection(connection)  # straight to the next call
            return
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
                    _close_quietly(connection)
                else:
                    keep.append(connection)
            target.idle[:] = keep
            pending = pending or bool(keep)
        if pending:
            self._sweeper = self.loop.call_later(self.keepalive_s / 2, self._sweep)

    def _close_idle(self, target: UpstreamTarget) -> None:
        for connection in target.idle:
            _close_quietly(connection)
        target.idle.clear()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for target in self.targets.values():
            self._close_idle(target)


def _close_quietly(connection: UpstreamConnection) -> None:
    """An idle connection, closed cleanly (nothing is in flight on it)."""
    if connection.transport is not None:
        connection.closed = True
        connection.transport.close()
