"""Chaos: the shop's checkout mix through the proxy on the shipped config while every upstream
misbehaves at once, then heals (RELIABILITY.md, "Chaos").

The proxy runs in this process (so /proc/self is its RSS and its descriptors) on
`config/breakers.yaml` as shipped, with three changes written into a copy: the upstreams are
the fakes', storage is in tmp_path, and the open periods are short (open_timeout_ms 1000,
max_open_timeout_ms 4000 instead of 60 s / 300 s) with the queues' retry back-off at
100 ms..1 s instead of 500 ms..60 s, so that recovery is natural (half-open trials from
traffic and replay) and fits in the test's time. No breaker is reset by hand.

Chaos, all at once for CHAOS_S: payment flapping (healthy/500 every 2 s), inventory hanging,
notification refusing connections, shipping slow (2.5 s: past the 2 s slow threshold, within
the 5 s timeout). Then every upstream heals.

Asserted: every request answered (by the upstream, a fallback or the contract's 502/503/504
error) within its route's timeout_ms + MARGIN_S; every 202 from a queue delivered exactly once
per Idempotency-Key, in acceptance order per queue, nothing charged twice or done after a
refusal; every breaker closed and every queue empty after healing; RSS and open descriptors
back near their baseline. Bounded: TEST_BUDGET_S for the whole test.
"""

from __future__ import annotations

import asyncio
import gc

import aiohttp
import pytest

from tests.chaos.shop import (
    QUEUES,
    ShopLoad,
    breaker_states,
    fd_count,
    fetch_records,
    proxy_status,
    queue_depths,
    queue_problems,
    route_timeouts_s,
    rss_kb,
    settle,
    shipped_config_text,
    socket_summary,
)

RATE = 30  # checkouts a second: 120 requests a second through the proxy
# inventory.stock learns its slow threshold (`auto`) from its first 128 calls (recomputed every
# 64, used from 100): the warm-up gives it 180, so the hang is met with hang detection on.
WARMUP_S = 6
CHAOS_S = 20
HEAL_S = 8
SETTLE_S = 30
MARGIN_S = 1.0
FD_SLACK = 20
RSS_SLACK_KB = 48 * 1024
TEST_BUDGET_S = 100


def pooled_idle(proxy) -> int:
    """Idle keep-alive connections in the proxy's upstream pool."""
    return sum(len(target.idle) for target in proxy.server.env.pool.targets.values())


@pytest.mark.timeout(TEST_BUDGET_S + 20)
async def test_checkouts_through_simultaneous_upstream_failures(start_proxy, fakes):
    async with asyncio.timeout(TEST_BUDGET_S):
        config = shipped_config_text({name: f"${name}" for name in ("payment", "inventory", "notification", "shipping")},
                                     "$db", open_timeout_ms=1000, max_open_timeout_ms=4000,
                                     queue_retry_ms=(100, 1000))
        proxy = await start_proxy(config)
        base = proxy.url("").rstrip("/")
        upstreams = {name: fakes.url(name) for name in ("payment", "inventory", "notification", "shipping")}
        load = ShopLoad(base, RATE, route_timeouts_s())
        async with load:
            await load.run(WARMUP_S)  # the stock cache fills, the auto slow threshold learns
            await load.drain(5)
            gc.collect()
            baseline = rss_kb(), fd_count(), pooled_idle(proxy)

            await fakes.set_mode("payment", "flap", period_s=2)
            await fakes.set_mode("inventory", "hang")
            await fakes.set_mode("notification", "down")
            await fakes.set_mode("shipping", "slow", latency_ms=2500)
            await load.run(CHAOS_S)
            during = breaker_states(await proxy_status(proxy.session, base))

            for name in upstreams:
                await fakes.set_mode(name, "healthy")
            await load.run(HEAL_S)
            status = await settle(proxy.session, base, SETTLE_S, load)
            await load.drain(10)

        async with aiohttp.ClientSession() as session:
            records = await fetch_records(session, upstreams)
        summary = load.summary()
        print("chaos summary:", summary)
        print("breakers during chaos:", during)

        problems = load.latency_problems(MARGIN_S)
        problems += queue_problems(load, records)
        states = breaker_states(status)
        if any(state != "closed" for state in states.values()):
            problems.append(f"breakers not closed after healing: {states}")
        depths = queue_depths(status)
        if any(depths[q] != (0, 0) for q in QUEUES):
            problems.append(f"queues not empty (depth, dead letters): {depths}")
        # The chaos did bite: each failure took its route off the healthy path.
        for route, kind in (("payment.charges", "fallback:queue"), ("inventory.stock", "fallback:cache"),
                            ("notification.notifications", "fallback:queue"),
                            ("shipping.quotes", "fallback:table")):
            if not load.counts[route][kind]:
                problems.append(f"{route}: no {kind} answer during the chaos: {dict(load.counts[route])}")

        await proxy.session.close()
        await asyncio.sleep(0.2)  # closed client sockets leave the proxy's side
        gc.collect()
        after = rss_kb(), fd_count(), pooled_idle(proxy)
        print(f"RSS {baseline[0] / 1024:.1f} -> {after[0] / 1024:.1f} MiB, fds {baseline[1]} -> {after[1]}, "
              f"idle pooled upstream connections {baseline[2]} -> {after[2]}")
        # An idle pooled upstream connection is two descriptors here (the proxy's end and the
        # fake's), kept by design for up to 30 s (keep-alive) and at most 256 per upstream.
        if after[1] - 2 * after[2] > baseline[1] - 2 * baseline[2] + FD_SLACK:
            ports = {fakes.port(name): name for name in upstreams}
            ports[proxy.server.port] = "proxy"
            problems.append(f"open descriptors {baseline[1]} -> {after[1]} (slack {FD_SLACK}): "
                            f"{dict(socket_summary(ports=ports))}")
        if after[0] > baseline[0] + RSS_SLACK_KB:
            problems.append(f"RSS {baseline[0]} kB -> {after[0]} kB (slack {RSS_SLACK_KB} kB)")
        assert not problems, "\n".join(problems)
