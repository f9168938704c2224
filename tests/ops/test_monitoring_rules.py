"""The shipped monitoring (§6): alert rules pass promtool and its unit tests; the dashboard and the
rules only use metrics the proxy really exports (a fleet's proxy, §8, for the fleet's gauge)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import yaml

from tests.real_tools import require_tool

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
_METRIC = re.compile(r"\b((?:circuit_breaker|circuit_proxy|fallback_queue|proxy|process)_[a-z_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum")

CONFIG = """
storage: {path: $db}
services:
  payment: {upstream: $payment}
"""
# A replica of a fleet (§8) exports what a lone proxy does, and whether it reaches its fleet.
FLEET_CONFIG = """
storage: {url: "$pg"}
cluster: {share_breakers: true, quorum: 1, node_id: pod-a}
services:
  payment: {upstream: $payment}
"""


async def run(*args: str, cwd: Path = MONITORING) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(*args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, output.decode()


async def test_alert_rules_pass_promtool_check():
    promtool = require_tool("promtool")
    code, output = await run(promtool, "check", "rules", "alerts.yml")
    assert (code, "SUCCESS: 8 rules found" in output) == (0, True), output


async def test_alert_rules_pass_their_unit_tests():
    promtool = require_tool("promtool")
    code, output = await run(promtool, "test", "rules", "alerts.test.yml")
    assert (code, output.strip().endswith("SUCCESS")) == (0, True), output


def families(expressions: list[str]) -> set[str]:
    names = set()
    for expression in expressions:
        for name in _METRIC.findall(expression):
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            names.add(name)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [a["expr"] for a in dashboard["annotations"]["list"]]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    return expressions


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


async def exported_families(proxy) -> tuple[set[str], str]:
    async with proxy.session.get(proxy.url("/metrics")) as response:
        text = await response.text()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    counters = {name.removesuffix("_total") for name in exported if name.endswith("_total")}
    return exported | counters, text  # counters: family and sample names


async def test_dashboard_and_rules_use_only_exported_metrics(start_proxy, pg_url):
    lone, _ = await exported_families(await start_proxy(CONFIG))
    fleet, text = await exported_families(await start_proxy(FLEET_CONFIG, name="fleet.yaml", pg=pg_url))
    assert "circuit_proxy_cluster_connected 1.0" in text.splitlines()  # reaches its fleet's database
    assert fleet - lone == {"circuit_proxy_cluster_connected"}
    used = families(dashboard_expressions()) | families(rule_expressions())
    assert used - fleet == set()
    assert {"circuit_breaker_state", "circuit_breaker_fallbacks_total", "fallback_queue_depth",
            "fallback_queue_replayed_total", "circuit_proxy_cluster_connected"} <= used
