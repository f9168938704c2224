"""The fleet's queue in-process (§8): two or three `QueueBook`s, each on its own connection to one
real PostgreSQL, standing for replicas. Limits hold for the fleet, a client's key makes one row
whichever replica it reaches, and exactly one replica delivers each item, in order, with its key.
(Real processes, SIGKILL and a restarted database: tests/fleet/test_fleet_replicas.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.config.model import FallbackSpec, Match, Policy, Route, Service, Settings
from proxy.core.clock import FakeClock
from proxy.core.messages import Answer
from proxy.fallbacks.build import FallbackDeps, build_fallback
from proxy.fallbacks.queue import QueueBook
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry
from proxy.storage.postgres import PostgresStorage
from tests.fallbacks.test_replay import AiohttpClient, Harness

NAME = "payment.charges"
OPTIONS = {"max_depth": 1000, "max_attempts": 5, "max_body_bytes": 4096, "amount_field": "amount",
           "retry_base_ms": 10, "retry_max_ms": 50, "replay_timeout_ms": None}


class Replica(Harness):
    """One proxy of the fleet: the replay tests' harness on the shared PostgreSQL."""

    async def charge(self, amount: float, key: str | None = None) -> Answer:
        return await self.post({"amount": amount, "currency": "EUR", "order_id": key or "o"}, key)


@pytest.fixture
async def replicas(fakes, pg_url) -> AsyncIterator[Callable[..., Any]]:
    started: list[Replica] = []

    async def start(count: int, *, deliver: bool = True, **options: Any) -> list[Replica]:
        route = Route(service="payment", name="charges", match=Match(path="/charges"), policy=Policy(),
                      fallback=FallbackSpec(type="queue", options={**OPTIONS, **options}))
        settings = Settings(services=(Service(name="payment", upstream=fakes.url("payment"), routes=(route,)),))
        made = []
        for number in range(count):
            storage = PostgresStorage(pg_url)
            await storage.open()
            client = AiohttpClient()
            clock = FakeClock()
            book = QueueBook(storage, clock, client=client, poll_s=0.02, node_id=f"replica-{number}")
            deps = FallbackDeps(clock=clock, fallback_dir=None, storage=storage, queues=book)
            registry = Registry(settings, clock, Metrics(), lambda route, upstream: build_fallback(route, deps))
            breaker = registry.get(NAME).breaker  # type: ignore[union-attr]
            if deliver:
                book.attach(registry)  # without a registry a worker never sends
                breaker.disable()  # counts only: a FakeClock would keep an opened breaker open
            else:
                breaker.force_open()
            await book.start()
            replica = Replica(book, registry, storage, client, clock)
            started.append(replica)
            made.append(replica)
        return made

    yield start
    for replica in started:
        await replica.book.stop()
        await replica.client.session.close()
        await replica.storage.close()


def status(answer: Answer) -> tuple[int, str]:
    document = json.loads(answer.body)
    return answer.status, document.get("error", document.get("status"))


async def test_max_depth_holds_for_the_fleet_not_per_replica(replicas):
    a, b, c = await replicas(3, deliver=False, max_depth=10)
    answers = await asyncio.gather(*(replica.charge(1, f"{replica.book.node_id}-{n}")
                                     for n in range(15) for replica in (a, b, c)))
    assert sorted(status(answer) for answer in answers) == [(202, "queued")] * 10 + [(503, "queue_full")] * 35
    [(pending,)] = await a.storage.fetchall("SELECT count(*) FROM queue_items WHERE state = 'pending'")
    assert pending == 10
    await a.book.load_counts(a.queue)
    assert a.book.statuses()[0]["depth"] == 10  # the fleet's depth, whichever replica says it


async def test_the_exposure_cap_holds_for_the_fleet(replicas):
    a, b = await replicas(2, deliver=False, floor_limit=100, exposure_cap=250)
    answers = await asyncio.gather(*(replica.charge(40, f"{replica.book.node_id}-{n}")
                                     for n in range(6) for replica in (a, b)))
    assert sorted(status(answer) for answer in answers) == [(202, "queued")] * 6 + [(503, "offline_limit")] * 6
    [(total,)] = await a.storage.fetchall(
        "SELECT sum(amount::numeric) FROM queue_items WHERE state = 'pending'")
    assert total == 240
    over = await b.charge(101, "big")
    assert json.loads(over.body)["detail"] == "amount 101 exceeds floor_limit 100"


