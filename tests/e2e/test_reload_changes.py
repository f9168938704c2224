"""What a reload reports: a route whose fallback changed is `changed` (header and log count)
even though its breaker keeps its state; the answer is the breakers' contract entries, small."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from proxy.core.clock import FakeClock

ROOT = Path(__file__).resolve().parents[2]


def shipped_config() -> str:
    """config/breakers.yaml with its upstreams and database in this test's place."""
    text = (ROOT / "config" / "breakers.yaml").read_text()
    text = text.replace("$schema", "$$schema").replace("path: var/circuit-proxy.db", "path: $db")
    for port, service in ((9101, "payment"), (9102, "inventory"), (9103, "notification"), (9104, "shipping")):
        text = text.replace(f"http://127.0.0.1:{port}", f"${service}")
    assert "127.0.0.1:91" not in text
    return text


QUOTE = {"destination": {"country": "IT", "postcode": "00100"}, "weight_kg": 2}


async def reload(proxy) -> tuple[int, dict[str, str], bytes]:
    async with proxy.session.post(proxy.url("/admin/reload"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        return response.status, dict(response.headers), await response.read()


async def test_an_edited_fallback_is_reported_changed_and_the_answer_is_compact(
        start_proxy, fakes, write_config, caplog):
    text = shipped_config()
    proxy = await start_proxy(text, clock=FakeClock())
    await fakes.set_mode("shipping", "down")
    for _ in range(8):  # refused, answered from the table; shipping's failure_threshold is 8
        async with proxy.session.post(proxy.url("/shipping/quotes"), json=QUOTE) as response:
            assert (response.status, response.headers["X-Fallback"]) == (200, "table")
            assert (await response.json())["cost"] == 7.9  # domestic: 6.90 + 2 × 0.50
    async with proxy.session.get(proxy.url("/status.json")) as response:
        before = {b["name"]: b for b in (await response.json())["breakers"]}
    assert before["shipping.quotes"]["state"] == "open"

    # Only fallback options change: the shipping table's domestic row and the payment cap.
    edited = text.replace("domestic: {carrier: fixed-rate, cost: 6.90", "domestic: {carrier: fixed-rate, cost: 8.90")
    edited = edited.replace("exposure_cap: 5000", "exposure_cap: 4000")
    assert edited.count("8.90") == 1 and "exposure_cap: 4000" in edited
    write_config(edited)
    with caplog.at_level(logging.INFO, logger="proxy.ops.reload"):
        status, headers, body = await reload(proxy)
    assert status == 200
    assert (headers["X-Reload-Added"], headers["X-Reload-Removed"], headers["X-Reload-Changed"]) == (
        "", "", "payment.charges,shipping.quotes")
    assert headers["X-Reload-Kept"].split(",") == [
        "payment.default", "inventory.stock", "inventory.default", "notification.notifications",
        "notification.default", "shipping.default"]
    assert "config reloaded: 0 added, 0 removed, 2 changed, 6 kept" in caplog.messages

    # The answer: every breaker, in the contract's shape, without the page's history.
    assert len(body) < 2048  # 8 breakers, ~1.7 KB; their /status.json entries are ~10 KB
    entries = json.loads(body)
    assert [e["name"] for e in entries] == list(before)
    quotes = next(e for e in entries if e["name"] == "shipping.quotes")
    assert quotes == {
        "name": "shipping.quotes", "service": "shipping", "route": "quotes", "state": "open",
        "failure_rate": None, "calls": before["shipping.quotes"]["calls"],
        "opened_at": before["shipping.quotes"]["opened_at"], "retry_at": before["shipping.quotes"]["retry_at"]}

    # Applied: the breaker kept its state (same policy), the new table answers at once.
    async with proxy.session.post(proxy.url("/shipping/quotes"), json=QUOTE) as response:
        assert (response.status, response.headers["X-Circuit-State"]) == (200, "open")
        assert (await response.json())["cost"] == 9.9
    assert fakes.requests("shipping") == 0  # down: refused, never reached


async def test_an_unchanged_config_reports_every_breaker_kept(start_proxy, fakes):
    proxy = await start_proxy(shipped_config(), clock=FakeClock())
    status, headers, _ = await reload(proxy)
    assert (status, headers["X-Reload-Changed"], len(headers["X-Reload-Kept"].split(","))) == (200, "", 8)
