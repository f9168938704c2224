"""Observability through the CLI as a user starts it: the generated admin token is logged once
and works, an open status page does not hold up SIGTERM's drain, and a reload of the demo keeps
its services pointed at its own fake upstreams."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from tests.real_tools import free_port, read_until

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
storage: {path: $db}
server: {drain_timeout_s: 30}
services:
  payment: {upstream: $payment}
"""


async def test_token_logged_once_and_an_open_status_stream_does_not_delay_shutdown(write_config):
    port = free_port()
    path = write_config(CONFIG)
    env = {key: value for key, value in os.environ.items() if key != "CIRCUIT_PROXY_ADMIN_TOKEN"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path), "--port", str(port), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    lines: list[str] = []
    base = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    try:
        token_line = await read_until(process.stdout, "admin token: ", lines)
        token = re.search(r"admin token: (\S+)$", token_line.rstrip("\n")).group(1)
        await read_until(process.stdout, "listening on", lines)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/admin/breakers/payment.default/force-open",
                                    headers={"Authorization": f"Bearer {token}"}) as response:
                assert (response.status, (await response.json())["state"]) == (200, "forced_open")
            async with session.get(f"{base}/status/events") as stream:
                assert (await stream.content.readline()).startswith(b"retry:")
                started = loop.time()
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(stream.content.read(), 10)  # the server ends the stream
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert loop.time() - started < 5  # not the 30 s drain timeout
        rest = (await process.stdout.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = "".join(lines) + rest
    assert output.count(token) == 1  # logged once, never again


def port_run_is_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


async def test_demo_reload_keeps_pointing_at_its_own_fakes():
    port, base = free_port(), free_port()
    while not port_run_is_free(base, 5) or port in range(base, base + 5):
        base = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port", str(port), "--base-port", str(base), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "CIRCUIT_PROXY_ADMIN_TOKEN": "t"})
    lines: list[str] = []
    proxy = f"http://127.0.0.1:{port}"
    quote = {"destination": {"country": "IT", "postcode": "00100"}, "weight_kg": 2}
    try:
        await read_until(process.stdout, "status page:", lines)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{proxy}/admin/reload", headers={"Authorization": "Bearer t"}) as response:
                assert (response.status, response.headers["X-Reload-Changed"], response.headers["X-Reload-Added"],
                        response.headers["X-Reload-Removed"]) == (200, "", "", "")
                assert len(await response.json()) == 8  # the list of breakers (§6)
            async with session.post(f"{proxy}/shipping/quotes", json=quote) as response:
                assert (response.status, response.headers.get("X-Fallback")) == (200, None)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
