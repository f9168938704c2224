"""/metrics (§6): every contract family with its labels, the process collector, and `promtool check
metrics` on what a live proxy serves."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from proxy.runtime.metrics import Metrics
from tests.real_tools import require_tool

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, minimum_calls: 2, window: {type: count, size: 4},
           slow_call_duration_ms: 200, failure_rate_threshold: 0, open_timeout_ms: 30000}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
  shipping:
    upstream: $shipping
    routes:
      quotes:
        match: {methods: [POST], path: /quotes}
        fallback:
          type: table
          key: destination.country
          zones: {IT: domestic}
          rows: {domestic: {carrier: fixed-rate, cost: 6.90, currency: EUR, eta_days: 3}}
          default_row: domestic
"""
CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}
QUOTE = {"destination": {"country": "IT", "postcode": "00100"}, "weight_kg": 1}


async def scrape(proxy) -> str:
    async with proxy.session.get(proxy.url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def traffic(proxy, fakes) -> None:
    """A slow success, two failures that open payment.charges, a rejection, a fallback."""
    await fakes.set_mode("payment", "slow", latency_ms=250)
    async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE) as response:
        assert response.status == 201
    await fakes.set_mode("payment", "error", status=500)
    await fakes.set_mode("shipping", "down")
    for expected in (500, 500, 503):
        async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE) as response:
            assert response.status == expected
    async with proxy.session.post(proxy.url("/shipping/quotes"), json=QUOTE) as response:
        assert (response.status, response.headers["X-Fallback"]) == (200, "table")


async def test_every_contract_metric_with_its_labels(start_proxy, fakes):
    proxy = await start_proxy(CONFIG)  # the system clock: a slow call must take time
    await traffic(proxy, fakes)
    values = samples(await scrape(proxy))

    def value(name: str, **labels: str) -> float | None:
        return values.get((name, tuple(sorted(labels.items()))))

    breaker = "payment.charges"
    assert {state: value("circuit_breaker_state", breaker=breaker, state=state) for state in (
        "closed", "open", "half_open", "forced_open", "forced_closed", "disabled")} == {
        "closed": 0, "open": 1, "half_open": 0, "forced_open": 0, "forced_closed": 0, "disabled": 0}
    assert value("circuit_breaker_transitions_total", breaker=breaker, from_state="closed", to_state="open") == 1
    assert {o: value("circuit_breaker_calls_total", breaker=breaker, outcome=o)
            for o in ("success", "failure", "rejected")} == {"success": 1, "failure": 2, "rejected": 1}
    assert value("circuit_breaker_slow_calls_total", breaker=breaker) == 1
    assert value("circuit_breaker_call_duration_seconds_count", breaker=breaker) == 3
    assert value("circuit_breaker_call_duration_seconds_bucket", breaker=breaker, le="+Inf") == 3
    assert value("circuit_breaker_failure_rate", breaker=breaker) == 2 / 3
    assert value("circuit_breaker_slow_call_rate", breaker=breaker) == 1 / 3  # of the 3 calls in the window
    assert 29 < value("circuit_breaker_seconds_to_half_open", breaker=breaker) <= 30  # open_timeout_ms 30000
    assert value("circuit_breaker_fallbacks_total", breaker="shipping.quotes", fallback="table") == 1
    assert {code: value("proxy_requests_total", breaker=breaker, code=code) for code in ("201", "500", "503")} == {
        "201": 1, "500": 2, "503": 1}
    assert value("proxy_request_duration_seconds_count", breaker=breaker) == 4
    # A route with no traffic is there from start, in closed.
    assert value("circuit_breaker_state", breaker="payment.default", state="closed") == 1
    assert value("circuit_breaker_failure_rate", breaker="payment.default") == 0
    assert value("circuit_breaker_slow_call_rate", breaker="payment.default") == 0
    assert value("circuit_breaker_seconds_to_half_open", breaker="payment.default") == 0  # not open
    # The process collector.
    assert value("process_resident_memory_bytes") > 0
    assert value("process_cpu_seconds_total") >= 0


