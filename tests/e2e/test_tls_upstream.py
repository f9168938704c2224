"""HTTPS upstreams through the real proxy (§1a `tls`): trust, host names, `verify: false`,
mutual TLS, keep-alive reuse and queue replay, against a trustme CA and a TLS server on loopback.

A TLS failure is the upstream's: 502 `upstream_unreachable`, counted as a failure of the
breaker, and the upstream never sees the request.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.tls_upstream import TlsUpstream, write_ca, write_client_cert

ITEM = {"sku": "SKU-001", "available": 5}
CHARGE = {"amount": 40, "currency": "EUR", "order_id": "o-1"}

CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 100, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               timeout_ms: 5000, connect_timeout_ms: 5000}
    services:
      inventory:
        upstream: $shop
        tls: $tls
"""

QUEUE_CONFIG = """
    storage: {path: $db}
    defaults: {failure_threshold: 100, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               timeout_ms: 5000, connect_timeout_ms: 5000}
    services:
      payment:
        upstream: $shop
        tls: $tls
        routes:
          charges:
            match: {methods: [POST], path: /charges}
            fallback: {type: queue, max_depth: 10, max_attempts: 3, retry_base_ms: 10, retry_max_ms: 20}
"""


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def shop(ca: trustme.CA) -> AsyncIterator[TlsUpstream]:
    """The shop's HTTPS upstream: a certificate for 127.0.0.1 and localhost from `ca`."""
    async with TlsUpstream(ca) as running:
        yield running


def tls(**keys: object) -> str:
    """A `tls` mapping as YAML flow text (JSON is YAML)."""
    return json.dumps({key: str(value) if isinstance(value, Path) else value for key, value in keys.items()})


async def get(proxy, path: str = "/inventory/stock/SKU-001") -> tuple[int, object]:
    async with proxy.session.get(proxy.url(path)) as response:
        return response.status, await response.json(content_type=None)


def unreachable(body: object, detail: str) -> object:
    """`body` with its detail replaced by `detail` if it matches that pattern (the end of an
    OpenSSL message names a line of CPython's `_ssl.c`, which differs between builds)."""
    if isinstance(body, dict) and re.fullmatch(detail, str(body.get("detail"))):
        return {**body, "detail": detail}
    return body


async def calls(proxy, name: str = "inventory.default") -> dict[str, int]:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        breakers = (await response.json())["breakers"]
    return {b["name"]: b for b in breakers}[name]["calls"]


async def admin(proxy, action: str, name: str) -> int:
    headers = {"Authorization": f"Bearer {proxy.app.control.admin_token}"}
    async with proxy.session.post(proxy.url(f"/admin/breakers/{name}/{action}"), headers=headers) as response:
        return response.status


async def until(predicate, what: str, timeout_s: float = 5.0):
    """Poll a background effect (queue replay) for at most `timeout_s`."""
    for _ in range(int(timeout_s / 0.02)):
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_certificate_from_the_configured_ca_is_trusted_and_the_request_forwarded(
        start_proxy, shop, tmp_path):
    proxy = await start_proxy(CONFIG, shop=shop.url, tls=tls(ca_file=shop.write_ca(tmp_path / "ca.pem")))
    assert await get(proxy, "/inventory/stock/SKU-001?fresh=1") == (200, ITEM)
    (seen,) = shop.requests
    proxy_host = proxy.url("/").removeprefix("http://").rstrip("/")
    assert (seen.method, seen.path, seen.client_names) == ("GET", "/stock/SKU-001?fresh=1", ())
    assert {k: v for k, v in seen.headers.items() if k.startswith(("Host", "X-Forwarded"))} == {
        "Host": f"127.0.0.1:{shop.port}", "X-Forwarded-For": "127.0.0.1",
        "X-Forwarded-Proto": "http", "X-Forwarded-Host": proxy_host}
    assert await calls(proxy) == {"success": 1, "failure": 0, "rejected": 0}


async def test_keep_alive_connections_are_reused_across_requests(start_proxy, shop, tmp_path):
    proxy = await start_proxy(CONFIG, shop=shop.url, tls=tls(ca_file=shop.write_ca(tmp_path / "ca.pem")))
    answers = [await get(proxy) for _ in range(5)]
    assert answers == [(200, ITEM)] * 5
    # One after the other: the first TLS connection goes back to the pool and carries them all.
    assert [r.connection for r in shop.requests] == [1, 1, 1, 1, 1]
    assert shop.connections == 1


@pytest.mark.parametrize("trusted", ["another CA", "the system store"])
async def test_a_certificate_from_an_unknown_ca_is_a_502_and_a_failure(start_proxy, shop, tmp_path, trusted):
    settings = "null"  # `tls: null`: as if not written, the system's CA store
    if trusted == "another CA":
        settings = tls(ca_file=write_ca(trustme.CA(), tmp_path / "other-ca.pem"))
    proxy = await start_proxy(CONFIG, shop=shop.url, tls=settings)
    assert await get(proxy) == (502, {
        "error": "upstream_unreachable", "breaker": "inventory.default",
        "detail": "TLS: certificate verify failed: unable to get local issuer certificate"})
    assert shop.requests == []
    assert await calls(proxy) == {"success": 0, "failure": 1, "rejected": 0}


