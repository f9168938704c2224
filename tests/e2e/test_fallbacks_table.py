"""The table fallback (shipping "fixed costs") through the real proxy (§5)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.clock import FakeClock
from proxy.config.load import ConfigError, load_settings

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               open_timeout_ms: 30000, timeout_ms: 2000}
    services:
      shipping:
        upstream: $shipping
        routes:
          quotes:
            match: {methods: [POST], path: /quotes}
            fallback:
              type: table
              key: destination.country
              weight_field: weight_kg
              zones: {IT: domestic, it: domestic, DE: eu, "NO": europe}
              rows:
                domestic: {carrier: fixed-rate, cost: 6.90, per_kg: 0.50, currency: EUR, eta_days: 3}
                eu:       {carrier: fixed-rate, cost: 12.90, per_kg: 1.00, currency: EUR, eta_days: 5}
                europe:   {cost: 19.90, per_kg: 1.50, currency: EUR, eta_days: 7}
                world:    {carrier: fixed-rate, cost: 34.90, per_kg: 3.00, currency: EUR, eta_days: 12}
              default_row: world
"""


async def quote(proxy, body) -> tuple[int, dict[str, str], object]:
    async with proxy.session.post(proxy.url("/shipping/quotes"), json=body) as response:
        headers = {k: v for k, v in response.headers.items() if k not in ("Date", "Server", "Content-Length")}
        return response.status, headers, await response.json(content_type=None)


HEADERS = {"Content-Type": "application/json", "X-Fallback-Estimated": "true",
           "X-Circuit-Breaker": "shipping.quotes", "X-Circuit-State": "open", "X-Fallback": "table"}


def parcel(country, weight=2.5):
    return {"destination": {"country": country, "postcode": "00100"}, "weight_kg": weight}


async def test_quotes_come_from_the_table_while_open(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    real = await quote(proxy, parcel("IT"))
    assert real[:1] == (200,) and "X-Fallback" not in real[1]
    await fakes.set_mode("shipping", "error", status=500)
    assert (await quote(proxy, parcel("IT")))[0] == 500
    await fakes.set_mode("shipping", "healthy")
    assert await quote(proxy, parcel("it")) == (200, HEADERS, {
        "carrier": "fixed-rate", "cost": 8.15, "currency": "EUR", "eta_days": 3, "zone": "domestic",
        "estimated": True})
    assert (await quote(proxy, parcel("NO", 1)))[2] == {
        "carrier": "fixed-rate", "cost": 21.4, "currency": "EUR", "eta_days": 7, "zone": "europe",
        "estimated": True}
    assert (await quote(proxy, parcel("US", 0.333)))[2] == {
        "carrier": "fixed-rate", "cost": 35.9, "currency": "EUR", "eta_days": 12, "zone": "world",
        "estimated": True}  # 34.90 + 0.999, to the cent
    # Whatever the body, the table answers: unknown shapes get the default row's base cost.
    assert (await quote(proxy, {"weight_kg": "heavy"}))[2]["cost"] == 34.9
    assert fakes.requests("shipping") == 2
    rows = []
    for _ in range(300):
        rows = await proxy.app.storage.fetchall("SELECT type, status, reason, detail FROM fallback_logs")
        if len(rows) == 4:
            break
        await asyncio.sleep(0.01)
    assert rows == [("table", 200, "open", "zone=domestic"), ("table", 200, "open", "zone=europe"),
                    ("table", 200, "open", "zone=world"), ("table", 200, "open", "zone=world")]


def test_an_unquoted_norway_is_a_config_error(write_config):
    path = write_config(CONFIG.replace('"NO": europe', "NO: europe"))
    with pytest.raises(ConfigError) as error:
        load_settings(path, {})
    assert [p.split(": ", 1)[1] for p in error.value.problems] == [
        ("services.shipping.routes.quotes.fallback.zones: key False is how YAML reads an unquoted "
         'NO/OFF/YES/ON; quote country codes ("NO": europe)')]
