"""The admin API (§6): bearer token, manual breaker control, reload; through the real proxy."""

from __future__ import annotations

import logging
import re

import pytest

from proxy.core.clock import FakeClock

CONFIG = """
storage: {path: $db}
defaults: {failure_threshold: 2, open_timeout_ms: 30000}
services:
  payment:
    upstream: $payment
    routes:
      charges: {match: {methods: [POST], path: /charges}}
"""
CHARGE = {"amount": 10, "currency": "EUR", "order_id": "o-1"}


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch):
    monkeypatch.delenv("CIRCUIT_PROXY_ADMIN_TOKEN", raising=False)


async def admin(proxy, path: str, token: str | None = None, method: str = "POST",
                authorization: str | None = None) -> tuple[int, dict, dict]:
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with proxy.session.request(method, proxy.url(path), headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def charge(proxy) -> tuple[int, dict, dict]:
    async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE) as response:
        return response.status, dict(response.headers), await response.json()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic dG9rZW4=", "Bearer", "token"])
async def test_without_the_right_token_nothing_happens_and_nothing_is_revealed(start_proxy, monkeypatch,
                                                                             authorization):
    monkeypatch.setenv("CIRCUIT_PROXY_ADMIN_TOKEN", "token")
    proxy = await start_proxy(CONFIG)
    for path in ("/admin/breakers/payment.charges/force-open", "/admin/breakers/nope/force-open",
                 "/admin/reload", "/admin/whatever"):
        status, headers, body = await admin(proxy, path, authorization=authorization or "")
        assert (status, body["error"]) == (401, "unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")
    async with proxy.session.get(proxy.url("/status.json")) as response:
        assert (await response.json())["breakers"][0]["state"] == "closed"


async def test_token_comes_from_the_variable_the_config_names(start_proxy, monkeypatch):
    monkeypatch.setenv("SHOP_PROXY_TOKEN", "s3cret-from-env")
    proxy = await start_proxy(CONFIG + "admin: {token_env: SHOP_PROXY_TOKEN}\n")
    assert (await admin(proxy, "/admin/breakers/payment.charges/reset", "s3cret-from-env"))[0] == 200
    assert (await admin(proxy, "/admin/breakers/payment.charges/reset", "token"))[0] == 401


async def test_without_a_token_one_is_made_and_logged_once(start_proxy, caplog):
    caplog.set_level(logging.INFO)
    proxy = await start_proxy(CONFIG)
    lines = [r.getMessage() for r in caplog.records if "admin token: " in r.getMessage()]
    assert len(lines) == 1
    token = re.search(r"admin token: (\S+)$", lines[0]).group(1)
    assert token == proxy.app.control.admin_token and len(token) >= 32
    assert (await admin(proxy, "/admin/breakers/payment.charges/force-open", token))[0] == 200
    # The token never appears in any other line (e.g. the access or refusal logs).
    assert sum(token in r.getMessage() for r in caplog.records) == 1


async def test_force_open_rejects_without_contacting_the_upstream(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    token = proxy.app.control.admin_token
    status, _, entry = await admin(proxy, "/admin/breakers/payment.charges/force-open", token)
    assert (status, entry["name"], entry["state"], entry["retry_at"]) == (
        200, "payment.charges", "forced_open", None)
    status, headers, body = await charge(proxy)
    assert (status, body) == (503, {"error": "circuit_open", "breaker": "payment.charges", "retry_after": None})
    assert "Retry-After" not in headers
    assert fakes.requests("payment") == 0


async def test_force_closed_and_disable_let_calls_through_and_never_trip(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    token = proxy.app.control.admin_token
    await fakes.set_mode("payment", "error", status=500)
    for action, state in (("force-closed", "forced_closed"), ("disable", "disabled")):
        status, _, entry = await admin(proxy, f"/admin/breakers/payment.charges/{action}", token)
        assert (status, entry["state"]) == (200, state)
        assert [(await charge(proxy))[0] for _ in range(3)] == [500, 500, 500]
    assert fakes.requests("payment") == 6


async def test_reset_returns_to_closed_with_counts_cleared(start_proxy, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    token = proxy.app.control.admin_token
    await fakes.set_mode("payment", "error", status=500)
    assert [(await charge(proxy))[0] for _ in range(3)] == [500, 500, 503]
    await fakes.set_mode("payment", "healthy")
    status, _, entry = await admin(proxy, "/admin/breakers/payment.charges/reset", token)
    assert (status, entry["state"], entry["calls"], entry["opened_at"]) == (
        200, "closed", {"success": 0, "failure": 0, "rejected": 0}, None)
    assert (await charge(proxy))[0] == 201


async def test_unknown_breaker_or_action_is_404_and_wrong_method_405(start_proxy):
    proxy = await start_proxy(CONFIG)
    token = proxy.app.control.admin_token
    status, _, body = await admin(proxy, "/admin/breakers/payment.nope/force-open", token)
    assert (status, body) == (404, {"error": "unknown_breaker", "breaker": "payment.nope"})
    status, _, body = await admin(proxy, "/admin/breakers/payment.charges/explode", token)
    assert (status, body["error"]) == (404, "not_found")
    status, headers, body = await admin(proxy, "/admin/breakers/payment.charges/force-open", token, method="GET")
    assert (status, headers["Allow"], body["error"]) == (405, "POST", "method_not_allowed")


async def test_reload_applies_a_valid_config_and_refuses_an_invalid_one(start_proxy, write_config, fakes):
    proxy = await start_proxy(CONFIG, clock=FakeClock())
    token = proxy.app.control.admin_token
    await fakes.set_mode("payment", "error", status=500)
    assert [(await charge(proxy))[0] for _ in range(3)] == [500, 500, 503]

    write_config(CONFIG + """
  shipping:
    upstream: $shipping
""")
    status, headers, body = await admin(proxy, "/admin/reload", token)
    assert status == 200
    assert [(b["name"], b["state"], b["calls"]) for b in body] == [
        ("payment.charges", "open", {"success": 0, "failure": 2, "rejected": 1}),  # kept as it was
        ("payment.default", "closed", {"success": 0, "failure": 0, "rejected": 0}),
        ("shipping.default", "closed", {"success": 0, "failure": 0, "rejected": 0})]
    assert (headers["X-Reload-Added"], headers["X-Reload-Removed"], headers["X-Reload-Changed"]) == (
        "shipping.default", "", "")

    path = write_config(CONFIG.replace("failure_threshold: 2", "failure_threshold: -1") + "bogus: 1\n")
    status, _, body = await admin(proxy, "/admin/reload", token)
    assert (status, body["error"]) == (400, "invalid_config")
    assert body["errors"] == [f"{path}:3: defaults.failure_threshold: must be ≥ 0, got -1",  # by line
                              f"{path}:9: bogus: unknown key"]
    async with proxy.session.get(proxy.url("/status.json")) as response:
        names = [b["name"] for b in (await response.json())["breakers"]]
    assert names == ["payment.charges", "payment.default", "shipping.default"]  # nothing applied
