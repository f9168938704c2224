"""What fallbacks know survives a restart (§5).

Queued requests survive kill -9: the proxy runs as a real process, killed mid-replay,
restarted, and every accepted request reaches the upstream exactly once, in acceptance order.
Cached stock survives a restart during an inventory outage: served scaled, with its true Age.

Fake upstreams run in this process on port 0; the fake services de-duplicate by
Idempotency-Key, so "exactly once" is what they record. Bounded: the whole test must finish
within TEST_BUDGET_S.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp

from proxy.core.clock import FakeClock
from tests.real_tools import free_port

NOTIFICATIONS = 500
PAYMENTS = 200
TEST_BUDGET_S = 55
CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, success_threshold: 1, failure_rate_threshold: 0,
               slow_call_rate_threshold: 0, open_timeout_ms: 200, max_open_timeout_ms: 200,
               backoff_multiplier: 1.0, timeout_ms: 2000, connect_timeout_ms: 500}
    services:
      notification:
        upstream: $notification
        routes:
          notifications:
            match: {methods: [POST], path: /notifications}
            fallback: {type: queue, max_depth: 100000, retry_base_ms: 20, retry_max_ms: 200}
      payment:
        upstream: $payment
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, amount_field: amount, floor_limit: 100, exposure_cap: 100000,
                       retry_base_ms: 20, retry_max_ms: 200}
"""


class ProxyProcess:
    """`python -m proxy run` on a port, its output in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self, session: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "run", "--config", str(self.config), "--port", str(self.port),
                cwd=self.config.parent.parent, stdout=out, stderr=out,
                env={**os.environ, "CIRCUIT_PROXY_ADMIN_TOKEN": "t"})
        for _ in range(300):
            try:
                async with session.get(self.url("/healthz")) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError("proxy did not start:\n" + self.log.read_text())

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                await self.kill()


async def until(predicate, what: str, timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def accept_all(session, proxy, path, bodies, keys) -> list[tuple[int, str]]:
    """POST every body concurrently; (queue id, Idempotency-Key) of each, all must be 202."""
    async def one(body, key):
        headers = {"Idempotency-Key": key} if key else {}
        async with session.post(proxy.url(path), json=body, headers=headers) as response:
            assert response.status == 202, await response.text()
            return int(response.headers["X-Queue-Id"]), response.headers["Idempotency-Key"]
    return await asyncio.gather(*(one(body, key) for body, key in zip(bodies, keys, strict=True)))


def read_states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:  # the proxy is stopped: nobody else writes
        return dict(conn.execute("SELECT queue || ':' || state, count(*) FROM queue_items GROUP BY 1"))


async def test_every_accepted_request_is_delivered_once_in_order_across_kill_9(write_config, fakes, tmp_path):
    async with asyncio.timeout(TEST_BUDGET_S):
        config = write_config(CONFIG)
        proxy = ProxyProcess(config, tmp_path / "proxy.log")
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                await fakes.set_mode("notification", "down")
                await fakes.set_mode("payment", "down")
                await proxy.start(session)
                # Half the clients bring their own Idempotency-Key, half get one from the proxy.
                notes = await accept_all(
                    session, proxy, "/notification/notifications",
                    [{"to": f"c{n}@example.com", "template": "shipped", "data": {"n": n}} for n in range(NOTIFICATIONS)],
                    [f"note-{n}" if n % 2 else None for n in range(NOTIFICATIONS)])
                charges = await accept_all(
                    session, proxy, "/payment/charges",
                    [{"amount": 1 + n % 90, "currency": "EUR", "order_id": f"o-{n}"} for n in range(PAYMENTS)],
                    [f"pay-{n}" if n % 2 else None for n in range(PAYMENTS)])

                # The upstreams come back, slowly: kill -9 while the queues are being replayed.
                await fakes.set_mode("notification", "slow", latency_ms=5)
                await fakes.set_mode("payment", "slow", latency_ms=5)
                received = fakes.service("notification").records
                await until(lambda: len(received) >= NOTIFICATIONS // 5, "replay under way", 20)
                await proxy.kill()
                killed_at = len(received), len(fakes.service("payment").records)
                assert killed_at[0] < NOTIFICATIONS

                await fakes.set_mode("notification", "down")
                await fakes.set_mode("payment", "down")
                await proxy.start(session)
                await fakes.set_mode("notification", "healthy")
                await fakes.set_mode("payment", "healthy")
                await until(lambda: len(received) >= NOTIFICATIONS
                            and len(fakes.service("payment").records) >= PAYMENTS, "replay complete", 25)
            finally:
                await proxy.stop()

        # Exactly once, in acceptance (queue id) order, with the key the client was given.
        assert [r["idempotency_key"] for r in received] == [key for _, key in sorted(notes)]
        assert [r["data"]["n"] for r in received] == [
            n for _, n in sorted((qid, n) for n, (qid, _) in enumerate(notes))]
        paid = fakes.service("payment").records
        assert [c["idempotency_key"] for c in paid] == [key for _, key in sorted(charges)]
        assert len({c["idempotency_key"] for c in paid}) == PAYMENTS
        # Some were sent again after the restart (their marks died with the process): the
        # upstream saw them twice and did them once, thanks to the key.
        assert fakes.requests("notification") >= NOTIFICATIONS
        assert await asyncio.to_thread(read_states, tmp_path / "var" / "proxy.db") == {
            "notification.notifications:delivered": NOTIFICATIONS, "payment.charges:delivered": PAYMENTS}


CACHE_CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               open_timeout_ms: 600000, max_open_timeout_ms: 600000, timeout_ms: 2000}
    services:
      inventory:
        upstream: $inventory
        routes:
          stock:
            match: {methods: [GET], path: /stock}
            fallback: {type: cache, max_age_s: 60, max_entries: 100, scale: {available: 0.5},
                       default_file: inventory-unknown.json}
"""


