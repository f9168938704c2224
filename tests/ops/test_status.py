"""/status.json in the contract's shape and the /status page (§6), through the real proxy."""

from __future__ import annotations

import base64
import hashlib
import re

from proxy.core.clock import FakeClock

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, minimum_calls: 2, window: {type: count, size: 4},
           open_timeout_ms: 30000, failure_rate_threshold: 0}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
  notification:
    upstream: $notification
    routes:
      notifications: {match: {path: /notifications}, fallback: {type: queue}}
"""
CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}


async def status(proxy) -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        assert response.status == 200
        return await response.json()


async def charge(proxy) -> int:
    async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE) as response:
        await response.read()
        return response.status


def contract_part(entry: dict) -> dict:
    keys = ("name", "service", "route", "state", "failure_rate", "calls", "opened_at", "retry_at")
    return {key: entry[key] for key in keys}


async def test_every_breaker_is_listed_from_start_in_the_contract_shape(start_proxy):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    document = await status(proxy)
    assert set(document) == {"breakers", "queues"}
    closed = {"state": "closed", "failure_rate": None, "calls": {"success": 0, "failure": 0, "rejected": 0},
              "opened_at": None, "retry_at": None}
    assert [contract_part(b) for b in document["breakers"]] == [
        {"name": "payment.charges", "service": "payment", "route": "charges", **closed},
        {"name": "payment.default", "service": "payment", "route": "default", **closed},
        {"name": "notification.notifications", "service": "notification", "route": "notifications",
         **closed},
        {"name": "notification.default", "service": "notification", "route": "default", **closed},
    ]
    assert [{key: q[key] for key in ("name", "depth", "dead_letter")} for q in document["queues"]] == [
        {"name": "notification.notifications", "depth": 0, "dead_letter": 0}]


async def test_an_open_breaker_shows_when_it_opened_and_when_it_half_opens(start_proxy, fakes):
    clock = FakeClock(start_wall=1_700_000_000.0)  # 2023-11-14T22:13:20Z
    proxy = await start_proxy(CONFIG, clock=clock)
    await fakes.set_mode("payment", "error", status=500)
    assert [await charge(proxy) for _ in range(3)] == [500, 500, 503]
    entry = (await status(proxy))["breakers"][0]
    assert contract_part(entry) == {
        "name": "payment.charges", "service": "payment", "route": "charges", "state": "open",
        "failure_rate": 1.0, "calls": {"success": 0, "failure": 2, "rejected": 1},
        "opened_at": "2023-11-14T22:13:20.000Z", "retry_at": "2023-11-14T22:13:50.000Z"}
    assert (entry["retry_after"], entry["fallback"], entry["thresholds"]["failure_threshold"]) == (30.0, None, 2)
    assert [(t["from_state"], t["to_state"], t["at"], t["reason"], t["reason_text"]) for t in entry["transitions"]] == [
        ("closed", "open", "2023-11-14T22:13:20.000Z", "consecutive_failures", "failures in a row")]
    clock.advance(30)
    entry = (await status(proxy))["breakers"][0]
    assert (entry["state"], entry["retry_at"], entry["opened_at"]) == (
        "half_open", None, "2023-11-14T22:13:20.000Z")


async def test_failure_rate_is_null_below_minimum_calls_then_a_ratio(start_proxy, fakes):
    proxy = await start_proxy(CONFIG.replace("failure_threshold: 2", "failure_threshold: 0"), clock=FakeClock())
    assert await charge(proxy) == 201
    assert (await status(proxy))["breakers"][0]["failure_rate"] is None
    await fakes.set_mode("payment", "error", status=503)
    assert await charge(proxy) == 503
    assert (await status(proxy))["breakers"][0]["failure_rate"] == 0.5


async def test_history_counts_each_outcome_once_across_ticks(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    assert await charge(proxy) == 201
    await fakes.set_mode("payment", "error", status=500)
    assert [await charge(proxy) for _ in range(3)] == [500, 500, 503]
    proxy.app.control.board.sample()  # the ticker samples too, whenever it runs: rows add up the same
    history = (await status(proxy))["breakers"][0]["history"]
    # [start, success, failure, rejected, fallbacks, p50_ms, p95_ms] per 10-s bucket
    assert [sum(column) for column in list(zip(*history))[1:5]] == [1, 2, 1, 0]
    assert all(bucket[0] % 10 == 0 for bucket in history)


async def test_status_page_is_one_self_contained_document(start_proxy):
    proxy = await start_proxy(CONFIG)
    async with proxy.session.get(proxy.url("/status")) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        policy = response.headers["Content-Security-Policy"]
        html = await response.text()
    # Nothing is fetched from elsewhere: no external script, style, font or image.
    assert re.findall(r"""(?:src|href)\s*=\s*["'](?!data:)[^"']*""", html) == []
    assert "@import" not in html and "url(" not in html
    # The policy allows exactly the page's own inline script and style to run.
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # Data reaches the page only as text, never as markup.
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
