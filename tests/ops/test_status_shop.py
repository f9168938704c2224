"""The status data in shop terms (issue 12): last failure reasons in plain words, the honest
failure rate below minimum_calls, shop labels, the queued requests with their dead-letter
actions, and the charts' history put back after a restart. Through the real proxy."""

from __future__ import annotations

import asyncio

from proxy.config.load import load_settings
from proxy.app import App

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 3, minimum_calls: 5, window: {type: count, size: 10},
           open_timeout_ms: 600000, failure_rate_threshold: 50}
services:
  payment:
    upstream: $payment
    routes:
      charges:
        match: {methods: [POST], path: /charges}
        fallback: {type: queue, amount_field: amount, floor_limit: 100, exposure_cap: 150, retry_base_ms: 10,
                   retry_max_ms: 20}
  inventory:
    upstream: $inventory
    routes:
      stock:
        match: {methods: [GET], path: /stock}
        timeout_ms: 200
        fallback: {type: cache, scale: {available: 0.5}}
  notification:
    upstream: $notification
    routes:
      notifications:
        match: {methods: [POST], path: /notifications}
        fallback: {type: queue, max_attempts: 3, retry_base_ms: 10, retry_max_ms: 20}
  shipping:
    upstream: $shipping
    routes:
      quotes:
        match: {methods: [POST], path: /quotes}
        fallback:
          type: table
          key: destination.country
          rows: {DE: {carrier: DHL, cost: 4.9, currency: EUR, eta_days: 2},
                 world: {carrier: Post, cost: 9.9, currency: EUR, eta_days: 5}}
          default_row: world
"""
TOKEN = "the proxy's own"  # post() sends the running proxy's admin token
NOTE = {"to": "ann@example.com", "template": "shipped", "data": {"order": "o-1"}}
QUOTE = {"destination": {"country": "DE", "postcode": "10115"}, "weight_kg": 1}


async def until(predicate, what: str, timeout_s: float = 5.0):
    """Poll an async effect (replay, a background write) for at most `timeout_s`."""
    for _ in range(int(timeout_s / 0.01)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def start(start_proxy):
    proxy = await start_proxy(CONFIG)
    proxy.app.queues.poll_s = 0.02
    return proxy


async def get_json(proxy, path: str, token: str | None = None) -> tuple[int, object]:
    if token == TOKEN:
        token = proxy.app.control.admin_token
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with proxy.session.get(proxy.url(path), headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def items(proxy, name: str) -> dict:
    """The queued requests' list, with the admin token."""
    status, listing = await get_json(proxy, f"/status/queues/{name}/items", token=TOKEN)
    assert status == 200, listing
    return listing


