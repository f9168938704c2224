"""The static fallback through the real proxy and fake upstreams (§4, §5)."""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.core.clock import FakeClock
from proxy.config.load import ConfigError, load_settings

POLICY = """
    storage: {path: $db}
    defaults: {failure_threshold: 1, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               open_timeout_ms: 30000, timeout_ms: 2000, connect_timeout_ms: 500}
"""

BUSY = {
    "status": 503,
    "headers": {"Content-Type": "application/json", "X-Order": "{{body.order_id}}"},
    "body": {"error": "payments_busy", "breaker": "{{breaker}}", "state": "{{state}}",
             "retry_after": "{{retry_after}}", "order": "{{body.order_id}}",
             "amount": "{{body.amount}}", "note": "order {{body.order_id}} for \"{{query.who}}\""},
}


def config(fallback: str) -> str:
    return POLICY + f"""
    services:
      payment:
        upstream: $payment
        routes:
          charges:
            match: {{methods: [POST], path: /charges}}
            fallback: {fallback}
    """


async def logs_of(proxy, count: int) -> list[tuple]:
    """fallback_logs rows, once the background writer has written `count` of them."""
    rows: list[tuple] = []
    for _ in range(300):
        rows = await proxy.app.storage.fetchall(
            "SELECT breaker, type, method, path, status, reason, detail FROM fallback_logs ORDER BY id")
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.01)
    return rows


async def open_breaker(proxy, fakes) -> None:
    await fakes.set_mode("payment", "error", status=500)
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": 1}) as response:
        assert response.status == 500
    await fakes.set_mode("payment", "healthy")


async def test_open_breaker_serves_the_canned_response_with_placeholders(start_proxy, fakes, config_dir):
    (config_dir / "fallback_responses" / "busy.json").write_text(json.dumps(BUSY))
    proxy = await start_proxy(config("{type: static, file: busy.json}"), clock=FakeClock())
    await open_breaker(proxy, fakes)
    async with proxy.session.post(proxy.url("/payment/charges?who=Ann%20%22A%22&x=1"),
                                  json={"amount": 12.5, "order_id": "o-\"7\"\n"},
                                  headers={"Authorization": "Bearer s3cret"}) as response:
        body = await response.read()
        assert response.status == 503
        assert {k: v for k, v in response.headers.items() if k not in ("Date", "Server")} == {
            "Content-Type": "application/json", "X-Order": 'o-"7"', "Retry-After": "30",
            "X-Circuit-Breaker": "payment.charges", "X-Circuit-State": "open", "X-Fallback": "static",
            "Content-Length": str(len(body))}
    assert json.loads(body) == {
        "error": "payments_busy", "breaker": "payment.charges", "state": "open", "retry_after": 30,
        "order": 'o-"7"\n', "amount": 12.5, "note": 'order o-"7"\n for "Ann "A""'}
    assert fakes.requests("payment") == 1
    assert await logs_of(proxy, 1) == [
        ("payment.charges", "static", "POST", "/payment/charges", 503, "open", None)]


async def test_a_call_that_gets_no_answer_is_served_the_fallback(start_proxy, fakes, config_dir):
    proxy = await start_proxy(POLICY + """
    services:
      payment:
        upstream: $payment
        failure_threshold: 5
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: static, file: service-unavailable.json}
    """, clock=FakeClock())
    await fakes.set_mode("payment", "down")
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": 1}) as response:
        assert response.status == 503
        assert (response.headers["X-Fallback"], response.headers["X-Circuit-State"]) == ("static", "closed")
        assert "Retry-After" not in response.headers  # closed: no time to half-open to give
        assert await response.json() == {"error": "service_unavailable", "breaker": "payment.charges",
                                         "retry_after": None}
    assert await logs_of(proxy, 1) == [
        ("payment.charges", "static", "POST", "/payment/charges", 503, "unreachable", None)]


async def test_on_failure_false_leaves_the_contract_error(start_proxy, fakes):
    proxy = await start_proxy(POLICY.replace("failure_threshold: 1", "failure_threshold: 5") + """
    services:
      payment:
        upstream: $payment
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: static, file: service-unavailable.json, on_failure: false}
    """, clock=FakeClock())
    await fakes.set_mode("payment", "down")
    async with proxy.session.post(proxy.url("/payment/charges"), json={"amount": 1}) as response:
        assert response.status == 502
        assert "X-Fallback" not in response.headers
        assert (await response.json())["error"] == "upstream_unreachable"


async def test_forced_open_and_plain_files(start_proxy, fakes, config_dir):
    (config_dir / "fallback_responses" / "sorry.html").write_text(
        "<p>{{service}} is {{state}}: {{query.q}}</p>\n")
    proxy = await start_proxy(config("{type: static, file: sorry.html, status: 200}"), clock=FakeClock())
    proxy.app.registry.get("payment.charges").breaker.force_open()
    async with proxy.session.post(proxy.url("/payment/charges?q=%3Cb%3E"), data=b"") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["X-Circuit-State"] == "forced_open"
        assert await response.text() == "<p>payment is forced_open: &lt;b&gt;</p>\n"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("../config/breakers.yaml", None, "resolves outside"),
    ("missing.json", None, "no such file in"),
    ("bad.json", "{\"status\": 99}", "bad.json: status must be an HTTP status 100..599, got 99"),
    ("bad.json", "{\"body\": 1, \"extra\": 2}", "bad.json: unknown key 'extra'"),
    ("bad.json", "{\"body\": \"{{nope}}\"}", "bad.json: unknown placeholder {{nope}}"),
    ("bad.json", "{\"body\": \"{{header.Authorization}}\"}", "would echo a credential"),
    ("bad.json", "{\"headers\": {\"Content-Length\": \"3\"}}", "Content-Length is set by the proxy"),
    ("bad.json", "{\"body\": ", "bad.json: invalid JSON at line 1 column 10"),
])
def test_bad_response_files_are_config_errors(write_config, config_dir, name, content, message):
    if content is not None:
        (config_dir / "fallback_responses" / name).write_text(content)
    path = write_config(config(f"{{type: static, file: {json.dumps(name)}}}"))
    with pytest.raises(ConfigError) as error:
        load_settings(path, {})
    assert len(error.value.problems) == 1
    assert "services.payment.routes.charges.fallback.file: " in error.value.problems[0]
    assert message in error.value.problems[0]