async def get_json(proxy, path: str) -> tuple[int, dict[str, str], object]:
    async with proxy.session.get(proxy.url(path)) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


async def test_cached_stock_survives_a_restart_during_an_outage_with_its_true_age(start_proxy, fakes):
    clock = FakeClock()
    proxy = await start_proxy(CACHE_CONFIG, clock=clock)
    assert (await get_json(proxy, "/inventory/stock/SKU-002"))[2] == {"sku": "SKU-002", "available": 34}
    clock.advance(30)
    assert (await get_json(proxy, "/inventory/stock/SKU-001"))[2] == {"sku": "SKU-001", "available": 17}
    # The outage: the breaker opens, and the proxy is restarted during it (31 s of wall time).
    await fakes.set_mode("inventory", "error", status=503)
    assert (await get_json(proxy, "/inventory/stock/SKU-050"))[0] == 503
    await proxy.close()
    clock.advance(31)
    seen = fakes.requests("inventory")

    restarted = await start_proxy(CACHE_CONFIG, clock=clock)
    assert restarted.app.cache_store.restored == 1  # SKU-002, 61 s old, is past max_age_s
    status, headers, body = await get_json(restarted, "/inventory/stock/SKU-001")
    assert (status, body) == (200, {"sku": "SKU-001", "available": 8})  # 17 × 0.5, floored
    assert {k: headers[k] for k in ("Age", "X-Fallback-Estimated", "X-Fallback", "X-Circuit-State")} == {
        "Age": "31", "X-Fallback-Estimated": "true", "X-Fallback": "cache", "X-Circuit-State": "open"}
    # So SKU-002 is not served: the default file answers, as for a sku never seen.
    status, headers, body = await get_json(restarted, "/inventory/stock/SKU-002")
    assert (status, "Age" in headers, body["available"], body["estimated"]) == (200, False, 0, True)
    assert fakes.requests("inventory") == seen  # all from the proxy's memory: the breaker is open
