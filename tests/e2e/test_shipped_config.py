"""The shipped config/breakers.yaml, as acceptance tests run it: upstreams and timeouts
rewritten, everything else as shipped. Each of the four shop fallbacks answers as §5 says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from proxy.core.clock import FakeClock

ROOT = Path(__file__).resolve().parents[2]


def shipped_config() -> str:
    document = yaml.safe_load((ROOT / "config" / "breakers.yaml").read_text())
    for name, service in document["services"].items():
        service["upstream"] = f"${name}"
    document["storage"]["path"] = "$db"
    document["defaults"]["open_timeout_ms"] = 1000
    document["defaults"]["jitter"] = 0.0
    return yaml.safe_dump(document, sort_keys=False)


async def get_entry(proxy, name: str) -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        return next(b for b in (await response.json())["breakers"] if b["name"] == name)


def fallback_headers(response) -> tuple[str, str, str]:
    return (response.headers["X-Circuit-Breaker"], response.headers["X-Circuit-State"],
            response.headers["X-Fallback"])


async def test_payment_offline_mode_queues_small_charges_and_replays_them(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(shipped_config(), clock=clock)
    await fakes.set_mode("payment", "down")
    accepted = []
    for order in range(4):
        async with proxy.session.post(proxy.url("/payment/charges"), json={
                "amount": 40, "currency": "EUR", "order_id": f"o-{order}"}) as response:
            assert response.status == 202
            body = await response.json()
            accepted.append((response.headers["X-Queue-Id"], response.headers["Idempotency-Key"]))
            assert body["idempotency_key"] == response.headers["Idempotency-Key"]
    # payment's failure_threshold is 3: the last one was answered while open.
    assert fallback_headers(response) == ("payment.charges", "open", "queue")
    async with proxy.session.post(proxy.url("/payment/charges"), json={
            "amount": 250, "currency": "EUR", "order_id": "big"}) as response:
        assert response.status == 503
        assert (await response.json())["error"] == "offline_limit"
    await fakes.set_mode("payment", "healthy")
    clock.advance(600)  # past any open period: the replay's trial call closes the breaker
    for _ in range(500):
        charges = fakes.service("payment").records
        if len(charges) == 4:
            break
        await asyncio.sleep(0.01)
    assert [c["order_id"] for c in charges] == ["o-0", "o-1", "o-2", "o-3"]
    assert [c["idempotency_key"] for c in charges] == [key for _, key in accepted]


async def test_inventory_estimated_availability_from_last_known_good(start_proxy, fakes):
    proxy = await start_proxy(shipped_config(), clock=FakeClock())
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
        fresh = await response.json()
    assert fresh == {"sku": "SKU-001", "available": 17}
    await fakes.set_mode("inventory", "error", status=503)
    answers = []
    for _ in range(4):
        async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
            answers.append((response.status, response.headers.get("X-Retry-Count")))
    # An answering upstream's 5xx passes through. The lookup is retried within the budget
    # (the clock stands still: one retry in its second, then 20 % of the requests), and every
    # attempt counts: 2 + 1 + 1 + 1 = 5 failures open the breaker after 4 requests.
    assert answers == [(503, "1"), (503, "0"), (503, "0"), (503, "0")]
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
        assert response.status == 200
        assert await response.json() == {"sku": "SKU-001", "available": 8}
        assert fallback_headers(response) == ("inventory.stock", "open", "cache")
        assert response.headers["X-Fallback-Estimated"] == "true"
        assert int(response.headers["Age"]) >= 0


async def test_notifications_wait_in_the_local_queue_and_are_delivered_once(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(shipped_config(), clock=clock)
    await fakes.set_mode("notification", "down")
    keys = []
    for n in range(12):
        async with proxy.session.post(proxy.url("/notification/notifications"), json={
                "to": f"user{n}@example.com", "template": "order_shipped", "data": {"n": n}}) as response:
            assert response.status == 202
            keys.append(response.headers["Idempotency-Key"])
    assert fallback_headers(response) == ("notification.notifications", "open", "queue")
    await fakes.set_mode("notification", "healthy")
    clock.advance(600)
    for _ in range(500):
        delivered = fakes.service("notification").records
        if len(delivered) == 12:
            break
        await asyncio.sleep(0.01)
    assert [d["data"]["n"] for d in delivered] == list(range(12))
    assert [d["idempotency_key"] for d in delivered] == keys


async def test_shipping_fixed_costs_from_the_table(start_proxy, fakes):
    proxy = await start_proxy(shipped_config(), clock=FakeClock())
    await fakes.set_mode("shipping", "down")
    quotes = {}
    for country in ("IT", "DE", "NO", "JP"):
        async with proxy.session.post(proxy.url("/shipping/quotes"), json={
                "destination": {"country": country, "postcode": "1"}, "weight_kg": 2}) as response:
            assert response.status == 200
            assert response.headers["X-Fallback"] == "table"
            quote = await response.json()
            quotes[country] = (quote["cost"], quote["currency"], quote["eta_days"])
            assert quote["carrier"] == "fixed-rate"
    assert quotes == {"IT": (7.9, "EUR", 3), "DE": (14.9, "EUR", 5), "NO": (22.9, "EUR", 7),
                      "JP": (40.9, "EUR", 12)}
    assert (await get_entry(proxy, "shipping.quotes"))["calls"]["failure"] == 4
