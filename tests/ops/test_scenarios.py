"""Demo scenarios through the control plane: listed in /status.json, started by
POST /admin/scenarios/<name> behind the admin token. In-process, with a small scenarios object."""

from __future__ import annotations

import json
from pathlib import Path

from multidict import CIMultiDict

from proxy.config.load import load_settings
from proxy.core.clock import FakeClock
from proxy.core.messages import Answer, Request
from proxy.ops.control import ControlPlane
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry

CONFIG = """
storage: {path: var/db.sqlite}
services:
  payment:
    upstream: http://127.0.0.1:9
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""
TOKEN = "t0ken"
AVAILABLE = [{"name": "payment-outage", "title": "Payment outage", "description": "payment refuses connections"},
             {"name": "all-recover", "title": "Everything recovers", "description": "every service healthy"}]


class Scenarios:
    def __init__(self) -> None:
        self.started: list[str] = []

    def available(self) -> list[dict]:
        return AVAILABLE

    def running(self) -> str | None:
        return self.started[-1] if self.started else None

    async def start(self, name: str) -> None:
        if name not in {s["name"] for s in AVAILABLE}:
            raise KeyError(name)
        self.started.append(name)


def build(tmp_path: Path, scenarios: Scenarios | None) -> ControlPlane:
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(CONFIG)
    settings = load_settings(path, {})
    metrics = Metrics()
    registry = Registry(settings, FakeClock(start_wall=1_700_000_000.0), metrics)
    return ControlPlane(settings, registry, metrics, admin_token=TOKEN, scenarios=scenarios)


async def call(control: ControlPlane, method: str, target: str, token: str | None = TOKEN) -> Answer:
    headers = CIMultiDict({"Authorization": f"Bearer {token}"} if token else {})
    return await control.handle(Request(method, target, headers, client_ip="192.0.2.7"))


def body(answer: Answer) -> object:
    return json.loads(answer.body)


async def test_scenarios_are_listed_and_started_with_the_token(tmp_path):
    scenarios = Scenarios()
    control = build(tmp_path, scenarios)
    document = body(await call(control, "GET", "/status.json"))
    assert document["scenarios"] == {"available": AVAILABLE, "running": None}

    answer = await call(control, "POST", "/admin/scenarios/payment-outage")
    assert (answer.status, body(answer)) == (200, {"started": "payment-outage", "running": "payment-outage"})
    assert body(await call(control, "GET", "/status.json"))["scenarios"]["running"] == "payment-outage"

    answer = await call(control, "POST", "/admin/scenarios/meteor-strike")
    assert (answer.status, body(answer)) == (404, {"error": "unknown_scenario", "scenario": "meteor-strike"})
    assert (await call(control, "POST", "/admin/scenarios/all-recover", token="wrong")).status == 401
    assert (await call(control, "POST", "/admin/scenarios/all-recover", token=None)).status == 401
    answer = await call(control, "GET", "/admin/scenarios/all-recover")
    assert (answer.status, answer.headers["Allow"]) == (405, "POST")
    assert scenarios.started == ["payment-outage"]


async def test_without_scenarios_there_is_nothing_to_start(tmp_path):
    control = build(tmp_path, None)
    assert "scenarios" not in body(await call(control, "GET", "/status.json"))
    answer = await call(control, "POST", "/admin/scenarios/payment-outage")
    assert (answer.status, body(answer)) == (404, {"error": "not_found", "path": "/admin/scenarios/payment-outage"})
