"""The cache fallback (inventory "estimated availability") through the real proxy (§5)."""

from __future__ import annotations

import asyncio

from proxy.core.clock import FakeClock

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               open_timeout_ms: 600000, max_open_timeout_ms: 600000, timeout_ms: 2000}
    services:
      inventory:
        upstream: $inventory
        routes:
          stock:
            match: {methods: [GET], path: /stock}
            fallback: {type: cache, max_age_s: 60, max_entries: 2, scale: {available: 0.5}%s}
"""
WITH_DEFAULT = CONFIG % ", default_file: inventory-unknown.json"


async def get(proxy, path: str) -> tuple[int, dict[str, str], object]:
    async with proxy.session.get(proxy.url(path)) as response:
        headers = {k: v for k, v in response.headers.items() if k not in ("Date", "Server", "Content-Length")}
        return response.status, headers, await response.json(content_type=None)


async def open_breaker(proxy, fakes) -> None:
    await fakes.set_mode("inventory", "error", status=503)
    assert (await get(proxy, "/inventory/stock/SKU-050"))[0] == 503
    await fakes.set_mode("inventory", "healthy")


def fallback_headers(state: str = "open", **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json; charset=utf-8", "X-Fallback-Estimated": "true",
            "X-Circuit-Breaker": "inventory.stock", "X-Circuit-State": state, "X-Fallback": "cache",
            **extra}


async def test_last_known_good_is_served_scaled_with_age(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(WITH_DEFAULT, clock=clock)
    assert await get(proxy, "/inventory/stock/SKU-003?x=1") == (
        200, {"Content-Type": "application/json; charset=utf-8"}, {"sku": "SKU-003", "available": 1})
    assert (await get(proxy, "/inventory/stock/SKU-007"))[2] == {"sku": "SKU-007", "available": 19}
    await open_breaker(proxy, fakes)
    clock.advance(42.9)
    assert await get(proxy, "/inventory/stock/SKU-007") == (
        200, fallback_headers(Age="42"), {"sku": "SKU-007", "available": 9})  # 19 × 0.5, floored
    # Same method + path + query only: another query string is another key.
    status, headers, body = await get(proxy, "/inventory/stock/SKU-003?x=1")
    assert (status, headers["Age"], body) == (200, "42", {"sku": "SKU-003", "available": 0})
    status, headers, body = await get(proxy, "/inventory/stock/SKU-003")
    assert (status, "Age" in headers) == (200, False)
    assert body == {"sku": "SKU-003", "available": 0, "estimated": True,
                    "reason": "inventory unavailable (inventory.stock is open); retry in 558 s"}
    assert fakes.requests("inventory") == 3
    rows = []
    for _ in range(300):
        rows = await proxy.app.storage.fetchall(
            "SELECT type, path, status, reason, detail FROM fallback_logs ORDER BY id")
        if len(rows) == 3:
            break
        await asyncio.sleep(0.01)
    assert rows == [("cache", "/inventory/stock/SKU-007", 200, "open", "age_s=42"),
                    ("cache", "/inventory/stock/SKU-003", 200, "open", "age_s=42"),
                    ("cache", "/inventory/stock/SKU-003", 200, "open", "default_file")]


async def test_too_old_or_never_seen_falls_back_to_the_default_file(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(WITH_DEFAULT, clock=clock)
    await get(proxy, "/inventory/stock/SKU-010")
    await open_breaker(proxy, fakes)
    clock.advance(60)
    assert (await get(proxy, "/inventory/stock/SKU-010"))[1]["Age"] == "60"
    clock.advance(0.001)
    assert await get(proxy, "/inventory/stock/SKU-010") == (
        200, fallback_headers(**{"Content-Type": "application/json"}), {"sku": "SKU-010", "available": 0, "estimated": True,
                                  "reason": "inventory unavailable (inventory.stock is open); retry in 540 s"})


async def test_without_a_default_nothing_cached_is_the_contract_503(start_proxy, fakes):
    proxy = await start_proxy(CONFIG % "", clock=FakeClock())
    await open_breaker(proxy, fakes)
    status, headers, body = await get(proxy, "/inventory/stock/SKU-001")
    assert (status, body) == (503, {"error": "circuit_open", "breaker": "inventory.stock", "retry_after": 600.0})
    assert "X-Fallback" not in headers


async def test_entries_are_bounded_least_recently_used_first(start_proxy, fakes):
    proxy = await start_proxy(CONFIG % "", clock=FakeClock())
    for sku in ("SKU-001", "SKU-002", "SKU-001", "SKU-004"):  # max_entries 2: SKU-002 goes
        await get(proxy, f"/inventory/stock/{sku}")
    await open_breaker(proxy, fakes)
    assert [(await get(proxy, f"/inventory/stock/{sku}"))[0] for sku in ("SKU-001", "SKU-002", "SKU-004")] == [
        200, 503, 200]


async def test_errors_are_never_remembered_and_failed_calls_use_the_cache(start_proxy, fakes):
    proxy = await start_proxy(CONFIG.replace("failure_threshold: 1", "failure_threshold: 10") % "",
                              clock=FakeClock())
    await get(proxy, "/inventory/stock/SKU-020")
    assert (await get(proxy, "/inventory/stock/SKU-999"))[0] == 404  # a 4xx is not cached
    await fakes.set_mode("inventory", "down")
    status, headers, body = await get(proxy, "/inventory/stock/SKU-020")
    assert (status, headers["X-Circuit-State"], body) == (200, "closed", {"sku": "SKU-020", "available": 20})  # 40 × 0.5
    assert (await get(proxy, "/inventory/stock/SKU-999"))[0] == 502
