"""The server on the wire (§2, §4): keep-alive, pipelining, reserved paths on a proxied connection, framing
both ways, HEAD/204/304, Expect: 100-continue, HTTP/1.0, broken upstreams, hostile framing.

Raw sockets, because clients normalise exactly what these tests need to send or observe.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.raw_server import RawServer

CONFIG = """
    storage: {path: $db}
    server: {max_body_bytes: 100000}
    defaults: {failure_threshold: 3, failure_rate_threshold: 0, slow_call_rate_threshold: 0, timeout_ms: 2000}
    services:
      up:
        upstream: $up
"""


class Upstream(RawServer):
    """A raw upstream: each request is answered by `answer(head, body)` → bytes (or None to
    hang up without an answer). Records every request head and body it received."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bytes]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                body = b""
                if b"\r\ncontent-length:" in lower:
                    length = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                elif b"\r\ntransfer-encoding: chunked" in lower:
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")
                            break
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                self.received.append((head, body))
                answer = self.answer(head, body)
                if answer is None:
                    writer.transport.abort()
                    return
                for part in answer if isinstance(answer, list) else [answer]:
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                    elif part is CLOSE:
                        writer.close()
                        return
                    else:
                        writer.write(part)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def answer(self, head: bytes, body: bytes):  # replaced per test
        path = head.split(b" ")[1]
        if path.startswith(b"/nocontent"):
            return b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n"
        if path.startswith(b"/notmodified"):
            return b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"
        if path.startswith(b"/untilclose"):
            return [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ", 0.05, b"part two", CLOSE]
        if path.startswith(b"/chunked"):
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        if path.startswith(b"/cutoff"):
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", 0.05, CLOSE]
        if path.startswith(b"/hangup"):
            return None
        if path.startswith(b"/fail"):
            return b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom"
        digest = hashlib.sha256(body).hexdigest().encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(digest), digest))


CLOSE = object()


@pytest.fixture
async def upstream():
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    return await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}")


