"""proxy/fallbacks/replay.py: queued requests delivered to a real fake upstream, in order.

The replay worker talks to the upstream only through an `UpstreamClient`; here that is a small
aiohttp-backed client (tests may use aiohttp, the proxy does not), so every request really goes
over loopback to the fake payment service and its records say what arrived.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.config.model import FallbackSpec, Match, Policy, Route, Service, Settings, StorageSettings
from proxy.core.breaker import Breaker, State
from proxy.core.clock import FakeClock
from proxy.core.messages import Answer, Request
from proxy.core.outcome import Reason, UpstreamReply
from proxy.fallbacks.base import FallbackContext
from proxy.fallbacks.build import FallbackDeps, build_fallback
from proxy.fallbacks.queue import QueueBook, QueueState
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry, RouteRuntime
from proxy.storage.postgres import PostgresStorage
from proxy.storage.sqlite import Storage

NAME = "payment.charges"
OPTIONS = {"max_depth": 100, "max_attempts": 2, "max_body_bytes": 4096, "amount_field": None,
           "retry_base_ms": 10, "retry_max_ms": 20, "replay_timeout_ms": None}


class AiohttpClient:
    """An UpstreamClient on an aiohttp session, classifying failures as the proxy's does."""

    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))
        self.calls: list[tuple[str, str, str, float, float]] = []

    async def call(self, upstream: str, method: str, target: str, headers: list[tuple[str, str]],
                   body: bytes, *, timeout_s: float, connect_timeout_s: float) -> UpstreamReply:
        self.calls.append((upstream, method, target, timeout_s, connect_timeout_s))
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        try:
            async with self.session.request(method, URL(upstream + target, encoded=True), headers=headers,
                                            data=body, timeout=timeout, allow_redirects=False) as response:
                return UpstreamReply(response.status, await response.read(), sent=True)
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one too
            return UpstreamReply(None, reason=Reason.TIMEOUT, sent=False, detail=str(exc))
        except aiohttp.ClientConnectorError as exc:  # refused, DNS: the request never left
            return UpstreamReply(None, reason=Reason.UNREACHABLE, sent=False, detail=str(exc))
        except TimeoutError:
            return UpstreamReply(None, reason=Reason.TIMEOUT, sent=True, detail="timed out")
        except aiohttp.ClientError as exc:  # reset, closed mid-answer: it may have been received
            return UpstreamReply(None, reason=Reason.UNREACHABLE, sent=True, detail=str(exc))


