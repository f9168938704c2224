"""`server.upstream_max_connections`: at most that many connections to an upstream, calls
beyond it wait in order for one to be given back, within their own timeout."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.test_wire import Upstream

CONFIG = """
    storage: {path: $db}
    server: {upstream_max_connections: $pool}
    defaults: {failure_threshold: 0, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               timeout_ms: $timeout, max_concurrent: 0}
    services:
      up:
        upstream: $up
        routes:
          hang: {match: {path: /hang}, timeout_ms: 1500}
"""


class CountingUpstream(Upstream):
    """Answers each request after `delay_s` (or never, for paths under /hang), counting the
    connections it has open at once."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.open = 0
        self.most_open = 0
        self.accepted = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await super()._serve(reader, writer)
        finally:
            self.open -= 1

    def answer(self, head: bytes, body: bytes) -> list:
        if head.startswith(b"GET /hang"):
            return [3600.0]
        return [self.delay_s, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]


async def _get(proxy, path: str) -> int:
    async with proxy.session.get(proxy.url(path)) as response:
        await response.read()
        return response.status


@pytest.fixture
async def upstream():
    server = CountingUpstream(delay_s=0.05)
    await server.start()
    yield server
    await server.stop()


async def test_calls_beyond_the_bound_wait_for_a_connection_and_all_are_answered(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", pool="2", timeout="5000")
    statuses = await asyncio.gather(*(_get(proxy, f"/up/x{i}") for i in range(10)))
    assert statuses == [200] * 10
    assert len(upstream.received) == 10
    assert upstream.most_open <= 2 and upstream.accepted == 2  # two connections, reused in turn


async def test_a_call_waiting_past_its_timeout_is_a_504_and_the_bound_holds(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", pool="1", timeout="200")
    hung = asyncio.ensure_future(_get(proxy, "/up/hang"))  # holds the only connection for 1.5 s
    while not upstream.received:
        await asyncio.sleep(0.01)
    assert await _get(proxy, "/up/waits") == 504  # never sent: waited for the pool, then its timeout
    assert await hung == 504
    assert [head.split(b" ")[1] for head, _ in upstream.received] == [b"/hang"]
    assert upstream.accepted == 1
    # The slot came back with the hung connection's abort: the next call gets through.
    assert await _get(proxy, "/up/after") == 200


async def test_without_a_bound_concurrent_calls_open_connections_of_their_own(start_proxy, upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", pool="0", timeout="5000")
    statuses = await asyncio.gather(*(_get(proxy, f"/up/x{i}") for i in range(6)))
    assert statuses == [200] * 6
    assert upstream.accepted > 2
