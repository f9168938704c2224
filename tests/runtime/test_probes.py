"""The Prober on a FakeClock with a fake upstream client: it probes only a half-open breaker,
one probe at a time, records each like a call, gives a permit back when stopped mid-probe, and
follows routes across reloads. Every wait is bounded and waits for the event it expects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.config.model import Match, Policy, ProbeSpec, Route, Service, Settings
from proxy.core.breaker import State, Transition
from proxy.core.clock import FakeClock
from proxy.core.outcome import Reason, UpstreamReply
from proxy.runtime.metrics import Metrics
from proxy.runtime.probes import Prober
from proxy.runtime.registry import Registry

UPSTREAM = "http://upstream:1/base"
PROBE = ProbeSpec(path="/health?deep=1", method="HEAD", interval_ms=10, expect_status=frozenset({200, 204}))


def settings(probe: ProbeSpec | None = PROBE, **policy: object) -> Settings:
    values = {"failure_threshold": 1, "success_threshold": 2, "open_timeout_ms": 1000, "jitter": 0.0,
              "timeout_ms": 700, "connect_timeout_ms": 300, "probe": probe, **policy}
    route = Route(service="svc", name="r", match=Match(), policy=Policy(**values))
    return Settings(services=(Service(name="svc", upstream=UPSTREAM, routes=(route,)),))


class FakeClient:
    """Answers each call with `reply()`; `gate`, when set, holds calls until it is opened."""

    def __init__(self, reply: Callable[[], UpstreamReply] = lambda: UpstreamReply(200)) -> None:
        self.reply = reply
        self.calls: list[tuple[str, str, str, list[tuple[str, str]], bytes, float, float]] = []
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def call(self, upstream, method, target, headers, body, *, timeout_s, connect_timeout_s):
        self.calls.append((upstream, method, target, headers, body, timeout_s, connect_timeout_s))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.reply()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(settings(), clock, Metrics())


@pytest.fixture
async def prober(registry: Registry, clock: FakeClock):
    prober = Prober(registry, clock, FakeClient())
    yield prober
    await prober.stop()


def breaker(registry: Registry):
    return registry.get("svc.r").breaker


def trip(registry: Registry) -> None:
    b = breaker(registry)
    b.record(b.try_acquire(), failed=True)  # failure_threshold 1
    assert b.state is State.OPEN


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):  # 5 s at most
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def settle() -> None:
    """Let every ready task run to its next wait (no timer involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_half_open_breaker_is_closed_by_probes_alone(registry, clock, prober):
    seen: list[Transition] = []
    registry.add_listener(seen.append)
    client = prober.client
    prober.start()
    trip(registry)
    await settle()
    assert client.calls == []  # open: nothing is sent before the period ends
    clock.advance(1.0)
    await until(lambda: breaker(registry).state is State.CLOSED, "closed")
    assert len(client.calls) == 2  # success_threshold, one at a time
    assert client.calls[0] == (UPSTREAM, "HEAD", "/health?deep=1",
                               [("User-Agent", "circuit-proxy-probe"), ("X-Circuit-Probe", "svc.r")],
                               b"", 0.7, 0.3)
    view = breaker(registry).view()
    assert (view.calls_success, view.calls_failure) == (2, 1)
    assert [(t.to_state, t.reason) for t in seen] == [
        (State.OPEN, "consecutive_failures"), (State.HALF_OPEN, "open_timeout_elapsed"),
        (State.CLOSED, "success_threshold")]
    await settle()
    assert len(client.calls) == 2  # closed: no more probes


async def test_a_failed_probe_reopens_it_and_the_next_comes_after_the_new_open_period(registry, clock, prober):
    client = prober.client
    client.reply = lambda: UpstreamReply(503)
    prober.start()
    trip(registry)
    clock.advance(1.0)
    await until(lambda: len(client.calls) == 1 and breaker(registry).view().open_count == 2, "re-opened")
    b = breaker(registry)
    assert b.state is State.OPEN
    await asyncio.sleep(0.05)  # several interval polls: the open period (2 s, backed off) holds
    assert len(client.calls) == 1
    client.reply = lambda: UpstreamReply(204)  # also expected
    clock.advance(2.0)
    await until(lambda: b.state is State.CLOSED, "closed")
    assert len(client.calls) == 3


@pytest.mark.parametrize("reply", [UpstreamReply(500), UpstreamReply(404), UpstreamReply(302),
                                   UpstreamReply(None, reason=Reason.TIMEOUT, sent=True),
                                   UpstreamReply(None, reason=Reason.UNREACHABLE)])
async def test_anything_but_an_expected_status_is_a_failed_probe(registry, clock, prober, reply):
    prober.client.reply = lambda: reply
    prober.start()
    trip(registry)
    clock.advance(1.0)
    await until(lambda: prober.client.calls and breaker(registry).state is State.OPEN, "re-opened")
    assert breaker(registry).view().calls_failure == 2


@pytest.mark.parametrize("manual", ["force_open", "force_closed", "disable"])
async def test_never_probes_a_forced_or_disabled_breaker(registry, clock, prober, manual):
    prober.start()
    trip(registry)
    getattr(breaker(registry), manual)()
    clock.advance(10.0)
    await asyncio.sleep(0.05)  # several interval polls
    assert prober.client.calls == []


async def test_a_probe_in_flight_gives_its_permit_back_when_stopped(registry, clock, prober):
    client = prober.client
    client.gate = asyncio.Event()  # never opened: the probe hangs
    prober.start()
    trip(registry)
    clock.advance(1.0)
    await asyncio.wait_for(client.called.wait(), 5)
    b = breaker(registry)
    assert b.view().half_open_in_flight == 1
    await prober.stop()
    view = b.view()
    assert (view.state, view.half_open_in_flight) == (State.HALF_OPEN, 0)
    assert (view.calls_success, view.calls_failure) == (0, 1)  # the stopped probe is neither
    assert b.try_acquire_trial() is not None  # its slot is free again


async def test_nothing_is_sent_before_the_client_is_set(registry, clock):
    prober = Prober(registry, clock)
    try:
        prober.start()
        trip(registry)
        clock.advance(1.0)
        assert breaker(registry).state is State.HALF_OPEN
        await asyncio.sleep(0.03)
        assert breaker(registry).view().half_open_in_flight == 0  # no permit taken
        client = FakeClient()
        prober.client = client
        await until(lambda: breaker(registry).state is State.CLOSED, "closed")
        assert len(client.calls) == 2
    finally:
        await prober.stop()


async def test_without_probe_the_prober_leaves_the_trial_to_customers(clock):
    registry = Registry(settings(probe=None), clock, Metrics())
    prober = Prober(registry, clock, FakeClient())
    try:
        prober.start()
        trip(registry)
        clock.advance(1.0)
        await asyncio.sleep(0.03)
        b = breaker(registry)
        assert b.view().waiting_for == "trial_request"
        assert prober.client.calls == []
        assert b.view().half_open_in_flight == 0
    finally:
        await prober.stop()


async def test_reloads_start_and_stop_probing(registry, clock, prober):
    client = prober.client
    prober.start()
    without = settings(probe=None)
    prober.on_reload(without, registry.apply(without))
    trip(registry)
    clock.advance(1.0)
    await asyncio.sleep(0.03)
    assert client.calls == [] and breaker(registry).state is State.HALF_OPEN
    # The probe comes back: a rebuilt breaker (changed policy), closed, then tripped again.
    again = settings(probe=PROBE)
    prober.on_reload(again, registry.apply(again))
    trip(registry)
    clock.advance(1.0)
    await until(lambda: breaker(registry).state is State.CLOSED, "closed by probes after the reload")
    assert len(client.calls) == 2
