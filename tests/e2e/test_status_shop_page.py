"""The /status page answers a shop operator's questions (issue 12), in a real headless Chromium:
why calls fail, latency and outcome charts, an honest failure rate below minimum_calls, the
offline payments' exposure against cap and floor, the queued requests (shown once the admin
token is given) with dead-letter retry and drop, demo scenario buttons, default routes compact,
charts that survive a restart, and a fleet's replica saying whether it reaches its fleet (§8).
Screenshots go to test-artifacts/."""

from __future__ import annotations



from tests.browser import screenshot
from tests.real_tools import free_port

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 3, minimum_calls: 5, window: {type: count, size: 10}, open_timeout_ms: 600000}
services:
  payment:
    upstream: $payment
    routes:
      charges:
        match: {methods: [POST], path: /charges}
        fallback: {type: queue, amount_field: amount, floor_limit: 100, exposure_cap: 150}
  inventory:
    upstream: $inventory
    routes:
      stock:
        match: {methods: [GET], path: /stock}
        fallback: {type: cache, scale: {available: 0.5}}
  notification:
    upstream: $notification
    routes:
      notifications:
        match: {methods: [POST], path: /notifications}
        fallback: {type: queue, retry_base_ms: 10, retry_max_ms: 20}
  shipping:
    upstream: $shipping
    failure_threshold: 8
    routes:
      quotes:
        match: {methods: [POST], path: /quotes}
        fallback:
          type: table
          key: destination.country
          rows: {world: {carrier: fixed-rate, cost: 34.9, currency: EUR, eta_days: 12}}
          default_row: world
