"""Recovery without customer traffic (`probe`), through the real proxy and a raw upstream.

The upstream fails or answers on cue and records every request head, so each test can say
exactly what reached it after the breaker opened. No test waits for a timer to prove
something did not happen without first waiting (bounded) for the state it expects.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.test_wire import Upstream

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 2, success_threshold: 2, open_timeout_ms: 100, jitter: 0,
               failure_rate_threshold: 0, slow_call_rate_threshold: 0, timeout_ms: 2000}
    services:
      up:
        upstream: $up
        routes:
          probed:
            match: {path: /probed}
            probe: {path: /health, interval_ms: 20}
          held:
            match: {path: /held}
            probe: {path: /hang-health, interval_ms: 20}
          plain:
            match: {path: /plain}
"""


class Cued(Upstream):
    """503 for everything while `healthy` is False; `/hang-health` never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.healthy = False

    def answer(self, head: bytes, body: bytes):
        path = head.split(b" ")[1]
        if path.startswith(b"/hang-health"):
            return [30.0]  # holds the probe in flight (the test ends first)
        if not self.healthy:
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def upstream():
    server = Cued()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")


async def entry(proxy, name: str) -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        return next(b for b in (await response.json())["breakers"] if b["name"] == name)


async def until(proxy, name: str, check, what: str) -> dict:
    for _ in range(250):  # 5 s at most
        found = await entry(proxy, name)
        if check(found):
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never {what}: {found}")


async def get(proxy, path: str) -> tuple[int, dict | str]:
    async with proxy.session.get(proxy.url(path)) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def trip(proxy, path: str, name: str) -> None:
    """Two failing customer calls: the breaker opens (failure_threshold 2)."""
    assert [(await get(proxy, path))[0] for _ in range(2)] == [503, 503]
    assert (await entry(proxy, name))["state"] == "open"


def sent_after(upstream: Cued, mark: int) -> list[bytes]:
    return [head for head, _ in upstream.received[mark:]]


def is_probe(head: bytes, breaker: str, path: bytes) -> bool:
    lower = head.lower()
    return (head.split(b" ")[1] == path and f"\r\nx-circuit-probe: {breaker}\r\n".encode() in lower
            and b"\r\nuser-agent: circuit-proxy-probe\r\n" in lower)


async def test_a_probed_route_recovers_with_zero_customer_requests(proxy, upstream):
    await trip(proxy, "/up/probed/order", "up.probed")
    mark = len(upstream.received)
    upstream.healthy = True
    closed = await until(proxy, "up.probed", lambda b: b["state"] == "closed", "closed")
    heads = sent_after(upstream, mark)
    assert heads and all(is_probe(h, "up.probed", b"/health") for h in heads), heads
    assert all(h.startswith(b"GET ") for h in heads)
    assert closed["calls"]["success"] == 2  # success_threshold probes, no customer call
    assert [t["reason"] for t in closed["transitions"]][-2:] == ["open_timeout_elapsed", "success_threshold"]
    assert closed["waiting_for"] is None
    assert (await get(proxy, "/up/probed/order"))[0] == 200  # customers are back


async def test_while_half_open_with_a_probe_customers_get_the_rejection_not_the_upstream(proxy, upstream):
    await trip(proxy, "/up/held/order", "up.held")
    # The probe hangs in flight: the breaker stays half-open, waiting for it.
    half_open = await until(proxy, "up.held", lambda b: b["state"] == "half_open", "half-open")
    assert half_open["waiting_for"] == "probe"
    for _ in range(250):  # the probe has reached the upstream (5 s at most)
        if any(is_probe(h, "up.held", b"/hang-health") for h, _ in upstream.received):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("no probe reached the upstream")
    mark = len(upstream.received)
    upstream.healthy = True  # a customer call would succeed now: it must not be let through
    rejected_before = (await entry(proxy, "up.held"))["calls"]["rejected"]
    status, document = await get(proxy, "/up/held/order")
    assert status == 503 and document["error"] == "circuit_open"
    assert sent_after(upstream, mark) == []
    after = await entry(proxy, "up.held")
    assert after["state"] == "half_open" and after["calls"]["rejected"] == rejected_before + 1


async def test_a_failed_probe_reopens_the_breaker(proxy, upstream):
    await trip(proxy, "/up/probed/order", "up.probed")
    mark = len(upstream.received)
    reopened = await until(proxy, "up.probed",
                           lambda b: "half_open_failure" in [t["reason"] for t in b["transitions"]],
                           "re-opened by a failed probe")
    assert reopened["state"] in ("open", "half_open")  # half-open again once 200 ms have passed
    heads = sent_after(upstream, mark)
    assert heads and all(is_probe(h, "up.probed", b"/health") for h in heads), heads
    reasons = [t["reason"] for t in reopened["transitions"]]
    assert reasons[:3] == ["consecutive_failures", "open_timeout_elapsed", "half_open_failure"]
    upstream.healthy = True
    closed = await until(proxy, "up.probed", lambda b: b["state"] == "closed", "closed")
    assert closed["transitions"][-1]["reason"] == "success_threshold"
    assert all(is_probe(h, "up.probed", b"/health") for h in sent_after(upstream, mark))


async def test_without_probe_a_half_open_breaker_waits_for_a_customer_request(proxy, upstream):
    await trip(proxy, "/up/plain/order", "up.plain")
    mark = len(upstream.received)
    upstream.healthy = True
    half_open = await until(proxy, "up.plain", lambda b: b["state"] == "half_open", "half-open")
    assert half_open["waiting_for"] == "trial_request"
    # Ten more looks over 200 ms (ten probe intervals of the other routes): still nothing sent.
    for _ in range(10):
        await asyncio.sleep(0.02)
        assert (await entry(proxy, "up.plain"))["state"] == "half_open"
    assert sent_after(upstream, mark) == []
    assert (await get(proxy, "/up/plain/order"))[0] == 200  # the trial is this request
    assert (await entry(proxy, "up.plain"))["state"] == "half_open"
    assert (await get(proxy, "/up/plain/order"))[0] == 200
    closed = await entry(proxy, "up.plain")
    assert closed["state"] == "closed" and closed["waiting_for"] is None
    assert [h.split(b" ")[1] for h in sent_after(upstream, mark)] == [b"/plain/order", b"/plain/order"]
    assert not any(b"x-circuit-probe" in h.lower() for h, _ in upstream.received)
