"""One data path (§2–§5): every contract answer is the same on a fresh connection and on a
keep-alive connection that first asked for /healthz, /metrics and /status.json, and a request
whose framing breaks never reaches an upstream as a complete request.

Raw sockets on both sides: what is compared is the answer as it leaves the proxy (status,
headers but Date, body), and what is checked upstream is the bytes an upstream received.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.e2e.test_wire import Conn, Upstream
from tests.raw_server import RawServer

CONFIG = """
    storage: {path: $db}
    server: {max_body_bytes: 100000}
    defaults: {failure_threshold: 1000, failure_rate_threshold: 0, slow_call_rate_threshold: 0,
               timeout_ms: 2000}
    services:
      up:
        upstream: $up
        routes:
          slow: {match: {path: /slow}, timeout_ms: 100}
          held: {match: {path: /held}}
          quotes:
            match: {methods: [POST], path: /quotes}
            fallback:
              type: table
              key: destination.country
              weight_field: weight_kg
              zones: {IT: domestic}
              rows:
                domestic: {carrier: fixed-rate, cost: 6.90, per_kg: 0.50, currency: EUR, eta_days: 3}
                world: {carrier: fixed-rate, cost: 34.90, per_kg: 3.00, currency: EUR, eta_days: 12}
              default_row: world
      gone:
        upstream: http://127.0.0.1:$closed_port
"""

SCENARIOS = {
    "proxied 200": b"GET /up/ok?q=1 HTTP/1.1\r\nHost: p\r\n\r\n",
    "proxied HEAD": b"HEAD /up/ok HTTP/1.1\r\nHost: p\r\n\r\n",
    "upstream 500 passed through": b"GET /up/fail HTTP/1.1\r\nHost: p\r\n\r\n",
    "body with a length": b"POST /up/sum HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello",
    "chunked body": b"POST /up/sum HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "upstream hangs up: 502": b"GET /up/hangup HTTP/1.1\r\nHost: p\r\n\r\n",
    "upstream too slow: 504": b"GET /up/slow HTTP/1.1\r\nHost: p\r\n\r\n",
    "connection refused: 502": b"GET /gone/x HTTP/1.1\r\nHost: p\r\n\r\n",
    "forced open, no fallback: 503": b"GET /up/held HTTP/1.1\r\nHost: p\r\n\r\n",
    "forced open, table fallback": (b"POST /up/quotes HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 51\r\n\r\n"
                                    b'{"destination": {"country": "IT"}, "weight_kg": 2.0}'),
    "unknown service: 404": b"GET /nosuch/x HTTP/1.1\r\nHost: p\r\n\r\n",
    "dot-segment: 400": b"GET /up/a/../b HTTP/1.1\r\nHost: p\r\n\r\n",
    "body too large: 413": b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 100001\r\n\r\n",
    "ambiguous framing: 400": (b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n"),
}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Answers(Upstream):
    def answer(self, head: bytes, body: bytes):
        path = head.split(b" ")[1]
        if path.startswith(b"/slow"):
            return [0.5, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        if path.startswith(b"/sum"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        if path.startswith(b"/ok"):
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"v1\"\r\n"
                    b"Content-Length: 12\r\n\r\n{\"ok\": true}")
        return super().answer(head, body)


@pytest.fixture
async def upstream():
    server = Answers()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(start_proxy, upstream):
    running = await start_proxy(CONFIG, up=f"http://127.0.0.1:{upstream.port}", closed_port=str(closed_port()))
    registry = running.app.registry
    registry.get("up.held").breaker.force_open()
    registry.get("up.quotes").breaker.force_open()
    return running


def seen(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], bytes]:
    status, headers, body = answer
    return status, {k: v for k, v in headers.items() if k != "date"}, body


async def ask(proxy, request: bytes, *, warm: bool) -> tuple[int, dict[str, str], bytes]:
    conn = await Conn.open(proxy)
    try:
        if warm:
            for path in ("/healthz", "/metrics", "/status.json"):
                conn.send(f"GET {path} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
                status, _, _ = await conn.response()
                assert status == 200
        conn.send(request)
        return seen(await conn.response(head_only=request.startswith(b"HEAD")))
    finally:
        conn.close()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_every_answer_is_the_same_on_a_fresh_and_on_a_warm_connection(proxy, upstream, scenario):
    request = SCENARIOS[scenario]
    fresh = await ask(proxy, request, warm=False)
    warm = await ask(proxy, request, warm=True)
    assert warm == fresh
    assert fresh[0] == {
        "proxied 200": 200, "proxied HEAD": 200, "upstream 500 passed through": 500,
        "body with a length": 200, "chunked body": 200, "upstream hangs up: 502": 502,
        "upstream too slow: 504": 504, "connection refused: 502": 502,
        "forced open, no fallback: 503": 503, "forced open, table fallback": 200,
        "unknown service: 404": 404, "dot-segment: 400": 400, "body too large: 413": 413,
        "ambiguous framing: 400": 400}[scenario]


async def test_a_warm_connection_keeps_serving_proxied_requests_after_reserved_ones(proxy, upstream):
    conn = await Conn.open(proxy)
    for path in ("/healthz", "/up/ok", "/status.json", "/up/ok", "/metrics", "/up/ok"):
        conn.send(f"GET {path} HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        status, headers, _ = await conn.response()
        assert (status, headers.get("connection")) == (200, None)
    conn.close()
    assert [head.split(b" ")[1] for head, _ in upstream.received] == [b"/ok"] * 3


class EofReader(RawServer):
    """The naive upstream a new user might run: reads a request until EOF, then answers.
    Records what it read and how the read ended ("eof" or "reset")."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[bytes, str]] = []
        self.connections = 0
        self.got_bytes = asyncio.Event()
        self.done = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        data = b""
        ending = "eof"
        try:
            while chunk := await reader.read(65536):
                data += chunk
                self.got_bytes.set()
        except ConnectionResetError:
            ending = "reset"
        self.reads.append((data, ending))
        self.done.set()
        writer.close()