"""
QUOTE = {"destination": {"country": "JP", "postcode": "100-0001"}, "weight_kg": 1}
NOTE = {"to": "ann@example.com", "template": "shipped", "data": {"order": "o-1"}}
PAYMENT = '[data-breaker="payment.charges"]'
SHIPPING = '[data-breaker="shipping.quotes"]'
STOCK = '[data-breaker="inventory.stock"]'
OFFLINE = '[data-queue="payment.charges"]'
OUTBOX = '[data-queue="notification.notifications"]'


class Scenarios:
    """What the living demo hands the control plane, reduced to two fake-upstream switches."""

    def __init__(self, fakes) -> None:
        self._fakes = fakes
        self._running: str | None = None

    def available(self) -> list[dict]:
        return [{"name": "payment-outage", "title": "Payment outage", "description": "payment refuses connections"},
                {"name": "everything-recovers", "title": "Everything recovers", "description": "all healthy"}]

    def running(self) -> str | None:
        return self._running

    async def start(self, name: str) -> None:
        if name == "payment-outage":
            await self._fakes.set_mode("payment", "down")
        elif name == "everything-recovers":
            for service in ("payment", "inventory", "notification", "shipping"):
                await self._fakes.set_mode(service, "healthy")
        else:
            raise KeyError(name)
        self._running = name


async def request(proxy, method: str, path: str, body=None, **headers) -> int:
    async with proxy.session.request(method, proxy.url(path), json=body, headers=headers) as response:
        await response.read()
        return response.status


async def admin(proxy, path: str) -> int:
    return await request(proxy, "POST", path, Authorization=f"Bearer {proxy.app.control.admin_token}")


async def open_page(browser, proxy, errors: list[str]):
    page = await browser.new_page(viewport={"width": 1440, "height": 1000})
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(proxy.url("/status"))
    await page.wait_for_selector("#conn.live", timeout=10_000)
    await page.wait_for_selector("body[data-history=loaded]", timeout=10_000)
    return page


async def shot(page, name: str) -> None:
    await screenshot(page, name)


async def test_the_page_answers_the_shop_operators_questions(start_proxy, fakes, browser):
    proxy = await start_proxy(CONFIG)
    proxy.app.queues.poll_s = 0.02
    proxy.app.control.board.scenarios = Scenarios(fakes)
    for sku in ("SKU-001", "SKU-002", "SKU-003", "SKU-004"):
        assert await request(proxy, "GET", f"/inventory/stock/{sku}") == 200
    assert await request(proxy, "POST", "/payment/charges", {"amount": 5, "currency": "EUR", "order_id": "o-0"}) == 201
    errors: list[str] = []
    page = await open_page(browser, proxy, errors)

    # Routes that matter first, in shop terms; each service's default route in one compact line.
    await page.wait_for_selector(f'{STOCK} svg.latency[data-lines="2"]', timeout=10_000)
    first = await page.locator("#breakers > .card").evaluate_all("cards => cards.map(c => c.dataset.breaker)")
    assert first == ["payment.charges", "inventory.stock", "notification.notifications", "shipping.quotes"]
    compact = await page.locator("#compact > .mini").evaluate_all("rows => rows.map(r => r.dataset.breaker)")
    assert compact == ["payment.default", "inventory.default", "notification.default", "shipping.default"]
    assert await page.locator(f"{STOCK} .term").inner_text() == "estimated stock"
    assert await page.locator(f"{PAYMENT} .term").inner_text() == "offline payments"
    assert await page.locator(f"{SHIPPING} .term").inner_text() == "fixed costs"
    assert await page.locator("#fleet").is_hidden()  # no cluster configured: nothing said of a fleet
    assert int(await page.locator(f"{STOCK} svg.outcomes").get_attribute("data-bars")) >= 1
    assert "latency p50" in await page.locator(f"{STOCK} .chart-head").nth(1).inner_text()

    # A demo scenario from its button (the token is asked once): payment goes down.
    await page.click('[data-scenario="payment-outage"]')
    await page.wait_for_selector("#token-dialog[open]", timeout=5_000)
    await page.fill("#token-input", proxy.app.control.admin_token)
    await page.click("#token-save")
    await page.wait_for_selector('[data-scenario="payment-outage"].running', timeout=10_000)
    charges = [(20, "o-1"), (30, "o-2"), (40, "o-3")]
    for amount, order in charges:
        assert await request(proxy, "POST", "/payment/charges", {"amount": amount, "currency": "EUR", "order_id": order},
                             **{"Idempotency-Key": f"key-{order}"}) == 202
    await page.wait_for_selector(f'{PAYMENT}[data-state="open"]', timeout=10_000)
    await page.locator(f"{PAYMENT} .last-failure .why", has_text="connection refused").wait_for(timeout=10_000)
    await page.locator(f"{PAYMENT} .countdown", has_text="half-open in").wait_for(timeout=5_000)

    # Offline payments: exposure against cap and floor, each queued charge with its key and amount.
    await page.wait_for_selector(f'{OFFLINE}[data-depth="3"] tr[data-item-state="pending"] >> nth=2', timeout=10_000)
    assert await page.locator(f"{OFFLINE} .exposure .rate-label b").inner_text() == "90.00 of cap 150.00"
    assert "up to 100.00 per amount (floor_limit)" in await page.locator(f"{OFFLINE} .floor").inner_text()
    rows = await page.locator(f"{OFFLINE} tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].slice(1, 6).map(c => c.textContent))")
    assert [(state, key, amount) for state, _, _, key, amount in rows] == [
        ("pending", "key-o-1", "20.00"), ("pending", "key-o-2", "30.00"), ("pending", "key-o-3", "40.00")]
    assert await page.locator(f"{OFFLINE} .replay b").inner_text() == "when the breaker turns half-open"
    assert (await page.locator(f"{OFFLINE} .stat.oldest dd").inner_text()).endswith(" s")

    # A tab without the token: the figures, but no amount or key until the token is given.
    fresh = await open_page(browser, proxy, errors)
    await fresh.wait_for_selector(f'{OFFLINE}[data-depth="3"][data-items="locked"]', timeout=10_000)
    assert await fresh.locator(f"{OFFLINE} .exposure .rate-label b").inner_text() == "90.00 of cap 150.00"
    assert await fresh.locator(f"{OFFLINE} .replay b").inner_text() == "when the breaker turns half-open"
    assert "key-o-1" not in await fresh.locator(OFFLINE).inner_text()
    assert "3 requests stored" in await fresh.locator(f"{OFFLINE} tr.locked").inner_text()
    await shot(fresh, "status-shop-queue-locked.png")
    await fresh.click(f'{OFFLINE} button[data-action="show-items"]')
    await fresh.wait_for_selector("#token-dialog[open]", timeout=5_000)
    await fresh.fill("#token-input", "not-the-token")
    await fresh.click("#token-save")
    await fresh.wait_for_selector(f'{OFFLINE}[data-items="refused"]', timeout=10_000)
    assert "that one was refused" in await fresh.locator(f"{OFFLINE} tr.locked").inner_text()
    await fresh.click(f'{OFFLINE} button[data-action="show-items"]')
    await fresh.locator("#token-error", has_text="That token was refused").wait_for(timeout=5_000)
    await fresh.fill("#token-input", proxy.app.control.admin_token)
    await fresh.click("#token-save")
    await fresh.wait_for_selector(f'{OFFLINE}[data-items="shown"] tr[data-item-state="pending"] >> nth=2',
                                  timeout=10_000)
    assert "key-o-1" in await fresh.locator(OFFLINE).inner_text()
    await fresh.close()

    # 3 of 3 failed is not healthy: the bar is filled and says it is not judged yet.
    await fakes.set_mode("shipping", "error", status=500)
    for _ in range(3):
        assert await request(proxy, "POST", "/shipping/quotes", QUOTE) == 500
    meter = page.locator(f"{SHIPPING} .failure-rate")
    await meter.locator("b", has_text="3 of 3 failed (too few calls to judge)").wait_for(timeout=10_000)
    assert await meter.get_attribute("data-judged") == "false"
    # The bar grows with a CSS transition (0.4 s) from the moment the text changes: drawn, not 0.
    bar = await meter.locator(".meter i").element_handle()
    await page.wait_for_function("i => i.getBoundingClientRect().width > 0", arg=bar, timeout=5_000)
    await page.locator(f"{SHIPPING} .last-failure .why", has_text="HTTP 500 from the upstream").wait_for(timeout=5_000)
    await shot(page, "status-shop-outage.png")

    # Dead letters: retried once the upstream takes them, or dropped.
    ids = []
    for key in ("note-1", "note-2"):
        assert await admin(proxy, "/admin/breakers/notification.notifications/force-open") == 200
        assert await request(proxy, "POST", "/notification/notifications", NOTE, **{"Idempotency-Key": key}) == 202
        await fakes.set_mode("notification", "error", status=400)
        assert await admin(proxy, "/admin/breakers/notification.notifications/reset") == 200
        ids.append(int((await proxy.app.storage.fetchall(
            "SELECT id FROM queue_items WHERE idempotency_key = ?", (key,)))[0][0]))
    dead = f'{OUTBOX} tr[data-item-state="dead_letter"]'
    await page.wait_for_selector(f"{dead} >> nth=1", timeout=10_000)
    assert await page.locator(f"{OUTBOX} .stat.dead dd").inner_text() == "2"
    await shot(page, "status-shop-dead-letters.png")
    await fakes.set_mode("notification", "healthy")
    await page.click(f'{OUTBOX} tr[data-item="{ids[0]}"] button[data-action="retry"]')
    await page.wait_for_selector(f'{OUTBOX} tr[data-item="{ids[0]}"]', state="detached", timeout=10_000)
    await page.click(f'{OUTBOX} tr[data-item="{ids[1]}"] button[data-action="drop"]')
    await page.wait_for_selector(f'{OUTBOX} tr[data-item="{ids[1]}"]', state="detached", timeout=10_000)
    await page.wait_for_selector(f'{OUTBOX}[data-dead="0"]', timeout=10_000)
    assert [n["idempotency_key"] for n in fakes.server("notification").service.records] == ["note-1"]
    assert await proxy.app.storage.fetchall("SELECT id FROM queue_items WHERE idempotency_key = 'note-2'") == []
    await shot(page, "status-shop-page.png")
    assert errors == []


async def test_the_charts_come_back_after_a_restart(start_proxy, fakes, browser):
    proxy = await start_proxy(CONFIG)
    proxy.app.persistence.store.snapshot()  # the baseline the next snapshot is counted from
    for sku in ("SKU-001", "SKU-002", "SKU-003"):
        assert await request(proxy, "GET", f"/inventory/stock/{sku}") == 200
    await fakes.set_mode("inventory", "error", status=500)
    assert await request(proxy, "GET", "/inventory/stock/SKU-004") == 500
    await proxy.close()  # its last snapshot is written as it stops

    proxy = await start_proxy(CONFIG)
    errors: list[str] = []
    page = await open_page(browser, proxy, errors)
    outcomes = page.locator(f"{STOCK} svg.outcomes")
    await page.wait_for_selector(f'{STOCK} svg.outcomes rect[data-kind="failed"]', timeout=10_000)
    assert await outcomes.locator('rect[data-kind="ok"]').count() >= 1
    assert "(4 calls)" in await page.locator(f"{STOCK} .chart-head").first.inner_text()
    assert await page.locator(f"{STOCK} .stat.s dd").inner_text() == "0"  # the counters did start again
    await shot(page, "status-shop-restored.png")
    assert errors == []


FLEET_CONFIG = """
storage: {url: "$pg", path: $dbpath}
cluster: {share_breakers: true, quorum: 1, node_id: $node}
defaults: {failure_threshold: 3, open_timeout_ms: 600000}
services:
  inventory: {upstream: $inventory}
