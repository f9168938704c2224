"""proxy/demo/traffic.py: the checkout mix through a real proxy to the fakes, paced and bounded."""

from __future__ import annotations

import asyncio

import pytest

from proxy.demo.traffic import Checkout, Traffic, require_loopback

CONFIG = """
    storage: {path: $db}
    defaults: {timeout_ms: 300, failure_threshold: 0, failure_rate_threshold: 0, slow_call_rate_threshold: 0}
    services:
      payment: {upstream: $payment}
      inventory: {upstream: $inventory}
      notification: {upstream: $notification}
      shipping: {upstream: $shipping}
"""


async def until(predicate, what: str, timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def test_an_order_is_a_stock_lookup_a_quote_a_charge_and_a_confirmation():
    checkout = Checkout(seed=7, run_id="r1")
    first = [checkout.next_call() for _ in range(4)]
    assert [(c.step, c.method, c.path.rsplit("/", 1)[0]) for c in first] == [
        ("stock", "GET", "/inventory/stock"), ("quote", "POST", "/shipping"),
        ("charge", "POST", "/payment"), ("notify", "POST", "/notification")]
    sku = first[0].path.rsplit("/", 1)[1]
    assert sku.startswith("SKU-0") and 1 <= int(sku[4:]) <= 99
    charge = first[2]
    assert charge.headers == {"Idempotency-Key": "demo-r1-1-charge"}
    assert charge.body is not None and 0 < charge.body["amount"] < 100 and charge.body["order_id"] == "demo-r1-1"
    assert checkout.next_call().headers == {}  # order 2 begins with its stock lookup
    assert [checkout.next_call() for _ in range(3)][1].headers == {"Idempotency-Key": "demo-r1-2-charge"}


@pytest.mark.parametrize("url", ["http://10.1.2.3:8080", "http://example.com", "https://127.0.0.1:8080", "x"])
def test_only_loopback_http_is_accepted(url):
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(url)
    assert require_loopback("http://localhost:8080/") == "http://localhost:8080"
    assert require_loopback("http://[::1]:8080") == "http://[::1]:8080"


@pytest.mark.parametrize(("options", "message"), [({"rate": 0}, "rate"), ({"rate": 51}, "rate"),
                                                  ({"workers": 0}, "workers")])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Traffic("http://127.0.0.1:8080", **options)


async def test_the_checkout_mix_reaches_every_upstream_through_the_proxy(start_proxy, fakes):
    proxy = await start_proxy(CONFIG)
    traffic = Traffic(proxy.url("/"), rate=50, seed=1)
    await traffic.start()
    try:
        await until(lambda: len(fakes.service("notification").records) >= 2, "two whole orders")
    finally:
        await traffic.stop()
    charges = fakes.service("payment").records
    assert charges and all(c["idempotency_key"].endswith("-charge") and c["currency"] == "EUR" for c in charges)
    assert fakes.requests("inventory") >= 2 and len(fakes.service("shipping").records) >= 2
    assert traffic.stats.answers[("stock", 200)] >= 2 and traffic.stats.answers[("notify", 202)] >= 2
    assert not traffic.is_running


async def test_a_hanging_shop_never_piles_up_and_stop_ends_it_at_once(start_proxy, fakes):
    proxy = await start_proxy(CONFIG.replace("timeout_ms: 300", "timeout_ms: 60000"))
    for name in ("payment", "inventory", "notification", "shipping"):
        await fakes.set_mode(name, "hang")
    traffic = Traffic(proxy.url("/"), rate=50, workers=3, timeout_s=30)
    await traffic.start()
    try:
        await until(lambda: traffic.stats.skipped >= 10, "ticks skipped while every worker waits")
        sent = traffic.stats.sent
    finally:
        async with asyncio.timeout(2):  # not the 30 s client timeout: the hung calls are cut
            await traffic.stop()
    assert (traffic.most_in_flight, sent) == (3, 3)  # one pool, never more, never a backlog
    assert sum(fakes.requests(n) for n in ("payment", "inventory", "notification", "shipping")) == 3
