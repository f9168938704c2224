"""Hang detection in flight (§3a) and budgeted, breaker-aware retries (§3b), through the proxy.

A raw upstream on loopback hangs, fails or answers on cue, and counts what it received. No
test waits for a timer to prove something did not happen: each waits (bounded) for the event
it expects and then checks the counts.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.core.clock import FakeClock
from tests.e2e.test_wire import Conn, Upstream

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 0, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               timeout_ms: 500}
    services:
      up:
        upstream: $up
        routes:
          hang:
            match: {path: /hang}
            slow_call_duration_ms: 50
            max_slow_in_flight: 3
            open_timeout_ms: 60000
          learn:
            match: {path: /learn}
            slow_call_duration_ms: auto
            auto_slow_floor_ms: 40
            max_slow_in_flight: 2
            open_timeout_ms: 60000
          flaky:
            match: {path: /flaky}
            retry: {attempts: 2, backoff_ms: 1, budget_percent: 100}
          strict:
            match: {path: /strict}
            failure_threshold: 1
            retry: {attempts: 2, backoff_ms: 1, budget_percent: 100}
          budget:
            match: {path: /budget}
            retry: {attempts: 2, backoff_ms: 1, budget_percent: 0}
      gone:
        upstream: http://127.0.0.1:$closed_port
        retry: {attempts: 2, backoff_ms: 1, budget_percent: 100}
      gonefb:
        upstream: http://127.0.0.1:$closed_port
        retry: {attempts: 2, backoff_ms: 1, budget_percent: 100}
        routes:
          default:
            fallback: {type: static, file: service-unavailable.json}
"""


