"""proxy/fallbacks/queue.py: options, amounts and the acceptance bookkeeping on real SQLite, and
the same acceptance on a real PostgreSQL (a fleet of one: the checks read the table)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from multidict import CIMultiDict

from proxy.config.model import FallbackSpec, Match, Policy, Route
from proxy.core.breaker import Breaker
from proxy.core.clock import FakeClock
from proxy.core.messages import Request
from proxy.core.outcome import Reason
from proxy.fallbacks.base import FallbackContext
from proxy.fallbacks.queue import FIND_KEY, QueueBook, QueueFallback, QueueOptions, _decimal
from proxy.fallbacks.replay import ReplayWorker
from proxy.runtime.metrics import Metrics
from proxy.storage.postgres import PostgresStorage
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


def queue_route(service: str, **options) -> Route:
    return Route(service=service, name="r", match=Match(), policy=Policy(),
                 fallback=FallbackSpec(type="queue", options={**OPTIONS, **options}))


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
            book.fallback(queue_route(service), ReplayWorker)
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


def context(reason: Reason = Reason.OPEN, *, maybe_delivered: bool = False) -> FallbackContext:
    view = Breaker("a.r", Policy(), FakeClock()).view()
    return FallbackContext(view=view, reason=reason, maybe_delivered=maybe_delivered, body=None)


def charge(amount: object, key: str | None = None) -> Request:
    headers = CIMultiDict({"Host": "shop.test", "Content-Type": "application/json", "Connection": "x-hop",
                           "X-Hop": "dropped", "X-Forwarded-For": "10.0.0.1", "Expect": "100-continue"})
    if key is not None:
        headers["Idempotency-Key"] = key
    body = json.dumps({"payment": {"amount": amount}}).encode()
    return Request("POST", "/a/charges/x%2Fy?mode=offline", headers, client_ip="192.0.2.7", body=body)


class NoWorker:
    """Stands for the replay worker: these tests look at acceptance only."""

    def __init__(self, book: QueueBook, state: object) -> None:
        pass

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_url(request) -> str | None:
    """None: SQLite; else a fresh PostgreSQL database (made outside the event loop)."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
async def any_storage(engine_url, tmp_path):
    """Each engine, open; closed by the test."""
    storage = Storage(tmp_path / "q.db") if engine_url is None else PostgresStorage(engine_url)
    await storage.open()
    return storage


async def test_acceptance_stores_what_replay_sends_and_answers_202(any_storage):
    storage = any_storage
    book = QueueBook(storage, FakeClock())
    fallback = book.fallback(queue_route("a"), NoWorker)
    assert isinstance(fallback, QueueFallback)
    try:
        assert await fallback.serve(charge(5), context()) is None  # not started: nothing accepted
        await book.start()
        request = charge(12.5)
        answer = await fallback.serve(request, context())
        assert answer is not None
        document = json.loads(answer.body)
        key = document["idempotency_key"]
        assert key.startswith("cp-")
        assert (answer.status, document, answer.headers["X-Queue-Id"], answer.headers["Idempotency-Key"]) == (
            202, {"status": "queued", "queue": "a.r", "queue_id": 1, "idempotency_key": key}, "1", key)
        assert request.detail == "queue_id=1"
        [(method, target, headers, body, amount)] = await storage.fetchall(
            "SELECT method, target, headers, body, amount FROM queue_items")
        assert (method, target, json.loads(body), amount) == (
            "POST", "/charges/x%2Fy?mode=offline", {"payment": {"amount": 12.5}}, "12.5")
        assert json.loads(headers) == [
            ["Content-Type", "application/json"], ["X-Forwarded-For", "10.0.0.1, 192.0.2.7"],
            ["X-Forwarded-Proto", "http"], ["X-Forwarded-Host", "shop.test"], ["Idempotency-Key", key]]
        assert book.statuses() == [{"name": "a.r", "depth": 1, "dead_letter": 0, "exposure": 12.5}]
    finally:
        await book.stop()
        await storage.close()


async def test_a_retried_key_gets_the_first_answer_and_limits_refuse(any_storage):
    storage = any_storage
    book = QueueBook(storage, FakeClock())
    fallback = book.fallback(queue_route("a"), NoWorker)
    await book.start()
    try:
        first = await fallback.serve(charge(100, "k-1"), context())
        retry = charge(100, "k-1")
        again = await fallback.serve(retry, context(Reason.UNREACHABLE, maybe_delivered=True))
        assert first is not None and again is not None
        assert (again.status, again.body, again.headers["Idempotent-Replayed"]) == (202, first.body, "true")
        assert retry.detail == "queue_id=1 replayed"
        # Maybe delivered and no key of the client's: a replay could do it twice, so no 202.
        assert await fallback.serve(charge(1), context(Reason.TIMEOUT, maybe_delivered=True)) is None
        over = charge(100.01)
        refused = await fallback.serve(over, context())
        assert refused is not None and (refused.status, json.loads(refused.body)) == (503, {
            "error": "offline_limit", "breaker": "a.r",
            "detail": "payment.amount 100.01 exceeds floor_limit 100"})
        assert over.detail == "offline_limit: payment.amount 100.01 exceeds floor_limit 100"
        assert (await fallback.serve(charge(100), context())).status == 202  # type: ignore[union-attr]
        capped = await fallback.serve(charge(60), context())  # 200 + 60 > exposure_cap 250.5
        assert capped is not None and json.loads(capped.body)["error"] == "offline_limit"
        assert book.statuses() == [{"name": "a.r", "depth": 2, "dead_letter": 0, "exposure": 200.0}]
    finally:
        await book.stop()
        await storage.close()


async def _open(tmp_path) -> Storage:
    storage = Storage(tmp_path / "q.db")
    await storage.open()
    return storage