async def test_no_created_series(start_proxy, fakes):
    proxy = await start_proxy(CONFIG)
    await traffic(proxy, fakes)
    text = await scrape(proxy)
    assert "circuit_breaker_transitions_total{" in text  # a counter with children is there ...
    assert "_created" not in text  # ... without its creation-time twin


QUEUES = """
storage: {path: $db}
defaults: {failure_threshold: 2, open_timeout_ms: 30000}
services:
  payment:
    upstream: $payment
    routes:
      charges:
        match: {methods: [POST], path: /charges}
        fallback: {type: queue, amount_field: amount, floor_limit: 100, exposure_cap: 500}
  notification:
    upstream: $notification
    routes:
      notifications:
        match: {methods: [POST], path: /notifications}
        fallback: {type: queue}
"""


async def test_queue_exposure_and_its_cap_are_read_at_scrape_time(start_proxy, fakes):
    proxy = await start_proxy(QUEUES)
    await fakes.set_mode("payment", "down")
    for amount in (10, 25.5, 40):  # refused twice (queued), then open (queued without a call)
        async with proxy.session.post(proxy.url("/payment/charges"), json={**CHARGE, "amount": amount}) as response:
            assert (response.status, response.headers["X-Fallback"]) == (202, "queue")
    values = samples(await scrape(proxy))
    assert values[("fallback_queue_exposure", (("queue", "payment.charges"),))] == 75.5
    assert values[("fallback_queue_exposure_cap", (("queue", "payment.charges"),))] == 500
    assert values[("fallback_queue_depth", (("queue", "payment.charges"),))] == 3
    # A queue without an amount_field has no exposure to report.
    assert [key for key in values if key[0].startswith("fallback_queue_exposure")
            and key[1] == (("queue", "notification.notifications"),)] == []


async def test_queue_families_are_declared(start_proxy):
    proxy = await start_proxy(CONFIG)
    text = await scrape(proxy)
    assert "# TYPE fallback_queue_depth gauge" in text
    assert "# TYPE fallback_queue_replayed_total counter" in text


async def test_promtool_accepts_the_live_metrics(start_proxy, fakes):
    promtool = require_tool("promtool")
    proxy = await start_proxy(CONFIG)
    await traffic(proxy, fakes)
    text = await scrape(proxy)
    process = await asyncio.create_subprocess_exec(promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(text.encode()), 60)
    assert (process.returncode, output.decode()) == (0, "")


def test_breaker_children_are_bound_once():
    metrics = Metrics()
    children = metrics.for_breaker("payment.charges", "queue")
    calls = children.success
    children.count_request(201, 0.01)
    children.count_request(201, 0.02)
    # The same objects serve every request: no labels() lookup, no lock on the hot path.
    assert children.success is calls
    assert children.codes[201] is children.codes[201]
    assert metrics.registry.get_sample_value("proxy_requests_total",
                                             {"breaker": "payment.charges", "code": "201"}) == 2


def test_per_request_numbers_are_exact_at_scrape_time_and_leave_with_their_route():
    metrics = Metrics()
    children = metrics.for_breaker("inventory.stock", "cache")
    for seconds in (0.001, 0.0011, 0.3, 40.0):  # on a bound, just above it, mid-range, past the last
        children.call_duration.observe(seconds)
    children.success.inc()
    children.fallback.inc()
    sample = metrics.registry.get_sample_value
    labels = {"breaker": "inventory.stock"}
    assert [sample("circuit_breaker_call_duration_seconds_bucket", {**labels, "le": le})
            for le in ("0.001", "0.0025", "0.25", "0.5", "30.0", "+Inf")] == [1, 2, 2, 3, 3, 4]
    assert sample("circuit_breaker_call_duration_seconds_sum", labels) == 0.001 + 0.0011 + 0.3 + 40.0
    assert sample("circuit_breaker_calls_total", {**labels, "outcome": "success"}) == 1
    assert sample("circuit_breaker_fallbacks_total", {**labels, "fallback": "cache"}) == 1
    assert metrics.fallback_counts() == {"inventory.stock": 1}
    children.remove()
    assert sample("circuit_breaker_calls_total", {**labels, "outcome": "success"}) is None
    assert metrics.fallback_counts() == {}
