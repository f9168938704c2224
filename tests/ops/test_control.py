"""The control plane (§6) called in-process: every reserved path, its answers and its streams.

No server and no socket: a real Registry and Metrics from a small config, and `Request`s
handed to `ControlPlane.handle` as the HTTP server hands them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import textwrap
from pathlib import Path

import pytest
from multidict import CIMultiDict

from proxy.config.load import load_settings
from proxy.core.clock import FakeClock
from proxy.core.messages import Answer, Request
from proxy.ops.control import ControlPlane
from proxy.ops.paths import route_path, unquote
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry

CONFIG = """
storage: {path: var/db.sqlite}
defaults: {failure_threshold: 2, open_timeout_ms: 30000}
services:
  payment:
    upstream: http://127.0.0.1:9
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""
TOKEN = "t0ken"
JSON_UTF8 = "application/json; charset=utf-8"
QUEUES = [{"name": "payment.charges", "depth": 3, "dead_letter": 1}]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write(tmp_path, CONFIG)


def build(config_path: Path, *, admin_token: str | None = TOKEN,
          environ: dict[str, str] | None = None) -> tuple[ControlPlane, Registry, Metrics]:
    settings = load_settings(config_path, {})
    metrics = Metrics()
    registry = Registry(settings, FakeClock(start_wall=1_700_000_000.0), metrics)
    control = ControlPlane(settings, registry, metrics, queues=lambda: QUEUES, admin_token=admin_token)
    return control, registry, metrics


@pytest.fixture
def plane(config_path: Path) -> tuple[ControlPlane, Registry, Metrics]:
    return build(config_path)


async def call(control: ControlPlane, method: str, target: str, token: str | None = None,
               **headers: str) -> Answer:
    sent = CIMultiDict(headers)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return await control.handle(Request(method, target, sent, client_ip="192.0.2.7"))


def document(answer: Answer) -> object:
    assert answer.headers["Content-Type"].startswith("application/json")
    return json.loads(answer.body)


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


# -- /healthz, /metrics, /status.json, /status -----------------------------------------------

async def test_healthz_answers_ok_to_get_and_head(plane):
    control, _, _ = plane
    for method in ("GET", "HEAD"):
        answer = await call(control, method, "/healthz?probe=1")
        assert (answer.status, answer.headers["Content-Type"], answer.body) == (
            200, JSON_UTF8, b'{"status": "ok"}')


async def test_other_methods_and_paths_are_an_unknown_service_as_the_proxy_route_said(plane):
    control, _, _ = plane
    for method, target, service in (("POST", "/healthz", "healthz"), ("PUT", "/metrics", "metrics"),
                                    ("DELETE", "/status", "status"), ("GET", "/healthz/", "healthz"),
                                    ("POST", "/status.json", "status.json"), ("GET", "/admin", "admin"),
                                    ("GET", "/status.json/x", "status.json")):
        answer = await call(control, method, target, TOKEN)
        assert (answer.status, document(answer)) == (404, {"error": "unknown_service", "service": service})


async def test_unknown_status_paths_are_not_found_with_the_decoded_path(plane):
    control, _, _ = plane
    for method, target, path in (("GET", "/status/", "/status/"), ("GET", "/status/x%20y", "/status/x y"),
                                 ("POST", "/status/events", "/status/events"),
                                 ("GET", "/status/events/", "/status/events/")):
        answer = await call(control, method, target)
        assert (answer.status, answer.headers["Content-Type"], document(answer)) == (
            404, JSON_UTF8, {"error": "not_found", "path": path})


async def test_metrics_are_prometheus_text_with_the_breaker_families(plane):
    control, _, _ = plane
    answer = await call(control, "GET", "/metrics")
    assert (answer.status, answer.headers["Content-Type"]) == (
        200, "text/plain; version=0.0.4; charset=utf-8")
    text = answer.body.decode()
    assert 'circuit_breaker_state{breaker="payment.charges",state="closed"} 1.0' in text
    assert "circuit_proxy_status_stream_clients 0.0" in text


async def test_status_json_has_the_contract_shape_and_is_never_cached(plane):
    control, _, _ = plane
    answer = await call(control, "GET", "/status.json")
    assert (answer.status, answer.headers["Cache-Control"], answer.headers["Content-Type"]) == (
        200, "no-store", JSON_UTF8)
    body = document(answer)
    assert body["queues"] == QUEUES
    assert [(b["name"], b["state"]) for b in body["breakers"]] == [
        ("payment.charges", "closed"), ("payment.default", "closed")]
    assert {"name", "service", "route", "state", "failure_rate", "calls", "opened_at", "retry_at",
            "thresholds", "transitions", "history", "fallbacks_served"} <= set(body["breakers"][0])


