"""Shared breakers (§8 `cluster`): three real proxies on one real PostgreSQL, one fake upstream.

Each proxy is a whole `App` (what `circuit-proxy run` starts) on its own port; they share only
the database. What the fleet does is read where a user reads it: `/status.json`, `/metrics`,
and the upstream's own request count.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.runtime.cluster import RESYNC_S

CONFIG = """
storage: {url: "$pg", path: $dbpath}
cluster: {share_breakers: $share, quorum: $quorum, node_id: $node}
defaults: {failure_threshold: $threshold, open_timeout_ms: $open_ms, max_open_timeout_ms: 600000,
           jitter: 0, backoff_multiplier: 1, success_threshold: 1, half_open_max_calls: 1,
           max_concurrent: 0}
services:
  inventory:
    upstream: $inventory
"""
NODES = ("node-a", "node-b", "node-c")
BREAKER = "inventory.default"
THRESHOLD = 3


async def fleet(start_proxy, config_dir: Path, pg_url: str, *, share: bool = True, quorum: int = 1,
                open_ms: int = 60000) -> list:
    proxies = []
    for node in NODES:
        proxies.append(await start_proxy(
            CONFIG, name=f"{node}.yaml", pg=pg_url, node=node, share="true" if share else "false",
            quorum=str(quorum), threshold=str(THRESHOLD), open_ms=str(open_ms),
            dbpath=str(config_dir / "var" / f"{node}.db")))
    return proxies


async def status(proxy) -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        assert response.status == 200
        return await response.json()


async def entry(proxy) -> dict:
    return next(b for b in (await status(proxy))["breakers"] if b["name"] == BREAKER)


async def get(proxy) -> int:
    async with proxy.session.get(proxy.url("/inventory/stock/SKU-001")) as response:
        await response.read()
        return response.status


async def admin(proxy, action: str) -> None:
    async with proxy.session.post(proxy.url(f"/admin/breakers/{BREAKER}/{action}"),
                                  headers={"Authorization": f"Bearer {proxy.app.control.admin_token}"}) as response:
        assert response.status == 200


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` every 20 ms until it holds; seconds it took, or fail after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def states(proxies) -> list[str]:
    return [(await entry(p))["state"] for p in proxies]


async def open_by_errors(proxy) -> None:
    for _ in range(THRESHOLD):
        assert await get(proxy) == 500
    assert (await entry(proxy))["state"] == "open"


async def resynced(proxies, rounds: int = 2) -> None:
    """Each proxy has read the fleet's rows `rounds` more times (a NOTIFY or the ~1 s resync)."""
    marks = [p.app.cluster.rounds for p in proxies]
    await until(lambda: _past(proxies, marks, rounds), 3 * rounds * RESYNC_S + 1, "resynced")


async def _past(proxies, marks, rounds) -> bool:
    return all(p.app.cluster.rounds >= mark + rounds for p, mark in zip(proxies, marks))


@pytest.mark.parametrize("share", [True, False], ids=["shared", "alone"])
async def test_an_outage_seen_by_one_opens_the_whole_fleet_with_the_same_retry_at(
        start_proxy, config_dir, pg_url, fakes, share):
    a, b, c = proxies = await fleet(start_proxy, config_dir, pg_url, share=share)
    await fakes.set_mode("inventory", "error", status=500)
    await open_by_errors(a)
    if share:
        took = await until(lambda: _all_open(proxies), 1.0, "the fleet opens")
        assert took <= 1.0
        entries = [await entry(p) for p in proxies]
        assert len({e["retry_at"] for e in entries}) == 1, entries  # adopted, not a backoff of its own
        assert [e["state"] for e in entries] == ["open"] * 3
    # The outage goes on: the shop keeps calling every replica.
    for _ in range(2 * THRESHOLD):
        for proxy in (b, c, a):
            await get(proxy)
    contacts = fakes.requests("inventory")
    if share:
        assert contacts <= THRESHOLD + 2  # §8: the others never learned it on their own
        assert await states(proxies) == ["open"] * 3
    else:
        assert contacts == 3 * THRESHOLD  # each replica leaks its own threshold


async def _all_open(proxies) -> bool:
    return await states(proxies) == ["open"] * 3


async def test_quorum_two_needs_two_replicas_open(start_proxy, config_dir, pg_url, fakes):
    a, b, c = proxies = await fleet(start_proxy, config_dir, pg_url, quorum=2)
    await fakes.set_mode("inventory", "error", status=500)
    await open_by_errors(a)
    await resynced([b, c])
    assert await states(proxies) == ["open", "closed", "closed"]
    await open_by_errors(b)
    await until(lambda: _all_open(proxies), 1.0, "c opens once two replicas have it open")
    retry_at = [(await entry(p))["retry_at"] for p in proxies]
    assert retry_at[2] == max(retry_at[:2])  # c adopted one of theirs, b's being the later


async def test_an_operator_action_on_one_proxy_applies_to_all(start_proxy, config_dir, pg_url, fakes):
    a, b, c = proxies = await fleet(start_proxy, config_dir, pg_url)
    await admin(a, "force-open")
    await until(lambda: _states_are(proxies, "forced_open"), 1.0, "force-open reaches the fleet")
    assert await get(c) == 503 and fakes.requests("inventory") == 0
    await admin(c, "disable")
    await until(lambda: _states_are(proxies, "disabled"), 1.0, "disable reaches the fleet")
    await admin(b, "reset")
    await until(lambda: _states_are(proxies, "closed"), 1.0, "reset reaches the fleet")
    assert await get(a) == 200


