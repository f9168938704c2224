"""Breaker state survives restarts; snapshots are written and expire (§6), on real SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite

from proxy.core.clock import FakeClock
from proxy.runtime.persistence import quantiles

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
CONFIG = """
storage: {path: $db, snapshot_interval_s: $interval, retention_hours: 1}
defaults: {failure_threshold: 2, open_timeout_ms: 60000, jitter: 0}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""
CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}


async def charge(proxy) -> tuple[int, dict]:
    async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE) as response:
        return response.status, await response.json()


async def entry(proxy, name: str = "payment.charges") -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        return next(b for b in (await response.json())["breakers"] if b["name"] == name)


async def stop(proxy) -> None:
    """As a restart would: drain, write what is buffered, close the database."""
    await proxy.session.close()
    await proxy.app.close()


async def rows(db: Path, sql: str) -> list[tuple]:
    async with aiosqlite.connect(db) as conn:
        return list(await conn.execute_fetchall(sql))


def db_path(proxy) -> Path:
    return Path(proxy.settings.storage.path)


async def test_forced_open_stays_forced_open_across_a_restart(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock(T0), interval="60")
    async with proxy.session.post(proxy.url("/admin/breakers/payment.charges/force-open"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        assert response.status == 200
    await stop(proxy)
    assert await rows(db_path(proxy), "SELECT name, state, forced_open, forced_closed, disabled"
                                      " FROM circuit_breakers ORDER BY name") == [
        ("payment.charges", "forced_open", 1, 0, 0), ("payment.default", "closed", 0, 0, 0)]

    again = await start_proxy(CONFIG, clock=FakeClock(T0 + 3600), interval="60")
    assert (await entry(again))["state"] == "forced_open"
    assert await charge(again) == (503, {"error": "circuit_open", "breaker": "payment.charges",
                                         "retry_after": None})
    assert fakes.requests("payment") == 0


async def test_open_stays_open_for_what_remained_then_half_opens_on_time(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock(T0), interval="60")
    await fakes.set_mode("payment", "error", status=500)
    assert [(await charge(proxy))[0] for _ in range(2)] == [500, 500]
    before = await entry(proxy)
    assert (before["state"], before["opened_at"], before["retry_at"]) == (
        "open", "2023-11-14T22:13:20.000Z", "2023-11-14T22:14:20.000Z")
    await stop(proxy)
    assert await rows(db_path(proxy), "SELECT state, opened_at_wall, retry_at_wall, open_count"
                                      " FROM circuit_breakers WHERE name = 'payment.charges'") == [
        ("open", T0, T0 + 60, 1)]

    clock = FakeClock(T0 + 30)  # the restart took 30 s of the 60 s open period
    again = await start_proxy(CONFIG, clock=clock, interval="60")
    await fakes.set_mode("payment", "healthy")
    after = await entry(again)
    assert (after["state"], after["opened_at"], after["retry_at"], after["retry_after"]) == (
        "open", "2023-11-14T22:13:20.000Z", "2023-11-14T22:14:20.000Z", 30.0)
    status, body = await charge(again)
    assert (status, body["retry_after"]) == (503, 30.0)
    clock.advance(29.999)
    assert (await entry(again))["state"] == "open"
    clock.advance(0.001)
    assert (await entry(again))["state"] == "half_open"
    assert (await charge(again))[0] == 201
    assert fakes.requests("payment") == 3  # two failures before the restart, one trial after


async def test_changed_settings_keep_only_what_an_operator_set(start_proxy, fakes):
    config = CONFIG + """
      refunds: {match: {path: /refunds}}
"""
    proxy = await start_proxy(config, clock=FakeClock(T0), interval="60")
    await fakes.set_mode("payment", "error", status=500)
    assert [(await charge(proxy))[0] for _ in range(2)] == [500, 500]
    async with proxy.session.post(proxy.url("/admin/breakers/payment.refunds/disable"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        assert response.status == 200
    await stop(proxy)

    changed = config.replace("failure_threshold: 2", "failure_threshold: 3")
    again = await start_proxy(changed, clock=FakeClock(T0 + 1), interval="60")
    assert [(await entry(again, name))["state"] for name in ("payment.charges", "payment.refunds")] == [
        "closed", "disabled"]


async def test_snapshots_are_written_and_expire(start_proxy, fakes):
    clock = FakeClock(T0)
    proxy = await start_proxy(CONFIG, clock=clock, interval="0.1")
    storage = proxy.app.storage
    assert (await charge(proxy))[0] == 201

    async def snapshots() -> list[tuple]:
        return await storage.fetchall(
            "SELECT breaker, at_wall, state, calls_success, calls_failure, calls_rejected, slow_calls,"
            " latency_p50_s IS NOT NULL FROM circuit_breaker_metrics ORDER BY id")

    for _ in range(500):
        found = await snapshots()
        if len(found) >= 2:
            break
        await asyncio.sleep(0.01)
    assert found[:2] == [("payment.charges", T0, "closed", 1, 0, 0, 0, 1),
                         ("payment.default", T0, "closed", 0, 0, 0, 0, 0)]
    clock.advance(2 * 3600)  # past retention_hours: 1
    for _ in range(500):
        found = await snapshots()
        if found and min(row[1] for row in found) > T0:
            break
        await asyncio.sleep(0.01)
    assert {row[1] for row in found} == {T0 + 7200}
    # Only the interval's calls count towards the quantiles: none since the last snapshot.
    assert {(row[0], row[7]) for row in found} == {("payment.charges", 0), ("payment.default", 0)}


def test_quantiles_interpolate_within_a_bucket_like_prometheus():
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantiles(buckets) == [0.1, 0.5 + 0.5 * 0.5, 0.5 + 0.5 * 0.9]
    assert quantiles([(0.1, 0.0), (float("inf"), 0.0)]) == [None, None, None]
    assert quantiles([(0.1, 0.0), (float("inf"), 4.0)]) == [0.1, 0.1, 0.1]


async def test_a_breaker_pointed_elsewhere_starts_afresh(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock(T0), interval="60")
    await fakes.set_mode("payment", "error", status=500)
    assert [(await charge(proxy))[0] for _ in range(2)] == [500, 500]
    await stop(proxy)
    # The old failures were evidence about the old upstream, not this one.
    again = await start_proxy(CONFIG.replace("$payment", "$shipping"), clock=FakeClock(T0 + 1), interval="60")
    assert (await entry(again))["state"] == "closed"


async def test_reload_writes_new_rows_and_drops_removed_ones(start_proxy, write_config):
    proxy = await start_proxy(CONFIG + """
      refunds: {match: {path: /refunds}}
""", clock=FakeClock(T0), interval="60")
    write_config(CONFIG.replace("failure_threshold: 2", "failure_threshold: 4"), interval="60")
    async with proxy.session.post(proxy.url("/admin/reload"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        assert response.headers["X-Reload-Removed"] == "payment.refunds"
    await stop(proxy)
    assert [(name, '"failure_threshold":4' in config) for name, config in await rows(
        db_path(proxy), "SELECT name, config FROM circuit_breakers ORDER BY name")] == [
        ("payment.charges", True), ("payment.default", True)]
