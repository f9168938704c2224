"""A real Prometheus server scrapes the proxy on loopback and sees a breaker open (§6).

It also loads the shipped alert rules, so a rule the server would refuse fails here too.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from tests.real_tools import free_port, require_tool

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, open_timeout_ms: 600000}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""
PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: circuit-proxy
    static_configs: [{{targets: ["{target}"]}}]
"""


async def query(session: aiohttp.ClientSession, base: str, expression: str) -> list[dict]:
    async with session.get(f"{base}/api/v1/query", params={"query": expression}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def poll(session: aiohttp.ClientSession, base: str, expression: str, want: str,
               process: asyncio.subprocess.Process, seconds: float = 40) -> list[dict]:
    """Query every 0.25 s until a series has value `want`, at most `seconds`."""
    result: list[dict] = []
    for _ in range(int(seconds / 0.25)):
        if process.returncode is not None:
            raise AssertionError(f"prometheus exited with {process.returncode}")
        try:
            result = await query(session, base, expression)
        except aiohttp.ClientConnectionError:
            result = []  # not listening yet
        if any(sample["value"][1] == want for sample in result):
            return result
        await asyncio.sleep(0.25)
    raise AssertionError(f"{expression} never became {want}: last {result}")


async def test_prometheus_scrapes_an_open_breaker(start_proxy, fakes, tmp_path):
    prometheus = require_tool("prometheus")
    proxy = await start_proxy(CONFIG)
    target = urlsplit(proxy.url("/")).netloc
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(target=target))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("w") as log:
        process = await asyncio.create_subprocess_exec(
            prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn", stdout=asyncio.subprocess.DEVNULL, stderr=log)
    try:
        async with aiohttp.ClientSession() as session:
            up = await poll(session, base, 'up{job="circuit-proxy"}', "1", process)
            assert [sample["metric"]["instance"] for sample in up] == [target]
            await fakes.set_mode("payment", "error", status=503)
            for _ in range(2):
                async with proxy.session.post(proxy.url("/payment/charges"), json={}) as response:
                    assert response.status == 503
            state = await poll(session, base, 'circuit_breaker_state{state="open"} == 1', "1", process)
            assert [sample["metric"]["breaker"] for sample in state] == ["payment.charges"]
            failures = await query(session, base,
                                   'circuit_breaker_calls_total{breaker="payment.charges",outcome="failure"}')
            assert [sample["value"][1] for sample in failures] == ["2"]
            # The scrape-time gauges reach Prometheus too; no `_created` series does.
            waiting = await query(session, base, 'circuit_breaker_seconds_to_half_open > 0')
            assert [sample["metric"]["breaker"] for sample in waiting] == ["payment.charges"]
            created = await query(session, base, '{__name__=~".+_created"}')
            assert created == []
            async with session.get(f"{base}/api/v1/rules") as response:
                groups = (await response.json())["data"]["groups"]
            assert [rule["name"] for rule in groups[0]["rules"]][:2] == [
                "CircuitBreakerOpen", "CircuitBreakerForcedOpen"]
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
