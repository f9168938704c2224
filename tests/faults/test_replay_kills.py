"""kill -9 at random points of a queue replay, over and over (§5, "Prove it holds").

A real `python -m proxy run` process accepts N requests while its breaker is forced open
(admin API), then is started, let replay for a random 50–300 ms (seeded) and killed with
SIGKILL, again and again, until every request has been delivered. The upstream is a raw one in
this test: it records every request it gets (no de-duplication by Idempotency-Key, so every
re-send shows) and answers 201 after a delay, so that kills land mid-replay: while a request is
on its way, while the upstream is answering it, while its mark is being committed.

What must hold: every accepted request is delivered, nothing is lost, first deliveries come in
acceptance order, and each crash re-sends at most one request (the one in flight), so the
upstream sees at most N + kills requests. Bounded: the whole test within TEST_BUDGET_S.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import aiohttp

from tests.e2e.test_fallbacks_restart import ProxyProcess
from tests.raw_server import RawServer

N = 60
MIN_KILLS = 20
DELAY_S = 0.06  # each delivery takes the upstream this long: a 50–300 ms life delivers a few
SEED = 20240611
TEST_BUDGET_S = 60
ADMIN = {"Authorization": "Bearer t"}  # ProxyProcess sets CIRCUIT_PROXY_ADMIN_TOKEN=t
CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, success_threshold: 1, failure_rate_threshold: 0,
               slow_call_rate_threshold: 0, open_timeout_ms: 200, max_open_timeout_ms: 200,
               backoff_multiplier: 1.0, timeout_ms: 3000, connect_timeout_ms: 500}
    services:
      payment:
        upstream: $up
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, max_depth: 1000, retry_base_ms: 20, retry_max_ms: 100}
"""


class RecordingUpstream(RawServer):
    """Records (life of the proxy, Idempotency-Key) of every request, then answers 201 after
    DELAY_S. `open` counts its connections, so a test can wait until a dead proxy's last bytes
    have been read."""

    def __init__(self) -> None:
        super().__init__()
        self.deliveries: list[tuple[int, str]] = []
        self.life = 0
        self.open = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
                await reader.readexactly(int(fields.get("content-length", "0")))
                self.deliveries.append((self.life, fields.get("idempotency-key", "")))
                await asyncio.sleep(DELAY_S)
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def pending_in(db: Path) -> dict[str, int]:
    """States of the queue's rows, read while no proxy runs (on a thread: never on the loop)."""
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM queue_items GROUP BY state"))
    finally:
        conn.close()


async def admin(session: aiohttp.ClientSession, proxy: ProxyProcess, action: str) -> None:
    async with session.post(proxy.url(f"/admin/breakers/payment.charges/{action}"), headers=ADMIN) as response:
        assert response.status == 200, await response.text()


async def test_sigkill_at_random_points_of_a_replay_loses_nothing_and_resends_at_most_one_per_crash(
        write_config, tmp_path):
    upstream = RecordingUpstream()
    await upstream.start()
    db = tmp_path / "var" / "proxy.db"
    rng = random.Random(SEED)
    kills = 0
    try:
        async with asyncio.timeout(TEST_BUDGET_S), aiohttp.ClientSession() as session:
            proxy = ProxyProcess(write_config(CONFIG, up=f"http://127.0.0.1:{upstream.port}"),
                                 tmp_path / "proxy.log")
            try:
                await proxy.start(session)
                await admin(session, proxy, "force-open")
                accepted: list[tuple[int, str]] = []
                for n in range(N):  # one by one: acceptance order is the order sent
                    key = f"key-{n:03d}"
                    async with session.post(proxy.url("/payment/charges"), headers={"Idempotency-Key": key},
                                            json={"amount": 1 + n, "currency": "EUR", "order_id": f"o-{n}"}) as r:
                        assert r.status == 202, await r.text()
                        accepted.append((int(r.headers["X-Queue-Id"]), r.headers["Idempotency-Key"]))
                assert upstream.deliveries == []
                await admin(session, proxy, "reset")  # replay may begin; the first life starts now

                while True:
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                    await proxy.kill()
                    kills += 1
                    # Whatever the dead process had sent is read before the next life begins.
                    for _ in range(500):
                        if upstream.open == 0:
                            break
                        await asyncio.sleep(0.01)
                    assert upstream.open == 0
                    upstream.life += 1
                    states = await asyncio.to_thread(pending_in, db)
                    if states.get("pending", 0) == 0 and kills >= MIN_KILLS:
                        break
                    await proxy.start(session)
                    await admin(session, proxy, "reset")  # a no-op once the reset of a life is on disk
            finally:
                await proxy.stop()
    finally:
        await upstream.stop()

    keys = [key for _, key in sorted(accepted)]
    assert len(set(keys)) == N
    delivered = [key for _, key in upstream.deliveries]
    first: list[str] = []
    for key in delivered:
        if key not in first:
            first.append(key)
    assert first == keys  # every one delivered, nothing lost, in acceptance order
    assert states == {"delivered": N}  # nothing pending, nothing given up on
    assert len(delivered) <= N + kills, f"{len(delivered)} deliveries of {N} requests with {kills} kills"
    # More precisely: a re-send is only ever the first request of a life, and it is the request
    # that was in flight when the previous process died (the last one sent before).
    seen: set[str] = set()
    for index, (life, key) in enumerate(upstream.deliveries):
        if key in seen:
            assert index > 0 and upstream.deliveries[index - 1][0] < life, (
                f"{key} sent again in the middle of life {life}")
            assert upstream.deliveries[index - 1][1] == key, (
                f"life {life} re-sent {key}, but {upstream.deliveries[index - 1][1]} was in flight")
        seen.add(key)
    assert kills >= MIN_KILLS
