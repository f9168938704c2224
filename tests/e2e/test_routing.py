"""Routing and the data path through the real proxy (§2, §4): what reaches the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

CONFIG = """
    storage: {path: $db}
    services:
      payment:
        upstream: $payment
        routes:
          charges: {match: {methods: [POST], path: /charges}}
          by_id: {match: {path_regex: "/charges/ch_[0-9]+"}}
      echo:
        upstream: $echo/base
"""


async def echo_app() -> web.Application:
    """An upstream that reports what it received and streams bodies back with a checksum."""
    async def report(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/stream"):
            digest = hashlib.sha256()
            response = web.StreamResponse(headers={"X-Upstream": "echo"})
            await response.prepare(request)
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response
        body = await request.read()
        return web.json_response({
            "method": request.method, "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(), "body_length": len(body),
        }, headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                    "Keep-Alive": "timeout=5", "X-End-To-End": "kept"})
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", report)
    return app


@pytest.fixture
async def echo():
    server = TestServer(await echo_app(), host="127.0.0.1", port=0)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def proxy(start_proxy, echo):
    return await start_proxy(CONFIG, echo=echo)


async def raw_request(proxy, data: bytes) -> bytes:
    """Send bytes as they are (clients would normalise what these tests need to be hostile)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return response


async def test_service_path_and_query_reach_the_upstream_byte_for_byte(proxy):
    async with proxy.session.get(proxy.url("/echo/a/b%2Fc?x=1&y=%20z&x=2&flag")) as response:
        assert response.status == 200
        report = await response.json()
    assert (report["method"], report["raw_path"]) == ("GET", "/base/a/b%2Fc?x=1&y=%20z&x=2&flag")


async def test_service_without_slash_is_its_root(proxy):
    async with proxy.session.get(proxy.url("/echo")) as response:
        assert (await response.json())["raw_path"] == "/base/"


async def test_routes_match_in_order_and_name_the_breaker(proxy, fakes):
    async with proxy.session.post(proxy.url("/payment/charges"), json={
            "amount": 10, "currency": "EUR", "order_id": "o-1"}) as response:
        assert response.status == 201
        charge = await response.json()
    assert charge["amount"] == 10 and charge["order_id"] == "o-1"
    async with proxy.session.get(proxy.url("/payment/charges")) as response:
        assert [c["id"] for c in await response.json()] == [charge["id"]]
    async with proxy.session.get(proxy.url("/status.json")) as response:
        calls = {b["name"]: b["calls"]["success"] for b in (await response.json())["breakers"]}
    # POST /charges → charges; GET /charges → default (the regex needs an id)
    assert calls == {"payment.charges": 1, "payment.by_id": 0, "payment.default": 1, "echo.default": 0}


async def test_unknown_service_is_404_json(proxy):
    async with proxy.session.get(proxy.url("/nope/x")) as response:
        assert response.status == 404
        assert await response.json() == {"error": "unknown_service", "service": "nope"}


@pytest.mark.parametrize("path", ["/echo/../admin", "/echo/a/./b", "/echo/%2e%2E/x", "/echo/a/%2e"])
async def test_dot_segments_are_refused_and_never_forwarded(proxy, path):
    answer = await raw_request(proxy, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"error": "bad_request"' in answer


async def test_hop_by_hop_headers_are_stripped_and_forwarded_headers_set(proxy):
    headers = {"Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "secret", "Keep-Alive": "300",
               "TE": "trailers", "X-Keep": "yes", "X-Forwarded-For": "203.0.113.7"}
    async with proxy.session.get(proxy.url("/echo/h"), headers=headers) as response:
        report = await response.json()
        assert response.headers["X-End-To-End"] == "kept"
        assert "X-Secret-Hop" not in response.headers and "Keep-Alive" not in response.headers
    received = {k.lower(): v for k, v in report["headers"]}
    assert "x-drop-me" not in received and "keep-alive" not in received and "te" not in received
    assert received["x-keep"] == "yes"
    assert received["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-forwarded-host"] == f"127.0.0.1:{proxy.server.port}"


async def test_multi_megabyte_body_round_trips_streamed(proxy):
    payload = os.urandom(6 * 1024 * 1024)

    async def chunks():
        for start in range(0, len(payload), 256 * 1024):
            yield payload[start:start + 256 * 1024]

    digest = hashlib.sha256()
    async with proxy.session.post(proxy.url("/echo/stream"), data=chunks()) as response:
        assert response.status == 200
        assert response.headers["X-Upstream"] == "echo"
        async for chunk in response.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_body_with_length_reaches_upstream_intact(proxy):
    payload = os.urandom(3 * 1024 * 1024 + 7)
    async with proxy.session.put(proxy.url("/echo/put"), data=payload) as response:
        report = await response.json()
    assert (report["body_length"], report["body_sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())


async def test_oversized_body_is_413(start_proxy, echo):
    proxy = await start_proxy(CONFIG.replace("services:", "server: {max_body_bytes: 1000}\n    services:"),
                              echo=echo)
    async with proxy.session.post(proxy.url("/echo/x"), data=b"x" * 1001) as response:
        assert response.status == 413
        assert await response.json() == {"error": "payload_too_large", "max_body_bytes": 1000}

    async def chunked():
        for _ in range(5):
            yield b"y" * 400

    async with proxy.session.post(proxy.url("/echo/stream"), data=chunked()) as response:
        assert response.status == 413


async def test_oversized_headers_are_431(proxy):
    async with proxy.session.get(proxy.url("/echo/x"), headers={"X-Big": "b" * 17000}) as response:
        assert response.status == 431
        assert (await response.json())["error"] == "request_header_fields_too_large"


@pytest.mark.parametrize("head", [
    b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST /echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET /echo/x HTTP/1.1\r\nHost: x\r\nX-Evil: a\rb\r\n\r\n",
])
async def test_ambiguous_framing_is_400_and_never_forwarded(proxy, head):
    answer = await raw_request(proxy, head)
    assert answer.split(b" ", 2)[1] == b"400"  # the HTTP parser refuses these before routing
    async with proxy.session.get(proxy.url("/status.json")) as response:
        echo_calls = [b for b in (await response.json())["breakers"] if b["name"] == "echo.default"]
    assert echo_calls[0]["calls"] == {"success": 0, "failure": 0, "rejected": 0}


async def test_reserved_paths_are_never_forwarded(proxy):
    for path in ("/healthz", "/status.json", "/metrics"):
        async with proxy.session.get(proxy.url(path)) as response:
            assert response.status == 200, path
    async with proxy.session.post(proxy.url("/admin/anything")) as response:
        assert response.status in (401, 404)