class Conn:
    """A raw client connection that reads whole responses (Content-Length, chunked or close)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, proxy) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", proxy.server.port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
        else:
            body = await asyncio.wait_for(self.reader.read(), 10)
        return status, headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxy\r\n{extra}\r\n".encode()


async def breaker_calls(proxy, name: str = "up.default") -> dict:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        document = await response.json()
    return next(b for b in document["breakers"] if b["name"] == name)["calls"]


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(get("/up/a"))
    assert (await conn.response())[0] == 200
    conn.send(get("/up/b") + get("/up/c") + get("/up/d"))  # pipelined: one write
    answers = [await conn.response() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [h.split(b" ")[1] for h, _ in upstream.received] == [b"/a", b"/b", b"/c", b"/d"]
    conn.close()


async def test_reserved_paths_on_a_proxied_connection_reach_the_app(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(get("/up/first"))
    assert (await conn.response())[0] == 200
    conn.send(get("/healthz"))
    status, _, body = await conn.response()
    assert (status, body) == (200, b'{"status": "ok"}')
    conn.send(get("/up/after") + get("/nope/x"))  # proxied again, then an unknown service
    assert (await conn.response())[0] == 200
    status, _, body = await conn.response()
    assert (status, body) == (404, b'{"error": "unknown_service", "service": "nope"}')
    assert [h.split(b" ")[1] for h, _ in upstream.received] == [b"/first", b"/after"]
    conn.close()


async def test_request_bodies_reach_the_upstream_with_either_framing(proxy, upstream):
    payload = os.urandom(50_000)
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/cl HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    assert (await conn.response())[2] == hashlib.sha256(payload).hexdigest().encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 7000]), payload[i:i + 7000])
                       for i in range(0, len(payload), 7000)) + b"0\r\n\r\n"
    conn.send(b"POST /up/te HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(chunked), 3000):  # in pieces that split chunk lines
        conn.send(chunked[i:i + 3000])
        await asyncio.sleep(0)
    assert (await conn.response())[2] == hashlib.sha256(payload).hexdigest().encode()
    head, body = upstream.received[1]
    assert b"transfer-encoding: chunked" in head.lower() and body == payload
    conn.close()


async def test_post_without_a_body_is_sent_with_content_length_zero(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/empty HTTP/1.1\r\nHost: p\r\n\r\n")
    assert (await conn.response())[0] == 200
    assert b"\r\nContent-Length: 0\r\n" in upstream.received[0][0]
    conn.close()


async def test_head_204_and_304_have_no_body_and_keep_the_connection(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(b"HEAD /up/x HTTP/1.1\r\nHost: p\r\n\r\n")
    status, headers, _ = await conn.response(head_only=True)
    assert (status, headers["content-length"]) == (200, "64")  # the length a GET would have
    conn.send(get("/up/nocontent"))
    status, headers, _ = await conn.response()
    assert (status, headers["x-kind"]) == (204, "none")
    assert "transfer-encoding" not in headers and "content-length" not in headers
    conn.send(get("/up/notmodified"))
    assert (await conn.response())[0] == 304
    conn.send(get("/up/after"))  # nothing stray was left on the connection
    status, _, body = await conn.response()
    assert (status, len(body)) == (200, 64)
    conn.close()


async def test_chunked_and_close_delimited_upstream_bodies_are_rechunked(proxy):
    conn = await Conn.open(proxy)
    conn.send(get("/up/chunked"))
    status, headers, body = await conn.response()
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"hello world")
    conn.send(get("/up/untilclose"))
    status, headers, body = await conn.response()
    assert (status, headers["transfer-encoding"], body) == (200, "chunked", b"part one, part two")
    conn.send(get("/up/again"))
    assert (await conn.response())[0] == 200
    conn.close()


async def test_expect_100_continue_is_answered_before_the_body(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(b"PUT /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert (await conn.response())[0] == 100
    conn.send(b"hello")
    status, _, body = await conn.response()
    assert (status, body) == (200, hashlib.sha256(b"hello").hexdigest().encode())
    assert b"expect" not in upstream.received[0][0].lower()  # answered here, not passed on
    conn.close()


async def test_http_1_0_gets_its_answer_and_the_connection_closes(proxy):
    conn = await Conn.open(proxy)
    conn.send(b"GET /up/x HTTP/1.0\r\n\r\n")
    status, headers, body = await conn.response()
    assert (status, headers["connection"], len(body)) == (200, "close", 64)
    assert await conn.closed()


async def test_upstream_breaking_off_mid_body_breaks_the_client_response(proxy):
    conn = await Conn.open(proxy)
    conn.send(get("/up/cutoff"))
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    assert b"Content-Length: 100" in head
    rest = await asyncio.wait_for(conn.reader.read(), 10)  # then the connection ends early
    assert rest == b"only part"
    assert (await breaker_calls(proxy))["failure"] == 1
    async with proxy.session.get(proxy.url("/metrics")) as response:
        lines = [line for line in (await response.text()).splitlines()
                 if line.startswith('proxy_requests_total{breaker="up.default"')]
    assert lines == ['proxy_requests_total{breaker="up.default",code="truncated"} 1.0']  # not a 200


async def test_upstream_hanging_up_without_an_answer_is_502_and_a_failure(proxy):
    conn = await Conn.open(proxy)
    conn.send(get("/up/hangup"))
    status, _, body = await conn.response()
    assert status == 502 and b'"error": "upstream_unreachable"' in body
    conn.send(get("/up/fail"))
    status, _, body = await conn.response()
    assert (status, body) == (500, b"boom")  # 5xx passes through as it is (§4)
    assert await breaker_calls(proxy) == {"success": 0, "failure": 2, "rejected": 0}
    conn.close()


async def test_open_breaker_answers_on_the_same_connection(proxy):
    conn = await Conn.open(proxy)
    for _ in range(3):
        conn.send(get("/up/fail"))
        assert (await conn.response())[0] == 500
    conn.send(get("/up/x") + get("/up/y"))
    for _ in range(2):
        status, headers, body = await conn.response()
        assert (status, headers["content-type"]) == (503, "application/json")
        assert body.startswith(b'{"error": "circuit_open", "breaker": "up.default", "retry_after": ')
        assert int(headers["retry-after"]) >= 1
    # A POST whose body is refused unread: the body is read and dropped, the connection kept.
    conn.send(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc" + get("/healthz"))
    assert (await conn.response())[0] == 503
    assert (await conn.response())[0] == 200
    conn.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Folded: a\r\n b\r\n\r\n", 400),  # obsolete line folding
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Space : a\r\n\r\n", 400),  # whitespace before the colon
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Nul: a\x00b\r\n\r\n", 400),
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Lf: a\nb: c\r\n\r\n", 400),
    (b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: +3\r\n\r\nabc", 400),
    (b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nHost: q\r\n\r\n", 400),
    (b"GET /up/x HTTP/2.0\r\nHost: p\r\n\r\n", 505),
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nExpect: something\r\n\r\n", 417),
    (b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 100001\r\n\r\n", 413),
    (b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET /up/x HTTP/1.1\r\nHost: p\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
])
async def test_hostile_framing_is_refused_never_forwarded_and_the_connection_closed(
        proxy, upstream, request_bytes, status):
    conn = await Conn.open(proxy)
    conn.send(request_bytes)
    got, headers, _ = await conn.response()
    assert (got, headers["connection"]) == (status, "close")
    assert await conn.closed()
    assert upstream.received == []


async def test_a_chunked_body_over_the_limit_is_413_and_not_a_failure(proxy):
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(30):
        conn.send(b"1000\r\n" + b"z" * 4096 + b"\r\n")
        await conn.writer.drain()  # the proxy keeps reading (and dropping) after its answer
    status, _, body = await conn.response()
    assert (status, body) == (413, b'{"error": "payload_too_large", "max_body_bytes": 100000}')
    assert await breaker_calls(proxy) == {"success": 0, "failure": 0, "rejected": 0}


async def test_client_gone_mid_upload_is_neither_success_nor_failure(proxy, upstream):
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 50000\r\n\r\n" + b"a" * 1000)
    await asyncio.sleep(0.1)
    conn.writer.transport.abort()
    for _ in range(100):
        async with proxy.session.get(proxy.url("/status.json")) as response:
            entry = next(b for b in (await response.json())["breakers"] if b["name"] == "up.default")
        if entry["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (entry["in_flight"], entry["calls"]) == (0, {"success": 0, "failure": 0, "rejected": 0})


async def test_response_streams_while_the_request_body_is_still_uploading(start_proxy):
    """Full duplex: an upstream that echoes as it reads (aiohttp streaming both ways)."""
    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/echo", echo)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        proxy = await start_proxy(CONFIG, up=str(server.make_url("")).rstrip("/"))
        conn = await Conn.open(proxy)
        conn.send(b"POST /up/echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(conn.reader.readuntil(b"first\r\n"), 10)  # before the rest is sent
        conn.send(b"6\r\nsecond\r\n0\r\n\r\n")
        assert await asyncio.wait_for(conn.reader.readuntil(b"0\r\n\r\n"), 10)
        conn.close()
    finally:
        await server.close()