async def post(proxy, path: str, body=None, token: str | None = TOKEN, **headers) -> tuple[int, object]:
    if token == TOKEN:
        token = proxy.app.control.admin_token
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with proxy.session.post(proxy.url(path), json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def breaker(proxy, name: str, query: str = "") -> dict:
    _, document = await get_json(proxy, "/status.json" + query)
    return next(b for b in document["breakers"] if b["name"] == name)


async def queue(proxy, name: str) -> dict:
    _, document = await get_json(proxy, "/status.json")
    return next(q for q in document["queues"] if q["name"] == name)


# -- why calls fail, in plain words -------------------------------------------------------------

async def test_the_last_failure_says_why_in_plain_words(start_proxy, fakes):
    proxy = await start(start_proxy)
    assert (await breaker(proxy, "inventory.stock"))["last_failure"] is None
    await fakes.set_mode("inventory", "error", status=500)
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
        assert response.status == 500
    failure = (await breaker(proxy, "inventory.stock"))["last_failure"]
    assert (failure["kind"], failure["text"]) == ("http", "HTTP 500 from the upstream")
    assert failure["at"].endswith("Z")

    await fakes.set_mode("inventory", "hang")
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-002")) as response:
        assert response.status == 504  # nothing cached for this sku: the contract's timeout
    failure = (await breaker(proxy, "inventory.stock"))["last_failure"]
    assert (failure["kind"], failure["text"]) == ("timeout", "timeout: no answer within 200 ms")

    await fakes.set_mode("payment", "down")
    assert (await post(proxy, "/payment/charges", {"amount": 10, "currency": "EUR", "order_id": "o-1"},
                       token=None))[0] == 202  # the refused call went to offline payments
    failure = (await breaker(proxy, "payment.charges"))["last_failure"]
    assert (failure["kind"], failure["text"]) == ("unreachable", "connection refused")


async def test_three_of_three_failed_is_shown_as_not_yet_judged_not_as_healthy(start_proxy, fakes):
    proxy = await start(start_proxy)
    await fakes.set_mode("shipping", "error", status=500)
    for _ in range(2):
        assert (await post(proxy, "/shipping/quotes", QUOTE, token=None))[0] == 500
    entry = await breaker(proxy, "shipping.quotes")
    assert (entry["state"], entry["failure_rate"], entry["window_calls"], entry["window_failures"],
            entry["thresholds"]["minimum_calls"]) == ("closed", None, 2, 2, 5)


async def test_fallbacks_carry_their_shop_terms(start_proxy):
    proxy = await start(start_proxy)
    _, document = await get_json(proxy, "/status.json")
    terms = {b["name"]: b["shop_term"] for b in document["breakers"]}
    assert terms == {"payment.charges": "offline payments", "payment.default": None,
                     "inventory.stock": "estimated stock", "inventory.default": None,
                     "notification.notifications": "local queue", "notification.default": None,
                     "shipping.quotes": "fixed costs", "shipping.default": None}
    labels = {q["name"]: (await get_json(proxy, f"/status/queues/{q['name']}"))[1]["label"]
              for q in document["queues"]}
    assert labels == {"payment.charges": "offline payments", "notification.notifications": "local queue"}


# -- queues: exposure, listing, dead letters ------------------------------------------------------

async def test_offline_payments_show_exposure_against_cap_and_floor_and_list_each_charge(start_proxy, fakes):
    proxy = await start(start_proxy)
    assert (await post(proxy, "/admin/breakers/payment.charges/force-open"))[0] == 200
    for order, amount in (("o-1", 60), ("o-2", 40.5)):
        status, body = await post(proxy, "/payment/charges", {"amount": amount, "currency": "EUR", "order_id": order},
                                  token=None, **{"Idempotency-Key": f"key-{order}"})
        assert (status, body["status"]) == (202, "queued")
    assert await queue(proxy, "payment.charges") == {
        "name": "payment.charges", "depth": 2, "dead_letter": 0, "exposure": 100.5}  # small: every snapshot
    listing = await items(proxy, "payment.charges")
    assert {k: listing[k] for k in ("depth", "dead_letter", "exposure", "exposure_cap", "floor_limit",
                                    "amount_field", "max_depth", "label")} == {
        "depth": 2, "dead_letter": 0, "exposure": 100.5, "exposure_cap": 150.0, "floor_limit": 100.0,
        "amount_field": "amount", "max_depth": 10000, "label": "offline payments"}
    assert [(i["state"], i["idempotency_key"], i["amount"], i["attempts"], i["method"], i["target"])
            for i in listing["items"]] == [
        ("pending", "key-o-1", 60.0, 0, "POST", "/charges"),
        ("pending", "key-o-2", 40.5, 0, "POST", "/charges")]
    assert (listing["depth"], listing["next_replay"], listing["next_replay_at"]) == (
        2, "held: the breaker is forced open", None)
    assert 0 <= listing["oldest_age_s"] < 5
    assert "headers" not in listing["items"][0] and "body" not in listing["items"][0]

    # Back to automatic: the queue drains, and the listing says so.
    assert (await post(proxy, "/admin/breakers/payment.charges/reset"))[0] == 200
    await until(lambda: _drained(proxy, "payment.charges"), "the charges replayed")
    listing = await items(proxy, "payment.charges")
    assert (listing["items"], listing["oldest_age_s"], listing["next_replay"]) == ([], None, "nothing waiting")
    assert [c["idempotency_key"] for c in fakes.server("payment").service.records] == ["key-o-1", "key-o-2"]


async def test_the_queued_requests_need_the_admin_token_and_the_figures_do_not(start_proxy):
    proxy = await start(start_proxy)
    assert (await post(proxy, "/admin/breakers/payment.charges/force-open"))[0] == 200
    status, body = await post(proxy, "/payment/charges", {"amount": 60, "currency": "EUR", "order_id": "o-1"},
                              token=None, **{"Idempotency-Key": "key-o-1"})
    assert status == 202

    # Anyone: the queue's figures, never an amount or a key of a request.
    status, figures = await get_json(proxy, "/status/queues/payment.charges")
    assert status == 200
    assert {k: figures[k] for k in ("depth", "dead_letter", "exposure", "exposure_cap", "next_replay", "label")} == {
        "depth": 1, "dead_letter": 0, "exposure": 60.0, "exposure_cap": 150.0,
        "next_replay": "held: the breaker is forced open", "label": "offline payments"}
    assert 0 <= figures["oldest_age_s"] < 5
    assert "items" not in figures and "key-o-1" not in str(figures)

    # The requests: 401 without the token or with a wrong one (unknown queue or not), as /admin/.
    for path in ("/status/queues/payment.charges/items", "/status/queues/payment.nope/items"):
        for token in (None, "wrong"):
            async with proxy.session.get(proxy.url(path), headers={"Authorization": f"Bearer {token}"}
                                         if token else {}) as response:
                assert (response.status, response.headers["WWW-Authenticate"], await response.json()) == (
                    401, 'Bearer realm="circuit-proxy admin"',
                    {"error": "unauthorized", "detail": "Authorization: Bearer <admin token> required"})
    listing = await items(proxy, "payment.charges")
    assert [(i["id"], i["idempotency_key"], i["amount"]) for i in listing["items"]] == [
        (body["queue_id"], "key-o-1", 60.0)]
    assert {k: v for k, v in listing.items() if k not in ("items", "listed", "oldest_age_s")} == {
        k: v for k, v in figures.items() if k != "oldest_age_s"}


async def _drained(proxy, name: str) -> bool:
    return (await queue(proxy, name))["depth"] == 0


async def _dead_letter(proxy, fakes, key: str) -> int:
    """A notification stored while the breaker is held open, then refused with 400 on replay."""
    assert (await post(proxy, "/admin/breakers/notification.notifications/force-open"))[0] == 200
    status, body = await post(proxy, "/notification/notifications", NOTE, token=None, **{"Idempotency-Key": key})
    assert status == 202
    await fakes.set_mode("notification", "error", status=400)
    assert (await post(proxy, "/admin/breakers/notification.notifications/reset"))[0] == 200

    async def dead() -> bool:
        listing = await items(proxy, "notification.notifications")
        return any(i["id"] == body["queue_id"] and i["state"] == "dead_letter" for i in listing["items"])
    await until(dead, f"{key} in the dead letters")
    return body["queue_id"]


async def test_a_dead_letter_is_retried_or_dropped_by_an_operator(start_proxy, fakes):
    proxy = await start(start_proxy)
    first = await _dead_letter(proxy, fakes, "note-1")
    second = await _dead_letter(proxy, fakes, "note-2")
    q = await queue(proxy, "notification.notifications")
    assert (q["depth"], q["dead_letter"]) == (0, 2)
    listing = await items(proxy, "notification.notifications")
    assert [(i["id"], i["state"], i["attempts"], i["last_error"][:8]) for i in listing["items"]] == [
        (second, "dead_letter", 1, "HTTP 400"), (first, "dead_letter", 1, "HTTP 400")]  # newest first

    # Retry: back to pending, delivered once the upstream takes it.
    await fakes.set_mode("notification", "healthy")
    assert await post(proxy, f"/admin/queues/notification.notifications/items/{first}/retry") == (
        200, {"queue": "notification.notifications", "id": first, "state": "pending"})
    await until(lambda: _drained(proxy, "notification.notifications"), "the retried note delivered")
    assert [n["idempotency_key"] for n in fakes.server("notification").service.records] == ["note-1"]

    # Drop: gone for good, and counted out of the dead letters.
    assert await post(proxy, f"/admin/queues/notification.notifications/items/{second}/drop") == (
        200, {"queue": "notification.notifications", "id": second, "state": "dropped"})
    q = await queue(proxy, "notification.notifications")
    assert (q["depth"], q["dead_letter"]) == (0, 0)
    listing = await items(proxy, "notification.notifications")
    assert listing["items"] == []
    rows = await proxy.app.storage.fetchall("SELECT id, state FROM queue_items ORDER BY id")
    assert rows == [(first, "delivered")]

    # What cannot be done: a delivered request, a dropped one, unknown names, no token.
    path = "/admin/queues/notification.notifications/items"
    assert await post(proxy, f"{path}/{first}/drop") == (409, {
        "error": "not_dead_letter", "queue": "notification.notifications", "id": first, "state": "delivered"})
    assert await post(proxy, f"{path}/{second}/retry") == (404, {
        "error": "unknown_item", "queue": "notification.notifications", "id": second})
    assert await post(proxy, f"{path}/x1/retry") == (404, {
        "error": "unknown_item", "queue": "notification.notifications", "id": "x1"})
    for odd in ("%C2%B2", "9" * 30):  # "²" is a digit to Python, not an id; nor is a number SQLite cannot hold
        assert (await post(proxy, f"{path}/{odd}/retry"))[0] == 404
    assert (await post(proxy, f"{path}/{first}/resend"))[0] == 404
    assert await post(proxy, f"/admin/queues/payment.nope/items/{first}/retry") == (404, {
        "error": "unknown_queue", "queue": "payment.nope"})
    assert (await post(proxy, f"{path}/{first}/retry", token="wrong"))[0] == 401
    assert await get_json(proxy, "/status/queues/payment.nope") == (
        404, {"error": "unknown_queue", "queue": "payment.nope"})
    assert await get_json(proxy, "/status/queues/payment.nope/items", token=TOKEN) == (
        404, {"error": "unknown_queue", "queue": "payment.nope"})


async def test_a_pending_request_belongs_to_its_worker(start_proxy, fakes):
    proxy = await start(start_proxy)
    assert (await post(proxy, "/admin/breakers/notification.notifications/force-open"))[0] == 200
    status, body = await post(proxy, "/notification/notifications", NOTE, token=None)
    assert status == 202
    item = body["queue_id"]
    for action in ("retry", "drop"):
        assert await post(proxy, f"/admin/queues/notification.notifications/items/{item}/{action}") == (409, {
            "error": "not_dead_letter", "queue": "notification.notifications", "id": item, "state": "pending"})
    assert (await queue(proxy, "notification.notifications"))["depth"] == 1


# -- history: charted, and put back after a restart ------------------------------------------------

async def test_history_buckets_carry_outcomes_and_latency_and_survive_a_restart(start_proxy, fakes, write_config):
    proxy = await start(start_proxy)
    store = proxy.app.persistence.store
    store.snapshot()  # the baseline: what came before is another interval
    for sku in ("SKU-001", "SKU-002", "SKU-003"):
        async with proxy.session.get(proxy.url(f"/inventory/stock/{sku}")) as response:
            assert response.status == 200
    await fakes.set_mode("inventory", "error", status=500)
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-009")) as response:
        assert response.status == 500
    proxy.app.control.board.sample()
    live = await breaker(proxy, "inventory.stock", "?history=1")
    assert [sum(b[i] for b in live["history"]) for i in (1, 2, 3)] == [3, 1, 0]
    assert all(b[5] is not None and b[6] >= b[5] for b in live["history"] if b[1] + b[2])
    # Every snapshot carries only the buckets under way; the page asks once for the rest.
    assert len((await breaker(proxy, "inventory.stock"))["history"]) <= 2
    store.snapshot()
    await proxy.close()  # writes what is still buffered

    settings = load_settings(write_config(CONFIG), {})
    app = App(settings, admin_token="t0ken")
    await app.start("127.0.0.1", 0)
    try:
        document = app.control.board.document(full_history=True)
        restored = next(b for b in document["breakers"] if b["name"] == "inventory.stock")
        assert restored["calls"] == {"success": 0, "failure": 0, "rejected": 0}  # counters start again
        assert [sum(b[i] for b in restored["history"]) for i in (1, 2, 3)] == [3, 1, 0]
        assert {b[4] for b in restored["history"]} <= {None, 0}  # fallbacks are not in the snapshots
        assert any(b[6] is not None for b in restored["history"])
    finally:
        await app.close()
