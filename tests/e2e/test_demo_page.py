"""The living demo as a newcomer sees it (issue 12, done when): `circuit-proxy demo` on the shipped
config, its /status page in a real headless Chromium moving by itself within 10 s, and each
scenario started from the page's own buttons showing its effect on the page. Screenshots of
each step go to test-artifacts/demo-*.png.

The demo runs as a subprocess, as `./dev demo` starts it, on free ports, with the admin token
from CIRCUIT_PROXY_ADMIN_TOKEN. The only change to the shipped config is a short open period
without backoff, so "recover" closes the payment breaker within the test's time. Every wait is
on a page condition with a timeout.
"""

from __future__ import annotations

import time

from tests.demo.test_demo import Demo, shipped_config
from tests.browser import screenshot

TOKEN = "t"  # what Demo puts in CIRCUIT_PROXY_ADMIN_TOKEN
PAYMENT = '[data-breaker="payment.charges"]'
STOCK = '[data-breaker="inventory.stock"]'
NOTES = '[data-breaker="notification.notifications"]'
OFFLINE = '[data-queue="payment.charges"]'

# What the page shows, read in the page: a card's state, a stat, a queue's depth.
CARD_STAT = """([card, stat]) => {
  const node = document.querySelector(`${card} .stat.${stat} dd`);
  return node ? Number(node.textContent) : -1;
}"""
FALLBACKS_SHOWN = """card => Number(document.querySelectorAll(`${card} .stats dd`)[3]?.textContent ?? -1)"""
CALLS_SHOWN = """() => [...document.querySelectorAll('.card .stat dd, .mini .mcalls')]
  .map(node => node.textContent).join('|')"""


async def shot(page, step: str) -> None:
    await screenshot(page, f"demo-{step}.png")


async def play(page, name: str, title: str, *, first: bool = False) -> None:
    """Press the scenario's button on the page (the token is asked for once, then kept)."""
    await page.click(f'[data-scenario="{name}"]')
    if first:
        await page.wait_for_selector("#token-dialog[open]", timeout=5_000)
        await page.fill("#token-input", TOKEN)
        await page.click("#token-save")
    await page.locator(".toast", has_text=f"Scenario started: {title}").wait_for(timeout=10_000)


async def test_the_demo_page_moves_by_itself_and_shows_each_scenario(config_dir, browser):
    config = shipped_config(config_dir, **{"open_timeout_ms: 60000": "open_timeout_ms: 1000",
                                           "backoff_multiplier: 2.0": "backoff_multiplier: 1.0"})
    async with Demo(config) as demo:
        announced = time.monotonic()  # the demo printed its status page's address
        page = await browser.new_page(viewport={"width": 1440, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(f"{demo.proxy}/status")
        await page.wait_for_selector("#conn.live", timeout=10_000)
        await page.wait_for_selector(f"{PAYMENT} >> nth=0", timeout=10_000)

        # The page moves by itself: the shop's traffic changes the counts it shows, within 10 s
        # of the demo being up, with nobody touching anything.
        first = await page.evaluate(CALLS_SHOWN)
        left_ms = (10.0 - (time.monotonic() - announced)) * 1000
        assert left_ms > 0, "the page was not even open 10 s after the demo was up"
        await page.wait_for_function(f"previous => ({CALLS_SHOWN})() !== previous", arg=first, timeout=left_ms)
        assert await page.evaluate(CARD_STAT, [STOCK, "s"]) >= 0
        await shot(page, "1-moving")

        # Inventory hangs: the stock route is cut off (its calls time out) and opens, so stock
        # comes from the cache.
        await play(page, "inventory-hangs", "Inventory hangs", first=True)
        await page.wait_for_selector('[data-scenario="inventory-hangs"].running', timeout=10_000)
        await page.locator(f"{STOCK} .last-failure .why", has_text="timeout: no answer within 2000 ms").wait_for(
            timeout=15_000)
        await page.locator(f'{STOCK} .transitions .st.open').first.wait_for(timeout=20_000)  # → open
        assert await page.locator(f"{STOCK} .term").inner_text() == "estimated stock"
        await page.wait_for_function(f"() => ({FALLBACKS_SHOWN})({STOCK!r}) > 0", timeout=10_000)  # served
        await shot(page, "2-inventory-hangs")

        # Notifications flap: healthy 10 s, then HTTP 500; the failures show on the card.
        await play(page, "notifications-flap", "Notifications flap")
        await page.wait_for_selector('[data-scenario="notifications-flap"].running', timeout=10_000)
        await page.wait_for_function(f"() => ({CARD_STAT})({[NOTES, 'f']!r}) > 0", timeout=25_000)
        await page.locator(f"{NOTES} .last-failure .why", has_text="HTTP 500 from the upstream").wait_for(
            timeout=5_000)
        await shot(page, "3-notifications-flap")

        # Payment outage: the payment breaker opens and charges are queued as offline payments,
        # each listed with its Idempotency-Key and amount (the tab has the token).
        await play(page, "payment-outage", "Payment outage")
        await page.wait_for_selector('[data-scenario="payment-outage"].running', timeout=10_000)
        await page.wait_for_selector(f'{PAYMENT}[data-state="open"]', timeout=15_000)
        await page.locator(f"{PAYMENT} .last-failure .why", has_text="connection refused").wait_for(timeout=5_000)
        await page.wait_for_function(
            f"() => Number(document.querySelector('{OFFLINE}')?.dataset.depth) >= 2", timeout=15_000)
        await page.wait_for_selector(f'{OFFLINE}[data-items="shown"] tr[data-item-state="pending"]', timeout=10_000)
        keys = await page.locator(f'{OFFLINE} tr[data-item-state="pending"] td.key').all_inner_texts()
        assert keys and all(keys), keys
        assert (await page.locator(f"{OFFLINE} .exposure .rate-label b").inner_text()).endswith("of cap 5000.00")
        await shot(page, "4-payment-outage")

        # Everything recovers: payment closes again and the queued charges are replayed.
        await play(page, "recover", "Everything recovers")
        await page.wait_for_selector('[data-scenario].running', state="detached", timeout=10_000)
        await page.wait_for_selector(f'{PAYMENT}[data-state="closed"]', timeout=20_000)
        await page.wait_for_selector(f'{OFFLINE}[data-depth="0"]', timeout=20_000)
        await page.locator(f"{PAYMENT} .transitions .reason", has_text="trial calls succeeded").first.wait_for(
            timeout=5_000)
        await shot(page, "5-recover")
        assert errors == []
        assert await demo.stop() == 0