async def test_a_key_retried_on_another_replica_makes_one_row_and_one_answer(replicas):
    a, b = await replicas(2, deliver=False)
    first, second = await asyncio.gather(a.charge(5, "same-key"), b.charge(5, "same-key"))
    assert {first.status, second.status} == {202}
    assert first.headers["X-Queue-Id"] == second.headers["X-Queue-Id"]
    assert sorted(answer.headers.get("Idempotent-Replayed", "-") for answer in (first, second)) == ["-", "true"]
    assert await a.storage.fetchall("SELECT count(*) FROM queue_items") == [(1,)]


async def test_one_replica_delivers_each_item_once_in_order_with_its_key(replicas, fakes):
    await fakes.set_mode("payment", "down")
    accepted = await replicas(3)
    keys = [f"order-{n:03d}" for n in range(60)]
    ids = {}
    for n, key in enumerate(keys):  # one after another: acceptance order is known
        answer = await accepted[n % 3].charge(n + 1, key)
        assert answer.status == 202
        ids[key] = int(answer.headers["X-Queue-Id"])
    assert sorted(ids.values()) == [ids[key] for key in keys]  # ids follow acceptance order, fleet-wide
    await fakes.set_mode("payment", "healthy")
    async with asyncio.timeout(20):
        while len(fakes.service("payment").records) < len(keys):
            await asyncio.sleep(0.02)
        while (await accepted[0].storage.fetchall(
                "SELECT count(*) FROM queue_items WHERE state = 'pending'")) != [(0,)]:
            await asyncio.sleep(0.02)
    records = fakes.service("payment").records
    assert [r["idempotency_key"] for r in records] == keys
    assert [r["amount"] for r in records] == list(range(1, 61))
    # Refused calls while it was down never reached it; once up, no replica sent an item twice.
    assert fakes.requests("payment") == len(keys)
    owners = await accepted[0].storage.fetchall("SELECT owner FROM queue_leases")
    assert len(owners) == 1 and owners[0][0] in {"replica-0", "replica-1", "replica-2"}


async def test_a_stopped_replica_hands_its_lease_over_at_once(replicas, fakes):
    a, b = await replicas(2)
    await fakes.set_mode("payment", "down")
    await a.charge(1, "first")
    async with asyncio.timeout(10):  # someone holds the lease and keeps trying the head
        while not await a.storage.fetchall("SELECT owner FROM queue_leases WHERE owner <> ''"):
            await asyncio.sleep(0.02)
    [(owner,)] = await a.storage.fetchall("SELECT owner FROM queue_leases")
    holder, other = (a, b) if owner == "replica-0" else (b, a)
    await holder.book.stop()
    await fakes.set_mode("payment", "healthy")
    async with asyncio.timeout(5):  # well before the lease (timeout 5 s + 3 s) would expire
        while len(fakes.service("payment").records) < 1:
            await asyncio.sleep(0.02)
    assert [r["idempotency_key"] for r in fakes.service("payment").records] == ["first"]
    assert await other.storage.fetchall("SELECT owner FROM queue_leases") == [(other.book.node_id,)]


async def test_the_database_keeps_each_queue_s_counters_whoever_writes(replicas):
    [replica] = await replicas(1, deliver=False)
    for n in range(5):
        assert (await replica.charge(n + 1, f"k{n}")).status == 202
    storage = replica.storage
    for sql in ("UPDATE queue_items SET state = 'delivered' WHERE idempotency_key = 'k0'",
                "UPDATE queue_items SET state = 'dead_letter' WHERE idempotency_key = 'k1'",
                "UPDATE queue_items SET attempts = 3 WHERE idempotency_key = 'k2'",
                "UPDATE queue_items SET state = 'pending' WHERE idempotency_key = 'k1'",  # sent again
                "DELETE FROM queue_items WHERE idempotency_key = 'k4'"):
        await storage.commit_promise(sql)
    counters = await storage.fetchall("SELECT depth, exposure FROM queue_counters WHERE queue = ?", (NAME,))
    recount = await storage.fetchall("SELECT count(*), sum(amount::numeric) FROM queue_items"
                                     " WHERE queue = ? AND state = 'pending'", (NAME,))
    assert counters == recount == [(3, 9)]  # k1 (2), k2 (3), k3 (4)
    await replica.book.load_counts(replica.queue)
    assert replica.book.statuses()[0]["depth"] == 3 and replica.book.statuses()[0]["exposure"] == 9.0