@pytest.mark.parametrize(("host", "reason"), [("127.0.0.1", "IP address mismatch"),
                                               ("localhost", "Hostname mismatch")])
async def test_a_certificate_for_another_host_name_is_a_502_and_a_failure(start_proxy, ca, tmp_path, host, reason):
    async with TlsUpstream(ca, names=("other.test",)) as other:
        proxy = await start_proxy(CONFIG, shop=f"https://{host}:{other.port}",
                                  tls=tls(ca_file=write_ca(ca, tmp_path / "ca.pem")))
        assert await get(proxy) == (502, {
            "error": "upstream_unreachable", "breaker": "inventory.default",
            "detail": f"TLS: certificate verify failed: {reason}, certificate is not valid for '{host}'."})
        assert other.requests == []
        assert await calls(proxy) == {"success": 0, "failure": 1, "rejected": 0}


async def test_verify_false_accepts_a_certificate_from_an_unknown_ca(start_proxy, shop, tmp_path):
    other = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    proxy = await start_proxy(CONFIG, shop=shop.url, tls=tls(ca_file=other, verify=False))
    assert await get(proxy) == (200, ITEM)
    assert [(r.method, r.path) for r in shop.requests] == [("GET", "/stock/SKU-001")]
    assert await calls(proxy) == {"success": 1, "failure": 0, "rejected": 0}


async def test_an_upstream_requiring_a_client_certificate_refuses_a_proxy_without_one(
        start_proxy, ca, tmp_path):
    async with TlsUpstream(ca, require_client_cert=True) as upstream:
        proxy = await start_proxy(CONFIG, shop=upstream.url,
                                  tls=tls(ca_file=upstream.write_ca(tmp_path / "ca.pem")))
        # TLS 1.3: the proxy's side of the handshake completes before the upstream checks for
        # a client certificate; the upstream then drops the connection (with or without an
        # alert the proxy gets to read), so the refusal shows on the first read, not at connect.
        status, body = await get(proxy)
        detail = r"connection closed by the upstream|SSLError|ConnectionResetError"
        assert (status, unreachable(body, detail)) == (502, {
            "error": "upstream_unreachable", "breaker": "inventory.default", "detail": detail})
        assert upstream.requests == []
        assert await calls(proxy) == {"success": 0, "failure": 1, "rejected": 0}


async def test_an_upstream_requiring_a_client_certificate_accepts_the_configured_one(
        start_proxy, ca, tmp_path):
    cert, key = write_client_cert(ca, tmp_path / "client")
    async with TlsUpstream(ca, require_client_cert=True) as upstream:
        proxy = await start_proxy(CONFIG, shop=upstream.url, tls=tls(
            ca_file=upstream.write_ca(tmp_path / "ca.pem"), client_cert=cert, client_key=key))
        assert await get(proxy) == (200, ITEM)
        assert [(r.method, r.path, r.client_names) for r in upstream.requests] == [
            ("GET", "/stock/SKU-001", ("circuit-proxy.test",))]


async def test_a_queued_request_is_replayed_over_tls_with_its_idempotency_key(start_proxy, shop, tmp_path):
    proxy = await start_proxy(QUEUE_CONFIG, shop=shop.url, tls=tls(ca_file=shop.write_ca(tmp_path / "ca.pem")))
    proxy.app.queues.poll_s = 0.02
    assert await admin(proxy, "force-open", "payment.charges") == 200
    async with proxy.session.post(proxy.url("/payment/charges"), json=CHARGE,
                                  headers={"Idempotency-Key": "k-1"}) as response:
        accepted = response.status, response.headers["Idempotency-Key"], await response.json()
    assert accepted == (202, "k-1", {"status": "queued", "queue": "payment.charges", "queue_id": 1,
                                     "idempotency_key": "k-1"})
    assert shop.requests == []

    assert await admin(proxy, "reset", "payment.charges") == 200
    (replayed,) = await until(lambda: list(shop.requests), "the charge replayed over TLS")
    assert (replayed.method, replayed.path, replayed.headers["Idempotency-Key"],
            replayed.headers["Host"], json.loads(replayed.body)) == (
        "POST", "/charges", "k-1", f"127.0.0.1:{shop.port}", CHARGE)
    delivered = await until(lambda: _states(proxy, "delivered"), "the queue item marked delivered")
    assert delivered == [("delivered", 1)]
    assert len(shop.requests) == 1  # a 201 is the end of it: no second delivery


async def _states(proxy, wanted: str) -> list[tuple] | None:
    found = await proxy.app.storage.fetchall("SELECT state, attempts FROM queue_items ORDER BY id")
    return found if found and all(row[0] == wanted for row in found) else None
