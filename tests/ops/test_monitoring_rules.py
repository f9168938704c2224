"""The shipped monitoring (§6): alert rules pass promtool and its unit tests; the dashboard and the
rules only use metrics the proxy really exports."""

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


async def run(*args: str, cwd: Path = MONITORING) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(*args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, output.decode()


async def test_alert_rules_pass_promtool_check():
    promtool = require_tool("promtool")
    code, output = await run(promtool, "check", "rules", "alerts.yml")
    assert (code, "SUCCESS: 7 rules found" in output) == (0, True), output


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


async def test_dashboard_and_rules_use_only_exported_metrics(start_proxy):
    proxy = await start_proxy(CONFIG)
    async with proxy.session.get(proxy.url("/metrics")) as response:
        exported = set(re.findall(r"^# TYPE (\S+) ", await response.text(), re.M))
    exported |= {name[: -len("_total")] for name in exported}  # counters: family and sample names
    used = families(dashboard_expressions()) | families(rule_expressions())
    assert used - exported == set()
    assert {"circuit_breaker_state", "circuit_breaker_fallbacks_total", "fallback_queue_depth",
            "fallback_queue_replayed_total"} <= used
