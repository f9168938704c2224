"""One proxied request: permit → upstream → classify → record → (fallback).

Carried out with callbacks, not awaits: the healthy path and every rejection without a fallback
run without a task, a coroutine or a timer of their own (deadlines are swept, see
`deadlines`). Only a fallback and opening a new upstream connection run in a task.

An exchange sees its client only through `Downstream` and its settings through `ExchangeEnv`,
never the whole server. It owns, until it ends, the route's bulkhead slot, the breaker permit,
the upstream connection and the deadline; whatever way it ends (answered, failed, client gone,
request broken), each is given back exactly once. What counts as a failure and the contract's
answers come from `core.outcome`; what a call without an upstream answer gets instead is in
`answering` (fallbacks, contract answers), and when it is tried again in `retrying` (§3b).
A call still in flight at the slow threshold is marked slow by the deadline sweep (§3a).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

from multidict import CIMultiDict

from proxy.core import outcome
from proxy.core.breaker import Permit
from proxy.core.headers import downstream_response_fields, upstream_request_head
from proxy.core.messages import Request
from proxy.core.outcome import Reason
from proxy.http import wire
from proxy.http.body import BodyReader
from proxy.http.deadlines import Deadlines
from proxy.http.head import RequestHead, ResponseHead
from proxy.http.tls import connect_error
from proxy.http.answering import Answering
from proxy.http.retrying import Retrying
from proxy.http.states import CONNECTING, DONE, RETRY_WAIT, SENT, STREAMING, WAITING
from proxy.http.upstream import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, UpstreamConnection, UpstreamPool
from proxy.runtime.registry import RouteRuntime

log = logging.getLogger(__name__)

_RETRYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})  # a stale pooled connection, resent
_IN_FLIGHT = (CONNECTING, SENT, STREAMING)
TRUNCATED = "truncated"  # the `code` of an answer the upstream broke off mid-body
_BODYLESS_DEFAULT = frozenset({b"POST", b"PUT", b"PATCH"})  # sent with Content-Length: 0
_HELD_BODY = 64 * 1024  # request body bytes held while no upstream connection is ready

FallbackLog = Callable[[str, str, Request, int, str], None]


class Downstream(Protocol):
    """What an exchange may do to its client connection."""

    peer_ip: bytes | None
    trusted: bool  # the client is a trusted proxy (server.trusted_proxies): X-Forwarded-For kept
    writable: bool
    lost: bool

    def write(self, data: bytes) -> None: ...
    def writelines(self, data: list[bytes]) -> None: ...
    def pause_reading(self, why: str) -> None: ...
    def resume_reading(self, why: str) -> None: ...
    def abort(self) -> None: ...
    def can_discard(self) -> bool: ...
    def exchange_done(self, exchange: Any, *, keep_alive: bool) -> None: ...


class ExchangeEnv:
    """What every exchange of a server shares."""

    __slots__ = ("loop", "pool", "deadlines", "clock", "fallback_log", "draining", "scheme", "tls_for",
                 "rng")

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: UpstreamPool, deadlines: Deadlines,
                 clock: Any, *, fallback_log: FallbackLog | None = None, scheme: bytes = b"http",
                 tls_for: Callable[[RouteRuntime], Any] | None = None) -> None:
        self.loop = loop
        self.pool = pool
        self.deadlines = deadlines
        self.clock = clock
        self.fallback_log = fallback_log
        self.draining = False
        self.scheme = scheme
        self.tls_for = tls_for  # the route's TLS context for an https upstream (None: default)
        self.rng = random.Random()  # retry backoff jitter


def refused_at_once(runtime: RouteRuntime, clock: Any, *, keep_alive: bool, head_only: bool) -> bytes | None:
    """The open path without an exchange: a request read whole, on a route whose breaker is
    open (or forced open) and whose refusals are the contract's 503 (`plain_refusal`: no
    fallback, no retries), gets its 503 circuit_open here, counted as `Exchange.start` would
    count it. None: it needs an exchange (the open period is over, or a full bulkhead, whose
    rejection says so)."""
    started = clock.monotonic()
    breaker = runtime.breaker
    retry_after = breaker.refuses()
    if retry_after is None or runtime.bulkhead.is_full:
        return None
    breaker.note_rejected()
    metrics = runtime.metrics
    metrics.rejected.value += 1
    data = wire.circuit_open(runtime.name, retry_after if retry_after >= 0.0 else None,
                             keep_alive=keep_alive, head_only=head_only)
    metrics.count_request(503, clock.monotonic() - started)
    return data


class Exchange(Answering, Retrying):
    __slots__ = ("env", "client", "runtime", "head", "target", "upstream_target", "permit",
                 "started", "upstream", "deadline", "state", "status", "failed", "recorder",
                 "head_only", "client_chunked", "keep_alive", "out", "pending", "pending_size",
                 "request_done", "request_sent", "buffering", "buffered", "task", "retried",
                 "holds_slot", "reader", "has_body", "request", "slow_at", "marked_slow",
                 "attempt", "retryable", "pool_wait", "reserved")

    def __init__(self, env: ExchangeEnv, client: Downstream, head: RequestHead,
                 runtime: RouteRuntime, target: bytes) -> None:
        self.env = env
        self.client = client
        self.runtime = runtime
        self.head = head
        self.target = target  # path (after the service) and query, as sent
        tls = env.tls_for(runtime) if runtime.secure and env.tls_for is not None else None
        self.upstream_target = env.pool.target(runtime.upstream, tls)
        self.permit: Permit | None = None
        self.started = env.clock.monotonic()
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
        self.has_body = head.has_body
        self.request_done = not self.has_body  # the whole request body was read from the client
        self.request_sent = False  # ... and written upstream
        self.buffering = False  # reading the whole body first, for the fallback (§5)
        self.buffered: bytes | None = None
        self.task: asyncio.Task | None = None
        self.retried = False
        self.holds_slot = False
        self.reader: BodyReader | None = None  # a fallback reading the body from the client
        self.request: Request | None = None
        self.slow_at = 0.0  # loop.time() at which the call in flight becomes slow (§3a); 0: none
        self.marked_slow = False  # ... and it has (counted once)
        self.attempt = 0  # retries made (§3b)
        self.retryable = False
        self.pool_wait = False  # queued for a connection of a full pool (server.upstream_max_connections)
        self.reserved = False  # holds a pool slot for a connection being made

    # -- start: bulkhead, breaker, then the upstream ---------------------------------------

    def start(self) -> None:
        runtime = self.runtime
        retry = runtime.retry
        if retry is not None:
            runtime.retry_budget.note_request(self.started)  # type: ignore[union-attr]
            self.retryable = self._may_be_retried(retry)
        if not runtime.bulkhead.try_enter():
            # Excess calls are rejected at once and are not the upstream's fault (§3).
            runtime.breaker.note_rejected()
            runtime.metrics.rejected.inc()
            self._reject(Reason.BULKHEAD_FULL, None)
            return
        self.holds_slot = True
        permit = runtime.breaker.try_acquire()
        if permit is None:
            runtime.metrics.rejected.inc()
            reason, retry_after = outcome.rejection(runtime.breaker)
            self._reject(reason, retry_after)
            return
        self.permit = permit
        fallback = runtime.fallback
        length = self.head.content_length
        if self.head.expect_continue and self.has_body:
            self.client.write(wire.CONTINUE)
        if length and ((fallback is not None and fallback.on_failure and fallback.buffer_request_bytes
                        and length <= fallback.buffer_request_bytes) or self.retryable):
            # The fallback must be able to store this body if the call fails (§5), or a
            # retry to send it again (§3b).
            self.buffering = True
            return  # continues in on_request_end
        self._go_upstream()

    def _go_upstream(self) -> None:
        # The route's timeout covers connecting, sending and the whole response, not the time
        # a client takes to upload a body we buffer. The same sweep tells when the call
        # becomes slow while still in flight (§3a).
        runtime = self.runtime
        self.env.deadlines.add(self, runtime.timeout_s, runtime.breaker.slow_threshold_s())
        pool = self.env.pool
        connection = pool.acquire(self.upstream_target)
        if connection is not None:
            self._send(connection)
            return
        self.state = CONNECTING
        if pool.may_connect(self.upstream_target):
            self._start_connect()
        else:
            self.pool_wait = True  # the deadline already set covers the wait
            pool.wait(self.upstream_target, self)

    def on_pool_connection(self, connection: UpstreamConnection) -> None:
        """A full pool hands over a connection given back by another call."""
        self.pool_wait = False
        if self.state == CONNECTING and self.task is None:
            self._send(connection)
        else:
            self.env.pool.release(connection)  # not wanted any more: on to the next in line

    def on_pool_slot(self) -> None:
        """A full pool freed a slot: this call may open a connection of its own."""
        self.pool_wait = False
        if self.state == CONNECTING and self.task is None:
            self._start_connect()
        else:
            self.env.pool.slot_freed(self.upstream_target)

    def _start_connect(self) -> None:
        """A connection of its own: its slot in the pool's bound is taken now (so calls
        deciding in the same tick see it) and given back by `_connect_done` unless the
        connection that came of it holds it."""
        self.env.pool.reserve(self.upstream_target)
        self.reserved = True
        self.task = self.env.loop.create_task(self._connect())
        self.task.add_done_callback(self._connect_done)

    def _connect_done(self, _task: asyncio.Task) -> None:
        if self.reserved:  # failed, timed out, or cancelled (even before it began)
            self.reserved = False
            self.env.pool.unreserve(self.upstream_target)

    async def _connect(self) -> None:
        runtime = self.runtime
        try:
            connection = await self.env.pool.connect(self.upstream_target,
                                                     runtime.connect_timeout_s or runtime.timeout_s,
                                                     reserved=True)
            self.reserved = False  # the connection holds the slot now
        except TimeoutError:
            self.task = None
            if self.state == CONNECTING:
                self._call_failed(Reason.TIMEOUT, False, "")  # never sent
            return
        except OSError as exc:
            self.task = None
            if self.state == CONNECTING:  # refused, DNS, TLS: never sent
                self._call_failed(Reason.UNREACHABLE, False, connect_error(exc))
            return
        self.task = None
        if self.state != CONNECTING:  # the deadline passed or the client left meanwhile
            self.env.pool.release(connection)
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
        data = upstream_request_head(
            head.method, target.base_path + self.target, head.fields, head.connection_tokens,
            host=target.host_header, client_ip=self.client.peer_ip, proto=self.env.scheme,
            forwarded_host=head.host, framing=framing,
            trust_forwarded=self.client.trusted)
        if self.buffered is not None:
            data += self.buffered
        elif self.pending:
            data = b"".join([data, *self.pending])
            self.pending.clear()
            if self.pending_size > _HELD_BODY:
                self.client.resume_reading("upstream")
            self.pending_size = 0
        if self.request_done and head.chunked:
            data += wire.LAST_CHUNK
        self.request_sent = self.request_done
        connection.send(self, data, head_only=self.head_only)

    # -- the request body, from the client -------------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        if self.reader is not None:  # a fallback is reading the body
            self.reader.feed(data)
            return
        connection = self.upstream
        if connection is not None and not self.buffering:  # sent (the answer may be streaming)
            connection.write(wire.encode_chunk(data) if self.head.chunked else data)
            if not connection.writable:
                self.client.pause_reading("upstream")
            return
        if self.state in (WAITING, CONNECTING) and self.permit is not None:
            self.pending.append(wire.encode_chunk(data) if self.head.chunked else data)
            self.pending_size += len(data)
            if self.pending_size > _HELD_BODY and not self.buffering:
                self.client.pause_reading("upstream")
        # otherwise: the exchange has its answer already; the rest of the body is dropped

    def on_request_end(self) -> None:
        self.request_done = True
        if self.reader is not None:
            self.reader.end()
            return
        if self.buffering and self.state == WAITING and self.permit is not None:
            self.buffering = False
            self.buffered = b"".join(self.pending)
            self.pending.clear()
            self._go_upstream()
            return
        if self.upstream is not None:
            if self.head.chunked:
                self.upstream.write(wire.LAST_CHUNK)
            self.request_sent = True

    def on_request_broken(self, status: int, answer: bytes) -> None:
        """The request's framing broke (400) or its chunked body grew too large (413): the
        client's fault, not the upstream's. An upstream that got part of it is cut off, so it
        never sees a request that looks complete."""
        state = self.state
        if state == DONE:
            return
        self._give_back()
        if state == STREAMING:
            self.client.abort()  # an answer is already under way: it cannot become an error
            return
        self.client.write(answer)
        self.runtime.metrics.count_request(status, self.env.clock.monotonic() - self.started)
        self.client.exchange_done(self, keep_alive=False)

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading("upstream")
        else:
            self.client.pause_reading("upstream")

    # -- the response, from the upstream ---------------------------------------------------

    def on_response_head(self, head: ResponseHead, body_mode: int) -> None:
        status = self.status = head.status
        runtime = self.runtime
        # Only listed statuses fail (outcome.is_failure, §3); set on every attempt (§3b).
        failed = self.failed = status in runtime.failure_statuses
        if failed:
            runtime.note_failure("http", status)
            if self.retryable:
                # Judged now, before anything of this answer reaches the client (§3b).
                self._record_attempt(True)
                if self._retry(True):
                    return  # the next attempt's answer is the one the client gets
        self.state = STREAMING
        lines = [wire.status_line(status, head.reason)]
        # NO_BODY or LENGTH: relayed as framed; CHUNKED or UNTIL_CLOSE: re-framed here.
        has_date = downstream_response_fields(lines, head.fields, head.connection_tokens,
                                              keep_length=body_mode <= LENGTH)
        if body_mode >= CHUNKED:
            if self.head.http11:
                lines.append(b"Transfer-Encoding: chunked\r\n")
                self.client_chunked = True
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the close
        if not has_date:
            lines.append(wire.date_line())
        if self.keep_alive and (self.env.draining or not (self.request_done or self.client.can_discard())):
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        if runtime.retry is not None:
            lines.append(b"X-Retry-Count: %d\r\n" % self.attempt)
        lines.append(b"\r\n")
        self.out.append(b"".join(lines))
        fallback = runtime.fallback
        if fallback is not None and 200 <= status < 300:
            headers = CIMultiDict((name.decode("latin-1"), value.decode("latin-1"))
                                  for name, _, value in head.fields)
            self.recorder = fallback.recorder(self.request_view(None), status, headers)

    def on_response_body(self, data: bytes) -> None:
        self.out.append(wire.encode_chunk(data) if self.client_chunked else data)
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
            self.out.append(wire.LAST_CHUNK)
        self.upstream = None  # back in the pool, or closed (the connection decides)
        self.flush()
        self.state = DONE
        self._cancel_deadline()
        runtime = self.runtime
        self._record_attempt(self.failed)
        if self.recorder is not None and not self.failed:
            self.recorder.finish()
        self._leave()
        runtime.metrics.count_request(self.status, self.env.clock.monotonic() - self.started)
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
                self._start_connect()  # the lost connection gave its slot back
                return
            self._call_failed(Reason.UNREACHABLE, True, error)  # reset or broken mid-exchange
        elif state == STREAMING:
            self._broken()

    def on_slow(self) -> None:
        """The call is still in flight at the slow threshold: slow from now on (§3a)."""
        if self.state in _IN_FLIGHT and self.permit is not None and not self.marked_slow:
            self.marked_slow = True
            self.runtime.mark_slow(self.permit)

    def on_deadline(self) -> None:
        self.deadline = 0.0
        state = self.state
        if state == RETRY_WAIT:
            self._go_upstream()  # the backoff is over: the next attempt
        elif state == CONNECTING or state == WAITING:
            self._cancel_task()
            self._call_failed(Reason.TIMEOUT, False, "")
        elif state == SENT:
            self._drop_upstream()
            self._call_failed(Reason.TIMEOUT, True, "")  # sent, then no answer in time: outcome unknown
        elif state == STREAMING:
            self._broken()

    def _broken(self) -> None:
        """The upstream broke off mid-body: a failure, and the client must see a broken
        response rather than a short one that looks complete."""
        self._drop_upstream()
        self.state = DONE
        self._cancel_deadline()
        self._record_attempt(True)
        self.runtime.note_failure("broken")
        self._leave()
        # Not a 200 the client got: an answer cut off (code="truncated" in proxy_requests_total).
        self.runtime.metrics.count_request(TRUNCATED, self.env.clock.monotonic() - self.started)
        self.out.clear()
        self.client.abort()

    # -- the client went away ---------------------------------------------------------------

    def on_client_lost(self) -> None:
        """Neither success nor failure (§3): the permit goes back, the slot is freed."""
        if self.state != DONE:
            self._give_back()

    def _give_back(self) -> None:
        """End without an outcome: deadline, task, upstream connection, permit, bulkhead slot
        and a waiting fallback's body reader each given back once."""
        self.state = DONE
        self._cancel_deadline()
        self._cancel_task()
        self._drop_upstream()
        self._release_permit()
        self._leave()
        if self.reader is not None:
            self.reader.fail()

    # -- bookkeeping -------------------------------------------------------------------------

    def _record_attempt(self, failed: bool) -> None:
        """The outcome of the attempt under way, to the breaker and metrics (once)."""
        permit, self.permit = self.permit, None
        if permit is None:
            return  # recorded already, when it was judged for a retry
        self.runtime.record(permit, failed=failed, marked_slow=self.marked_slow)
        self.marked_slow = False
        if self.attempt:
            self._count_retry("failure" if failed else "success")

    def _release_permit(self) -> None:
        if self.permit is not None:
            self.runtime.release(self.permit, marked_slow=self.marked_slow)
            self.permit = None

    def _leave(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.runtime.bulkhead.leave()

    def _cancel_deadline(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.env.deadlines.discard(self)

    def _cancel_task(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.pool_wait:
            self.pool_wait = False
            self.env.pool.unwait(self.upstream_target, self)

    def _drop_upstream(self) -> None:
        connection, self.upstream = self.upstream, None
        if connection is not None:
            connection.close()
