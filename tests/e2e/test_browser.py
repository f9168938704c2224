"""The /status page in a real headless Chromium (§6): a breaker turns open live, without a reload,
and an admin button with the token forces it closed. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json


from tests.browser import ARTIFACTS

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 3, open_timeout_ms: 600000, minimum_calls: 5, window: {type: count, size: 10}}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
  inventory:
    upstream: $inventory
    routes:
      stock: {match: {methods: [GET], path: /stock}}
"""
CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}
CARD = '[data-breaker="payment.charges"]'


async def charge(proxy) -> int:
    async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE) as response:
        await response.read()
        return response.status


async def test_a_breaker_opens_live_and_is_forced_closed_from_the_page(start_proxy, fakes, browser,
                                                                       write_config):
    proxy = await start_proxy(CONFIG)
    token = proxy.app.control.admin_token
    for sku in ("SKU-001", "SKU-002", "SKU-003"):
        async with proxy.session.get(proxy.url(f"/inventory/stock/{sku}")) as response:
            assert response.status == 200
    assert await charge(proxy) == 201

    page = await browser.new_page(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(proxy.url("/status"))
    await page.wait_for_selector(f'{CARD}[data-state="closed"]', timeout=10_000)
    await page.wait_for_selector("#conn.live", timeout=10_000)
    await page.evaluate("window.sameDocument = true")  # gone if the page reloads

    await fakes.set_mode("payment", "error", status=500)
    assert [await charge(proxy) for _ in range(4)] == [500, 500, 500, 503]
    await page.wait_for_selector(f'{CARD}[data-state="open"]', timeout=10_000)
    assert await page.evaluate("window.sameDocument") is True
    assert (await page.locator(f"{CARD} .pill").inner_text()).strip().lower() == "open"
    await page.locator(f"{CARD} .countdown", has_text="half-open in").wait_for(timeout=5_000)
    events = await page.locator("#events li").all_inner_texts()
    assert any("payment.charges" in e and "closed → open" in e for e in events), events
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-open.png"), full_page=True)

    # Force closed: the page asks for the token; a wrong one is refused and asked again.
    await page.locator(f'{CARD} button[data-action="force-closed"]').click()
    await page.wait_for_selector("#token-dialog[open]", timeout=5_000)
    await page.fill("#token-input", "not-the-token")
    await page.click("#token-save")
    await page.wait_for_selector("#token-error:has-text('refused')", timeout=5_000)
    await page.fill("#token-input", token)
    await page.click("#token-save")
    await page.wait_for_selector(f'{CARD}[data-state="forced_closed"]', timeout=10_000)
    async with proxy.session.get(proxy.url("/status.json")) as response:
        states = {b["name"]: b["state"] for b in (await response.json())["breakers"]}
    assert states["payment.charges"] == "forced_closed"

    # A reload refused for a key that looks like markup: shown as text, never run.
    write_config(CONFIG + '"<img src=x onerror=window.pwned=1>": 1\n')
    await page.click("#reload")  # the token is remembered for this tab
    toast = page.locator(".toast.bad")
    await toast.wait_for(timeout=10_000)
    assert "<img src=x onerror=window.pwned=1>: unknown key" in await toast.inner_text()
    assert await page.evaluate("window.pwned === undefined && !document.querySelector('.toast img')")
    await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    assert errors == []
    assert json.loads(await page.evaluate("JSON.stringify(sessionStorage.length)")) == 1


HALF_OPEN_CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, open_timeout_ms: 100, jitter: 0, minimum_calls: 5,
           window: {type: count, size: 10}}
services:
  payment:
    upstream: $payment
    routes:
      charges:
        match: {methods: [POST], path: /charges}
        timeout_ms: 30000
        probe: {path: /healthz, interval_ms: 20}
  inventory:
    upstream: $inventory
    routes:
      stock: {match: {methods: [GET], path: /stock}}
"""
STOCK = '[data-breaker="inventory.stock"]'


async def test_a_half_open_breaker_says_what_it_waits_for(start_proxy, fakes, browser):
    proxy = await start_proxy(HALF_OPEN_CONFIG)
    page = await browser.new_page(viewport={"width": 1360, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(proxy.url("/status"))
    await page.wait_for_selector(f'{STOCK}[data-state="closed"]', timeout=10_000)

    # Without a probe: nothing tests the upstream until a customer request comes.
    await fakes.set_mode("inventory", "error", status=500)
    for _ in range(2):
        async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
            assert response.status == 500
    await page.wait_for_selector(f'{STOCK}[data-state="half_open"]', timeout=10_000)
    await page.locator(f"{STOCK} .countdown", has_text="waiting for a trial request").wait_for(timeout=5_000)
    assert "testing the upstream" not in await page.locator(f"{STOCK} .countdown").inner_text()

    # With a probe (held in flight by a hanging upstream): the proxy is probing it.
    await fakes.set_mode("payment", "error", status=500)
    assert [await charge(proxy) for _ in range(2)] == [500, 500]
    await fakes.set_mode("payment", "hang")
    await page.wait_for_selector(f'{CARD}[data-state="half_open"]', timeout=10_000)
    await page.locator(f"{CARD} .countdown", has_text="probing the upstream").wait_for(timeout=5_000)
    async with proxy.session.get(proxy.url("/status.json")) as response:
        waiting = {b["name"]: b["waiting_for"] for b in (await response.json())["breakers"]}
    assert (waiting["inventory.stock"], waiting["payment.charges"]) == ("trial_request", "probe")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-half-open.png"), full_page=True)
    assert errors == []
