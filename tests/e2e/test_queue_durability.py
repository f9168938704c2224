"""The queue when its own storage is in trouble, and after a crash (§5).

A database locked by another process: acceptance answers 503 queue_unavailable within the
route's timeout and stores nothing (never a 202 it cannot keep, never circuit_open), then
recovers by itself. A delivery is committed before the next item of the queue is sent, so a
crash re-sends at most the item in flight: the upstream checks the database on every request.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time

from tests.e2e.test_fallbacks_queue import until
from tests.e2e.test_wire import Upstream

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, success_threshold: 1, failure_rate_threshold: 0,
               slow_call_rate_threshold: 0, open_timeout_ms: 60000, timeout_ms: 300}
    services:
      payment:
        upstream: $up
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, max_depth: 100, max_attempts: 3, retry_base_ms: 10, retry_max_ms: 20}
"""


class DatabaseLock:
    """Another process's exclusive lock on the proxy's database, held in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.held = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            self.held.set()
            self.release.wait(30)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    async def __aenter__(self) -> DatabaseLock:
        self.thread.start()
        await asyncio.to_thread(self.held.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await asyncio.to_thread(self.thread.join, 10)


async def charge(proxy, n: int) -> tuple[int, dict]:
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": n, "order_id": f"o-{n}"},
                                  headers={"Idempotency-Key": f"k-{n}"}) as response:
        return response.status, await response.json(content_type=None)


async def test_a_locked_database_gets_queue_unavailable_in_time_and_stores_nothing(start_proxy):
    upstream = Upstream()
    await upstream.start()
    try:
        proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")
        proxy.app.registry.get("payment.charges").breaker.force_open()
        async with DatabaseLock(proxy.settings.storage.path):
            started = time.monotonic()
            answers = await asyncio.gather(*(charge(proxy, n) for n in range(5)))
            waited = time.monotonic() - started
        assert answers == [(503, {"error": "queue_unavailable", "breaker": "payment.charges",
                                  "detail": "the request could not be stored; nothing was queued"})] * 5
        assert waited < 5  # the route's 300 ms, plus at most one locked commit attempt (1 s)
        assert await proxy.app.storage.fetchall("SELECT count(*) FROM queue_items") == [(0,)]
        assert proxy.app.queues.statuses()[0]["depth"] == 0
        assert await charge(proxy, 9) == (202, {"status": "queued", "queue": "payment.charges",
                                                "queue_id": 1, "idempotency_key": "k-9"})
    finally:
        await upstream.stop()


async def test_each_delivery_is_committed_before_the_next_item_is_sent(start_proxy, config_dir):
    db = str(config_dir / "var" / "proxy.db")
    seen_delivered: list[int] = []

    class Checking(Upstream):
        def answer(self, head: bytes, body: bytes):
            # What a crash right now would leave on disk, read as another process would (on a
            # thread of its own: the event loop never opens SQLite itself).
            def read() -> None:
                conn = sqlite3.connect(db)
                try:
                    (count,), = conn.execute("SELECT count(*) FROM queue_items WHERE state = 'delivered'")
                finally:
                    conn.close()
                seen_delivered.append(count)
            reader = threading.Thread(target=read)
            reader.start()
            reader.join(10)
            return b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"

    upstream = Checking()
    await upstream.start()
    try:
        proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")
        proxy.app.queues.poll_s = 0.02
        breaker = proxy.app.registry.get("payment.charges").breaker
        breaker.force_open()
        for n in range(6):
            assert (await charge(proxy, n))[0] == 202
        breaker.reset()
        await until(lambda: _delivered(proxy, 6), "six deliveries")
        assert seen_delivered == [0, 1, 2, 3, 4, 5]
        assert [json.loads(b)["order_id"] for _, b in upstream.received] == [f"o-{n}" for n in range(6)]
    finally:
        await upstream.stop()


async def _delivered(proxy, n: int) -> bool:
    rows = await proxy.app.storage.fetchall("SELECT count(*) FROM queue_items WHERE state = 'delivered'")
    return rows == [(n,)]
