"""The CLI as a user runs it: `run` drains on SIGTERM and frees its port; `demo` works end to end."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.real_tools import free_port, free_ports, port_is_free, read_until

ROOT = Path(__file__).resolve().parents[2]


async def start(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})})


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 30)


async def test_sigterm_drains_in_flight_requests_and_frees_the_port(write_config, fakes):
    port = free_port()
    path = write_config("""
        storage: {path: $db}
        server: {drain_timeout_s: 10}
        services:
          shipping: {upstream: $shipping}
    """)
    process = await start("run", "--config", str(path), "--port", str(port))
    output: list[str] = []
    try:
        await read_until(process.stdout, f"listening on http://127.0.0.1:{port}", output)
        await fakes.set_mode("shipping", "slow", latency_ms=700)
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(session.post(
                f"http://127.0.0.1:{port}/shipping/quotes",
                json={"destination": {"country": "IT", "postcode": "00100"}, "weight_kg": 1}))
            for _ in range(300):
                if fakes.requests("shipping") == 1:
                    break
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            response = await request
            assert response.status == 200
            assert set(await response.json()) >= {"carrier", "cost", "currency", "eta_days"}
            response.release()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert port_is_free(port)


async def test_demo_routes_to_all_four_fakes_and_error_mode_opens_a_breaker(config_dir):
    # The shipped config, with its database in tmp_path: state must not leak between runs.
    shipped = (ROOT / "config" / "breakers.yaml").read_text()
    config = config_dir / "config" / "breakers.yaml"
    config.write_text(shipped.replace("path: var/circuit-proxy.db", f"path: {config_dir / 'proxy.db'}"))
    assert config.read_text() != shipped
    port, base = free_ports()
    process = await start("demo", "--config", str(config), "--port", str(port), "--base-port", str(base),
                          env={"CIRCUIT_PROXY_ADMIN_TOKEN": "t"})
    output: list[str] = []
    proxy = f"http://127.0.0.1:{port}"
    try:
        line = await read_until(process.stdout, "/status", output)
        assert f"{proxy}/status" in line
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{proxy}/payment/charges",
                                    json={"amount": 5, "currency": "EUR", "order_id": "o1"}) as r:
                assert r.status == 201
            async with session.get(f"{proxy}/inventory/stock/SKU-001") as r:
                assert (r.status, (await r.json())["sku"]) == (200, "SKU-001")
            async with session.post(f"{proxy}/notification/notifications",
                                    json={"to": "a@example.com", "template": "t", "data": {}}) as r:
                assert r.status == 202
            async with session.post(f"{proxy}/shipping/quotes", json={
                    "destination": {"country": "IT", "postcode": "00100"}, "weight_kg": 2}) as r:
                assert r.status == 200
            async with session.put(f"http://127.0.0.1:{base}/services/inventory/mode",
                                   json={"mode": "error", "status": 500}) as r:
                assert r.status == 200
            statuses = []
            for _ in range(6):
                async with session.get(f"{proxy}/inventory/default-route") as r:
                    statuses.append(r.status)
            assert statuses == [500] * 5 + [503]
            async with session.get(f"{proxy}/status.json") as r:
                states = {b["name"]: b["state"] for b in (await r.json())["breakers"]}
            assert states["inventory.default"] == "open"
            assert states["payment.charges"] == "closed"
        assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert port_is_free(port) and all(port_is_free(base + i) for i in range(5))
