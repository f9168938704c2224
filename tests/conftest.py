"""Shared fixtures: real fake upstreams and a real proxy on loopback, configs in tmp_path."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import string
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from fake_upstreams import FakeUpstreams
from proxy.app import App
from proxy.config.load import load_settings
from proxy.config.model import Settings
from proxy.core.clock import Clock
from tests.browser import browser  # noqa: F401  (the Chromium fixture, for every page test)

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run soak tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_BLOCKING = {"time.sleep": (time, "sleep"), "sqlite3.connect": (sqlite3, "connect")}


@pytest.fixture(autouse=True)
def blocking_call_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocking calls made on a thread that runs an event loop fail the test (STYLE §6)."""
    for name, (module, attribute) in _BLOCKING.items():
        original = getattr(module, attribute)

        def guarded(*args, _original=original, _name=name, **kwargs):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return _original(*args, **kwargs)
            raise AssertionError(f"blocking call {_name}() inside the event loop")
        monkeypatch.setattr(module, attribute, guarded)


@pytest.fixture
async def fakes() -> AsyncIterator[FakeUpstreams]:
    upstreams = FakeUpstreams(host="127.0.0.1", base_port=0)
    await upstreams.start()
    try:
        yield upstreams
    finally:
        await upstreams.stop()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A project-like folder: config/ and a copy of the shipped fallback_responses/."""
    (tmp_path / "config").mkdir()
    shutil.copytree(ROOT / "fallback_responses", tmp_path / "fallback_responses")
    return tmp_path


@pytest.fixture
def write_config(config_dir: Path, fakes: FakeUpstreams) -> Callable[..., Path]:
    """Write a config; `$payment`, `$inventory`, … become the fake upstreams' URLs, `$db` a
    database path in tmp_path."""
    def write(text: str, name: str = "breakers.yaml", **extra: str) -> Path:
        values = {service: fakes.url(service) for service in
                  ("payment", "inventory", "notification", "shipping")}
        values["db"] = str(config_dir / "var" / "proxy.db")
        values.update(extra)
        path = config_dir / "config" / name
        path.write_text(string.Template(textwrap.dedent(text)).substitute(values))
        return path
    return write


@dataclass
class RunningProxy:
    app: App
    settings: Settings
    session: aiohttp.ClientSession

    @property
    def server(self):  # noqa: ANN201  (the running HTTP server: port, connections)
        return self.app.server

    def url(self, path: str) -> str:
        return self.app.url(path)

    async def close(self) -> None:
        await self.session.close()
        await self.app.close()


@pytest.fixture
async def start_proxy(write_config: Callable[..., Path]) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    started: list[RunningProxy] = []

    async def start(text: str, *, clock: Clock | None = None, environ: dict[str, str] | None = None,
                    **extra: str) -> RunningProxy:
        path = write_config(text, **extra)
        settings = load_settings(path, environ or {})
        app = App(settings, clock=clock)
        # What `circuit-proxy run` starts, on a free port.
        await app.start("127.0.0.1", 0)
        session = aiohttp.ClientSession(auto_decompress=False)
        running = RunningProxy(app, settings, session)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.close()


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL for the session (tests/pg_server.py), started on first use."""
    from tests.pg_server import PgServer  # noqa: PLC0415  (only the fleet tests need it)
    server = PgServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server, request: pytest.FixtureRequest) -> str:
    """A fresh database of its own for each test."""
    name = "t_" + "".join(ch if ch.isalnum() else "_" for ch in request.node.name.lower())[:40]
    name = f"{name}_{time.monotonic_ns() % 10**9}"
    return pg_server.create_database(name)
