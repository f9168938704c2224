"""One proxied request on the fast server: permit → stream upstream → classify → record.

The same decisions as `forward.Proxy` (it shares its recording and fallback code), carried out
with callbacks instead of awaits: the healthy path and every rejection without a fallback run
without a task, a coroutine or a timer of its own (deadlines are swept, see `Deadlines`). Only a fallback (which
is written against aiohttp's `web.Request`) and opening a new upstream connection run in a
task.

An exchange owns, until it finishes: the route's bulkhead slot, the breaker permit, the
upstream connection and the deadline. Whatever way it ends (answered, failed, client gone),
each is given back exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy import fastserver_wire as wire
from proxy.core.breaker import Permit
from proxy.fastserver_parse import LAST_CHUNK, RequestHead, ResponseHead, encode_chunk
from proxy.core.headers import downstream_response_fields, upstream_request_head
from proxy.runtime.registry import RouteRuntime
from proxy.upstream_pool import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, UpstreamConnection

if TYPE_CHECKING:
    from proxy.fastserver import ClientConnection, FastServer

log = logging.getLogger(__name__)

# Exchange states
WAITING, CONNECTING, SENT, STREAMING, FALLBACK, DONE = range(6)
_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_BODYLESS_DEFAULT = frozenset({b"POST", b"PUT", b"PATCH"})  # sent with Content-Length: 0
_FAILED_BODY_HELD = 64 * 1024  # request body bytes held while no upstream connection is ready


class Deadlines:
    """The upstream deadlines of the exchanges in flight, checked every `tick` seconds while
    there are any. A per-call timer handle costs more to create and cancel than everything
    else an exchange does in Python; a sweep over the calls in flight costs next to nothing,
    and a route's timeout fires at most `tick` late."""

    __slots__ = ("_loop", "_tick", "_pending", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = 0.01) -> None:
        self._loop = loop
        self._tick = tick
        self._pending: set[Exchange] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, exchange: Exchange, timeout_s: float) -> None:
        exchange.deadline = self._loop.time() + timeout_s
        self._pending.add(exchange)
        if self._handle is None:
            self._handle = self._loop.call_later(self._tick, self._sweep)

    def discard(self, exchange: Exchange) -> None:
        self._pending.discard(exchange)

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        due = [exchange for exchange in self._pending if exchange.deadline <= now]
        for exchange in due:
            self._pending.discard(exchange)
            exchange.on_deadline()
        if self._pending:
            self._handle = self._loop.call_later(self._tick, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending.clear()


class Exchange:
    __slots__ = ("server", "client", "runtime", "head", "target", "upstream_target", "permit",
                 "started", "upstream", "deadline", "state", "status", "failed", "recorder",
                 "head_only", "client_chunked", "keep_alive", "out", "pending", "pending_size",
                 "request_done", "request_sent", "buffering", "buffered", "task", "retried",
                 "holds_slot", "stream", "has_body", "view")

    def __init__(self, server: FastServer, client: ClientConnection, head: RequestHead,
                 runtime: RouteRuntime, target: bytes) -> None:
        self.server = server
        self.client = client
        self.runtime = runtime
        self.head = head
        self.target = target  # path (after the service) and query, as sent
        self.upstream_target = server.pool.target(runtime.upstream)
        self.permit: Permit | None = None
        self.started = server.clock.monotonic()
        self.upstream: UpstreamConnection | None = None
        self.deadline = 0.0  # loop.time() by which the upstream must have answered; 0: none
        self.state = WAITING
        self.status = 0
        self.failed = False
        self.recorder: Any = None
        self.head_only = head.method == b"HEAD"
        self.client_chunked = False
        self.keep_alive = head.keep_alive
        self.out: list[bytes] = []
        self.pending: list[bytes] = []  # request body read before an upstream connection was ready
        self.pending_size = 0
        self.has_body = head.chunked or bool(head.content_length)
        self.request_done = not self.has_body  # the whole request body was read from the client
        self.request_sent = False  # ... and written upstream
        self.buffering = False  # reading the whole body first, for the fallback (§5)
        self.buffered: bytes | None = None
        self.task: asyncio.Task | None = None
        self.retried = False
        self.holds_slot = False
        self.stream: Any = None  # body stream of a fallback's web.Request, fed from the client
        self.view: Any = None

    # -- start: bulkhead, breaker, then the upstream -------------------------------------

    def start(self) -> None:
        runtime = self.runtime
        if not runtime.bulkhead.try_enter():
            # Excess calls are rejected at once and are not the upstream's fault (§3).
            runtime.breaker.note_rejected()
            runtime.metrics.rejected.inc()
            self._reject("bulkhead_full", None)
            return
        self.holds_slot = True
        permit = runtime.breaker.try_acquire()
        if permit is None:
            runtime.metrics.rejected.inc()
            reason, retry_after = self.server.proxy.rejection(runtime)
            self._reject(reason, retry_after)
            return
        self.permit = permit
        fallback = runtime.fallback
        length = self.head.content_length
        if self.head.expect_continue and self.has_body:
            self.client.write(wire.CONTINUE)
        if (fallback is not None and fallback.on_failure and fallback.buffer_request_bytes
                and length and length <= fallback.buffer_request_bytes):
            # The fallback must be able to store this body if the call fails (§5).
            self.buffering = True
            return  # continues in on_request_end
        self._go_upstream()

    def _go_upstream(self) -> None:
        # The route's timeout covers connecting, sending and the whole response (as aiohttp's
        # total timeout does), not the time a client takes to upload a body we buffer.
        self.server.deadlines.add(self, self.runtime.timeout_s)
        connection = self.server.pool.acquire(self.upstream_target)
        if connection is not None:
            self._send(connection)
        else:
            self.state = CONNECTING
            self.task = self.server.loop.create_task(self._connect())

    async def _connect(self) -> None:
        runtime = self.runtime
        try:
            connection = await self.server.pool.connect(self.upstream_target,
                                                        runtime.timeout.connect or runtime.timeout_s)
        except TimeoutError:
            self.task = None
            if self.state == CONNECTING:
                self._call_failed("timeout", False, "")  # never sent
            return
        except OSError as exc:
            self.task = None
            if self.state == CONNECTING:
                self._call_failed("unreachable", False, str(exc))  # refused, DNS: never sent
            return
        self.task = None
        if self.state != CONNECTING:  # the deadline passed or the client left meanwhile
            self.server.pool.release(connection)
            return
        self._send(connection)

    def _send(self, connection: UpstreamConnection) -> None:
        self.upstream = connection
        self.state = SENT
        head = self.head
        target = self.upstream_target
        framing = b""
        if head.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif not self.has_body and head.content_length is None and head.method in _BODYLESS_DEFAULT:
            framing = b"Content-Length: 0\r\n"
        client = self.client
        data = upstream_request_head(
            head.method, target.base_path + self.target, head.fields, head.connection_tokens,
            host=target.host_header, client_ip=client.peer_ip, proto=b"http",
            forwarded_host=head.host, framing=framing)
        if self.buffered is not None:
            data += self.buffered
        elif self.pending:
            data = b"".join([data, *self.pending])
            self.pending.clear()
            if self.pending_size > _FAILED_BODY_HELD:
                client.resume_reading("upstream")
            self.pending_size = 0
        if self.request_done and head.chunked:
            data += LAST_CHUNK
        self.request_sent = self.request_done
        connection.send(self, data, head_only=self.head_only)

    # -- the request body, from the client -----------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        if self.stream is not None:  # a fallback is reading the body
            self.stream.feed_data(data)
            return
        connection = self.upstream
        if connection is not None and not self.buffering:  # sent (the answer may be streaming)
            connection.write(encode_chunk(data) if self.head.chunked else data)
            if not connection.writable:
                self.client.pause_reading("upstream")
            return
        if self.state in (WAITING, CONNECTING) and self.permit is not None:
            self.pending.append(encode_chunk(data) if self.head.chunked else data)
            self.pending_size += len(data)
            if self.pending_size > _FAILED_BODY_HELD and not self.buffering:
                self.client.pause_reading("upstream")
        # otherwise: the exchange has its answer already; the rest of the body is dropped

    def on_request_end(self) -> None:
        self.request_done = True
        if self.stream is not None:
            self.stream.feed_eof()
            return
        if self.buffering and self.state == WAITING and self.permit is not None:
            self.buffering = False
            self.buffered = b"".join(self.pending)
            self.pending.clear()
            self._go_upstream()
            return
        if self.upstream is not None:
            if self.head.chunked:
                self.upstream.write(LAST_CHUNK)
            self.request_sent = True

    def on_request_too_large(self) -> None:
        """A chunked body grew past max_body_bytes: the client's fault, not the upstream's."""
        if self.state == DONE or self.state == FALLBACK:
            return
        self._drop_upstream()
        self._release_permit()
        self._cancel_deadline()
        if self.state == STREAMING:
            self.state = DONE
            self._leave()
            self.client.abort()  # an answer is already under way: it cannot become a 413
            return
        self.state = DONE
        self._answer(wire.error_answer(413, "", self.server.limits), 413, False)

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading("upstream")
        else:
            self.client.pause_reading("upstream")

    # -- the response, from the upstream -------------------------------------------------

    def on_response_head(self, head: ResponseHead, body_mode: int) -> None:
        self.state = STREAMING
        status = self.status = head.status
        runtime = self.runtime
        self.failed = status in runtime.failure_statuses  # 4xx are the client's fault (§3)
        lines, has_date = downstream_response_fields(head.fields, head.connection_tokens,
                                                     keep_length=body_mode == LENGTH or body_mode == NO_BODY)
        lines.insert(0, wire.status_line(status, head.reason))
        if body_mode == CHUNKED or body_mode == UNTIL_CLOSE:
            if self.head.http11:
                lines.append(b"Transfer-Encoding: chunked\r\n")
                self.client_chunked = True
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the close
        if not has_date:
            lines.append(wire.date_line())
        if not self.request_done and not self.client.can_discard(self.head):
            self.keep_alive = False
        if self.keep_alive and self.server.draining:
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.out.append(b"".join(lines))
        fallback = runtime.fallback
        if fallback is not None and 200 <= status < 300:
            headers = CIMultiDict((name.decode("latin-1"), value.decode("latin-1"))
                                  for name, _, value in head.fields)
            self.recorder = fallback.recorder(self.web_request(None), status, headers)

    def on_response_body(self, data: bytes) -> None:
        self.out.append(encode_chunk(data) if self.client_chunked else data)
        if self.recorder is not None:
            self.recorder.feed(data)

    def flush(self) -> None:
        out = self.out
        if out:
            if len(out) == 1:
                self.client.write(out[0])
            elif len(out) == 2 and len(out[1]) <= 16384:
                self.client.write(out[0] + out[1])  # one small send costs less than a writev
            else:
                self.client.writelines(out)
            out.clear()
            if not self.client.writable and self.upstream is not None:
                self.upstream.pause_reading()  # resumed by on_client_writable

    def on_client_writable(self) -> None:
        if self.upstream is not None and self.state == STREAMING:
            self.upstream.resume_reading()

    def on_response_end(self) -> None:
        if self.client_chunked:
            self.out.append(LAST_CHUNK)
        self.upstream = None  # back in the pool, or closed (upstream_pool decides)
        self.flush()
        self.state = DONE
        self._cancel_deadline()
        runtime = self.runtime
        assert self.permit is not None
        runtime.record(self.permit, failed=self.failed)
        self.permit = None
        if self.recorder is not None and not self.failed:
            self.recorder.finish()
        self._leave()
        runtime.metrics.count_request(self.status, self.server.clock.monotonic() - self.started)
        self.client.exchange_done(self, keep_alive=self.keep_alive)

    def on_upstream_lost(self, error: str, got_response_bytes: bool) -> None:
        state = self.state
        connection = self.upstream
        self.upstream = None
        if state == SENT:
            if (connection is not None and connection.reused and not got_response_bytes
                    and not self.retried and not self.has_body and self.head.method in _RETRYABLE):
                # A pooled connection the upstream had closed meanwhile: nothing was
                # answered, and the request is safe to send again on a fresh one.
                self.retried = True
                self.state = CONNECTING
                self.task = self.server.loop.create_task(self._connect())
                return
            self._call_failed("unreachable", True, error)  # reset or broken mid-exchange
        elif state == STREAMING:
            self._broken()

    def on_deadline(self) -> None:
        self.deadline = 0.0
        state = self.state
        if state == CONNECTING or state == WAITING:
            self._cancel_task()
            self._call_failed("timeout", False, "")
        elif state == SENT:
            self._drop_upstream()
            self._call_failed("timeout", True, "")  # sent, then no answer in time: outcome unknown
        elif state == STREAMING:
            self._broken()

    def _broken(self) -> None:
        """The upstream broke off mid-body: a failure, and the client must see a broken
        response rather than a short one that looks complete."""
        self._drop_upstream()
        self.state = DONE
        self._cancel_deadline()
        assert self.permit is not None
        self.runtime.record(self.permit, failed=True)
        self.permit = None
        self._leave()
        self.runtime.metrics.count_request(self.status, self.server.clock.monotonic() - self.started)
        self.out.clear()
        self.client.abort()

    # -- failures and rejections: the contract's answers or the route's fallback ----------

    def _call_failed(self, reason: str, maybe_delivered: bool, detail: str) -> None:
        """A call let through got no response: the fallback if it is safe, else 502 / 504 (§4)."""
        self._cancel_deadline()
        runtime = self.runtime
        assert self.permit is not None
        runtime.record(self.permit, failed=True)
        self.permit = None
        fallback = runtime.fallback
        if fallback is not None and fallback.on_failure:
            self._start_fallback(reason, maybe_delivered, self.buffered, detail)
            return
        self.state = DONE
        keep_alive = self._keep_alive_after_answer()
        if reason == "timeout":
            data = wire.upstream_timeout(runtime.name, runtime.timeout_s, keep_alive=keep_alive,
                                         head_only=self.head_only)
            status = 504
        else:
            data = wire.upstream_unreachable(runtime.name, detail or "connection failed",
                                             keep_alive=keep_alive, head_only=self.head_only)
            status = 502
        self._answer(data, status, keep_alive)

    def _reject(self, reason: str, retry_after: float | None) -> None:
        runtime = self.runtime
        if runtime.fallback is not None:
            self._start_fallback(reason, False, None, "")
            return
        self.state = DONE
        keep_alive = self._keep_alive_after_answer()
        if reason == "bulkhead_full":
            data = wire.bulkhead_full(runtime.name, keep_alive=keep_alive, head_only=self.head_only)
        else:
            data = wire.circuit_open(runtime.name, retry_after, keep_alive=keep_alive,
                                     head_only=self.head_only)
        self._answer(data, 503, keep_alive)

    def _answer(self, data: bytes, status: int, keep_alive: bool) -> None:
        self.client.write(data)
        self._leave()
        self.runtime.metrics.count_request(status, self.server.clock.monotonic() - self.started)
        self.client.exchange_done(self, keep_alive=keep_alive)

    def _keep_alive_after_answer(self) -> bool:
        """Keep the connection when the rest of the request body can be read and dropped."""
        if not self.keep_alive or self.server.draining:
            return False
        if self.request_done:
            return True
        if self.head.expect_continue and self.permit is None and not self.request_sent:
            return False  # the client may be waiting for 100 Continue that will not come
        return self.client.can_discard(self.head)

    def _start_fallback(self, reason: str, maybe_delivered: bool, body: bytes | None, detail: str) -> None:
        self.state = FALLBACK
        if reason in ("unreachable", "timeout") or self.request_done:
            request = self.web_request(body)
        else:
            # Rejected before the body was read: the fallback may read it from the client.
            if self.head.expect_continue:
                self.client.write(wire.CONTINUE)
            request = self.web_request(None, streaming=True)
        self.pending.clear()
        self.task = self.server.loop.create_task(self._fallback(request, reason, maybe_delivered, body, detail))

    async def _fallback(self, request: Any, reason: str, maybe_delivered: bool, body: bytes | None,
                        detail: str) -> None:
        runtime = self.runtime
        proxy = self.server.proxy
        try:
            response = await proxy._fallback(request, runtime, reason, maybe_delivered, body)  # noqa: SLF001
        except Exception:
            log.exception("fallback of %s failed", runtime.name)
            response = None
        finally:
            self.task = None
        if self.state != FALLBACK:
            return  # the client left meanwhile
        self.state = DONE
        self.stream = None
        keep_alive = self._keep_alive_after_answer()
        if response is None:
            if reason == "bulkhead_full":
                data = wire.bulkhead_full(runtime.name, keep_alive=keep_alive, head_only=self.head_only)
                status = 503
            elif reason == "timeout":
                data = wire.upstream_timeout(runtime.name, runtime.timeout_s, keep_alive=keep_alive,
                                             head_only=self.head_only)
                status = 504
            elif reason == "unreachable":
                data = wire.upstream_unreachable(runtime.name, detail or "connection failed",
                                                 keep_alive=keep_alive, head_only=self.head_only)
                status = 502
            else:
                _, retry_after = proxy.rejection(runtime)
                data = wire.circuit_open(runtime.name, retry_after, keep_alive=keep_alive,
                                         head_only=self.head_only)
                status = 503
        else:
            data = await wire.web_response_bytes(response, keep_alive=keep_alive, head_only=self.head_only)
            status = response.status
        if self.client.lost:
            self._leave()
            return
        self._answer(data, status, keep_alive)

    def web_request(self, body: bytes | None, *, streaming: bool = False) -> Any:
        server = self.server
        client = self.client
        if self.view is None:
            self.view = wire.ProtocolView(client)
        if streaming:
            from aiohttp.streams import StreamReader  # noqa: PLC0415
            self.stream = payload = StreamReader(self.view, 2**16, loop=server.loop)
        else:
            payload = wire.body_stream(self.view, body, server.loop)
        return wire.web_request(self.head, self.view, payload, server.loop, app=server.app,
                                route=server.catch_all, max_body_bytes=server.max_body_bytes)

    @property
    def under_way(self) -> bool:
        """Some of the answer may have been written already."""
        return self.state == STREAMING or self.state == DONE

    # -- the client went away ------------------------------------------------------------

    def on_client_lost(self) -> None:
        """Neither success nor failure (§3): the permit goes back, the slot is freed."""
        if self.state == DONE:
            return
        self.state = DONE
        self._cancel_deadline()
        self._cancel_task()
        self._drop_upstream()
        self._release_permit()
        self._leave()

    # -- bookkeeping ----------------------------------------------------------------------

    def _release_permit(self) -> None:
        if self.permit is not None:
            self.runtime.breaker.release(self.permit)
            self.permit = None

    def _leave(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.runtime.bulkhead.leave()

    def _cancel_deadline(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.server.deadlines.discard(self)

    def _cancel_task(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _drop_upstream(self) -> None:
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.close()