"""
FLEET_STOCK = '[data-breaker="inventory.default"]'


async def test_a_replica_shows_its_fleet_and_why_the_fleet_opened_its_breaker(
        start_proxy, fakes, browser, config_dir, pg_url):
    a, b = [await start_proxy(FLEET_CONFIG, name=f"{node}.yaml", pg=pg_url, node=node,
                              dbpath=str(config_dir / "var" / f"{node}.db")) for node in ("pod-a", "pod-b")]
    errors: list[str] = []
    page = await open_page(browser, b, errors)
    await page.locator("#fleet[data-connected=true]", has_text="fleet: connected, 2 replicas").wait_for(timeout=10_000)

    # pod-a sees the outage; pod-b opens because the fleet did, and its card says so.
    await fakes.set_mode("inventory", "error", status=500)
    for _ in range(3):
        assert await request(a, "GET", "/inventory/stock/SKU-001") == 500
    await page.wait_for_selector(f'{FLEET_STOCK}[data-state="open"]', timeout=10_000)
    await page.locator(f"{FLEET_STOCK} .transitions .reason", has_text="opened because the fleet did").wait_for(
        timeout=10_000)
    assert fakes.requests("inventory") == 3  # pod-b learned it from the fleet, not from the upstream
    await shot(page, "status-fleet-connected.png")

    # A replica whose database is unreachable goes on alone, and says so.
    alone = await start_proxy(FLEET_CONFIG, name="pod-c.yaml", pg=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
                              node="pod-c", dbpath=str(config_dir / "var" / "pod-c.db"))
    lonely = await open_page(browser, alone, errors)
    await lonely.locator("#fleet[data-connected=false]",
                         has_text="fleet: database unreachable, deciding alone").wait_for(timeout=10_000)
    await shot(lonely, "status-fleet-alone.png")
    assert errors == []
