"""Faults on the wire, through the real proxy (§3, §4, "Prove it holds"): an upstream that resets
the connection mid-response, and a client that vanishes mid-upload.

Both must leave nothing behind: no upstream connection held open (`pool.open_count`, checked
against what the upstream itself sees), the bulkhead slot free (`in_flight` 0 in /status.json),
no breaker permit held. Raw sockets on both sides, because clients and servers normalise
exactly what these tests need to break.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from tests.raw_server import RawServer

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 1000, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               timeout_ms: 5000, connect_timeout_ms: 500}
    services:
      up:
        upstream: $up
        routes:
          trial:
            match: {path: /trial}
            failure_threshold: 1
            success_threshold: 1
            half_open_max_calls: 1
            open_timeout_ms: 100
            max_open_timeout_ms: 100
            jitter: 0
"""


class RawUpstream(RawServer):
    """Answers `/reset` with a head and part of its body, then RST (SO_LINGER 0 + close);
    `/fail` with 500; anything else with 200 once the whole request body is in. Counts the
    connections it has open and the request heads it got."""

    def __init__(self) -> None:
        super().__init__()
        self.open = 0
        self.heads: list[bytes] = []
        self.head_seen = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                self.head_seen.set()
                lower = head.lower()
                if b"\r\ncontent-length:" in lower:
                    await reader.readexactly(int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0]))
                path = head.split(b" ")[1]
                if path.startswith(b"/up/reset") or path.startswith(b"/reset"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
                                 b"only part")
                    await writer.drain()
                    await asyncio.sleep(0.05)  # the proxy has forwarded the part it got
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST, not FIN
                    return
                if path.endswith(b"/fail"):
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
        finally:
            self.open -= 1


async def start(start_proxy):
    upstream = RawUpstream()
    await upstream.start()
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")
    return proxy, upstream


async def eventually(check, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def entry(proxy, breaker: str) -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        document = await response.json()
    return next(b for b in document["breakers"] if b["name"] == breaker)


async def metric(proxy, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the series is not there)."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    async with proxy.session.get(proxy.url("/metrics")) as response:
        for line in (await response.text()).splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_an_upstream_reset_mid_response_breaks_the_answer_and_leaks_nothing(start_proxy):
    proxy, upstream = await start(start_proxy)
    pool = proxy.app.server.env.pool
    try:
        for n in range(1, 4):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
            writer.write(b"GET /up/reset HTTP/1.1\r\nHost: proxy\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 100" in head
            rest = await asyncio.wait_for(reader.read(), 10)  # then the connection ends ...
            assert rest == b"only part"  # ... short of its Content-Length: visibly broken
            writer.close()

            assert (await entry(proxy, "up.default"))["calls"] == {"success": 0, "failure": n, "rejected": 0}
            assert await metric(proxy, "proxy_requests_total", breaker="up.default", code="truncated") == n
            assert await metric(proxy, "proxy_requests_total", breaker="up.default", code="200") == 0
            await eventually(lambda: pool.open_count == 0 and upstream.open == 0, "the reset connection gone")
            assert (await entry(proxy, "up.default"))["in_flight"] == 0
        # And the route still works, on a fresh connection.
        async with proxy.session.get(proxy.url("/up/ok")) as response:
            assert (response.status, await response.read()) == (200, b"ok")
        assert (await entry(proxy, "up.default"))["in_flight"] == 0
    finally:
        await upstream.stop()


async def vanish_mid_upload(proxy, upstream: RawUpstream, path: bytes) -> None:
    """POST half of a 2000-byte body, wait until the upstream has the head, then reset."""
    upstream.head_seen.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\nContent-Length: 2000\r\n\r\n" + b"a" * 1000)
    await writer.drain()
    await asyncio.wait_for(upstream.head_seen.wait(), 10)  # the call is under way upstream
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_client_vanishing_mid_upload_leaks_nothing_and_counts_nothing(start_proxy):
    proxy, upstream = await start(start_proxy)
    pool = proxy.app.server.env.pool
    try:
        async with proxy.session.post(proxy.url("/up/echo"), data=b"warm") as response:
            assert response.status == 200
        await eventually(lambda: pool.open_count == upstream.open == 1, "one idle pooled connection")
        before = await entry(proxy, "up.default")

        for _ in range(3):
            await vanish_mid_upload(proxy, upstream, b"/up/upload")
            # The half-sent request cannot be finished: its upstream connection is closed, not
            # pooled and not left open; the idle one it used is not replaced behind our back.
            await eventually(lambda: pool.open_count == upstream.open == 0, "the upstream connection closed")
            now = await entry(proxy, "up.default")
            assert now["in_flight"] == 0
            assert now["calls"] == before["calls"]  # neither success nor failure
        async with proxy.session.post(proxy.url("/up/echo"), data=b"again") as response:
            assert (response.status, await response.read()) == (200, b"ok")
        await eventually(lambda: pool.open_count == upstream.open == 1, "back to one idle connection")
        assert (await entry(proxy, "up.default"))["calls"]["success"] == before["calls"]["success"] + 1
    finally:
        await upstream.stop()


async def test_a_client_vanishing_mid_upload_gives_back_the_half_open_trial(start_proxy):
    proxy, upstream = await start(start_proxy)
    pool = proxy.app.server.env.pool
    breaker = proxy.app.registry.get("up.trial").breaker
    try:
        async with proxy.session.get(proxy.url("/up/trial/fail")) as response:
            assert response.status == 500  # failure_threshold 1: open
        assert breaker.state.value == "open"
        await asyncio.sleep(0.15)  # open_timeout_ms 100: the next call is the one trial
        assert (await entry(proxy, "up.trial"))["state"] == "half_open"
        before = (await entry(proxy, "up.trial"))["calls"]

        await vanish_mid_upload(proxy, upstream, b"/up/trial/upload")  # takes the only trial permit ...
        await eventually(lambda: pool.open_count == upstream.open == 0, "the upstream connection closed")
        now = await entry(proxy, "up.trial")
        # ... and gives it back: still half-open, nothing counted, nothing in flight.
        assert (now["state"], now["calls"], now["in_flight"]) == ("half_open", before, 0)

        # With half_open_max_calls 1, a held permit would make this 503 circuit_open.
        async with proxy.session.get(proxy.url("/up/trial/ok")) as response:
            assert (response.status, await response.read()) == (200, b"ok")
        assert (await entry(proxy, "up.trial"))["state"] == "closed"  # success_threshold 1
    finally:
        await upstream.stop()
