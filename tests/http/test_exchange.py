"""http/exchange: one proxied request driven through `Exchange`, with fakes instead of the server.

The client is a `FakeDownstream` (the `Downstream` protocol: it records what is written and
what it is told), the upstream a `FakePool` whose connections record what they are sent and
answer only when the test plays the upstream, the deadlines a `FakeDeadlines` fired by hand.
The route is real: a `RouteRuntime` (breaker, bulkhead, static fallback) from a real `Registry`
on a `FakeClock`. Each test asserts what went upstream, the bytes the client got, and what the
breaker and the bulkhead were told (success, failure, neither; the slot given back).
"""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.config.load import load_settings
from proxy.core.clock import FakeClock
from proxy.fallbacks.build import FallbackDeps, build_fallback
from proxy.http import wire
from proxy.http.exchange import Exchange, ExchangeEnv
from proxy.http.head import RequestHead, ResponseHead
from proxy.http.upstream import CHUNKED, LENGTH, UpstreamTarget
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry, RouteRuntime

CONFIG = """
    defaults: {failure_threshold: 3, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               open_timeout_ms: 30000, timeout_ms: 2000, connect_timeout_ms: 500}
    services:
      inventory:
        upstream: http://127.0.0.1:9101/api
        routes:
          stock: {match: {path: /stock}, max_concurrent: 1}
      shipping:
        upstream: http://127.0.0.1:9104
        routes:
          quotes:
            match: {path: /quotes}
            fallback: {type: static, file: service-unavailable.json}
"""

UPSTREAM_DATE = b"Date: Tue, 01 Jan 2030 00:00:00 GMT"
_DATE = re.compile(rb"Date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")


def undated(data: bytes) -> bytes:
    """An answer the proxy built, without its one Date line (the wall clock's)."""
    stripped, count = _DATE.subn(b"", data)
    assert count == 1, data
    return stripped