@pytest.fixture
async def eof_upstream():
    server = EofReader()
    await server.start()
    yield server
    server.server.close()


async def calls(proxy) -> dict[str, int]:
    async with proxy.session.get(proxy.url("/status.json")) as response:
        document = await response.json()
    return next(b for b in document["breakers"] if b["name"] == "up.default")["calls"]


async def test_a_body_broken_in_its_first_bytes_is_refused_before_any_upstream_is_asked(
        start_proxy, eof_upstream):
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{eof_upstream.port}", closed_port="1")
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/orders HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc")
    status, headers, body = await conn.response()
    assert (status, headers["connection"]) == (400, "close")
    assert body.startswith(b'{"error": "bad_request"')
    assert await conn.closed()
    assert eof_upstream.connections == 0
    assert await calls(proxy) == {"success": 0, "failure": 0, "rejected": 0}


async def test_a_body_that_breaks_after_its_head_went_upstream_cuts_the_upstream_off(
        start_proxy, eof_upstream):
    """Without this, the upstream would read a complete, empty request up to the close."""
    proxy = await start_proxy(CONFIG, up=f"http://127.0.0.1:{eof_upstream.port}", closed_port="1")
    conn = await Conn.open(proxy)
    conn.send(b"POST /up/orders HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await asyncio.wait_for(eof_upstream.got_bytes.wait(), 5)  # the head and first chunk went up
    conn.send(b"zz\r\nmore")
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == (400, "close")
    await asyncio.wait_for(eof_upstream.done.wait(), 5)
    (data, ending), = eof_upstream.reads
    assert data.startswith(b"POST /orders HTTP/1.1\r\n")
    assert data.endswith(b"5\r\nhello\r\n")  # never a terminating chunk
    assert ending == "reset"  # aborted, not closed: an EOF reader sees no end of request
    assert await calls(proxy) == {"success": 0, "failure": 0, "rejected": 0}
