"""Scripted outages of the demo, played through the fake upstreams' control API (§7).

A scenario sets the mode of every fake service: the ones it names fail in their own way, the
others are healthy, so one scenario is in force at a time and "recover" undoes any of them.
`Scenarios` is what the status page's buttons (through the control plane's
`POST /admin/scenarios/<name>`) and `circuit-proxy scenario NAME` use. It only speaks HTTP to
the control port: it works the same against fakes in this process or in another one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.demo.catalog import DEFAULT_CONTROL_URL, HEALTHY, SCENARIOS, Scenario

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 5.0  # a `down` closes listeners and connections: quick, but not instant


class ScenarioError(RuntimeError):
    """The control API could not be reached, or refused a mode."""


class Scenarios:
    """The demo's scenarios against the control API at `control_url`."""

    def __init__(self, control_url: str = DEFAULT_CONTROL_URL, *,
                 modes: Callable[[], dict[str, dict[str, Any]]] | None = None,
                 scenarios: tuple[Scenario, ...] = SCENARIOS) -> None:
        """`modes`: where the fakes' modes can be read at once (`FakeUpstreams.describe`, the body
        of `GET /services`), so `running` also sees a scenario started elsewhere (the CLI, by
        hand on the control page); without it, `running` knows what was started here."""
        self.control_url = control_url.rstrip("/")
        self._scenarios = {scenario.name: scenario for scenario in scenarios}
        self._modes = modes
        self._running: str | None = None
        self._lock = asyncio.Lock()  # one scenario's modes at a time, never interleaved

    def available(self) -> list[dict[str, str]]:
        """[{"name", "title", "description"}] in the order they are shown."""
        return [scenario.as_dict() for scenario in self._scenarios.values()]

    def running(self) -> str | None:
        """The scenario in force: every fake service in the mode it sets (None when all are
        healthy, or in modes no scenario sets)."""
        if self._modes is None:
            return self._running
        current = self._modes()
        for scenario in self._scenarios.values():
            if scenario.modes and current and all(
                    _is_in(current[service], scenario.modes.get(service, HEALTHY)) for service in current):
                return scenario.name
        return None

    async def start(self, name: str) -> None:
        """Set every fake service's mode as `name` says. KeyError for an unknown name;
        ScenarioError when the control API cannot be reached or refuses a mode."""
        scenario = self._scenarios[name]
        async with self._lock, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)) as session:
            services = await self._call(session, "GET", "/services")
            # Healthy ones first: a recovery is never held up behind a listener being closed.
            order = sorted(services, key=lambda service: service in scenario.modes)
            for service in order:
                mode = scenario.modes.get(service, HEALTHY)
                if not _is_in(services[service], mode):  # already so: left alone (a flap keeps its phase)
                    await self._call(session, "PUT", f"/services/{service}/mode", mode)
            self._running = None if not scenario.modes else name
        log.info("demo scenario %s: %s", name, ", ".join(
            f"{service} {mode['mode']}" for service, mode in scenario.modes.items()) or "all healthy")

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str,
                    body: dict[str, Any] | None = None) -> Any:
        url = self.control_url + path
        try:
            async with session.request(method, url, json=body) as response:
                text = await response.text()
                if response.status != 200:
                    raise ScenarioError(f"{method} {url}: HTTP {response.status}: {text[:200]}")
                return json.loads(text)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise ScenarioError(f"{method} {url}: the fake upstreams' control API cannot be reached: "
                                f"{exc or type(exc).__name__}") from None


def _is_in(entry: dict[str, Any], mode: dict[str, Any]) -> bool:
    """A service's `GET /services` entry shows `mode` (its mode and every option it sets)."""
    return all(entry.get(key) == value for key, value in mode.items())
