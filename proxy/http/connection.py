"""One client connection: llhttp parses every request on it, each is served in order.

Requests are parsed as their bytes arrive (`httptools`, no leniency flags) and served one at a
time, pipelined ones queued (bounded: reading pauses). A request's handler is chosen once its
head is complete, after the read that completed it: a proxied request gets an `Exchange`, a
reserved path a `ControlCall`, anything else an answer at once. A request whose framing breaks
is answered 400 (413 for a body too large, 431 for a head too large) and the connection
closed; if part of it already went upstream, that upstream connection is cut off instead of
being finished. The connection is never handed to anything else.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from proxy.config.load import RESERVED_SERVICE_NAMES as RESERVED
from proxy.core import outcome
from proxy.core.headers import client_is_trusted
from proxy.core.routing import has_dot_segment
from proxy.http import wire
from proxy.http.control_call import ControlCall
from proxy.http.exchange import Exchange, refused_at_once
from proxy.http.head import HttpError, RequestHead

if TYPE_CHECKING:
    from proxy.http.server import Server

log = logging.getLogger(__name__)

PIPELINE_LIMIT = 256 * 1024  # bytes of queued requests held before reading pauses
DISCARD_LIMIT = 1024 * 1024  # request body left unread after an answer that is still read and dropped
LINGER_S = 2.0


def _climbs(path: str) -> bool:
    """A dot-segment (`..`, `%2e`) in the path, or in it percent-decoded once or twice with
    backslashes read as slashes: what an upstream that decodes (again) would resolve upwards
    (`..%2f`, `..%5c`, `..\\`, `%252e%252e`, `%252e%252e%252f`)."""
    if has_dot_segment(path):
        return True
    if "%" not in path and "\\" not in path:
        return False
    once = unquote(path).replace("\\", "/")
    if has_dot_segment(once):
        return True
    return "%" in once and has_dot_segment(unquote(once).replace("\\", "/"))


class Incoming:
    """One request as parsed: its head, and the body bytes that came before it was served."""

    __slots__ = ("head", "body", "held", "received", "complete", "error")

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.body: list[bytes] = []
        self.held = 0
        self.received = 0  # body bytes seen so far
        self.complete = False
        self.error: HttpError | None = None


class ClientConnection(asyncio.Protocol):
    __slots__ = ("server", "transport", "parser", "peer_ip", "peername", "trusted", "idle_since", "lost",
                 "writable", "handler", "current", "answered", "_queue", "_queued_bytes", "_parsing",
                 "_url", "_fields", "_head_size", "_in_head", "_progress", "_unparsed", "_feeding", "_serving", "_paused_by",
                 "_closing", "_lingering", "_drain_waiter", "_watched", "_watched_mark", "_watch_since")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser: HttpRequestParser | None = HttpRequestParser(self)
        self.peer_ip: bytes | None = None
        self.peername: Any = None
        # The client's X-Forwarded-* are believed: always (§2) unless server.trusted_proxies
        # is written, then only for a client in one of its networks.
        self.trusted = True
        self.idle_since = server.loop.time()
        self.lost = False
        self.writable = True
        self.handler: Any = None  # the Exchange or ControlCall serving `current`
        self.current: Incoming | None = None
        self.answered = False  # `current` has its answer (its body may still be coming)
        self._queue: deque[Incoming] = deque()
        self._queued_bytes = 0
        self._parsing: Incoming | None = None
        self._url = b""
        self._fields: list[tuple[bytes, bytes, bytes]] = []
        self._head_size = 0
        self._in_head = False
        # Bytes fed since a callback last delivered something counted against a limit (URL,
        # header, body byte, end of head or message): httptools holds a header line until it
        # ends and llhttp skips chunk extensions unseen, so neither may grow without bound.
        self._progress = 0
        self._unparsed = 0
        self._feeding = False  # inside llhttp's callbacks
        self._serving = False  # inside _serve (an answer may come before it returns)
        self._paused_by: set[str] = set()
        self._closing = False
        self._lingering = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # What the timeout sweep last saw of the request being read, and since when.
        self._watched: Incoming | None = None
        self._watched_mark: tuple[bool, int] = (True, 0)
        self._watch_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.max_connections:
            # Closed at once, never left hanging: the client sees the refusal (§1a).
            self.parser = None
            self.lost = True
            transport.close()
            server.refuse_connection()
            return
        self.peername = transport.get_extra_info("peername")
        if self.peername:
            self.peer_ip = str(self.peername[0]).encode()
            proxies = server.registry.settings.server.trusted_proxies
            if proxies is not None:  # decided once per connection, never per request
                self.trusted = bool(proxies) and client_is_trusted(self.peer_ip, proxies)
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.on_client_lost()
        self._wake_drain()

    def pause_writing(self) -> None:
        self.writable = False

    def check_timeouts(self, now: float) -> None:
        """Called by the server's sweep: 408 for a head not complete within header_timeout_ms
        or a body with no byte for body_timeout_ms, close when idle past idle_timeout_ms (§1a).
        Progress is noticed by comparing with the previous sweep, so reading costs nothing."""
        if self.lost or self._lingering:
            return
        parsing = self._parsing
        if parsing is None or self._paused_by:
            # Nothing being read (or we stopped reading ourselves: not the client's delay).
            self._watched = None
            if (parsing is None and self.handler is None and not self._queue
                    and now - self.idle_since > self.server.keepalive_s):
                self.close()
            return
        mark = (parsing.head is None, parsing.received)
        if parsing is not self._watched or mark != self._watched_mark:
            self._watched, self._watched_mark, self._watch_since = parsing, mark, now
            return
        server = self.server
        if parsing.head is None:
            if now - self._watch_since >= server.header_timeout_s:
                self._timed_out(parsing, "request head not complete in time")
        elif now - self._watch_since >= server.body_timeout_s:
            self._timed_out(parsing, "no request body byte in time")

    def _timed_out(self, incoming: Incoming, detail: str) -> None:
        error = HttpError(408, detail)
        self.parser = None
        self._parsing = None
        if incoming is self.current:
            if self.handler is not None:
                # Nothing of it went upstream yet: 408; else the upstream call is aborted.
                self.handler.on_request_broken(408, self.server.refusal(error))
            else:
                self.close()  # answered already; the rest of its body never came
            return
        if self.current is not None:
            self.abort()  # a pipelined request stalled behind one still being served
            return
        self._refuse(error)

    def resume_writing(self) -> None:
        self.writable = True
        self._wake_drain()
        if self.handler is not None:
            self.handler.on_client_writable()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # refused or upgraded: what the client still sends is dropped
        error: HttpError | None = None
        progress = self._progress
        self._feeding = True
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            # Upgrade or CONNECT: the request was answered as an ordinary one (Upgrade is
            # hop-by-hop and not forwarded); what follows is not HTTP, so it is dropped.
            self.parser = None
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            error = cause if isinstance(cause, HttpError) else HttpError(400, "bad request")
        except HttpParserError as exc:
            if str(exc) == "Invalid HTTP version":  # llhttp knows only 0.9, 1.x and 2.0 (HTTP/3.0)
                error = HttpError(505, "HTTP version not supported")
            else:
                error = HttpError(400, f"malformed request: {exc}")
        finally:
            self._feeding = False
        if error is None and self._progress == progress and self._parsing is not None:
            self._unparsed += len(data)
            if self._unparsed > self.server.max_header_bytes + 1024:
                # A header line or a chunk-size line (extensions) that does not end (§7.1.1).
                error = (HttpError(431, "header line too long") if self._in_head
                         else HttpError(400, "chunk extension or trailer line too long"))
        else:
            self._unparsed = 0
        if error is not None:
            self._broken(error)
        self._advance()

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Incoming()
        self._url = b""
        self._fields = []
        self._head_size = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._progress += 1
        self._url += url
        if len(self._url) > self.server.max_line:
            raise HttpError(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress += 1
        self._head_size += len(name) + len(value) + 4
        if not self._in_head:
            # Trailers of a chunked body: never forwarded, but bounded like a header section.
            if self._head_size > self.server.max_header_bytes:
                raise HttpError(431, "trailer section too large")
            return
        if self._head_size > self.server.max_header_bytes:
            raise HttpError(431, "header section too large")
        self._fields.append((name, name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        incoming = self._parsing
        assert parser is not None and incoming is not None
        self._in_head = False
        self._head_size = 0  # the trailer section gets a budget of its own
        self._progress += 1
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HttpError(505, "HTTP version not supported")
        head = RequestHead(parser.get_method(), self._url, version == "1.1", self._fields,
                           parser.should_keep_alive())
        if head.content_length is not None and head.content_length > self.server.max_body_bytes:
            raise HttpError(413, "payload too large")
        incoming.head = head
        self._queue.append(incoming)

    def on_body(self, body: bytes) -> None:
        incoming = self._parsing
        assert incoming is not None
        self._progress += 1
        incoming.received += len(body)
        if incoming.received > self.server.max_body_bytes:
            raise HttpError(413, "payload too large")  # a chunked body past the limit
        if incoming is self.current:
            if self.handler is not None:
                self.handler.on_request_body(body)
            elif incoming.received > DISCARD_LIMIT and not self._lingering:
                self.linger_close()  # answered; too much left to read and drop
            return
        incoming.body.append(body)
        incoming.held += len(body)
        self._queued_bytes += len(body)
        if self._queued_bytes > PIPELINE_LIMIT:
            self.pause_reading("pipeline")

    def on_message_complete(self) -> None:
        self._progress += 1
        incoming = self._parsing
        assert incoming is not None
        self._parsing = None
        incoming.complete = True
        if incoming is self.current and self.handler is not None:
            self.handler.on_request_end()

    # -- serving requests in order ------------------------------------------------------------

    def _broken(self, error: HttpError) -> None:
        """The request being parsed broke (or a head was refused): no more parsing."""
        self.parser = None
        incoming = self._parsing
        self._parsing = None
        if incoming is not None and incoming is self.current:
            if self.handler is not None:
                self.handler.on_request_broken(error.status, self.server.refusal(error))
            else:
                self.close()  # answered already; its body broke while being dropped
            return
        if incoming is None or incoming.head is None:
            incoming = Incoming()
            self._queue.append(incoming)
        incoming.error = error  # answered when its turn comes (before any upstream is asked)

    def _advance(self) -> None:
        """Serve the next queued request when the current one is answered and read."""
        if self._feeding or self._serving:
            return  # the caller up the stack goes on once it is done
        while not self.lost and not self._closing:
            current = self.current
            if current is not None:
                if not self.answered or not (current.complete or self.parser is None):
                    return
                self.current = None
            if not self._queue:
                if self._paused_by:
                    self.resume_reading("pipeline")
                return
            self._serving = True
            try:
                self._serve(self._queue.popleft())
            finally:
                self._serving = False

    def _serve(self, incoming: Incoming) -> None:
        self._queued_bytes -= incoming.held
        if incoming.error is not None:
            self._refuse(incoming.error)
            return
        head = incoming.head
        assert head is not None
        self.current = incoming
        self.answered = False
        server = self.server
        if server.access_log is not None:
            server.access_log.info("%s %s %s", self.peername[0] if self.peername else "-",
                                   head.method.decode(), head.target.decode("latin-1"))
        target = head.target
        if target[:1] != b"/":
            self._refuse(HttpError(400, "only origin-form request targets are served"))
            return
        if b"#" in target:  # llhttp passes a fragment on; it is no part of a request (RFC 9112 §3.2)
            self._refuse(HttpError(400, "a request target has no fragment"))
            return
        query_at = target.find(b"?")
        path = target if query_at < 0 else target[:query_at]
        if (b"." in path or b"%" in path) and _climbs(path.decode("latin-1")):
            self._refuse(HttpError(400, "dot-segments are not allowed in the path"))
            return
        # `/payment/charges?x` → service `payment`, the rest `/charges?x` as sent (as
        # core.routing.split_service, in bytes: the rest goes upstream as it came).
        slash = path.find(b"/", 1)
        if slash < 0:
            service, rest_at = path[1:].decode("latin-1"), -1
        else:
            service, rest_at = path[1:slash].decode("latin-1"), slash
        if service in RESERVED:
            handler: Any = ControlCall(server, self, head)
        else:
            router = server.registry.router
            runtime = router.catch_all.get(service)
            if runtime is None:
                rest = path[rest_at:].decode("latin-1") if rest_at > 0 else "/"
                runtime = router.resolve(service, head.method.decode("latin-1"), rest)
            if runtime is None:
                self._answer_now(outcome.unknown_service(service), head)
                return
            if incoming.complete and runtime.breaker.refusing and runtime.plain_refusal:
                # Nothing more to read, and an open breaker: answered at once.
                keep_alive = head.keep_alive and not server.env.draining
                refusal = refused_at_once(runtime, server.env.clock, keep_alive=keep_alive,
                                          head_only=head.method == b"HEAD")
                if refusal is not None:
                    self.write(refusal)
                    self._done(keep_alive)
                    return
            if rest_at > 0:
                upstream_target = target[rest_at:]  # the path's rest and the query, as sent
            else:
                upstream_target = b"/" + target[query_at:] if query_at >= 0 else b"/"
            handler = Exchange(server.env, self, head, runtime, upstream_target)
        self.handler = handler
        handler.start()
        for piece in incoming.body:
            if self.handler is not handler:
                break
            handler.on_request_body(piece)
        incoming.body = []
        if incoming.complete and self.handler is handler:
            handler.on_request_end()

    def _answer_now(self, answer: Any, head: RequestHead) -> None:
        keep_alive = head.keep_alive and not self.server.draining and self.can_discard()
        self.write(wire.answer_bytes(answer, keep_alive=keep_alive, head_only=head.method == b"HEAD"))
        self.handler = None
        self._done(keep_alive)

    def _refuse(self, error: HttpError) -> None:
        """Answer a request that is never forwarded, then close (its framing is not trusted)."""
        self.parser = None
        self._queue.clear()
        self.write(self.server.refusal(error))
        self.linger_close()

    def exchange_done(self, handler: Any, *, keep_alive: bool) -> None:
        if self.handler is not handler:
            return
        self.handler = None
        self._done(keep_alive)

    def _done(self, keep_alive: bool) -> None:
        self.answered = True
        server = self.server
        self.idle_since = server.loop.time()
        if not keep_alive or server.env.draining:
            current = self.current
            if current is not None and not current.complete and self.parser is not None:
                self.linger_close()  # its body is still coming: let the client see the answer
            else:
                self._closing = True
                self.close()
            return
        self._advance()

    def can_discard(self) -> bool:
        """Whether the rest of the current request's body may be read and dropped to keep the
        connection (else it is closed after the answer)."""
        current = self.current
        if current is None or current.complete:
            return True
        head = current.head
        if head is None or head.content_length is None:
            return False  # chunked: no telling how much is left
        return head.content_length - current.received <= DISCARD_LIMIT

    # -- writing --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)  # type: ignore[union-attr]

    def writelines(self, data: list[bytes]) -> None:
        if not self.lost:
            self.transport.writelines(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        """Until the client has taken what was written (back-pressure for streamed answers)."""
        while not self.writable and not self.lost:
            self._drain_waiter = self.server.loop.create_future()
            await self._drain_waiter

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        self._closing = True
        if not self.lost and self.transport is not None:
            self.transport.close()

    def linger_close(self) -> None:
        """Close after an answer to a request whose body is not read: first only our side,
        reading and dropping what the client still sends for a moment, so that it sees the
        answer rather than a reset (lingering close, RFC 9112 §9.6)."""
        self._closing = True
        if self.lost or self.transport is None or self._lingering or self.transport.is_closing():
            return
        self._lingering = True
        self.parser = None
        if self._paused_by:
            self._paused_by.clear()
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.server.loop.call_later(LINGER_S, self.close)

    def abort(self) -> None:
        self._closing = True
        if not self.lost and self.transport is not None:
            self.transport.abort()
