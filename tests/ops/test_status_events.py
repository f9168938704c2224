"""/status/events (§6): transitions and snapshots as Server-Sent Events, through the real proxy."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp

from proxy.app import App
from proxy.core.breaker import State, Transition
from proxy.core.clock import FakeClock
from proxy.config.load import load_settings
from proxy.ops.events import EventHub, encode_event

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, open_timeout_ms: 30000}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""


async def next_event(response: aiohttp.ClientResponse, timeout: float = 5.0) -> tuple[str, dict]:
    """The next `event:` + `data:` message (comments and `retry:` lines skipped)."""
    async def read() -> tuple[str, dict]:
        event, data = None, None
        while True:
            line = (await response.content.readline()).decode()
            if not line:
                raise AssertionError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif line == "" and event is not None:
                return event, data
    return await asyncio.wait_for(read(), timeout)


async def next_of(response: aiohttp.ClientResponse, kind: str) -> dict:
    for _ in range(20):
        event, data = await next_event(response)
        if event == kind:
            return data
    raise AssertionError(f"no {kind} event in 20")


async def test_a_snapshot_first_then_every_transition(start_proxy, fakes):
    clock = FakeClock(start_wall=1_700_000_000.0)
    proxy = await start_proxy(CONFIG, clock=clock)
    async with proxy.session.get(proxy.url("/status/events")) as stream:
        assert (stream.status, stream.content_type) == (200, "text/event-stream")
        assert stream.headers["Cache-Control"] == "no-store"
        event, snapshot = await next_event(stream)
        assert event == "snapshot"
        assert [(b["name"], b["state"]) for b in snapshot["breakers"]] == [
            ("payment.charges", "closed"), ("payment.default", "closed")]
        assert set(snapshot) == {"breakers", "queues"}

        await fakes.set_mode("payment", "error", status=500)
        for _ in range(2):
            async with proxy.session.post(proxy.url("/payment/charges"), json={}) as response:
                assert response.status == 500
        assert await next_of(stream, "transition") == {
            "breaker": "payment.charges", "from_state": "closed", "to_state": "open",
            "at": "2023-11-14T22:13:20.000Z"}
        clock.advance(30)  # due: the ticker's refresh moves it to half_open and says so
        assert await next_of(stream, "transition") == {
            "breaker": "payment.charges", "from_state": "open", "to_state": "half_open",
            "at": "2023-11-14T22:13:50.000Z"}
        snapshot = await next_of(stream, "snapshot")
        assert snapshot["breakers"][0]["state"] == "half_open"


async def test_snapshots_keep_coming_at_least_every_two_seconds(start_proxy):
    proxy = await start_proxy(CONFIG)
    loop = asyncio.get_running_loop()
    async with proxy.session.get(proxy.url("/status/events")) as stream:
        await next_of(stream, "snapshot")
        times = []
        for _ in range(2):
            await next_of(stream, "snapshot")
            times.append(loop.time())
    assert times[1] - times[0] < 2.0


async def test_a_client_that_leaves_is_forgotten(start_proxy):
    proxy = await start_proxy(CONFIG)
    hub: EventHub = proxy.app.control.hub
    async with proxy.session.get(proxy.url("/status/events")) as stream:
        await next_of(stream, "snapshot")
        assert hub.client_count == 1
    for _ in range(300):  # the next write (a tick at the latest) notices the closed socket
        if hub.client_count == 0:
            break
        await asyncio.sleep(0.01)
    assert hub.client_count == 0


async def test_a_slow_client_loses_events_and_never_blocks_a_transition(start_proxy):
    proxy = await start_proxy(CONFIG)
    hub: EventHub = proxy.app.control.hub
    stuck: asyncio.Queue[bytes | None] = asyncio.Queue(2)  # a client that never reads
    hub._clients.add(stuck)  # noqa: SLF001
    try:
        transition = Transition("payment.charges", State.CLOSED, State.OPEN, 1_700_000_000.0, "forced")
        for _ in range(5):
            hub.on_transition(transition)  # synchronous: returns at once, whatever the client does
        expected = encode_event("transition", {"breaker": "payment.charges", "from_state": "closed",
                                               "to_state": "open", "at": "2023-11-14T22:13:20.000Z"})
        assert [stuck.get_nowait() for _ in range(2)] == [expected, expected]
        async with proxy.session.get(proxy.url("/metrics")) as response:
            assert "circuit_proxy_status_events_dropped_total 3.0" in await response.text()
    finally:
        hub._clients.discard(stuck)  # noqa: SLF001


async def test_shutdown_ends_open_streams_at_once(write_config, fakes):
    """An open status page must not hold up the drain (shutdown_timeout is 60 s here)."""
    settings = load_settings(write_config(CONFIG), {})
    settings = replace(settings, server=replace(settings.server, drain_timeout_s=60))
    app = App(settings, clock=FakeClock())
    await app.start("127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        async with session.get(app.url("/status/events")) as stream:
            await next_of(stream, "snapshot")
            await asyncio.wait_for(app.close(), 5)
            rest = await asyncio.wait_for(stream.content.read(), 5)
    assert b"event: transition" not in rest
