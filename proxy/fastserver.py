"""The fast server: the proxy's own HTTP/1.1 listener, in front of the aiohttp application.

Why: aiohttp's server and client cost more per request than everything circuit-proxy does
itself (profiled in PERFORMANCE.md). Requests under a configured service are parsed here
(strictly, `fastserver_parse`), routed, and forwarded on pooled raw upstream connections by
an `Exchange` with callbacks, no task per request. Everything else (the reserved paths of §2:
/status…, /metrics, /healthz, /admin/…, unknown services, absolute-form targets) is handed to
aiohttp at a message boundary: the connection, with the bytes not yet answered, becomes an
ordinary aiohttp connection for the rest of its life, so those paths behave exactly as
`build_app` defines them.

One `FastServer` per process, built with `start_server(app, settings, host, port)` by the
CLI and by the test fixtures alike. `shutdown()` drains (bounded): it stops listening, lets
in-flight exchanges finish, closes idle connections, then lets aiohttp drain its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from yarl import URL

from proxy import fastserver_wire as wire
from proxy.app import PROXY
from proxy.config.model import ServerSettings
from proxy.fastserver_exchange import Deadlines, Exchange
from proxy.fastserver_parse import ChunkedDecoder, HttpError, RequestHead, parse_request_head
from proxy.core.routing import has_dot_segment, split_service
from proxy.upstream_pool import UpstreamPool

log = logging.getLogger(__name__)

RESERVED = frozenset({"status", "status.json", "metrics", "healthz", "admin"})
PIPELINE_LIMIT = 256 * 1024  # unanswered bytes held before reading from the client pauses
DISCARD_LIMIT = 1024 * 1024  # request body left unread after an answer that is still read and dropped
IDLE_SWEEP_S = 5.0
LINGER_S = 2.0


def runner_for(app: web.Application, settings: ServerSettings) -> web.AppRunner:
    """The aiohttp side, configured as `circuit-proxy run` always configured it."""
    return web.AppRunner(
        app, handle_signals=False, handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        shutdown_timeout=settings.drain_timeout_s,
        max_field_size=max(8190, settings.max_header_bytes * 4),
        max_line_size=max(8190, settings.max_header_bytes * 4))


async def start_server(app: web.Application, settings: ServerSettings, host: str, port: int, *,
                       reuse_address: bool = True, backlog: int = 1024) -> FastServer:
    runner = runner_for(app, settings)
    await runner.setup()
    server = FastServer(runner, settings)
    try:
        await server.listen(host, port, reuse_address=reuse_address, backlog=backlog)
    except BaseException:
        await runner.cleanup()
        raise
    return server


class FastServer:
    scheme = "http"

    def __init__(self, runner: web.AppRunner, settings: ServerSettings) -> None:
        self.runner = runner
        self.app = runner.app
        self.proxy = self.app[PROXY]
        self.registry = self.proxy.registry
        self.clock = self.proxy.clock
        self.loop = asyncio.get_running_loop()
        self.max_body_bytes = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        # What a head may take before it is refused: the request line has its own allowance.
        self.max_head = max(8190, settings.max_header_bytes * 4) + settings.max_header_bytes + 4
        self.limits = {"body": settings.max_body_bytes, "header": settings.max_header_bytes}
        self.drain_timeout_s = settings.drain_timeout_s
        self.keepalive_s = 75.0
        self.access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
        self.pool = UpstreamPool(self.loop)
        self.deadlines = Deadlines(self.loop)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.catch_all = next((route for route in self.app.router.routes()
                               if route.handler == self.proxy.handle), None)

    async def listen(self, host: str, port: int, *, reuse_address: bool = True, backlog: int = 1024) -> None:
        self._server = await self.loop.create_server(lambda: ClientConnection(self), host, port,
                                                     reuse_address=reuse_address, backlog=backlog)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.call_later(IDLE_SWEEP_S, self._sweep)

    def make_url(self, path: str) -> URL:
        return URL.build(scheme="http", host=self.host, port=self.port).join(URL(path))

    def _sweep(self) -> None:
        """Close connections idle (no request in progress) for longer than keepalive_s."""
        limit = self.loop.time() - self.keepalive_s
        for connection in list(self.connections):
            if connection.exchange is None and connection.idle_since < limit:
                connection.close()
        self._sweeper = self.loop.call_later(IDLE_SWEEP_S, self._sweep)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop listening, let in-flight exchanges finish (bounded), close the rest."""
        timeout = self.drain_timeout_s if timeout is None else timeout
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            if connection.exchange is None:
                connection.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        self.deadlines.close()
        self.pool.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._server = None

    async def close(self) -> None:
        """Drain the fast connections, then aiohttp's (and run the app's cleanup)."""
        await self.shutdown()
        await self.runner.cleanup()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, runs one exchange at a time, keeps order."""

    __slots__ = ("server", "transport", "buf", "exchange", "peer_ip", "peername", "sockname",
                 "idle_since", "lost", "writable", "_paused_by", "_body_left", "_decoder",
                 "_body_exchange", "_processing", "_close_after", "_handed_off", "_lingering")

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.exchange: Exchange | None = None
        self.peer_ip: bytes | None = None
        self.peername: Any = None
        self.sockname: Any = None
        self.idle_since = server.loop.time()
        self.lost = False
        self.writable = True
        self._paused_by: set[str] = set()
        self._body_left = 0  # bytes of a Content-Length body still to read
        self._decoder: ChunkedDecoder | None = None  # a chunked body being read
        self._body_exchange: Exchange | None = None  # where body bytes go (None: dropped)
        self._processing = False
        self._close_after = False
        self._handed_off = False
        self._lingering = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        if self.peername:
            self.peer_ip = str(self.peername[0]).encode()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.on_client_lost()
        if self._body_exchange is not None and self._body_exchange.stream is not None:
            self._body_exchange.stream.set_exception(ConnectionResetError("client disconnected"))
        self._body_exchange = None

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.exchange is not None:
            self.exchange.on_client_writable()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and closing: what the client still sends is dropped
        if self._body_left or self._decoder is not None:
            data = self._read_body(data)
            if not data:
                return
        self.buf = self.buf + data if self.buf else data
        if self.exchange is None:
            if not self._processing:
                self._process()
        elif len(self.buf) > PIPELINE_LIMIT:
            self.pause_reading("pipeline")

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, data: list[bytes]) -> None:
        if not self.lost:
            self.transport.writelines(data)  # type: ignore[union-attr]

    def pause_reading(self, why: str) -> None:
        if not self._paused_by and not self.lost:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._paused_by.add(why)

    def resume_reading(self, why: str) -> None:
        if why in self._paused_by:
            self._paused_by.discard(why)
            if not self._paused_by and not self.lost:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.close()

    def linger_close(self) -> None:
        """Close after an answer to a request whose body is not read: first only our side,
        reading and dropping what the client still sends for a moment, so that it sees the
        answer rather than a reset (lingering close, RFC 9112 §9.6)."""
        self._close_after = True
        if self.lost or self.transport is None or self._lingering or self.transport.is_closing():
            return
        self._lingering = True
        self._body_left = 0
        self._decoder = None
        self._body_exchange = None
        if self._paused_by:
            self._paused_by.clear()
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.server.loop.call_later(LINGER_S, self.close)

    def abort(self) -> None:
        if not self.lost and self.transport is not None:
            self.transport.abort()

    # -- request bodies ------------------------------------------------------------------------

    def _start_body(self, head: RequestHead, exchange: Exchange | None) -> None:
        self._body_exchange = exchange
        if head.chunked:
            self._decoder = ChunkedDecoder(self.server.max_body_bytes)
        else:
            self._body_left = head.content_length or 0

    def _read_body(self, data: bytes) -> bytes:
        """Feed body bytes to their exchange; returns what follows the body."""
        exchange = self._body_exchange
        if self._decoder is not None:
            try:
                pieces = self._decoder.feed(data)
            except HttpError as exc:
                self._body_exchange = None
                if exchange is None:  # a body being dropped after its answer
                    self.linger_close()
                elif exc.status == 413:
                    exchange.on_request_too_large()  # answers 413 (or breaks an answer under way)
                else:
                    answered = exchange.under_way
                    exchange.on_client_lost()  # a broken body: neither success nor failure
                    self.exchange = None
                    if answered:
                        self.abort()
                    else:
                        self.write(wire.error_answer(exc.status, exc.detail, self.server.limits))
                        self.linger_close()
                return b""
            if exchange is not None:
                for piece in pieces:
                    exchange.on_request_body(piece)
            if not self._decoder.done:
                return b""
            rest = self._decoder.rest
            self._decoder = None
        else:
            left = self._body_left
            if len(data) <= left:
                self._body_left = left - len(data)
                if exchange is not None:
                    exchange.on_request_body(data)
                if self._body_left:
                    return b""
                rest = b""
            else:
                if exchange is not None:
                    exchange.on_request_body(data[:left])
                self._body_left = 0
                rest = data[left:]
        self._body_exchange = None
        if exchange is not None:
            exchange.on_request_end()
        if self.exchange is None and not self._processing:
            # The answer went out before the body was all read (rejected, or answered early):
            # the next request starts after it.
            self.buf = self.buf + rest if self.buf else rest
            rest = b""
            self._process()
        return rest

    def can_discard(self, head: RequestHead) -> bool:
        """Whether the rest of this request's body may be read and dropped to keep the
        connection (else it is closed after the answer)."""
        return self._decoder is None and self._body_left <= DISCARD_LIMIT

    # -- requests --------------------------------------------------------------------------------

    def exchange_done(self, exchange: Exchange, *, keep_alive: bool) -> None:
        if self.exchange is not exchange:
            return
        self.exchange = None
        self.idle_since = self.server.loop.time()
        if self._body_exchange is exchange:
            self._body_exchange = None  # the rest of its body is read and dropped
        if not keep_alive or self.server.draining:
            if self._body_left or self._decoder is not None:
                self.linger_close()  # its body is still coming: let the client see the answer
            else:
                self._close_after = True
                self.close()
            return
        self.resume_reading("pipeline")
        if self.buf and not self._processing and not (self._body_left or self._decoder is not None):
            self._process()

    def _process(self) -> None:
        self._processing = True
        try:
            while self.exchange is None and self.buf and not self.lost and not self._close_after:
                if self._body_left or self._decoder is not None:
                    return  # a dropped body is still being read
                buf = self.buf
                if buf[:2] == b"\r\n":  # RFC 9112 §2.2: empty lines before a request are ignored
                    buf = self.buf = buf.lstrip(b"\r\n")
                    if not buf:
                        return
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self.server.max_head:
                        self._refuse(HttpError(431, "request head too large"))
                    return
                try:
                    head = parse_request_head(buf[:end], self.server.max_header_bytes)
                except HttpError as exc:
                    self._refuse(exc)
                    return
                if not self._dispatch(head, buf, end + 4):
                    return
        finally:
            self._processing = False

    def _refuse(self, error: HttpError) -> None:
        """Answer a request that is never forwarded, then close (its framing is not trusted)."""
        self.buf = b""
        self.write(wire.error_answer(error.status, error.detail, self.server.limits))
        self.linger_close()

    def _dispatch(self, head: RequestHead, buf: bytes, body_at: int) -> bool:
        """Route one parsed request; False when this connection is no longer ours to read."""
        server = self.server
        target = head.target
        if target[:1] != b"/":
            self._hand_off(buf)  # absolute-form or asterisk-form: aiohttp's business
            return False
        query_at = target.find(b"?")
        path = target if query_at < 0 else target[:query_at]
        path_str = path.decode("ascii")
        if (b"." in path or b"%" in path) and has_dot_segment(path_str):
            self._refuse(HttpError(400, "dot-segments are not allowed in the path"))
            return False
        service, rest = split_service(path_str)
        if service in RESERVED:
            self._hand_off(buf)
            return False
        runtime = server.registry.router.resolve(service, head.method.decode("ascii"), rest)
        if runtime is None:
            self._hand_off(buf)  # unknown service: the app answers it (404 JSON)
            return False
        length = head.content_length
        if length is not None and length > server.max_body_bytes:
            self._refuse(HttpError(413, "payload too large"))
            return False
        self.buf = buf[body_at:]
        upstream_target = rest.encode("ascii") + (target[query_at:] if query_at >= 0 else b"")
        exchange = Exchange(server, self, head, runtime, upstream_target)
        self.exchange = exchange
        if exchange.has_body:
            self._start_body(head, exchange)
        exchange.start()
        if server.access_log is not None:
            server.access_log.info("%s %s %s", self.peername[0] if self.peername else "-",
                                   head.method.decode(), target.decode())
        if exchange.has_body and self.buf:
            rest_bytes, self.buf = self.buf, b""
            rest_bytes = self._read_body(rest_bytes)
            if rest_bytes:
                self.buf = rest_bytes + self.buf if self.buf else rest_bytes
        return True

    def _hand_off(self, data: bytes) -> None:
        """The connection becomes an aiohttp connection, starting with `data` (not yet answered)."""
        server = self.server
        transport = self.transport
        assert transport is not None and server.runner.server is not None
        self._handed_off = True
        self.buf = b""
        server.connections.discard(self)
        handler = server.runner.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused_by:
            self._paused_by.clear()
            transport.resume_reading()
        if not self.writable:
            handler.pause_writing()
        handler.data_received(data)
