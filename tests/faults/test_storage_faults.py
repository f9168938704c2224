"""Faults of the proxy's own storage, through the real proxy (§5, "Prove it holds").

A full disk and a read-only database, each made to happen mid-run on the proxy's one storage
connection, then taken away again, with no restart:

- the data path keeps serving (an inventory GET through another route is still 200);
- queue acceptance answers 503 `queue_unavailable`, and never a 202 that is not stored: every
  202 is a row, every row a 202, and once the breaker lets calls through again, exactly the
  202s reach the upstream, in order;
- records written meanwhile (fallback_logs rows, breaker state rows) that cannot be stored are
  counted in `storage.dropped` and logged: every record is either in the file or counted;
- once the fault is gone, acceptance answers 202 again by itself.

The faults are SQLite's own, so they need neither a mount nor a privilege:
- full disk: `Storage.set_max_pages` (`PRAGMA max_page_count`): no room to grow is SQLITE_FULL,
  exactly what a full file system gives;
- read-only: `Storage.set_read_only` (`PRAGMA query_only`). A chmod 0444 of the file, its -wal
  and -shm would not do: root ignores it (these tests may run as root), and even for another
  user a mode is only checked at open(), so the connection the proxy already holds would go on
  writing.

(The database locked by another process is tests/e2e/test_queue_durability.py.)
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import time
from collections.abc import Awaitable, Callable

from proxy.storage.sqlite import Storage, StorageError

CONFIG = """
    storage: {path: $db, snapshot_interval_s: 3600}
    defaults: {failure_threshold: 1, success_threshold: 1, failure_rate_threshold: 0,
               slow_call_rate_threshold: 0, open_timeout_ms: 60000, timeout_ms: 1000,
               connect_timeout_ms: 500}
    services:
      payment:
        upstream: $payment
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, max_depth: 100000, max_attempts: 3, retry_base_ms: 10,
                       retry_max_ms: 20}
      inventory:
        upstream: $inventory
"""
PAD = "x" * 3000  # one queue row per page: a full file refuses every new one
UNAVAILABLE = {"error": "queue_unavailable", "breaker": "payment.charges",
               "detail": "the request could not be stored; nothing was queued"}
FALLBACK_LOG = "INSERT INTO fallback_logs"
BREAKER_ROW = "INSERT INTO circuit_breakers"


async def until(predicate: Callable[[], Awaitable[object]], what: str, timeout_s: float = 10.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def drain(storage: Storage) -> None:
    """Returns once every record enqueued before it was written or dropped: a promise takes the
    buffered records into its own batch, and is settled after them."""
    try:
        await storage.commit_promise("SELECT 1")
    except StorageError:
        pass  # the fault refuses the promise too; the records before it were dealt with all the same


class Charges:
    """Charges sent through the proxy, what each got, and the keys the proxy promised to keep."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.n = 0
        self.accepted: list[tuple[int, str]] = []  # (queue id, Idempotency-Key) of each 202
        self.refused = 0

    async def one(self) -> int:
        self.n += 1
        # Every other one brings its own key (its acceptance looks the key up in the same
        # transaction); the others get one made by the proxy (a plain insert).
        key = f"k-{self.n}" if self.n % 2 else None
        body = {"amount": 10, "currency": "EUR", "order_id": f"o-{self.n}", "pad": PAD}
        async with self.proxy.session.post(self.proxy.url("/payment/charges"), json=body,
                                           headers={"Idempotency-Key": key} if key else {}) as response:
            document = await response.json(content_type=None)
            if response.status == 202:
                assert key is None or response.headers["Idempotency-Key"] == key
                self.accepted.append((int(response.headers["X-Queue-Id"]), response.headers["Idempotency-Key"]))
            else:
                assert (response.status, document) == (503, UNAVAILABLE)
                assert "Retry-After" not in response.headers  # not circuit_open
                self.refused += 1
            return response.status

    async def burst(self, n: int) -> list[int]:
        return list(await asyncio.gather(*(self.one() for _ in range(n))))


async def inventory_ok(proxy) -> None:
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
        assert response.status == 200, await response.text()
        assert "X-Fallback" not in response.headers


async def stored_keys(proxy) -> list[tuple[int, str]]:
    return [(qid, key) for qid, key in await proxy.app.storage.fetchall(
        "SELECT id, idempotency_key FROM queue_items WHERE queue = 'payment.charges' ORDER BY id")]


