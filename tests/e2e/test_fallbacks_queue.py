"""The queue fallback (payment offline mode, notification outbox) through the real proxy (§4, §5)."""

from __future__ import annotations

import asyncio
import json

from proxy.core.clock import FakeClock
from proxy.config.load import load_settings

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, success_threshold: 1, failure_rate_threshold: 0,
               slow_call_rate_threshold: 0, open_timeout_ms: 10000, timeout_ms: 2000,
               connect_timeout_ms: 500}
    services:
      payment:
        upstream: $payment
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, max_depth: 10, max_attempts: 3, amount_field: amount,
                       floor_limit: 100, exposure_cap: 250, retry_base_ms: 10, retry_max_ms: 20}
      notification:
        upstream: $notification
        failure_threshold: 100
        routes:
          notifications:
            match: {methods: [POST], path: /notifications}
            fallback: {type: queue, max_depth: 3, max_attempts: 3, retry_base_ms: 10, retry_max_ms: 20}
"""
CHARGE = {"amount": 40, "currency": "EUR", "order_id": "o-1"}
NOTE = {"to": "ann@example.com", "template": "shipped", "data": {"order": "o-1"}}


async def until(predicate, what: str, timeout_s: float = 5.0):
    """Poll an async effect (replay, a background write) for at most `timeout_s`."""
    for _ in range(int(timeout_s / 0.01)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def start(start_proxy, clock):
    proxy = await start_proxy(CONFIG, clock=clock)
    proxy.app.queues.poll_s = 0.02
    return proxy


async def post(proxy, path, body, **headers) -> tuple[int, dict[str, str], object]:
    async with proxy.session.post(proxy.url(path), json=body, headers=headers) as response:
        kept = {k: v for k, v in response.headers.items() if k not in ("Date", "Server", "Content-Length")}
        return response.status, kept, await response.json(content_type=None)


async def rows(proxy, sql="SELECT queue, state, idempotency_key, amount, attempts FROM queue_items ORDER BY id"):
    return await proxy.app.storage.fetchall(sql)


async def open_payment(proxy, fakes) -> None:
    await fakes.set_mode("payment", "error", status=503)
    assert (await post(proxy, "/payment/charges", CHARGE))[0] == 503
    await fakes.set_mode("payment", "healthy")


async def queue_status(proxy) -> list[dict]:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        return (await response.json())["queues"]


async def test_accepted_while_open_then_replayed_once_healthy(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start(start_proxy, clock)
    await open_payment(proxy, fakes)
    status, headers, body = await post(proxy, "/payment/charges?src=web", CHARGE, Authorization="Bearer t")
    key = headers["Idempotency-Key"]
    assert key.startswith("cp-") and len(key) == 39
    assert (status, headers, body) == (202, {
        "Content-Type": "application/json", "X-Queue-Id": "1", "Idempotency-Key": key,
        "X-Circuit-Breaker": "payment.charges", "X-Circuit-State": "open", "X-Fallback": "queue"},
        {"status": "queued", "queue": "payment.charges", "queue_id": 1, "idempotency_key": key})
    mine = await post(proxy, "/payment/charges", {**CHARGE, "order_id": "o-2"}, **{"Idempotency-Key": "k-2"})
    assert (mine[0], mine[1]["X-Queue-Id"], mine[1]["Idempotency-Key"]) == (202, "2", "k-2")
    assert await rows(proxy) == [("payment.charges", "pending", key, "40", 0),
                                 ("payment.charges", "pending", "k-2", "40", 0)]
    assert {q["name"]: q for q in await queue_status(proxy)}["payment.charges"] == {
        "name": "payment.charges", "depth": 2, "dead_letter": 0, "exposure": 80.0}
    assert fakes.service("payment").records == []

    clock.advance(10)  # half-open: the worker's trial closes the breaker, then it drains
    charges = await until(lambda: _records(fakes, "payment", 2), "both charges replayed")
    assert [(c["order_id"], c["idempotency_key"], c["amount"]) for c in charges] == [
        ("o-1", key, 40), ("o-2", "k-2", 40)]
    assert proxy.app.registry.get("payment.charges").breaker.state == "closed"
    await until(lambda: _depth(proxy, "payment.charges", 0), "depth back to 0")
    assert await rows(proxy, "SELECT state, attempts FROM queue_items ORDER BY id") == [
        ("delivered", 1), ("delivered", 1)]
    async with proxy.session.get(proxy.url("/metrics")) as response:
        metrics = await response.text()
    assert 'fallback_queue_depth{queue="payment.charges"} 0.0' in metrics
    assert 'fallback_queue_replayed_total{queue="payment.charges",result="delivered"} 2.0' in metrics
    logs = await until(lambda: _logs(proxy, 2), "fallback_logs rows")
    assert logs == [("payment.charges", "queue", "POST", "/payment/charges", 202, "open", "queue_id=1"),
                    ("payment.charges", "queue", "POST", "/payment/charges", 202, "open", "queue_id=2")]


async def _records(fakes, service, count):
    records = fakes.service(service).records
    return list(records) if len(records) >= count else None


async def _depth(proxy, name, depth):
    return {q["name"]: q["depth"] for q in await queue_status(proxy)}[name] == depth


async def _logs(proxy, count):
    found = await proxy.app.storage.fetchall(
        "SELECT breaker, type, method, path, status, reason, detail FROM fallback_logs ORDER BY id")
    return found if len(found) >= count else None


async def test_offline_limits_answer_503_and_store_nothing(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    await open_payment(proxy, fakes)
    over = await post(proxy, "/payment/charges", {**CHARGE, "amount": 100.01})
    assert over == (503, {"Content-Type": "application/json", "X-Circuit-Breaker": "payment.charges",
                          "X-Circuit-State": "open", "X-Fallback": "queue"},
                    {"error": "offline_limit", "breaker": "payment.charges",
                     "detail": "amount 100.01 exceeds floor_limit 100"})
    assert (await post(proxy, "/payment/charges", {"currency": "EUR"}))[2]["detail"] == (
        "amount must be a number ≥ 0 to be accepted offline")
    assert [(await post(proxy, "/payment/charges", {**CHARGE, "amount": a}))[0] for a in (100, 100)] == [202, 202]
    capped = await post(proxy, "/payment/charges", {**CHARGE, "amount": 50.5})
    assert capped[2] == {"error": "offline_limit", "breaker": "payment.charges",
                         "detail": "outstanding 200 + 50.5 would exceed exposure_cap 250"}
    assert (await post(proxy, "/payment/charges", {**CHARGE, "amount": 50}))[0] == 202  # exactly the cap
    assert await rows(proxy, "SELECT amount FROM queue_items ORDER BY id") == [("100",), ("100",), ("50",)]
    logs = await until(lambda: _logs(proxy, 6), "fallback_logs rows")
    assert [(row[4], row[6]) for row in logs] == [
        (503, "offline_limit: amount 100.01 exceeds floor_limit 100"),
        (503, "offline_limit: amount must be a number ≥ 0 to be accepted offline"),
        (202, "queue_id=1"), (202, "queue_id=2"),
        (503, "offline_limit: outstanding 200 + 50.5 would exceed exposure_cap 250"),
        (202, "queue_id=3")]


async def test_the_exposure_cap_is_exact_under_concurrency(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    await open_payment(proxy, fakes)
    results = await asyncio.gather(*(post(proxy, "/payment/charges", {**CHARGE, "amount": 25})
                                     for _ in range(30)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [202] * 10 + [503] * 20  # 10 × 25 = 250, the cap; also max_depth 10
    assert await rows(proxy, "SELECT count(*), sum(amount) FROM queue_items") == [(10, 250.0)]
    assert sorted(int(h["X-Queue-Id"]) for s, h, _ in results if s == 202) == list(range(1, 11))


async def test_a_full_queue_answers_queue_full(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    proxy.app.registry.get("notification.notifications").breaker.force_open()
    statuses = [(await post(proxy, "/notification/notifications", NOTE))[0] for _ in range(3)]
    full = await post(proxy, "/notification/notifications", NOTE)
    assert (statuses, full[0], full[1]["X-Circuit-State"], full[2]) == (
        [202, 202, 202], 503, "forced_open",
        {"error": "queue_full", "breaker": "notification.notifications",
         "detail": "3 requests waiting (max_depth 3)"})
    assert await rows(proxy, "SELECT count(*) FROM queue_items") == [(3,)]


async def test_4xx_and_exhausted_retries_become_visible_dead_letters(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    breaker = proxy.app.registry.get("notification.notifications").breaker
    breaker.force_open()
    bad = await post(proxy, "/notification/notifications", {"template": "no recipient"})
    good = await post(proxy, "/notification/notifications", NOTE)
    assert (bad[0], good[0]) == (202, 202)
    breaker.reset()  # back to closed: the worker wakes and replays in order
    await until(lambda: _records(fakes, "notification", 1), "the good one delivered")
    assert [r["idempotency_key"] for r in fakes.service("notification").records] == [
        good[1]["Idempotency-Key"]]
    await until(lambda: _depth(proxy, "notification.notifications", 0), "queue drained")
    assert (await rows(proxy, "SELECT state, attempts, last_error FROM queue_items ORDER BY id"))[0] == (
        "dead_letter", 1,
        ('HTTP 400: {"error": "invalid_request", "message": "to is required and must be a non-empty '
         'string, got None"}'))

    await fakes.set_mode("notification", "error", status=500)
    failing = await post(proxy, "/notification/notifications", NOTE)
    assert failing[0] == 500  # closed: the upstream's answer passes through
    breaker.force_open()
    queued = await post(proxy, "/notification/notifications", {**NOTE, "to": "bob@example.com"})
    breaker.reset()
    await until(lambda: _depth(proxy, "notification.notifications", 0), "retries exhausted")
    dead = await proxy.app.queues.dead_letters("notification.notifications")
    assert [(d["id"], d["idempotency_key"], d["attempts"], d["last_error"][:8]) for d in dead] == [
        (3, queued[1]["Idempotency-Key"], 3, "HTTP 500"), (1, bad[1]["Idempotency-Key"], 1, "HTTP 400")]
    assert {q["name"]: q for q in await queue_status(proxy)}["notification.notifications"] == {
        "name": "notification.notifications", "depth": 0, "dead_letter": 2, "exposure": None}
    async with proxy.session.get(proxy.url("/metrics")) as response:
        metrics = await response.text()
    for result, count in (("delivered", 1), ("retried", 2), ("dead_letter", 2)):
        assert (f'fallback_queue_replayed_total{{queue="notification.notifications",result="{result}"}} '
                f"{count}.0") in metrics


async def test_a_maybe_delivered_request_is_queued_only_with_an_idempotency_key(start_proxy, fakes):
    proxy = await start_proxy(CONFIG.replace("timeout_ms: 2000", "timeout_ms: 300")
                              .replace("failure_threshold: 1,", "failure_threshold: 50,"), clock=FakeClock())
    proxy.app.queues.poll_s = 0.02
    await fakes.set_mode("payment", "hang")
    status, headers, body = await post(proxy, "/payment/charges", CHARGE)
    assert (status, body["error"], "X-Fallback" in headers) == (504, "upstream_timeout", False)
    status, headers, body = await post(proxy, "/payment/charges", CHARGE, **{"Idempotency-Key": "k-9"})
    assert (status, headers["X-Queue-Id"], headers["Idempotency-Key"], headers["X-Circuit-State"]) == (
        202, "1", "k-9", "closed")
    await fakes.set_mode("payment", "healthy")
    charges = await until(lambda: _records(fakes, "payment", 1), "the keyed charge replayed")
    assert [(c["idempotency_key"], c["amount"]) for c in charges] == [("k-9", 40)]
    assert await rows(proxy, "SELECT count(*) FROM queue_items") == [(1,)]


async def test_stored_requests_keep_end_to_end_headers_and_body(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    await open_payment(proxy, fakes)
    await post(proxy, "/payment/charges?a=%20b", CHARGE, **{"X-Trace": "t1", "Connection": "X-Hop",
                                                            "X-Hop": "gone"})
    [(method, target, headers, body)] = await rows(proxy, "SELECT method, target, headers, body FROM queue_items")
    names = [name for name, _ in json.loads(headers)]
    assert (method, target, json.loads(body)) == ("POST", "/charges?a=%20b", CHARGE)
    assert "X-Trace" in names and "X-Hop" not in names and "Content-Length" not in names
    assert names[-1] == "Idempotency-Key" and "X-Forwarded-For" in names


async def test_a_queue_added_by_a_reload_accepts_and_replays(start_proxy, write_config, fakes):
    proxy = await start_proxy(CONFIG.replace("fallback: {type: queue, max_depth: 3", "# no fallback: {x: 3"),
                              clock=FakeClock())
    proxy.app.queues.poll_s = 0.02
    registry = proxy.app.registry
    registry.get("notification.notifications").breaker.force_open()
    assert (await post(proxy, "/notification/notifications", NOTE))[2]["error"] == "circuit_open"
    registry.apply(load_settings(write_config(CONFIG, name="reloaded.yaml"), {}))
    breaker = registry.get("notification.notifications").breaker
    assert breaker.state == "forced_open"  # the reload kept the operator's choice
    status, headers, _ = await post(proxy, "/notification/notifications", NOTE)
    assert (status, headers["X-Queue-Id"]) == (202, "1")
    breaker.reset()
    records = await until(lambda: _records(fakes, "notification", 1), "the queued one delivered")
    assert [r["idempotency_key"] for r in records] == [headers["Idempotency-Key"]]


async def metric_lines(proxy, prefix: str) -> list[str]:
    async with proxy.session.get(proxy.url("/metrics")) as response:
        return [line for line in (await response.text()).splitlines() if line.startswith(prefix)]


async def test_a_retried_acceptance_with_the_same_key_gets_the_first_answer_and_stores_nothing(
        start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    await open_payment(proxy, fakes)
    key = {"Idempotency-Key": "k-retry"}
    first = await post(proxy, "/payment/charges", CHARGE, **key)
    again = await post(proxy, "/payment/charges", CHARGE, **key)
    answer = {"status": "queued", "queue": "payment.charges", "queue_id": 1, "idempotency_key": "k-retry"}
    common = {"Content-Type": "application/json", "X-Queue-Id": "1", "Idempotency-Key": "k-retry",
              "X-Circuit-Breaker": "payment.charges", "X-Circuit-State": "open", "X-Fallback": "queue"}
    assert first == (202, common, answer)
    assert again == (202, {**common, "Idempotent-Replayed": "true"}, answer)
    other = await post(proxy, "/payment/charges", CHARGE)  # no client key: a new request every time
    assert (other[0], other[1]["X-Queue-Id"], "Idempotent-Replayed" in other[1]) == (202, "2", False)
    assert await rows(proxy) == [("payment.charges", "pending", "k-retry", "40", 0),
                                 ("payment.charges", "pending", other[1]["Idempotency-Key"], "40", 0)]
    assert {q["name"]: q for q in await queue_status(proxy)}["payment.charges"] == {
        "name": "payment.charges", "depth": 2, "dead_letter": 0, "exposure": 80.0}
    logs = await until(lambda: _logs(proxy, 3), "fallback_logs rows")
    assert [(row[4], row[6]) for row in logs] == [
        (202, "queue_id=1"), (202, "queue_id=1 replayed"), (202, "queue_id=2")]


async def test_a_retry_after_delivery_is_still_answered_with_the_first_acceptance(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start(start_proxy, clock)
    await open_payment(proxy, fakes)
    key = {"Idempotency-Key": "k-late"}
    assert (await post(proxy, "/payment/charges", CHARGE, **key))[1]["X-Queue-Id"] == "1"
    clock.advance(10)
    await until(lambda: _records(fakes, "payment", 1), "the charge replayed")
    await until(lambda: _depth(proxy, "payment.charges", 0), "marked delivered")
    proxy.app.registry.get("payment.charges").breaker.force_open()
    status, headers, body = await post(proxy, "/payment/charges", CHARGE, **key)
    assert (status, headers["X-Queue-Id"], headers["Idempotent-Replayed"], body["queue_id"]) == (202, "1", "true", 1)
    assert await rows(proxy, "SELECT state, idempotency_key FROM queue_items") == [("delivered", "k-late")]
    assert len(fakes.service("payment").records) == 1


async def test_concurrent_retries_with_one_key_make_one_row(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    await open_payment(proxy, fakes)
    results = await asyncio.gather(*(post(proxy, "/payment/charges", CHARGE, **{"Idempotency-Key": "k-same"})
                                     for _ in range(20)))
    answer = {"status": "queued", "queue": "payment.charges", "queue_id": 1, "idempotency_key": "k-same"}
    assert [(s, h["X-Queue-Id"], h["Idempotency-Key"], b) for s, h, b in results] == [
        (202, "1", "k-same", answer)] * 20
    assert sorted(h.get("Idempotent-Replayed", "") for _, h, _ in results) == [""] + ["true"] * 19
    assert await rows(proxy) == [("payment.charges", "pending", "k-same", "40", 0)]
    assert {q["name"]: q for q in await queue_status(proxy)}["payment.charges"] == {
        "name": "payment.charges", "depth": 1, "dead_letter": 0, "exposure": 40.0}


async def test_retries_count_once_against_the_exposure_cap_and_max_depth(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    await open_payment(proxy, fakes)
    charge = {**CHARGE, "amount": 100}
    for key in ("k-a", "k-b"):
        for _ in range(3):  # the client retries each one twice
            status, headers, _ = await post(proxy, "/payment/charges", charge, **{"Idempotency-Key": key})
            assert (status, headers["Idempotency-Key"]) == (202, key)
    # 200 outstanding, not 600: 50 more still fits the cap of 250, and a retry of it too.
    assert [(await post(proxy, "/payment/charges", {**CHARGE, "amount": 50}, **{"Idempotency-Key": "k-c"}))[0]
            for _ in range(2)] == [202, 202]
    capped = await post(proxy, "/payment/charges", {**CHARGE, "amount": 1}, **{"Idempotency-Key": "k-d"})
    assert capped[2] == {"error": "offline_limit", "breaker": "payment.charges",
                         "detail": "outstanding 250 + 1 would exceed exposure_cap 250"}
    assert await rows(proxy, "SELECT idempotency_key, amount FROM queue_items ORDER BY id") == [
        ("k-a", "100"), ("k-b", "100"), ("k-c", "50")]
    assert {q["name"]: q for q in await queue_status(proxy)}["payment.charges"] == {
        "name": "payment.charges", "depth": 3, "dead_letter": 0, "exposure": 250.0}


async def test_the_dead_letter_gauge_counts_what_a_4xx_replay_gave_up_on(start_proxy, fakes):
    proxy = await start(start_proxy, FakeClock())
    assert await metric_lines(proxy, "fallback_queue_dead_letters{") == [
        'fallback_queue_dead_letters{queue="payment.charges"} 0.0',
        'fallback_queue_dead_letters{queue="notification.notifications"} 0.0']
    breaker = proxy.app.registry.get("notification.notifications").breaker
    breaker.force_open()
    assert (await post(proxy, "/notification/notifications", {"template": "no recipient"}))[0] == 202
    breaker.reset()
    await until(lambda: _depth(proxy, "notification.notifications", 0), "the bad one replayed")
    # The counters move inside the replay's transaction; the gauges once it has committed.
    dead_letters = [
        'fallback_queue_dead_letters{queue="payment.charges"} 0.0',
        'fallback_queue_dead_letters{queue="notification.notifications"} 1.0']

    async def gauge_shows_it() -> bool:
        return await metric_lines(proxy, "fallback_queue_dead_letters{") == dead_letters

    await until(gauge_shows_it, "the dead letter in its gauge")
    assert await metric_lines(proxy, "fallback_queue_depth{") == [
        'fallback_queue_depth{queue="payment.charges"} 0.0',
        'fallback_queue_depth{queue="notification.notifications"} 0.0']