async def _states_are(proxies, state: str) -> bool:
    return await states(proxies) == [state] * 3


async def test_one_half_open_trial_for_the_whole_fleet(start_proxy, config_dir, pg_url, fakes):
    proxies = await fleet(start_proxy, config_dir, pg_url, open_ms=700)
    await fakes.set_mode("inventory", "error", status=500)
    await open_by_errors(proxies[0])
    await until(lambda: _all_open(proxies), 1.0, "the fleet opens")
    await fakes.set_mode("inventory", "healthy")
    await until(lambda: _one_runs_the_trial(proxies), 3.0, "one replica claims the trial")
    waiting = [(await entry(p))["waiting_for"] for p in proxies]
    owner = proxies[waiting.index("trial_request")]
    held = [p for p in proxies if p is not owner]
    before = fakes.requests("inventory")
    for proxy in held:
        assert await get(proxy) == 503  # the others keep rejecting while the trial runs
    assert fakes.requests("inventory") == before
    assert await get(owner) == 200  # the trial
    assert fakes.requests("inventory") == before + 1
    await until(lambda: _states_are(proxies, "closed"), 1.0, "the fleet closes after the trial")
    assert [await get(p) for p in held] == [200, 200]


async def _one_runs_the_trial(proxies) -> bool:
    entries = [await entry(p) for p in proxies]
    return ([e["state"] for e in entries] == ["half_open"] * 3
            and sorted(e["waiting_for"] for e in entries) == ["fleet_trial", "fleet_trial", "trial_request"])


async def test_database_restarted_mid_run(start_proxy, config_dir, pg_url, pg_server, fakes):
    a, b, c = proxies = await fleet(start_proxy, config_dir, pg_url)
    assert [(await status(p))["cluster"]["connected"] for p in proxies] == [True] * 3
    assert await metric(a) == 1
    await asyncio.to_thread(pg_server.stop)
    try:
        await until(lambda: _connected_is(proxies, False), 5.0, "every proxy says it is alone")
        assert await metric(a) == 0
        # Alone, a replica still decides for itself, and tells nobody.
        await fakes.set_mode("inventory", "error", status=500)
        await open_by_errors(a)
        assert (await entry(b))["state"] == "closed"
    finally:
        await asyncio.to_thread(pg_server.start)
    await until(lambda: _connected_is(proxies, True), 6.0, "every proxy reconnects by itself")
    assert await metric(a) == 1
    # NOTIFY was lost meanwhile: the resync after reconnecting brings the fleet in line.
    await until(lambda: _all_open(proxies), 3.0, "the fleet catches up with a's open breaker")
    assert len({(await entry(p))["retry_at"] for p in proxies}) == 1


async def _connected_is(proxies, connected: bool) -> bool:
    return [(await status(p))["cluster"]["connected"] for p in proxies] == [connected] * 3


async def metric(proxy) -> float:
    async with proxy.session.get(proxy.url("/metrics")) as response:
        text = await response.text()
    line = next(line for line in text.splitlines() if line.startswith("circuit_proxy_cluster_connected "))
    return float(line.split()[1])


async def test_without_a_cluster_status_says_nothing_of_one(start_proxy, config_dir, fakes):
    proxy = await start_proxy("services: {inventory: {upstream: $inventory}}\n"
                              f"storage: {{path: {config_dir / 'var' / 'solo.db'}}}\n")
    document = await status(proxy)
    assert "cluster" not in document
    async with proxy.session.get(proxy.url("/metrics")) as response:
        assert "circuit_proxy_cluster_connected" not in await response.text()


async def test_a_killed_replica_stops_counting_towards_the_quorum(
        start_proxy, write_config, config_dir, pg_url, fakes, monkeypatch, tmp_path):
    """Its heartbeat stops: after NODE_TTL_S its open breaker no longer opens anybody's."""
    monkeypatch.setattr("proxy.runtime.cluster.NODE_TTL_S", 1.5)
    values = dict(pg=pg_url, share="true", quorum="2", threshold=str(THRESHOLD), open_ms="60000")
    path = write_config(CONFIG, name="node-k.yaml", node="node-k", dbpath=str(tmp_path / "k.db"), **values)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path), "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "CIRCUIT_PROXY_ADMIN_TOKEN": "t"})
    try:
        async with aiohttp.ClientSession() as session:
            async def up() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False
            await until(up, 20.0, "the replica to kill is up")
            b = await start_proxy(CONFIG, name="node-b.yaml", node="node-b",
                                  dbpath=str(tmp_path / "b.db"), **values)
            c = await start_proxy(CONFIG, name="node-c.yaml", node="node-c",
                                  dbpath=str(tmp_path / "c.db"), **values)
            await fakes.set_mode("inventory", "error", status=500)
            for _ in range(THRESHOLD):
                async with session.get(f"http://127.0.0.1:{port}/inventory/stock/SKU-001") as response:
                    assert response.status == 500
        killed.send_signal(signal.SIGKILL)  # no goodbye: its rows stay, its heartbeat stops
        await killed.wait()
        await until(lambda: _live_nodes_are([b, c], 2), 6.0, "the killed replica expires")
        await open_by_errors(b)
        await resynced([c])
        assert (await entry(c))["state"] == "closed"  # b alone is not a quorum of two
    finally:
        if killed.returncode is None:
            killed.kill()
            await killed.wait()


async def _live_nodes_are(proxies, count: int) -> bool:
    return [(await status(p))["cluster"]["live_nodes"] for p in proxies] == [count] * len(proxies)
