"""proxy/fallbacks/queue.py: options, amounts and the acceptance bookkeeping on real SQLite."""

from __future__ import annotations

from decimal import Decimal

from proxy.core.clock import FakeClock
from proxy.config.model import FallbackSpec, Match, Policy, Route
from proxy.fallbacks.queue import FIND_KEY, QueueBook, QueueOptions, _decimal
from proxy.runtime.metrics import Metrics
from proxy.storage.sqlite import Storage

OPTIONS = {"max_depth": 10, "max_attempts": 4, "max_body_bytes": 1024, "amount_field": "payment.amount",
           "floor_limit": 100, "exposure_cap": 250.5, "retry_base_ms": 100, "retry_max_ms": 1000,
           "replay_timeout_ms": None}


def test_options_convert_units_once():
    options = QueueOptions.from_options(OPTIONS)
    assert options == QueueOptions(max_depth=10, max_attempts=4, max_body_bytes=1024,
                                   amount_field=("payment", "amount"), floor_limit=Decimal(100),
                                   exposure_cap=Decimal("250.5"), retry_base_s=0.1, retry_max_s=1.0,
                                   replay_timeout_s=None)
    assert options.is_limited
    assert [options.backoff_s(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert options.backoff_s(10_000) == 1.0  # no overflow on a very long outage


def test_amounts_are_exact_decimals_or_nothing():
    assert [_decimal(v) for v in (0, 10, 0.1, 2.675, 1e3)] == [
        Decimal(0), Decimal(10), Decimal("0.1"), Decimal("2.675"), Decimal("1000.0")]
    assert [_decimal(v) for v in (-1, True, "5", None, float("inf"), float("nan"))] == [None] * 6
    assert sum((_decimal(0.1) for _ in range(3)), Decimal(0)) == Decimal("0.3")


def queue_route(service: str) -> Route:
    return Route(service=service, name="r", match=Match(), policy=Policy(),
                 fallback=FallbackSpec(type="queue", options=OPTIONS))


async def test_counters_come_back_from_the_database(tmp_path):
    storage = Storage(tmp_path / "q.db")
    await storage.open()
    try:
        rows = [(1, "a.r", "pending", "10.5"), (2, "a.r", "pending", "0.25"), (3, "a.r", "delivered", "7"),
                (4, "a.r", "dead_letter", "1"), (5, "b.r", "pending", None), (9, "b.r", "delivered", None)]
        for item_id, queue, state, amount in rows:
            await storage.commit_promise(
                "INSERT INTO queue_items (id, queue, state, accepted_wall, updated_wall, method, target,"
                " headers, body, idempotency_key, amount) VALUES (?, ?, ?, 0, 0, 'POST', '/', '[]', x'', ?, ?)",
                (item_id, queue, state, f"k{item_id}", amount))
        metrics = Metrics()
        book = QueueBook(storage, FakeClock(), metrics)  # no registry: the workers wait, nothing is sent
        for service in ("a", "b", "c"):
            book.fallback(queue_route(service))
        await book.start()
        assert book.next_id == 10
        assert book.statuses() == [{"name": "a.r", "depth": 2, "dead_letter": 1, "exposure": 10.75},
                                   {"name": "b.r", "depth": 1, "dead_letter": 0, "exposure": 0.0},
                                   {"name": "c.r", "depth": 0, "dead_letter": 0, "exposure": 0.0}]
        gauges = [line for line in metrics.render().decode().splitlines()
                  if line.startswith(("fallback_queue_depth{", "fallback_queue_dead_letters{"))]
        assert gauges == ['fallback_queue_depth{queue="a.r"} 2.0', 'fallback_queue_depth{queue="b.r"} 1.0',
                          'fallback_queue_depth{queue="c.r"} 0.0',
                          'fallback_queue_dead_letters{queue="a.r"} 1.0',
                          'fallback_queue_dead_letters{queue="b.r"} 0.0',
                          'fallback_queue_dead_letters{queue="c.r"} 0.0']
        dead = await book.dead_letters("a.r")
        assert [(d["id"], d["method"], d["target"], d["idempotency_key"], d["attempts"]) for d in dead] == [
            (4, "POST", "/", "k4", 0)]
        await book.stop()
    finally:
        await storage.close()


async def test_the_key_lookup_uses_its_index(tmp_path):
    storage = await _open(tmp_path)
    try:
        plan = await storage.fetchall("EXPLAIN QUERY PLAN " + FIND_KEY, ("a.r", "k"))
        assert [row[-1] for row in plan] == [
            "SEARCH queue_items USING COVERING INDEX queue_items_by_key (queue=? AND idempotency_key=?)"]
    finally:
        await storage.close()


async def _open(tmp_path) -> Storage:
    storage = Storage(tmp_path / "q.db")
    await storage.open()
    return storage
