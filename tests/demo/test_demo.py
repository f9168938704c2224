"""`circuit-proxy demo` as a person runs it: the page moves by itself, `--no-traffic` keeps it
still, each scenario (from `circuit-proxy scenario` or the page's admin call) shows in
/status.json, Ctrl-C exits 0 and frees every port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.real_tools import free_ports, port_is_free, read_until

ROOT = Path(__file__).resolve().parents[2]


def shipped_config(config_dir: Path, **replacements: str) -> Path:
    """The shipped config with its database in tmp_path (and what a test shortens)."""
    text = (ROOT / "config" / "breakers.yaml").read_text()
    for old, new in {"path: var/circuit-proxy.db": f"path: {config_dir / 'proxy.db'}", **replacements}.items():
        assert old in text
        text = text.replace(old, new)
    path = config_dir / "config" / "breakers.yaml"
    path.write_text(text)
    return path


class Demo:
    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.args = args
        self.port, self.base = free_ports()
        self.process: asyncio.subprocess.Process | None = None
        self.output: list[str] = []

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    async def __aenter__(self) -> Demo:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "demo", "--config", str(self.config), "--port", str(self.port),
            "--base-port", str(self.base), *self.args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, "CIRCUIT_PROXY_ADMIN_TOKEN": "t"})
        assert self.process.stdout is not None
        line = await read_until(self.process.stdout, "status page:", self.output)
        assert f"http://127.0.0.1:{self.port}/status" in line
        self._drain = asyncio.create_task(self._keep_reading())
        return self

    async def _keep_reading(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            self.output.append(raw.decode())

    async def stop(self, signum: int = signal.SIGINT) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await self._drain
        return code

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def status(session: aiohttp.ClientSession, demo: Demo) -> dict:
    async with session.get(f"{demo.proxy}/status.json") as response:
        assert response.status == 200
        return await response.json()


def total_calls(document: dict) -> int:
    return sum(sum(b["calls"].values()) for b in document["breakers"])


def breaker(document: dict, name: str) -> dict:
    return next(b for b in document["breakers"] if b["name"] == name)


def queue(document: dict, name: str) -> dict:
    return next(q for q in document["queues"] if q["name"] == name)


async def until_status(session, demo: Demo, predicate, what: str, timeout_s: float) -> dict:
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                document = await status(session, demo)
                if predicate(document):
                    return document
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}:\n{document}\n" + "".join(demo.output[-30:])) from None


async def scenario(demo: Demo, name: str) -> None:
    """`circuit-proxy scenario NAME --control URL`, from a second terminal."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "scenario", name, "--control", demo.control, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert (process.returncode, out.decode()) == (0, f"{name}: started ({demo.control})\n")


async def test_the_page_moves_by_itself_and_ctrl_c_exits_0_freeing_every_port(config_dir):
    async with Demo(shipped_config(config_dir)) as demo, aiohttp.ClientSession() as session:
        assert any("shop traffic: 4 requests a second" in line for line in demo.output)
        document = await until_status(session, demo, lambda d: total_calls(d) >= 8,
                                      "the shop's traffic in the counters", 10)
        assert {b["name"] for b in document["breakers"] if sum(b["calls"].values())} >= {
            "inventory.stock", "shipping.quotes"}
        assert await demo.stop(signal.SIGINT) == 0
    assert port_is_free(demo.port) and all(port_is_free(demo.base + i) for i in range(5))
    assert any("demo traffic stopped: sent" in line for line in demo.output)


async def test_with_no_traffic_the_counters_stay_still(config_dir):
    async with Demo(shipped_config(config_dir), "--no-traffic") as demo, aiohttp.ClientSession() as session:
        first = await status(session, demo)
        await asyncio.sleep(1.5)  # six ticks of the default traffic, had it been on
        assert (total_calls(first), total_calls(await status(session, demo))) == (0, 0)
        assert not any("shop traffic" in line for line in demo.output)
        assert await demo.stop(signal.SIGTERM) == 0


async def test_each_scenario_shows_in_status_json(config_dir):
    # Short open periods, so "recover" closes the breakers within the test's time.
    config = shipped_config(config_dir, **{"open_timeout_ms: 60000": "open_timeout_ms: 1000"})
    async with Demo(config, "--rate", "20") as demo, aiohttp.ClientSession() as session:
        await until_status(session, demo, lambda d: breaker(d, "payment.charges")["calls"]["success"] >= 2,
                           "charges paid", 10)

        await scenario(demo, "payment-outage")
        document = await until_status(
            session, demo, lambda d: breaker(d, "payment.charges")["state"] == "open"
            and queue(d, "payment.charges")["depth"] >= 2, "payment breaker open, charges queued", 10)
        assert document["scenarios"]["running"] == "payment-outage"  # started elsewhere, still seen

        # The status page's button: the control plane plays the demo's own Scenarios.
        async with session.post(f"{demo.proxy}/admin/scenarios/recover",
                                headers={"Authorization": "Bearer t"}) as response:
            assert (response.status, await response.json()) == (200, {"started": "recover", "running": None})
        await until_status(session, demo, lambda d: breaker(d, "payment.charges")["state"] == "closed"
                           and queue(d, "payment.charges")["depth"] == 0, "payment closed, queue replayed", 15)

        await scenario(demo, "inventory-hangs")
        await until_status(session, demo, lambda d: breaker(d, "inventory.stock")["state"] == "open",
                           "the hanging stock service cut off", 15)

        await scenario(demo, "notifications-flap")
        document = await until_status(
            session, demo, lambda d: breaker(d, "notification.notifications")["calls"]["failure"] >= 1,
            "notification failures in the error half of the flap", 15)
        assert document["scenarios"]["running"] == "notifications-flap"
        assert await demo.stop(signal.SIGINT) == 0