@dataclass
class Harness:
    book: QueueBook
    registry: Registry
    storage: Storage | PostgresStorage
    client: AiohttpClient
    clock: FakeClock

    @property
    def runtime(self) -> RouteRuntime:
        runtime = self.registry.get(NAME)
        assert runtime is not None
        return runtime

    @property
    def breaker(self) -> Breaker:
        return self.runtime.breaker

    @property
    def queue(self) -> QueueState:
        state = self.book.get(NAME)
        assert state is not None
        return state

    async def post(self, document: dict[str, Any], key: str | None = None) -> Answer:
        """`document` handed to the queue fallback as a rejected POST /payment/charges."""
        headers = CIMultiDict({"Host": "proxy.test", "Content-Type": "application/json"})
        if key is not None:
            headers["Idempotency-Key"] = key
        request = Request("POST", "/payment/charges", headers, client_ip="127.0.0.1",
                          body=json.dumps(document).encode())
        ctx = FallbackContext(view=self.breaker.view(), reason=Reason.OPEN, maybe_delivered=False, body=None)
        assert self.runtime.fallback is not None
        answer = await self.runtime.fallback.serve(request, ctx)
        assert answer is not None
        return answer

    async def accept(self, document: dict[str, Any], key: str | None = None) -> int:
        answer = await self.post(document, key)
        assert answer.status == 202, answer
        return int(answer.headers["X-Queue-Id"])

    async def items(self) -> list[tuple[Any, ...]]:
        return await self.storage.fetchall(
            "SELECT id, state, attempts, last_error FROM queue_items ORDER BY id")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_url(request) -> str | None:
    """None: SQLite; else a fresh PostgreSQL database (made outside the event loop)."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
async def start(engine_url, fakes, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """A harness on each engine (PostgreSQL: a fleet of one, delivering under its lease)."""
    started: list[Harness] = []

    async def start(policy: Policy | None = None, *, with_client: bool = True, **options: Any) -> Harness:
        route = Route(service="payment", name="charges", match=Match(path="/charges"),
                      policy=policy or Policy(), fallback=FallbackSpec(type="queue", options={**OPTIONS, **options}))
        settings = Settings(storage=StorageSettings(path=str(tmp_path / "q.db")),
                            services=(Service(name="payment", upstream=fakes.url("payment"), routes=(route,)),))
        clock = FakeClock()
        storage = Storage(settings.storage.path) if engine_url is None else PostgresStorage(engine_url)
        await storage.open()
        client = AiohttpClient()
        book = QueueBook(storage, clock, client=client if with_client else None, poll_s=0.02)
        deps = FallbackDeps(clock=clock, fallback_dir=None, storage=storage, queues=book)
        registry = Registry(settings, clock, Metrics(), lambda route, upstream: build_fallback(route, deps))
        book.attach(registry)
        await book.start()
        harness = Harness(book, registry, storage, client, clock)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        await harness.book.stop()
        await harness.client.session.close()
        await harness.storage.close()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_replays_in_acceptance_order_with_their_keys_once_the_breaker_lets_calls_through(start, fakes):
    harness = await start()
    harness.breaker.force_open()
    ids = [await harness.accept({"amount": amount, "order_id": f"o-{amount}"}, key)
           for amount, key in ((3, "k-3"), (1, None), (2, "k-2"))]
    await asyncio.sleep(0.1)
    assert (fakes.requests("payment"), harness.queue.depth) == (0, 3)  # forced open: nothing is sent
    harness.breaker.force_closed()  # the transition wakes the worker
    await until(lambda: harness.queue.depth == 0)
    records = fakes.service("payment").records
    assert [r["amount"] for r in records] == [3, 1, 2]
    keys = [r["idempotency_key"] for r in records]
    assert keys[0] == "k-3" and keys[1].startswith("cp-") and keys[2] == "k-2"
    stored = await harness.storage.fetchall("SELECT idempotency_key FROM queue_items ORDER BY id")
    assert [k for (k,) in stored] == keys  # the key given at acceptance is the one replayed
    assert await harness.items() == [(i, "delivered", 1, None) for i in ids]
    upstream = fakes.url("payment")
    assert harness.client.calls == [(upstream, "POST", "/charges", 5.0, 1.0)] * 3


async def test_a_4xx_is_a_dead_letter_at_once_and_the_queue_moves_on(start, fakes):
    harness = await start()
    bad = await harness.accept({"amount": 0})  # the payment service answers 400
    good = await harness.accept({"amount": 5})
    await until(lambda: harness.queue.depth == 0)
    assert fakes.requests("payment") == 2
    assert [r["amount"] for r in fakes.service("payment").records] == [5]
    (_, state, attempts, error), delivered = await harness.items()
    assert (state, attempts) == ("dead_letter", 1) and error.startswith("HTTP 400: ")
    assert delivered == (good, "delivered", 1, None)
    assert harness.queue.dead == 1
    assert [d["id"] for d in await harness.book.dead_letters(NAME)] == [bad]


async def test_refused_connections_do_not_count_towards_max_attempts(start, fakes):
    harness = await start()
    harness.breaker.disable()  # only counts: refused calls must not open it and stop the replays
    await fakes.set_mode("payment", "down")
    item = await harness.accept({"amount": 7})
    await until(lambda: len(harness.client.calls) >= 5)
    [(_, state, attempts, error)] = await harness.items()
    assert (state, attempts, harness.queue.dead) == ("pending", 0, 0)  # max_attempts is 2
    assert error.startswith("unreachable: ")
    await fakes.set_mode("payment", "healthy")
    await until(lambda: harness.queue.depth == 0)
    assert await harness.items() == [(item, "delivered", 1, None)]
    assert [r["amount"] for r in fakes.service("payment").records] == [7]


async def test_answers_the_upstream_saw_count_and_end_in_a_dead_letter(start, fakes):
    harness = await start()
    harness.breaker.disable()
    await fakes.set_mode("payment", "error", status=503)
    await harness.accept({"amount": 7})
    await until(lambda: harness.queue.depth == 0)
    [(_, state, attempts, error)] = await harness.items()
    assert (state, attempts, fakes.requests("payment")) == ("dead_letter", 2, 2)
    assert error.startswith("HTTP 503: ")


async def test_stopping_mid_replay_gives_the_half_open_trial_back(start, fakes):
    harness = await start(Policy(failure_threshold=1, half_open_max_calls=1))
    breaker = harness.breaker
    permit = breaker.try_acquire()
    assert permit is not None
    breaker.record(permit, failed=True)
    harness.clock.advance(61)  # past open_timeout_ms: the next reader sees half_open
    assert breaker.state is State.HALF_OPEN
    await fakes.set_mode("payment", "hang")
    await harness.accept({"amount": 7})
    await until(lambda: fakes.requests("payment") == 1)  # the only trial is out, unanswered
    assert breaker.try_acquire() is None
    await harness.book.stop()
    trial = breaker.try_acquire()
    assert trial is not None  # released, not lost and not recorded as a failure
    assert breaker.state is State.HALF_OPEN
    [(_, state, attempts, _)] = await harness.items()
    assert (state, attempts) == ("pending", 0)
    await fakes.set_mode("payment", "healthy")


async def test_nothing_is_sent_or_counted_until_the_app_sets_the_client(start, fakes):
    harness = await start(with_client=False)
    item = await harness.accept({"amount": 7})
    await asyncio.sleep(0.2)  # several tries, each put back: max_attempts is 2
    [(_, state, attempts, error)] = await harness.items()
    assert (state, attempts, error, harness.queue.dead) == ("pending", 0, "no upstream client", 0)
    assert harness.breaker.view().calls_failure == 0  # the permit went back unrecorded
    harness.book.client = harness.client
    await until(lambda: harness.queue.depth == 0)
    assert await harness.items() == [(item, "delivered", 1, None)]