class Cued(Upstream):
    """`/hang…` never answers; `/flaky…` fails with 503 until `heal_after` requests came."""

    def __init__(self) -> None:
        super().__init__()
        self.heal_after = 1

    def answer(self, head: bytes, body: bytes):
        path = head.split(b" ")[1]
        if path.startswith((b"/hang", b"/learn/hang")):
            return [30.0]  # holds the connection without an answer (the test ends first)
        if path.endswith(b"/fine"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        if path.startswith((b"/flaky", b"/strict", b"/budget")):
            seen = sum(1 for h, _ in self.received if h.split(b" ")[1] == path)
            if seen <= self.heal_after:
                return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def upstream():
    server = Cued()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", closed_port=str(closed_port()))


async def entry(proxy, name: str) -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        return next(b for b in (await response.json())["breakers"] if b["name"] == name)


async def until_state(proxy, name: str, state: str) -> dict:
    for _ in range(250):  # 5 s at most
        found = await entry(proxy, name)
        if found["state"] == state:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never became {state}: {found}")


async def metric(proxy, line_start: str) -> float:
    async with proxy.session.get(proxy.url("/metrics")) as response:
        for line in (await response.text()).splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def hits(upstream: Cued, prefix: bytes) -> int:
    return sum(1 for head, _ in upstream.received if head.split(b" ")[1].startswith(prefix))


# -- §3a: hang detection --------------------------------------------------------------------

async def test_calls_hanging_past_the_slow_threshold_open_the_breaker_while_still_in_flight(proxy, upstream):
    hanging = [asyncio.create_task(proxy.session.get(proxy.url(f"/up/hang/{i}"))) for i in range(3)]
    opened = await until_state(proxy, "up.hang", "open")  # long before the 500 ms timeout
    assert opened["calls"] == {"success": 0, "failure": 0, "rejected": 0}  # none has ended yet
    assert opened["slow_calls"] == 3
    async with proxy.session.get(proxy.url("/up/hang/next")) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "circuit_open"
    assert hits(upstream, b"/hang") == 3  # no new call reached the hanging upstream
    # The calls in flight kept running to their own timeout: each is a 504 and a failure,
    # counted slow once.
    statuses = []
    for task in hanging:
        response = await task
        statuses.append(response.status)
        response.release()
    assert statuses == [504, 504, 504]
    final = await entry(proxy, "up.hang")
    assert (final["calls"]["failure"], final["slow_calls"]) == (3, 3)
    transitions = [t["reason"] for t in final["transitions"]]
    assert transitions == ["slow_in_flight"]
    assert await metric(proxy, 'circuit_breaker_slow_calls_total{breaker="up.hang"}') == 3.0


async def test_auto_learns_the_normal_latency_and_cuts_off_a_hang_after_a_few_calls(proxy, upstream):
    before = await entry(proxy, "up.learn")
    assert before["slow_threshold_ms"] == 500.0  # timeout_ms until enough calls were seen
    conn = await Conn.open(proxy)
    for i in range(200):
        conn.send(f"GET /up/learn/ok/{i} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        status, _, _ = await conn.response()
        assert status == 200
    conn.close()
    learned = await entry(proxy, "up.learn")
    assert learned["slow_threshold_ms"] == 40.0  # 4 × a loopback p99 is under the floor
    hanging = [asyncio.create_task(proxy.session.get(proxy.url(f"/up/learn/hang/{i}"))) for i in range(2)]
    await until_state(proxy, "up.learn", "open")
    assert hits(upstream, b"/learn/hang") == 2
    for task in hanging:
        (await task).release()


# -- §3b: retries -----------------------------------------------------------------------------

async def test_an_idempotent_request_is_retried_and_says_how_often(proxy, upstream):
    async with proxy.session.get(proxy.url("/up/flaky/a")) as response:
        assert (response.status, response.headers["X-Retry-Count"]) == (200, "1")
    assert hits(upstream, b"/flaky/a") == 2
    assert (await entry(proxy, "up.flaky"))["calls"] == {"success": 1, "failure": 1, "rejected": 0}
    assert await metric(proxy, 'circuit_breaker_retries_total{breaker="up.flaky",result="success"}') == 1.0


async def test_a_post_is_retried_only_with_an_idempotency_key_and_with_its_body(proxy, upstream):
    async with proxy.session.post(proxy.url("/up/flaky/b"), data=b"order-1") as response:
        assert (response.status, response.headers["X-Retry-Count"], await response.read()) == (503, "0", b"busy")
    assert hits(upstream, b"/flaky/b") == 1
    async with proxy.session.post(proxy.url("/up/flaky/c"), data=b"order-2",
                                  headers={"Idempotency-Key": "k-2"}) as response:
        assert (response.status, response.headers["X-Retry-Count"], await response.read()) == (
            200, "1", b"order-2")
    assert [body for head, body in upstream.received if head.split(b" ")[1] == b"/flaky/c"] == [
        b"order-2", b"order-2"]


async def test_retries_stop_at_attempts_and_the_client_gets_the_last_answer(proxy, upstream):
    upstream.heal_after = 10
    for _ in range(2):  # with 3 requests in 10 s, budget_percent 100 allows 3 retries
        async with proxy.session.get(proxy.url("/up/flaky/fine")) as response:
            assert response.status == 200
    async with proxy.session.get(proxy.url("/up/flaky/d")) as response:
        assert (response.status, response.headers["X-Retry-Count"], await response.read()) == (503, "2", b"busy")
    assert hits(upstream, b"/flaky/d") == 3
    assert await metric(proxy, 'circuit_breaker_retries_total{breaker="up.flaky",result="failure"}') == 2.0


async def test_a_retry_never_goes_into_an_open_breaker(proxy, upstream):
    async with proxy.session.get(proxy.url("/up/strict/a")) as response:
        assert (response.status, response.headers["X-Retry-Count"]) == (503, "0")
    assert hits(upstream, b"/strict") == 1
    assert (await entry(proxy, "up.strict"))["state"] == "open"
    assert await metric(proxy, 'circuit_breaker_retries_total{breaker="up.strict",result="rejected"}') == 1.0


async def test_the_budget_allows_one_retry_a_second_beyond_its_share(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", closed_port=str(closed_port()),
                              clock=FakeClock())
    upstream.heal_after = 10
    async with proxy.session.get(proxy.url("/up/budget/a")) as response:
        assert (response.status, response.headers["X-Retry-Count"]) == (503, "1")
    assert hits(upstream, b"/budget/a") == 2
    assert await metric(proxy, 'circuit_breaker_retries_total{breaker="up.budget",result="budget_exhausted"}') == 1.0


async def test_a_refused_connection_is_retried_within_the_budget_then_answered_502(start_proxy, upstream):
    """One request, budget 100 %: its first retry fits, a second would be 200 % of requests.
    The budget's seconds come from a clock that stands still, so no second boundary can fall
    between the two retries (a new second allows one retry more)."""
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", closed_port=str(closed_port()),
                              clock=FakeClock())
    async with proxy.session.get(proxy.url("/gone/x")) as response:
        assert (response.status, response.headers["X-Retry-Count"]) == (502, "1")
        assert (await response.json())["error"] == "upstream_unreachable"
    assert (await entry(proxy, "gone.default"))["calls"] == {"success": 0, "failure": 2, "rejected": 0}
    assert await metric(proxy, 'circuit_breaker_retries_total{breaker="gone.default",result="failure"}') == 1.0
    assert await metric(proxy, 'circuit_breaker_retries_total{breaker="gone.default",result="budget_exhausted"}') == 1.0


async def test_a_fallback_after_retries_says_how_many_were_made(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", closed_port=str(closed_port()),
                              clock=FakeClock())
    async with proxy.session.get(proxy.url("/gonefb/x")) as response:
        assert (response.status, response.headers["X-Fallback"], response.headers["X-Retry-Count"]) == (
            503, "static", "1")
    assert (await entry(proxy, "gonefb.default"))["calls"] == {"success": 0, "failure": 2, "rejected": 0}
