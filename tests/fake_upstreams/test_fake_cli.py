"""`python -m fake_upstreams`: prints its addresses, serves, exits 0 on SIGINT/SIGTERM
leaving every port free, and exits 1 when a port is taken."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from fake_upstreams import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("control", *SERVICE_NAMES)


def is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def base_port() -> Iterator[int]:
    """A port whose next four are free too (free when probed, as good as it gets)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 4 <= 65535 and all(is_free(port + i) for i in range(5)):
            yield port
            return
    pytest.skip("no five consecutive free ports")


async def start_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fake_upstreams", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def read_addresses(process: asyncio.subprocess.Process) -> dict[str, str]:
    assert process.stdout is not None
    addresses = {}
    for _ in NAMES:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=10)
        name, url = line.decode().split()
        addresses[name] = url
    return addresses


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_serves_and_exits_0_on_signal_freeing_its_ports(base_port: int, signum: int) -> None:
    process = await start_cli("--base-port", str(base_port), "--log-level", "WARNING")
    try:
        addresses = await read_addresses(process)
        assert addresses == {name: f"http://127.0.0.1:{base_port + i}" for i, name in enumerate(NAMES)}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(f"{addresses['control']}/services") as response:
                services = await response.json()
            async with http.get(f"{addresses['inventory']}/stock/SKU-001") as response:
                assert await response.json() == {"sku": "SKU-001", "available": 17}
        assert {name: entry["port"] for name, entry in services.items()} == {
            name: base_port + i for i, name in enumerate(SERVICE_NAMES, start=1)
        }
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert all(is_free(base_port + i) for i in range(5))


async def test_cli_exits_1_when_a_port_is_taken(base_port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base_port + 2))
        taken.listen()
        process = await start_cli("--base-port", str(base_port))
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 1
    assert f"fake_upstreams: cannot listen on 127.0.0.1 from port {base_port}:" in stderr.decode()
    assert all(is_free(base_port + i) for i in range(5))


async def test_cli_rejects_a_base_port_out_of_range() -> None:
    process = await start_cli("--base-port", "65534")
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    assert process.returncode == 2
    assert "--base-port must be from 0 to 65531, got 65534" in stderr.decode()
