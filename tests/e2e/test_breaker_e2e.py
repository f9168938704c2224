"""Every breaker transition through the real proxy and fake upstreams (§3, §4)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.core.clock import FakeClock

CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}


BASE_POLICY = {"minimum_calls": 10, "failure_rate_threshold": 0, "slow_call_rate_threshold": 0,
               "open_timeout_ms": 10000, "timeout_ms": 2000}


def config(**policy: object) -> str:
    settings = "\n".join(f"      {key}: {value}" for key, value in {**BASE_POLICY, **policy}.items())
    return f"""
    storage: {{path: $db}}
    defaults:
{settings}
    services:
      payment:
        upstream: $payment
        routes:
          charges: {{match: {{methods: [POST], path: /charges}}}}
    """


async def post(proxy, path="/payment/charges") -> tuple[int, dict, object]:
    async with proxy.session.post(proxy.url(path), json=CHARGE) as response:
        body = await response.json(content_type=None)
        return response.status, dict(response.headers), body


async def breaker(proxy, name="payment.charges") -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        return next(b for b in (await response.json())["breakers"] if b["name"] == name)


async def test_exactly_threshold_calls_reach_a_failing_upstream(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=5), clock=FakeClock())
    await fakes.set_mode("payment", "error", status=500)
    statuses = [(await post(proxy))[0] for _ in range(12)]
    assert statuses == [500] * 5 + [503] * 7
    assert fakes.requests("payment") == 5
    status, headers, body = await post(proxy)
    assert (status, body) == (503, {"error": "circuit_open", "breaker": "payment.charges", "retry_after": 10.0})
    assert headers["Retry-After"] == "10"
    entry = await breaker(proxy)
    assert entry["state"] == "open"
    assert entry["calls"] == {"success": 0, "failure": 5, "rejected": 8}
    assert entry["opened_at"].endswith("Z") and entry["retry_at"].endswith("Z")


async def test_open_half_open_closed_on_the_clock(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(config(failure_threshold=2, success_threshold=2, open_timeout_ms=5000),
                              clock=clock)
    await fakes.set_mode("payment", "error", status=503)
    assert [(await post(proxy))[0] for _ in range(2)] == [503, 503]
    await fakes.set_mode("payment", "healthy")
    clock.advance(4.999)
    status, headers, body = await post(proxy)
    assert (status, body["error"], headers["Retry-After"]) == (503, "circuit_open", "1")
    assert fakes.requests("payment") == 2
    clock.advance(0.001)
    # Readers see half_open once retry_at has passed, before any call arrives (§3).
    assert (await breaker(proxy))["state"] == "half_open"
    async with proxy.session.get(proxy.url("/metrics")) as response:
        assert 'circuit_breaker_state{breaker="payment.charges",state="half_open"} 1.0' in await response.text()
    assert (await post(proxy))[0] == 201
    assert (await breaker(proxy))["state"] == "half_open"
    assert (await post(proxy))[0] == 201
    entry = await breaker(proxy)
    assert (entry["state"], entry["retry_at"]) == ("closed", None)


async def test_half_open_failure_reopens_with_backoff(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(config(failure_threshold=1, open_timeout_ms=1000, backoff_multiplier=3.0,
                                     max_open_timeout_ms=5000), clock=clock)
    await fakes.set_mode("payment", "error", status=502)
    assert (await post(proxy))[0] == 502
    expected_periods = [3.0, 5.0, 5.0]  # × 3 each re-open, capped at 5 s
    for period in expected_periods:
        clock.advance(10)
        assert (await post(proxy))[0] == 502  # the half-open trial fails
        status, headers, body = await post(proxy)
        assert (status, body["retry_after"], headers["Retry-After"]) == (503, period, str(int(period)))


async def test_half_open_lets_only_the_configured_trials_through(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(config(failure_threshold=1, half_open_max_calls=2, open_timeout_ms=1000,
                                     timeout_ms=5000), clock=clock)
    await fakes.set_mode("payment", "error", status=500)
    await post(proxy)
    await fakes.set_mode("payment", "hang")
    clock.advance(1)
    trials = [asyncio.create_task(post(proxy)) for _ in range(2)]
    for _ in range(200):
        if fakes.requests("payment") == 3:
            break
        await asyncio.sleep(0.01)
    status, headers, body = await post(proxy)
    assert (status, body["error"], headers["Retry-After"]) == (503, "circuit_open", "1")
    assert (await breaker(proxy))["state"] == "half_open"
    for trial in trials:
        trial.cancel()
    await asyncio.gather(*trials, return_exceptions=True)


async def test_timeout_is_504_and_counts_as_failure(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=2, timeout_ms=200), clock=FakeClock())
    await fakes.set_mode("payment", "hang")
    status, _, body = await post(proxy)
    assert (status, body) == (504, {"error": "upstream_timeout", "breaker": "payment.charges", "timeout_s": 0.2})
    assert (await post(proxy))[0] == 504
    assert (await post(proxy))[0] == 503
    assert (await breaker(proxy))["calls"] == {"success": 0, "failure": 2, "rejected": 1}


async def test_refused_connection_is_502_and_counts_as_failure(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=3), clock=FakeClock())
    await fakes.set_mode("payment", "down")
    results = [await post(proxy) for _ in range(4)]
    assert [r[0] for r in results] == [502, 502, 502, 503]
    assert results[0][2]["error"] == "upstream_unreachable"
    assert results[0][2]["breaker"] == "payment.charges"


async def test_4xx_is_success_and_5xx_passes_through(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=2), clock=FakeClock())
    await fakes.set_mode("payment", "error", status=429)
    assert [(await post(proxy))[0] for _ in range(3)] == [429] * 3
    await fakes.set_mode("payment", "error", status=503)
    assert [(await post(proxy))[0] for _ in range(2)] == [503, 503]
    assert (await breaker(proxy))["calls"] == {"success": 3, "failure": 2, "rejected": 0}
    assert (await breaker(proxy))["state"] == "open"


async def test_failure_rate_over_the_count_window_opens(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=0, minimum_calls=4, failure_rate_threshold=50,
                                     window="{type: count, size: 4}"), clock=FakeClock())
    outcomes = []
    for mode in ("healthy", "error", "healthy", "error", "healthy"):
        await fakes.set_mode("payment", mode)
        outcomes.append((await post(proxy))[0])
    assert outcomes == [201, 500, 201, 500, 503]
    # While open, the window that tripped it stays visible: it tells the operator why.
    assert (await breaker(proxy))["failure_rate"] == 0.5


async def test_slow_call_rate_opens(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=0, minimum_calls=2, slow_call_rate_threshold=100,
                                     slow_call_duration_ms=50, window="{type: count, size: 2}"))
    await fakes.set_mode("payment", "slow", latency_ms=80)
    assert [(await post(proxy))[0] for _ in range(3)] == [201, 201, 503]
    async with proxy.session.get(proxy.url("/metrics")) as response:
        assert 'circuit_breaker_slow_calls_total{breaker="payment.charges"} 2.0' in await response.text()


async def test_bulkhead_rejects_excess_calls_without_blaming_the_upstream(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=1, max_concurrent=1, timeout_ms=5000))
    await fakes.set_mode("payment", "hang")
    first = asyncio.create_task(post(proxy))
    for _ in range(200):
        if fakes.requests("payment") == 1:
            break
        await asyncio.sleep(0.01)
    status, headers, body = await post(proxy)
    assert (status, body, headers["Retry-After"]) == (
        503, {"error": "bulkhead_full", "breaker": "payment.charges"}, "1")
    entry = await breaker(proxy)
    assert (entry["state"], entry["calls"]) == ("closed", {"success": 0, "failure": 0, "rejected": 1})
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_client_disconnect_is_neither_success_nor_failure(start_proxy, fakes):
    proxy = await start_proxy(config(failure_threshold=1, timeout_ms=5000))
    await fakes.set_mode("payment", "hang")
    with pytest.raises(asyncio.TimeoutError):
        async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE,
                                      timeout=aiohttp.ClientTimeout(total=0.2)):
            pass
    for _ in range(300):
        entry = await breaker(proxy)
        if entry["in_flight"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (entry["state"], entry["in_flight"], entry["calls"]) == (
        "closed", 0, {"success": 0, "failure": 0, "rejected": 0})


async def test_environment_overrides_the_defaults_section(start_proxy, fakes):
    proxy = await start_proxy(config(), clock=FakeClock(),
                              environ={"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "2",
                                       "CIRCUIT_BREAKER_TIMEOUT": "7000"})
    await fakes.set_mode("payment", "error")
    results = [await post(proxy) for _ in range(4)]
    assert [r[0] for r in results] == [500, 500, 503, 503]
    assert results[2][2]["retry_after"] == 7.0
    assert fakes.requests("payment") == 2


async def test_status_lists_every_breaker_from_start(start_proxy):
    proxy = await start_proxy(config())
    async with proxy.session.get(proxy.url("/status.json")) as response:
        document = await response.json()
    assert [(b["name"], b["service"], b["route"], b["state"], b["failure_rate"], b["opened_at"], b["retry_at"])
            for b in document["breakers"]] == [
        ("payment.charges", "payment", "charges", "closed", None, None, None),
        ("payment.default", "payment", "default", "closed", None, None, None)]
    assert document["queues"] == []