async def storage_fault_scenario(start_proxy, fakes, caplog,
                                 break_storage: Callable[[Storage], Awaitable[None]],
                                 repair_storage: Callable[[Storage], Awaitable[None]], *,
                                 full_at_once: bool) -> None:
    caplog.set_level(logging.WARNING)
    proxy = await start_proxy(CONFIG)
    app = proxy.app
    storage = app.storage
    app.queues.poll_s = 0.02
    charges_breaker = app.registry.get("payment.charges").breaker
    charges_breaker.force_open()  # the queue fallback answers every charge
    await inventory_ok(proxy)
    charges = Charges(proxy)
    assert await charges.burst(3) == [202] * 3
    await drain(storage)

    # Every record from here on, so each can be found in the file or in the dropped count.
    enqueued: list[str] = []
    record = storage.record

    def counting_record(sql, params=()):
        enqueued.append(sql)
        return record(sql, params)
    storage.record = counting_record  # type: ignore[method-assign]
    dropped_before = storage.dropped
    broken_at = app.clock.wall()
    caplog.clear()

    await break_storage(storage)
    # Fill the file: queue rows until acceptance fails (at once for a read-only file).
    for _ in range(200):
        status = await charges.one()
        await inventory_ok(proxy)  # the data path does not depend on the disk
        if status == 503:
            break
    else:
        raise AssertionError("acceptance never failed")
    if full_at_once:
        assert charges.refused == 1 and len(charges.accepted) == 3
    accepted_while_filling = len(charges.accepted)
    # Full now: no 202 any more, concurrent or not, and still no circuit_open.
    assert await charges.burst(60) == [503] * 60
    await inventory_ok(proxy)
    # A breaker transition while storage is broken: its row is a record like any other.
    app.registry.get("inventory.default").breaker.force_closed()
    await inventory_ok(proxy)
    await drain(storage)

    # Never a 202 that is not stored: every 202 is a row, every row a 202.
    assert await stored_keys(proxy) == sorted(charges.accepted)
    assert app.queues.statuses()[0]["depth"] == len(charges.accepted)
    assert len(charges.accepted) == accepted_while_filling
    # Nothing lost silently: each record is in the file or counted as dropped, and logged.
    assert all(sql.startswith((FALLBACK_LOG, BREAKER_ROW)) for sql in enqueued)
    assert sum(sql.startswith(BREAKER_ROW) for sql in enqueued) == 1
    fallback_rows = (await storage.fetchall("SELECT count(*) FROM fallback_logs WHERE at_wall >= ?",
                                            (broken_at,)))[0][0]
    breaker_row = (await storage.fetchall(
        "SELECT state FROM circuit_breakers WHERE name = 'inventory.default'"))[0][0]
    dropped = storage.dropped - dropped_before
    assert fallback_rows + (breaker_row == "forced_closed") + dropped == len(enqueued)
    assert dropped > 0  # some were lost ...
    dropped_logs = [r for r in caplog.records if r.name == "proxy.storage.sqlite" and "dropped" in r.getMessage()]
    assert dropped_logs, "records dropped without a word in the log"  # ... and said so
    assert any(r.name == "proxy.fallbacks.queue" and "not stored" in r.getMessage() for r in caplog.records)

    # The fault goes away: acceptance recovers by itself, no restart.
    await repair_storage(storage)
    assert await charges.one() == 202
    assert await charges.burst(5) == [202] * 5
    await inventory_ok(proxy)
    await drain(storage)
    assert await stored_keys(proxy) == sorted(charges.accepted)
    assert app.queues.statuses()[0]["depth"] == len(charges.accepted)
    dropped_after_repair = storage.dropped

    # And exactly the 202s reach the upstream, in acceptance order, once it may be called.
    charges_breaker.reset()
    paid = fakes.service("payment").records
    await until(lambda: _true(len(paid) >= len(charges.accepted)), "replay of every 202")
    await until(lambda: _true(app.queues.statuses()[0]["depth"] == 0), "marks committed")
    assert [c["idempotency_key"] for c in paid] == [key for _, key in sorted(charges.accepted)]
    assert storage.dropped == dropped_after_repair  # nothing more lost once repaired


async def _true(value: bool) -> bool:
    return value


async def fill_up(storage: Storage) -> None:
    """As small as SQLite allows: the file's current size, no room to grow."""
    pages = (await storage.fetchall("PRAGMA page_count"))[0][0]
    assert await storage.set_max_pages(1) == pages


async def test_a_full_disk_refuses_acceptance_honestly_and_recovers_without_restart(start_proxy, fakes, caplog):
    limits: list[int] = []

    async def fill(storage: Storage) -> None:
        limits.append((await storage.fetchall("PRAGMA max_page_count"))[0][0])
        await fill_up(storage)

    async def free(storage: Storage) -> None:
        assert await storage.set_max_pages(limits[0]) == limits[0]

    await storage_fault_scenario(start_proxy, fakes, caplog, fill, free, full_at_once=False)


async def test_a_read_only_database_refuses_acceptance_honestly_and_recovers_without_restart(
        start_proxy, fakes, caplog):
    async def read_only(storage: Storage) -> None:
        await storage.set_read_only(True)

    async def writable(storage: Storage) -> None:
        await storage.set_read_only(False)

    await storage_fault_scenario(start_proxy, fakes, caplog, read_only, writable, full_at_once=True)


async def read_only(storage: Storage) -> None:
    await storage.set_read_only(True)


@pytest.mark.parametrize("fault", [fill_up, read_only], ids=["full_disk", "read_only"])
async def test_a_broken_disk_is_logged_once_per_episode_not_once_per_request(start_proxy, caplog, fault):
    caplog.set_level(logging.WARNING)
    proxy = await start_proxy(CONFIG)
    proxy.app.registry.get("payment.charges").breaker.force_open()
    charges = Charges(proxy)
    assert await charges.burst(3) == [202] * 3
    await drain(proxy.app.storage)
    caplog.clear()
    await fault(proxy.app.storage)
    started = time.monotonic()
    for _ in range(100):  # one after another: a hundred requests, a hundred failed batches
        await charges.one()
    await drain(proxy.app.storage)
    elapsed = time.monotonic() - started
    assert charges.refused >= 90 and proxy.app.storage.dropped > 0
    lines = [f"{r.levelname} {r.getMessage()[:70]}" for r in caplog.records if r.levelno >= logging.WARNING]
    # Each kind of trouble (failed batch, dropped record, requests not stored, buffer) is said
    # at most once per 10 s, with a count: a few lines per 10 s, not one per request.
    allowed = 4 * (int(elapsed // 10) + 2)
    assert len(lines) <= allowed, f"{len(lines)} lines in {elapsed:.0f} s for {charges.refused} refused: {lines[:6]}"


async def test_a_promise_that_writes_nothing_is_settled(tmp_path):
    storage = Storage(tmp_path / "p.db", schemas={})
    await storage.open()
    try:
        await asyncio.wait_for(storage.transact(lambda: ()), 2)
    finally:
        await storage.close()