def fields(*lines: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """Header fields as llhttp hands them to the connection: (name, lower-case name, value)."""
    out = []
    for line in lines:
        name, _, value = line.partition(b": ")
        out.append((name, name.lower(), value))
    return out


def json_answer(status_line: bytes, document: dict) -> bytes:
    """What `wire.answer_bytes` writes for `Answer.json` (Date left out), on a kept connection."""
    body = json.dumps(document).encode()
    return (status_line + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)


# -- fakes ---------------------------------------------------------------------------------------

class FakeDownstream:
    """The client connection as an exchange sees it."""

    def __init__(self, peer_ip: bytes | None = b"10.0.0.7") -> None:
        self.peer_ip = peer_ip
        self.trusted = True
        self.writable = True
        self.lost = False
        self.written: list[bytes] = []
        self.done: list[bool] = []  # keep_alive of each exchange_done
        self.paused: set[str] = set()
        self.aborted = False
        self.discardable = True

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def pause_reading(self, why: str) -> None:
        self.paused.add(why)

    def resume_reading(self, why: str) -> None:
        self.paused.discard(why)

    def abort(self) -> None:
        self.aborted = True

    def can_discard(self) -> bool:
        return self.discardable

    def exchange_done(self, exchange: Any, *, keep_alive: bool) -> None:
        self.done.append(keep_alive)


class FakeConnection:
    """An upstream connection: records what it is sent; the test plays the upstream through
    the same calls `UpstreamConnection` makes."""

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.call: Any = None
        self.sent: list[bytes] = []
        self.head_only: bool | None = None
        self.writable = True
        self.reused = False
        self.closed = False
        self.reading = True

    @property
    def received(self) -> bytes:
        return b"".join(self.sent)

    def send(self, call: Any, data: bytes, *, head_only: bool) -> None:
        self.call = call
        self.head_only = head_only
        self.sent.append(data)

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True
        self.call = None

    # -- the upstream's side --

    def respond_head(self, status: int, reason: bytes, head_fields: list, mode: int = LENGTH) -> None:
        self.call.on_response_head(ResponseHead(status, reason, head_fields, True), mode)

    def respond_body(self, data: bytes) -> None:
        """Body bytes of one read that did not end the response."""
        self.call.on_response_body(data)
        self.call.flush()

    def respond_end(self, last: bytes = b"") -> None:
        call, self.call = self.call, None
        if last:
            call.on_response_body(last)
        self.pool.released.append(self)
        call.on_response_end()

    def respond(self, status: int, reason: bytes, body: bytes, *extra: bytes) -> None:
        self.respond_head(status, reason, fields(b"Content-Length: %d" % len(body), UPSTREAM_DATE, *extra))
        self.respond_end(body)

    def lose(self, error: str, got_response_bytes: bool) -> None:
        call, self.call = self.call, None
        self.closed = True
        call.on_upstream_lost(error, got_response_bytes)


class FakePool:
    """`pool.target/acquire/connect/release` as an exchange uses them (no bound: `may_connect`
    always, `reserve`/`unreserve` counted). `connect` makes a new connection, raises
    `fail_with`, or (`hang`) waits until it is cancelled."""

    def __init__(self) -> None:
        self.idle: list[FakeConnection] = []
        self.connects: list[tuple[str, float]] = []
        self.made: list[FakeConnection] = []
        self.released: list[FakeConnection] = []
        self.fail_with: BaseException | None = None
        self.hang = False
        self.reserved = 0  # slots taken for connections being made and not yet given back

    def target(self, url: str, ssl_context: Any = None) -> UpstreamTarget:
        return UpstreamTarget(url, ssl_context)

    def acquire(self, target: UpstreamTarget) -> FakeConnection | None:
        return self.idle.pop() if self.idle else None

    def may_connect(self, target: UpstreamTarget) -> bool:
        return True

    def reserve(self, target: UpstreamTarget) -> None:
        self.reserved += 1

    def unreserve(self, target: UpstreamTarget) -> None:
        self.reserved -= 1

    async def connect(self, target: UpstreamTarget, timeout: float, *, reserved: bool = False) -> FakeConnection:
        self.connects.append((target.url, timeout))
        if self.fail_with is not None:
            raise self.fail_with
        if self.hang:
            await asyncio.get_running_loop().create_future()
        connection = FakeConnection(self)
        self.made.append(connection)
        return connection

    def release(self, connection: FakeConnection) -> None:
        self.released.append(connection)


class FakeDeadlines:
    """Deadlines the test fires: `pending` maps each call to its timeout."""

    def __init__(self) -> None:
        self.pending: dict[Any, float] = {}

    def add(self, call: Any, timeout_s: float, slow_s: float = 0.0) -> None:
        call.deadline = 1.0  # any non-zero loop time: "has a deadline"
        self.pending[call] = timeout_s

    def discard(self, call: Any) -> None:
        self.pending.pop(call, None)

    def fire(self) -> None:
        due, self.pending = self.pending, {}
        for call in due:
            call.on_deadline()


@dataclass
class World:
    clock: FakeClock
    registry: Registry
    pool: FakePool
    deadlines: FakeDeadlines
    env: ExchangeEnv
    fallback_logs: list[tuple] = field(default_factory=list)

    def runtime(self, name: str) -> RouteRuntime:
        runtime = self.registry.get(name)
        assert runtime is not None
        return runtime

    def exchange(self, method: bytes, target: bytes, *head_fields: bytes, http11: bool = True,
                 keep_alive: bool = True) -> tuple[Exchange, FakeDownstream]:
        """An exchange for `target` (`/<service>/<path>?<query>`), routed as the server does."""
        head = RequestHead(method, target, http11, fields(*head_fields), keep_alive)
        path, question, query = target.partition(b"?")
        _, service, rest = path.decode().split("/", 2)
        runtime = self.registry.router.resolve(service, method.decode(), "/" + rest)
        assert runtime is not None
        client = FakeDownstream()
        upstream_target = b"/" + rest.encode() + question + query
        return Exchange(self.env, client, head, runtime, upstream_target), client


@pytest.fixture
async def world(config_dir: Path) -> World:
    path = config_dir / "config" / "breakers.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    settings = load_settings(path, {})
    clock = FakeClock()
    deps = FallbackDeps(clock=clock, fallback_dir=settings.fallback_dir)
    registry = Registry(settings, clock, Metrics(), lambda route, upstream: build_fallback(route, deps))
    pool, deadlines = FakePool(), FakeDeadlines()
    logs: list[tuple] = []
    env = ExchangeEnv(asyncio.get_running_loop(), pool, deadlines, clock,  # type: ignore[arg-type]
                      fallback_log=lambda name, kind, request, status, reason: logs.append(
                          (name, kind, request.method, request.target, status, reason)))
    return World(clock, registry, pool, deadlines, env, logs)


def calls(runtime: RouteRuntime) -> dict[str, Any]:
    """What the route's breaker and bulkhead were told."""
    view = runtime.breaker.view()
    return {"state": view.state.value, "success": view.calls_success, "failure": view.calls_failure,
            "rejected": view.calls_rejected, "half_open_in_flight": view.half_open_in_flight,
            "in_flight": runtime.bulkhead.in_flight}


def closed_after(success: int = 0, failure: int = 0, rejected: int = 0, in_flight: int = 0) -> dict[str, Any]:
    return {"state": "closed", "success": success, "failure": failure, "rejected": rejected,
            "half_open_in_flight": 0, "in_flight": in_flight}


async def settle() -> None:
    """Let the loop run the callbacks made ready (a connect task, a fallback task)."""
    for _ in range(3):
        await asyncio.sleep(0)


def open_breaker(runtime: RouteRuntime) -> None:
    """Three failures: the route's breaker opens for 30 s."""
    for _ in range(3):
        permit = runtime.breaker.try_acquire()
        assert permit is not None
        runtime.record(permit, failed=True)
    assert runtime.breaker.state.value == "open"


GET_STOCK = (b"GET", b"/inventory/stock/SKU-1?x=1&y=%20", b"Host: proxy.local")
STOCK_HEAD = (b"GET /api/stock/SKU-1?x=1&y=%20 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\n"
              b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: proxy.local\r\n\r\n")


# -- the healthy path ------------------------------------------------------------------------------

async def test_a_healthy_get_is_forwarded_answered_and_recorded_as_a_success(world):
    exchange, client = world.exchange(
        b"GET", b"/inventory/stock/SKU-1?x=1&y=%20", b"Host: proxy.local", b"User-Agent: shop/1.0",
        b"Connection: keep-alive, X-Trace", b"X-Trace: abc", b"Keep-Alive: timeout=5", b"TE: trailers",
        b"Proxy-Authorization: Basic eDp5", b"X-Forwarded-For: 203.0.113.9", b"X-Forwarded-Proto: https",
        b"Accept: application/json")
    runtime = world.runtime("inventory.stock")
    exchange.start()
    assert calls(runtime) == closed_after(in_flight=1)
    await settle()
    (connection,) = world.pool.made
    assert world.pool.connects == [("http://127.0.0.1:9101/api", 0.5)]
    assert (connection.received, connection.head_only) == (
        b"GET /api/stock/SKU-1?x=1&y=%20 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\nUser-Agent: shop/1.0\r\n"
        b"Accept: application/json\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: proxy.local\r\n\r\n", False)
    assert world.deadlines.pending == {exchange: 2.0}

    connection.respond(200, b"OK", b'{"sku": "SKU-1"}', b"Content-Type: application/json",
                       b"Connection: keep-alive", b"Keep-Alive: timeout=30", b"X-Upstream: 1")

    assert client.data == (b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n" + UPSTREAM_DATE
                           + b"\r\nContent-Type: application/json\r\nX-Upstream: 1\r\n\r\n"
                           + b'{"sku": "SKU-1"}')
    assert (client.done, client.aborted, client.paused) == ([True], False, set())
    assert calls(runtime) == closed_after(success=1)
    assert (world.deadlines.pending, connection.closed, world.pool.released) == ({}, False, [connection])


async def test_a_pooled_connection_is_used_at_once_without_a_connect(world):
    pooled = FakeConnection(world.pool)
    pooled.reused = True
    world.pool.idle.append(pooled)
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    assert (pooled.received, world.pool.connects) == (STOCK_HEAD, [])
    pooled.respond(204, b"No Content", b"")
    assert client.data == b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n" + UPSTREAM_DATE + b"\r\n\r\n"
    assert calls(world.runtime("inventory.stock")) == closed_after(success=1)


@pytest.mark.parametrize("status, reason, outcome", [
    (500, b"Internal Server Error", closed_after(failure=1)),  # in failure_statuses
    (503, b"Service Unavailable", closed_after(failure=1)),
    (404, b"Not Found", closed_after(success=1)),  # the client's fault, not the upstream's
    (429, b"Too Many Requests", closed_after(success=1)),
])
async def test_an_upstream_status_passes_through_and_counts_as_its_failure_statuses_say(
        world, status, reason, outcome):
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    world.pool.made[0].respond(status, reason, b"boom")
    assert client.data == (b"HTTP/1.1 %d %s\r\nContent-Length: 4\r\n" % (status, reason)
                           + UPSTREAM_DATE + b"\r\n\r\nboom")
    assert client.done == [True]
    assert calls(world.runtime("inventory.stock")) == outcome


async def test_a_chunked_response_is_passed_on_chunked(world):
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    connection = world.pool.made[0]
    connection.respond_head(200, b"OK", fields(b"Transfer-Encoding: chunked", UPSTREAM_DATE), CHUNKED)
    connection.respond_body(b"hello")
    assert client.data == (b"HTTP/1.1 200 OK\r\n" + UPSTREAM_DATE + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"5\r\nhello\r\n")
    connection.respond_end(b"!")
    assert client.data.endswith(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n")
    assert (client.done, calls(world.runtime("inventory.stock"))) == ([True], closed_after(success=1))


# -- rejections ----------------------------------------------------------------------------------

async def test_a_forced_open_breaker_answers_503_circuit_open_without_retry_after_or_an_upstream(world):
    runtime = world.runtime("inventory.stock")
    runtime.breaker.force_open()
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    assert undated(client.data) == json_answer(
        b"HTTP/1.1 503 Service Unavailable\r\n",
        {"error": "circuit_open", "breaker": "inventory.stock", "retry_after": None})
    assert (world.pool.connects, world.pool.made, world.deadlines.pending, client.done) == ([], [], {}, [True])
    assert calls(runtime) == {"state": "forced_open", "success": 0, "failure": 0, "rejected": 1,
                              "half_open_in_flight": 0, "in_flight": 0}


async def test_an_open_breaker_answers_503_circuit_open_with_the_seconds_until_half_open(world):
    runtime = world.runtime("inventory.stock")
    open_breaker(runtime)
    world.clock.advance(10.5)
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    body = b'{"error": "circuit_open", "breaker": "inventory.stock", "retry_after": 19.5}'
    assert undated(client.data) == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nRetry-After: 20\r\n\r\n" % len(body) + body)
    assert (world.pool.connects, client.done) == ([], [True])
    assert calls(runtime) == {"state": "open", "success": 0, "failure": 3, "rejected": 1,
                              "half_open_in_flight": 0, "in_flight": 0}


async def test_a_full_bulkhead_answers_503_bulkhead_full_with_retry_after_1(world):
    runtime = world.runtime("inventory.stock")
    assert runtime.bulkhead.try_enter()  # max_concurrent: 1, taken
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    body = b'{"error": "bulkhead_full", "breaker": "inventory.stock"}'
    assert undated(client.data) == (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert (world.pool.connects, client.done) == ([], [True])
    assert calls(runtime) == closed_after(rejected=1, in_flight=1)  # only the slot taken above


async def test_a_rejected_request_whose_body_cannot_be_dropped_closes_the_connection(world):
    world.runtime("inventory.stock").breaker.force_open()
    exchange, client = world.exchange(b"POST", b"/inventory/stock", b"Host: p", b"Transfer-Encoding: chunked")
    client.discardable = False  # chunked: no telling how much is left
    exchange.start()
    assert undated(client.data).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nConnection: close\r\n\r\n" in client.data
    assert client.done == [False]


# -- calls that get no response ----------------------------------------------------------------

async def test_a_refused_connect_is_502_upstream_unreachable_and_a_failure(world):
    world.pool.fail_with = ConnectionRefusedError(111, "Connection refused")
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    assert undated(client.data) == json_answer(
        b"HTTP/1.1 502 Bad Gateway\r\n",
        {"error": "upstream_unreachable", "breaker": "inventory.stock",
         "detail": "[Errno 111] Connection refused"})
    assert (world.pool.connects, world.deadlines.pending, client.done) == (
        [("http://127.0.0.1:9101/api", 0.5)], {}, [True])
    assert calls(world.runtime("inventory.stock")) == closed_after(failure=1)


async def test_the_deadline_while_connecting_is_504_upstream_timeout_and_a_failure(world):
    world.pool.hang = True
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    assert (client.written, world.deadlines.pending) == ([], {exchange: 2.0})
    task = exchange.task
    world.deadlines.fire()
    await settle()
    assert undated(client.data) == json_answer(
        b"HTTP/1.1 504 Gateway Timeout\r\n",
        {"error": "upstream_timeout", "breaker": "inventory.stock", "timeout_s": 2.0})
    assert (task.cancelled(), exchange.task, world.pool.made, client.done) == (True, None, [], [True])
    assert calls(world.runtime("inventory.stock")) == closed_after(failure=1)


async def test_the_deadline_after_the_request_went_upstream_cuts_the_connection_off(world):
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    (connection,) = world.pool.made
    world.deadlines.fire()
    assert undated(client.data) == json_answer(
        b"HTTP/1.1 504 Gateway Timeout\r\n",
        {"error": "upstream_timeout", "breaker": "inventory.stock", "timeout_s": 2.0})
    assert (connection.closed, connection.call, client.done) == (True, None, [True])
    assert calls(world.runtime("inventory.stock")) == closed_after(failure=1)


async def test_an_upstream_that_hangs_up_before_answering_is_502_and_a_failure(world):
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    world.pool.made[0].lose("ConnectionResetError", False)
    assert undated(client.data) == json_answer(
        b"HTTP/1.1 502 Bad Gateway\r\n",
        {"error": "upstream_unreachable", "breaker": "inventory.stock", "detail": "ConnectionResetError"})
    assert calls(world.runtime("inventory.stock")) == closed_after(failure=1)


async def test_a_reused_connection_closed_meanwhile_is_retried_once_on_a_fresh_one(world):
    stale = FakeConnection(world.pool)
    stale.reused = True
    world.pool.idle.append(stale)
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    stale.lose("connection closed by the upstream", False)
    await settle()
    (fresh,) = world.pool.made
    assert (stale.received, fresh.received) == (STOCK_HEAD, STOCK_HEAD)
    fresh.respond(200, b"OK", b"ok")
    assert client.data == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + UPSTREAM_DATE + b"\r\n\r\nok"
    assert calls(world.runtime("inventory.stock")) == closed_after(success=1)


async def test_an_upstream_lost_mid_body_aborts_the_client_and_is_a_failure(world):
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()
    await settle()
    connection = world.pool.made[0]
    connection.respond_head(200, b"OK", fields(b"Content-Length: 10", UPSTREAM_DATE))
    connection.respond_body(b"hello")
    connection.lose("connection closed by the upstream", True)
    assert client.data == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" + UPSTREAM_DATE + b"\r\n\r\nhello"
    assert (client.aborted, client.done, world.deadlines.pending) == (True, [], {})
    assert calls(world.runtime("inventory.stock")) == closed_after(failure=1)


# -- the client's side going wrong ----------------------------------------------------------------

async def test_a_client_lost_mid_call_is_neither_success_nor_failure_and_frees_the_trial_slot(world):
    runtime = world.runtime("inventory.stock")
    open_breaker(runtime)
    world.clock.advance(30)
    exchange, client = world.exchange(*GET_STOCK)
    exchange.start()  # the half-open trial call (half_open_max_calls: 1)
    await settle()
    (connection,) = world.pool.made
    assert calls(runtime) == {"state": "half_open", "success": 0, "failure": 3, "rejected": 0,
                              "half_open_in_flight": 1, "in_flight": 1}
    client.lost = True
    exchange.on_client_lost()
    assert calls(runtime) == {"state": "half_open", "success": 0, "failure": 3, "rejected": 0,
                              "half_open_in_flight": 0, "in_flight": 0}
    assert (connection.closed, client.written, client.done, world.deadlines.pending) == (True, [], [], {})
    # The trial slot is free again: the next call goes upstream.
    second, _ = world.exchange(*GET_STOCK)
    second.start()
    await settle()
    assert [made.received for made in world.pool.made] == [STOCK_HEAD, STOCK_HEAD]


async def test_a_request_broken_after_its_head_went_upstream_cuts_the_upstream_off(world):
    exchange, client = world.exchange(b"POST", b"/inventory/stock/SKU-1", b"Host: p",
                                      b"Transfer-Encoding: chunked")
    exchange.start()
    await settle()
    (connection,) = world.pool.made
    exchange.on_request_body(b"hello")
    refusal = wire.refusal(400, "malformed request: Invalid character in chunk size",
                           max_body_bytes=1000, max_header_bytes=1000)
    exchange.on_request_broken(400, refusal)
    # No terminating chunk: the upstream never sees a request that looks complete.
    assert connection.received == (
        b"POST /api/stock/SKU-1 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\nX-Forwarded-For: 10.0.0.7\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n")
    assert (connection.closed, client.written, client.done, client.aborted) == (True, [refusal], [False], False)
    assert (calls(world.runtime("inventory.stock")), world.deadlines.pending) == (closed_after(), {})


async def test_a_request_broken_while_its_answer_streams_aborts_the_client(world):
    exchange, client = world.exchange(b"POST", b"/inventory/stock", b"Host: p", b"Transfer-Encoding: chunked")
    client.discardable = False  # its chunked body is still coming: the answer closes
    exchange.start()
    await settle()
    connection = world.pool.made[0]
    connection.respond_head(200, b"OK", fields(b"Content-Length: 10", UPSTREAM_DATE))
    connection.respond_body(b"hello")
    exchange.on_request_broken(413, b"413 bytes never written")
    assert client.data == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n" + UPSTREAM_DATE + b"\r\nConnection: close\r\n\r\nhello"
    assert (client.aborted, client.done, connection.closed) == (True, [], True)
    assert calls(world.runtime("inventory.stock")) == closed_after()


# -- request bodies --------------------------------------------------------------------------------

async def test_a_chunked_request_body_is_rechunked_and_ended_only_on_request_end(world):
    exchange, client = world.exchange(b"POST", b"/inventory/stock/SKU-1", b"Host: p",
                                      b"Transfer-Encoding: chunked", b"Content-Type: text/plain")
    head = (b"POST /api/stock/SKU-1 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\nContent-Type: text/plain\r\n"
            b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: p\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    exchange.start()
    exchange.on_request_body(b"ab")  # before the connection is ready: held
    await settle()
    (connection,) = world.pool.made
    assert connection.received == head + b"2\r\nab\r\n"
    exchange.on_request_body(b"cde" * 10)
    assert connection.received == head + b"2\r\nab\r\n1e\r\n" + b"cde" * 10 + b"\r\n"
    assert exchange.request_sent is False
    exchange.on_request_end()
    assert connection.received == head + b"2\r\nab\r\n1e\r\n" + b"cde" * 10 + b"\r\n0\r\n\r\n"
    assert exchange.request_sent is True
    connection.respond(201, b"Created", b"")
    assert (client.done, calls(world.runtime("inventory.stock"))) == ([True], closed_after(success=1))


async def test_a_content_length_body_is_forwarded_as_it_is(world):
    exchange, client = world.exchange(b"PUT", b"/inventory/stock/SKU-1", b"Host: p", b"Content-Length: 7")
    exchange.start()
    exchange.on_request_body(b"abc")
    await settle()
    exchange.on_request_body(b"defg")
    exchange.on_request_end()
    assert world.pool.made[0].received == (
        b"PUT /api/stock/SKU-1 HTTP/1.1\r\nHost: 127.0.0.1:9101\r\nContent-Length: 7\r\n"
        b"X-Forwarded-For: 10.0.0.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: p\r\n\r\nabcdefg")


# -- fallbacks ----------------------------------------------------------------------------------

async def test_a_rejection_on_a_route_with_a_static_fallback_answers_the_fallback(world):
    runtime = world.runtime("shipping.quotes")
    open_breaker(runtime)
    world.clock.advance(10)
    exchange, client = world.exchange(b"GET", b"/shipping/quotes?zone=eu", b"Host: p")
    exchange.start()
    await settle()
    body = b'{"error": "service_unavailable", "breaker": "shipping.quotes", "retry_after": 20}'
    assert undated(client.data) == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 20\r\n"
        b"X-Circuit-Breaker: shipping.quotes\r\nX-Circuit-State: open\r\nX-Fallback: static\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert (world.pool.connects, client.done) == ([], [True])
    assert world.fallback_logs == [("shipping.quotes", "static", "GET", "/shipping/quotes?zone=eu", 503, "open")]
    assert calls(runtime) == {"state": "open", "success": 0, "failure": 3, "rejected": 1,
                              "half_open_in_flight": 0, "in_flight": 0}


async def test_a_refused_connect_on_a_route_with_a_static_fallback_answers_the_fallback(world):
    world.pool.fail_with = ConnectionRefusedError(111, "Connection refused")
    exchange, client = world.exchange(b"GET", b"/shipping/quotes", b"Host: p")
    exchange.start()
    await settle()
    body = b'{"error": "service_unavailable", "breaker": "shipping.quotes", "retry_after": null}'
    assert undated(client.data) == (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"X-Circuit-Breaker: shipping.quotes\r\nX-Circuit-State: closed\r\nX-Fallback: static\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert world.fallback_logs == [("shipping.quotes", "static", "GET", "/shipping/quotes", 503, "unreachable")]
    assert calls(world.runtime("shipping.quotes")) == closed_after(failure=1)
    assert world.pool.reserved == 0  # the slot taken for the connect was given back
