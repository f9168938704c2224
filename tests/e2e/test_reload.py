"""Hot reload (SIGHUP, /admin/reload): no request lost under load, unchanged breakers keep their
state and counts, removed routes leave /metrics, an invalid config changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.real_tools import free_port, read_until

ROOT = Path(__file__).resolve().parents[2]
BASE = """
storage: {path: $db}
defaults: {failure_threshold: 2, open_timeout_ms: 600000, timeout_ms: 5000}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
  inventory:
    upstream: $inventory
    routes:
      stock: {match: {methods: [GET], path: /stock}}
  shipping:
    upstream: $shipping
    timeout_ms: $shipping_timeout
"""
# Each reload swaps between these: shipping's policy changes, refunds comes and goes.
WITH_REFUNDS = BASE + """
    routes:
      refunds: {match: {path: /refunds}}
"""
CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}
QUOTE = {"destination": {"country": "IT", "postcode": "00100"}, "weight_kg": 1}


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, dict]:
    async with session.get(url) as response:
        return {b["name"]: b for b in (await response.json())["breakers"]}


async def test_reload_under_load_loses_nothing_and_keeps_unchanged_breakers(start_proxy, fakes, write_config):
    proxy = await start_proxy(WITH_REFUNDS, shipping_timeout="5000")
    token = proxy.app.control.admin_token
    auth = {"Authorization": f"Bearer {token}"}
    await fakes.set_mode("inventory", "error", status=503)
    for expected in (503, 503, 503):
        async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
            assert response.status == expected
    await fakes.set_mode("inventory", "healthy")
    before = await status(proxy.session, proxy.url("/status.json"))
    assert before["inventory.stock"]["state"] == "open"

    stop = asyncio.Event()
    outcomes: list[object] = []

    async def load(path: str, body: dict) -> None:
        async with aiohttp.ClientSession() as session:  # its own connections, like real clients
            while not stop.is_set():
                try:
                    async with session.post(proxy.url(path), json=body) as response:
                        await response.read()
                        outcomes.append((path, response.status))
                except aiohttp.ClientError as exc:
                    outcomes.append((path, repr(exc)))

    workers = [asyncio.create_task(load(path, body)) for path, body in
               [("/payment/charges", CHARGE), ("/shipping/quotes", QUOTE)] * 3]
    results = []
    try:
        for index in range(6):
            while len(outcomes) < 20 * (index + 1):  # requests keep flowing between reloads
                await asyncio.sleep(0.005)
            text, timeout = (BASE, "4000") if index % 2 == 0 else (WITH_REFUNDS, "5000")
            write_config(text, shipping_timeout=timeout)
            async with proxy.session.post(proxy.url("/admin/reload"), headers=auth) as response:
                assert response.status == 200
                assert isinstance(await response.json(), list)
                results.append({key: response.headers[f"X-Reload-{key.title()}"].split(",") if
                                response.headers[f"X-Reload-{key.title()}"] else []
                                for key in ("added", "removed", "changed")})
    finally:
        stop.set()
        await asyncio.gather(*workers)

    # Every request got its upstream's answer, and reached the upstream exactly once.
    assert {outcome for outcome in outcomes} == {("/payment/charges", 201), ("/shipping/quotes", 200)}
    sent = {path: sum(1 for p, _ in outcomes if p == path) for path in ("/payment/charges", "/shipping/quotes")}
    assert (fakes.requests("payment"), fakes.requests("shipping")) == (
        sent["/payment/charges"], sent["/shipping/quotes"])
    # The last reload (index 5) put WITH_REFUNDS back; index 4 had removed refunds again.
    assert [(r["added"], r["removed"], r["changed"]) for r in results[-2:]] == [
        ([], ["shipping.refunds"], ["shipping.default"]),
        (["shipping.refunds"], [], ["shipping.default"])]

    after = await status(proxy.session, proxy.url("/status.json"))
    # Unchanged breakers kept their state and counts through six reloads.
    for key in ("state", "opened_at", "retry_at", "calls"):
        assert after["inventory.stock"][key] == before["inventory.stock"][key]
    assert after["payment.charges"]["calls"] == {"success": sent["/payment/charges"], "failure": 0, "rejected": 0}
    # A changed breaker starts afresh: it only counts calls since the last reload.
    assert after["shipping.default"]["calls"]["success"] < sent["/shipping/quotes"]


async def test_a_removed_route_leaves_metrics_and_status(start_proxy, fakes, write_config):
    proxy = await start_proxy(WITH_REFUNDS, shipping_timeout="5000")
    async with proxy.session.post(proxy.url("/shipping/refunds"), json={}) as response:
        await response.read()
    async with proxy.session.get(proxy.url("/metrics")) as response:
        assert 'breaker="shipping.refunds"' in await response.text()
    write_config(BASE, shipping_timeout="5000")
    async with proxy.session.post(proxy.url("/admin/reload"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        assert (response.status, response.headers["X-Reload-Removed"]) == (200, "shipping.refunds")
        assert "shipping.refunds" not in [b["name"] for b in await response.json()]
    async with proxy.session.get(proxy.url("/metrics")) as response:
        assert 'breaker="shipping.refunds"' not in await response.text()
    assert "shipping.refunds" not in await status(proxy.session, proxy.url("/status.json"))


async def test_sighup_applies_a_valid_config_and_keeps_the_old_one_for_an_invalid_one(write_config):
    port = free_port()
    path = write_config(BASE, shipping_timeout="5000")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path), "--port", str(port), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CIRCUIT_PROXY_ADMIN_TOKEN": "t"})
    lines: list[str] = []
    url = f"http://127.0.0.1:{port}/status.json"
    try:
        await read_until(process.stdout, "listening on", lines)
        async with aiohttp.ClientSession() as session:
            assert "shipping.refunds" not in await status(session, url)
            write_config(WITH_REFUNDS, shipping_timeout="5000")
            process.send_signal(signal.SIGHUP)
            await read_until(process.stdout, "config reloaded: 1 added, 0 removed, 0 changed, 5 kept", lines)
            assert "shipping.refunds" in await status(session, url)

            write_config(BASE.replace("failure_threshold: 2", "failure_threshold: many"), shipping_timeout="5000")
            process.send_signal(signal.SIGHUP)
            await read_until(process.stdout, "config reload refused", lines)
            problem = await read_until(process.stdout, "config problem:", lines)
            assert "defaults.failure_threshold: not an integer: 'many'" in problem
            assert "shipping.refunds" in await status(session, url)  # the old config still runs
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