async def test_the_page_runs_only_its_own_inline_script_and_style(plane):
    control, _, _ = plane
    answer = await call(control, "GET", "/status")
    headers = answer.headers
    assert (answer.status, headers["Content-Type"], headers["Cache-Control"]) == (
        200, "text/html; charset=utf-8", "no-store")
    assert (headers["X-Content-Type-Options"], headers["Referrer-Policy"]) == ("nosniff", "no-referrer")
    csp = headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none';") and "frame-ancestors 'none'" in csp
    script = re.search(r"<script>(.*?)</script>", answer.body.decode(), re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp


# -- /admin ----------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic dG9rZW4=", "Bearer", TOKEN])
async def test_admin_without_the_right_token_is_401_before_anything_else(plane, authorization):
    control, registry, _ = plane
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, target in (("POST", "/admin/breakers/payment.charges/force-open"),
                           ("POST", "/admin/breakers/nope/force-open"), ("GET", "/admin/reload"),
                           ("DELETE", "/admin/whatever"), ("GET", "/admin/")):
        answer = await call(control, method, target, **headers)
        assert (answer.status, document(answer)["error"]) == (401, "unauthorized")
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="circuit-proxy admin"'
        assert answer.headers["Cache-Control"] == "no-store"
    assert registry.get("payment.charges").breaker.state.value == "closed"


async def test_force_open_changes_the_breaker_and_answers_its_entry(plane, caplog):
    control, registry, _ = plane
    caplog.set_level(logging.INFO, logger="proxy.ops.admin")
    answer = await call(control, "POST", "/admin/breakers/payment.charges/force-open", TOKEN)
    entry = document(answer)
    assert (answer.status, answer.headers["Cache-Control"]) == (200, "no-store")
    assert (entry["name"], entry["state"], entry["retry_at"]) == ("payment.charges", "forced_open", None)
    assert registry.get("payment.charges").breaker.state.value == "forced_open"
    (record,) = [r for r in caplog.records if r.getMessage() == "admin force-open"]
    assert (record.breaker, record.client) == ("payment.charges", "192.0.2.7")
    # The breaker name is percent-decoded, as the router decoded path parameters.
    answer = await call(control, "POST", "/admin/breakers/payment%2Echarges/reset?x=1", TOKEN)
    assert (answer.status, document(answer)["state"]) == (200, "closed")


async def test_admin_404_for_unknown_breakers_and_paths_405_for_a_wrong_method(plane):
    control, _, _ = plane
    cases = [
        ("POST", "/admin/breakers/payment.nope/force-open", 404,
         {"error": "unknown_breaker", "breaker": "payment.nope"}),
        ("POST", "/admin/breakers/a%2Fb/reset", 404, {"error": "unknown_breaker", "breaker": "a/b"}),
        ("POST", "/admin/breakers/payment.charges/explode", 404,
         {"error": "not_found", "path": "/admin/breakers/payment.charges/explode"}),
        ("GET", "/admin/breakers/payment.charges/force-open%20", 404,
         {"error": "not_found", "path": "/admin/breakers/payment.charges/force-open "}),
        ("POST", "/admin/", 404, {"error": "not_found", "path": "/admin/"}),
        ("POST", "/admin/reload/", 404, {"error": "not_found", "path": "/admin/reload/"}),
        ("POST", "/admin/breakers/payment.charges", 404,
         {"error": "not_found", "path": "/admin/breakers/payment.charges"}),
    ]
    for method, target, status, body in cases:
        answer = await call(control, method, target, TOKEN)
        assert (answer.status, document(answer)) == (status, body), target
    not_allowed = {"error": "method_not_allowed", "allow": "POST"}
    for method, target in (("GET", "/admin/breakers/payment.charges/force-open"), ("HEAD", "/admin/reload"),
                           ("PUT", "/admin/reload"), ("POST", "/admin/breakers/a/b/reset"),
                           ("POST", "/admin/breakers//reset")):
        answer = await call(control, method, target, TOKEN)
        assert (answer.status, answer.headers["Allow"], document(answer)) == (405, "POST", not_allowed)


async def test_reload_applies_a_valid_config_and_refuses_an_invalid_one(plane, config_path):
    control, registry, _ = plane
    write(config_path.parent.parent, CONFIG + "  shipping:\n    upstream: http://127.0.0.1:9\n")
    answer = await call(control, "POST", "/admin/reload", TOKEN)
    assert answer.status == 200
    assert [b["name"] for b in document(answer)] == ["payment.charges", "payment.default", "shipping.default"]
    assert (answer.headers["X-Reload-Added"], answer.headers["X-Reload-Removed"],
            answer.headers["X-Reload-Kept"]) == ("shipping.default", "", "payment.charges,payment.default")

    write(config_path.parent.parent, CONFIG + "bogus: 1\n")
    answer = await call(control, "POST", "/admin/reload", TOKEN)
    assert (answer.status, document(answer)["error"]) == (400, "invalid_config")
    assert list(registry.routes) == ["payment.charges", "payment.default", "shipping.default"]


# -- /status/events --------------------------------------------------------------------------

async def next_chunk(stream) -> bytes:
    return await asyncio.wait_for(stream.__anext__(), 5)


async def test_a_stream_starts_with_retry_and_a_snapshot_then_carries_transitions(plane):
    control, _, metrics = plane
    answer = await call(control, "GET", "/status/events")
    assert (answer.status, answer.body) == (200, b"")
    assert (answer.headers["Content-Type"], answer.headers["Cache-Control"],
            answer.headers["X-Accel-Buffering"]) == ("text/event-stream", "no-store", "no")
    stream = answer.stream
    first = await next_chunk(stream)
    assert first.startswith(b"retry: 2000\n\nevent: snapshot\ndata: ")
    snapshot = json.loads(first.split(b"data: ", 1)[1])
    assert set(snapshot) == {"breakers", "queues"}
    assert sample(metrics, "circuit_proxy_status_stream_clients") == 1

    await call(control, "POST", "/admin/breakers/payment.charges/force-open", TOKEN)
    event = await next_chunk(stream)
    assert event == (b'event: transition\ndata: {"breaker":"payment.charges","from_state":"closed",'
                     b'"to_state":"forced_open","at":"2023-11-14T22:13:20.000Z"}\n\n')

    control.close_streams()
    with pytest.raises(StopAsyncIteration):
        await next_chunk(stream)
    assert (control.hub.client_count, sample(metrics, "circuit_proxy_status_stream_clients")) == (0, 0)
    # After shutdown began, a new stream is an empty one.
    later = await call(control, "GET", "/status/events")
    assert [chunk async for chunk in later.stream] == []


async def test_closing_the_iterator_forgets_the_client(plane):
    control, _, metrics = plane
    streams = [(await call(control, "GET", "/status/events")).stream for _ in range(2)]
    for stream in streams:
        await next_chunk(stream)
    assert sample(metrics, "circuit_proxy_status_stream_clients") == 2
    await streams[0].aclose()  # the server, between two chunks: the client went away
    assert (control.hub.client_count, sample(metrics, "circuit_proxy_status_stream_clients")) == (1, 1)
    pending = asyncio.ensure_future(streams[1].__anext__())  # the server, waiting for a chunk
    await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert (control.hub.client_count, sample(metrics, "circuit_proxy_status_stream_clients")) == (0, 0)


async def test_a_stream_never_started_holds_nothing_and_head_has_no_stream(plane):
    control, _, metrics = plane
    answer = await call(control, "GET", "/status/events")
    await answer.stream.aclose()
    head = await call(control, "HEAD", "/status/events")
    assert (head.status, head.stream, head.headers["Content-Type"]) == (200, None, "text/event-stream")
    assert (control.hub.client_count, sample(metrics, "circuit_proxy_status_stream_clients")) == (0, 0)


async def test_a_client_that_does_not_read_loses_events_and_they_are_counted(plane):
    control, _, metrics = plane
    stream = (await call(control, "GET", "/status/events")).stream
    await next_chunk(stream)
    for _ in range(70):
        control.hub.tick()  # returns at once whatever the client does
    assert sample(metrics, "circuit_proxy_status_events_dropped_total") == 70 - 64
    await stream.aclose()


# -- lifecycle -------------------------------------------------------------------------------

async def test_a_generated_token_is_logged_once_at_start_and_never_otherwise(config_path, monkeypatch, caplog):
    monkeypatch.delenv("CIRCUIT_PROXY_ADMIN_TOKEN", raising=False)
    caplog.set_level(logging.INFO)
    control, _, _ = build(config_path, admin_token=None)
    assert control.token_generated and len(control.admin_token) >= 32
    assert not caplog.records  # not when built: when the app starts
    await control.start()
    try:
        lines = [r.getMessage() for r in caplog.records if "admin token: " in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].startswith("CIRCUIT_PROXY_ADMIN_TOKEN is not set")
        assert re.search(r"admin token: (\S+)$", lines[0]).group(1) == control.admin_token
        assert (await call(control, "POST", "/admin/breakers/payment.charges/reset", control.admin_token)).status == 200
        await call(control, "POST", "/admin/reload", "wrong")
    finally:
        control.close_streams()
        await control.stop()
    assert sum(control.admin_token in r.getMessage() for r in caplog.records) == 1


async def test_a_token_from_the_environment_is_used_and_not_logged(config_path, monkeypatch, caplog):
    monkeypatch.setenv("CIRCUIT_PROXY_ADMIN_TOKEN", "from-env")
    caplog.set_level(logging.INFO)
    control, _, _ = build(config_path, admin_token=None)
    await control.start()
    await control.stop()
    assert (control.admin_token, control.token_generated) == ("from-env", False)
    assert not [r for r in caplog.records if "admin token" in r.getMessage()]


async def test_the_ticker_sends_snapshots_until_stop(plane):
    control, _, _ = plane
    stream = (await call(control, "GET", "/status/events")).stream
    await next_chunk(stream)
    await control.start()
    try:
        assert (await next_chunk(stream)).startswith(b"event: snapshot\n")
    finally:
        control.close_streams()
        await control.stop()
    assert [chunk async for chunk in stream] == []
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "status-ticker"]


# -- paths -----------------------------------------------------------------------------------

def test_paths_are_decoded_as_the_router_decoded_them():
    assert unquote("/a%2Fb/c%25d/%7a/%e2%82%ac/%FF") == "/a/b/c%d/z/€/%FF"
    assert route_path("/a%2fb/c%25d/%7a/%e2%82%ac") == "/a%2Fb/c%25d/z/€"
    assert route_path("/status/%65vents") == "/status/events"
