"""A fleet of real proxies on one real PostgreSQL (§8): three `python -m proxy run` processes.

500 payments are accepted across the three while the payment service is down. Once it is back
(a little slow, so a kill lands mid-delivery), the replica holding the queue's lease, which
accepted a third of them itself, is SIGKILLed and never restarted. What must hold: another
replica takes the lease over once it expires and the fleet delivers every accepted payment
exactly once (the payment service's `GET /charges`, counted by Idempotency-Key), in acceptance
order, re-sending at most the one that was in flight (with its key, so not charged twice).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.e2e.test_fallbacks_restart import ProxyProcess

TEST_BUDGET_S = 90
CONFIG = """
    storage: {url: "$pgurl", snapshot_interval_s: 3600}
    cluster: {node_id: $node}
    defaults: {failure_threshold: 1, success_threshold: 1, failure_rate_threshold: 0,
               slow_call_rate_threshold: 0, open_timeout_ms: 200, max_open_timeout_ms: 200,
               backoff_multiplier: 1.0, timeout_ms: 1000, connect_timeout_ms: 300}
    services:
      payment:
        upstream: $payment
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, max_depth: 100000, retry_base_ms: 20, retry_max_ms: 100}
"""


async def until(predicate, what: str, timeout_s: float) -> None:
    """Poll `predicate` (plain or async) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not (await result if inspect.isawaitable(result := predicate()) else result):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def accept(session: aiohttp.ClientSession, proxies: list[ProxyProcess], count: int) -> list[tuple[int, str]]:
    """POST `count` payments round-robin over the proxies; (queue id, key) of each, all 202."""
    gate = asyncio.Semaphore(48)

    async def one(n: int) -> tuple[int, str]:
        key = f"pay-{n:04d}"
        body = {"amount": 10 + n % 7, "currency": "EUR", "order_id": f"o-{n}"}
        async with gate, session.post(proxies[n % len(proxies)].url("/payment/charges"), json=body,
                                      headers={"Idempotency-Key": key}) as response:
            assert response.status == 202, await response.text()
            return int(response.headers["X-Queue-Id"]), key
    return await asyncio.gather(*(one(n) for n in range(count)))


@pytest.mark.parametrize("count", [500, pytest.param(1500, marks=[pytest.mark.slow, pytest.mark.timeout(300)])])
async def test_a_killed_replica_s_queue_is_delivered_exactly_once_by_the_fleet(
        write_config, fakes, pg_url, tmp_path: Path, count: int):
    scale = count / 500
    async with asyncio.timeout(TEST_BUDGET_S * scale):
        proxies = [ProxyProcess(write_config(CONFIG, name=f"r{n}.yaml", pgurl=pg_url, node=f"r{n}"),
                                tmp_path / f"r{n}.log") for n in range(3)]
        database = await asyncpg.connect(pg_url)
        async with aiohttp.ClientSession() as session:
            try:
                await asyncio.gather(*(proxy.start(session) for proxy in proxies))
                await fakes.set_mode("payment", "down")
                accepted = await accept(session, proxies, count)
                ids = sorted(accepted)
                assert len({queue_id for queue_id, _ in ids}) == count  # fleet-wide ids, none twice

                await fakes.set_mode("payment", "slow", latency_ms=10)
                charges = fakes.service("payment").records
                await until(lambda: len(charges) >= count // 5, "deliveries", 30)
                owner = await database.fetchval("SELECT owner FROM queue_leases WHERE queue = 'payment.charges'")
                victim = proxies[int(owner.removeprefix("r"))]
                await victim.kill()  # mid-delivery, never restarted
                delivered_by_victim = len(charges)
                assert delivered_by_victim < count

                async def all_delivered() -> bool:
                    pending = await database.fetchval("SELECT count(*) FROM queue_items WHERE state <> 'delivered'")
                    return pending == 0 and len(charges) >= count
                await until(all_delivered, "the fleet to deliver the lost replica's queue", 45 * scale)

                # Only the payment in flight at the kill may have been sent twice.
                assert count <= fakes.requests("payment") <= count + 1
                async with session.get(fakes.url("payment") + "/charges") as response:
                    listed = await response.json()
                keys = [charge["idempotency_key"] for charge in listed]
                assert keys == [key for _, key in ids]  # each once, in acceptance order
                new_owner = await database.fetchval("SELECT owner FROM queue_leases")
                assert new_owner != owner and new_owner in {"r0", "r1", "r2"}
            finally:
                await database.close()
                await asyncio.gather(*(proxy.stop() for proxy in proxies))
