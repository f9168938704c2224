"""Every table of §6 on PostgreSQL (§8: `storage.url`), through the real proxy: breaker state
restored across a restart, metric snapshots, fallback logs and the queue, in a schema the
proxy made itself."""

from __future__ import annotations

import asyncpg

from proxy.core.clock import FakeClock

T0 = 1_700_000_000.0
CONFIG = """
storage: {url_env: SHOP_DATABASE_URL, snapshot_interval_s: 3600}
defaults: {failure_threshold: 1, open_timeout_ms: 60000, jitter: 0, timeout_ms: 1000,
           connect_timeout_ms: 300}
services:
  payment:
    upstream: $payment
    routes:
      charges:
        match: {methods: [POST], path: /charges}
        fallback: {type: queue}
"""


async def test_breaker_state_logs_snapshots_and_queue_live_in_postgresql(start_proxy, fakes, pg_url,
                                                                           monkeypatch):
    await fakes.set_mode("payment", "down")
    monkeypatch.setenv("SHOP_DATABASE_URL", pg_url)  # as a Kubernetes Secret would give it
    proxy = await start_proxy(CONFIG, clock=FakeClock(T0))
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": 3},
                                  headers={"Idempotency-Key": "k-1"}) as response:
        assert response.status == 202  # refused upstream, queued; the breaker opened
    await proxy.session.close()
    await proxy.app.close()  # writes what is buffered, as a restart would

    database = await asyncpg.connect(pg_url)
    try:
        breakers = await database.fetch("SELECT name, state, opened_at_wall, retry_at_wall"
                                        " FROM circuit_breakers ORDER BY name")
        assert [tuple(row) for row in breakers] == [("payment.charges", "open", T0, T0 + 60),
                                                    ("payment.default", "closed", None, None)]
        logs = await database.fetch("SELECT breaker, type, method, path, status, reason, detail FROM fallback_logs")
        assert [tuple(row) for row in logs] == [
            ("payment.charges", "queue", "POST", "/payment/charges", 202, "unreachable", "queue_id=1")]
        snapshots = await database.fetch("SELECT breaker, state, calls_failure FROM circuit_breaker_metrics"
                                         " ORDER BY breaker")
        assert [tuple(row) for row in snapshots] == [("payment.charges", "open", 1),
                                                     ("payment.default", "closed", 0)]
        items = await database.fetch("SELECT id, queue, state, idempotency_key FROM queue_items")
        assert [tuple(row) for row in items] == [(1, "payment.charges", "pending", "k-1")]
    finally:
        await database.close()

    again = await start_proxy(CONFIG, clock=FakeClock(T0 + 30))
    async with again.session.get(again.url("/status.json")) as response:
        document = await response.json()
    charges = next(b for b in document["breakers"] if b["name"] == "payment.charges")
    assert (charges["state"], charges["retry_at"]) == ("open", "2023-11-14T22:14:20.000Z")
    assert next(q for q in document["queues"] if q["name"] == "payment.charges")["depth"] == 1
