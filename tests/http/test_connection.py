"""http/connection: `ClientConnection` parsing requests (llhttp) and serving them in order.

Bytes are handed to `data_received` of a connection on a fake transport; the server is a
minimal fake with the attributes the connection uses, a real `Registry` routes, and real
`Exchange`s forward to a fake upstream pool that records every call (so "never forwarded" is
"the pool was never asked"). A fake upstream answers a call once its whole request went up.
Hostile or malformed heads are refused with the contract's status and the connection closed;
valid requests parse to the same requests however their bytes are split, and pipelined ones
are answered in order, one at a time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from httptools import HttpRequestParser

from proxy.config.load import parse_settings
from proxy.core.clock import FakeClock
from proxy.http import wire
from proxy.http.connection import ClientConnection
from proxy.http.exchange import ExchangeEnv
from proxy.http.head import HttpError, ResponseHead
from proxy.http.upstream import LENGTH, UpstreamTarget
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry

MAX_HEADER_BYTES = 1024
MAX_BODY_BYTES = 1000
UPSTREAM_DATE = b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\n"


# -- fakes ---------------------------------------------------------------------------------------

class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.eof = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not (self.closed or self.aborted or self.eof), "written after the close"
        self.data += data

    def writelines(self, data: list[bytes]) -> None:
        for piece in data:
            self.write(piece)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.7", 50123) if name == "peername" else default


class FakeUpstream:
    """One upstream connection: what it was sent, and the call waiting for its answer."""

    def __init__(self) -> None:
        self.call: Any = None
        self.sent: list[bytes] = []
        self.writable = True
        self.reused = False
        self.closed = False

    def send(self, call: Any, data: bytes, *, head_only: bool) -> None:
        self.call = call
        self.sent.append(data)

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True
        self.call = None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class RecordingPool:
    """Records every call an exchange makes; `acquire` always has a connection ready."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.upstreams: list[FakeUpstream] = []

    def target(self, url: str, ssl_context: Any = None) -> UpstreamTarget:
        self.calls.append(f"target {url}")
        return UpstreamTarget(url, ssl_context)

    def acquire(self, target: UpstreamTarget) -> FakeUpstream:
        self.calls.append("acquire")
        upstream = FakeUpstream()
        self.upstreams.append(upstream)
        return upstream

    async def connect(self, target: UpstreamTarget, timeout: float) -> FakeUpstream:
        raise AssertionError("acquire always has a connection")

    def release(self, connection: FakeUpstream) -> None:
        pass


class FakeDeadlines:
    def add(self, call: Any, timeout_s: float, slow_s: float = 0.0) -> None:
        call.deadline = 1.0

    def discard(self, call: Any) -> None:
        pass


class FakeServer:
    """What `ClientConnection` uses of `Server`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: Registry, env: ExchangeEnv) -> None:
        self.loop = loop
        self.connections: set[ClientConnection] = set()
        self.max_line = 8190
        self.max_header_bytes = MAX_HEADER_BYTES
        self.max_body_bytes = MAX_BODY_BYTES
        self.access_log = None
        self.max_connections = 10_000
        self.registry = registry
        self.env = env
        self.draining = False
        self.control = None

    def refusal(self, error: HttpError) -> bytes:
        return wire.refusal(error.status, error.detail, max_body_bytes=self.max_body_bytes,
                            max_header_bytes=self.max_header_bytes)


_SETTINGS = parse_settings("services: {up: {upstream: 'http://127.0.0.1:9101'}}", source="<test>", environ={})


class Client:
    """A `ClientConnection` on a fake transport, and the fake upstream behind it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        clock = FakeClock()
        self.registry = Registry(_SETTINGS, clock, Metrics())
        self.pool = RecordingPool()
        env = ExchangeEnv(loop, self.pool, FakeDeadlines(), clock)  # type: ignore[arg-type]
        self.server = FakeServer(loop, self.registry, env)
        self.connection = ClientConnection(self.server)  # type: ignore[arg-type]
        self.transport = FakeTransport()
        self.connection.connection_made(self.transport)  # type: ignore[arg-type]
        self.answered = 0

    def feed(self, *pieces: bytes) -> None:
        """Each piece is one read; the upstream answers every call whose request went up whole."""
        for piece in pieces:
            self.connection.data_received(piece)
            self.answer_ready()

    def answer_ready(self) -> None:
        while self.answer_one():  # an answer may send the next request up
            pass

    def answer_one(self) -> bool:
        """Answer the one call whose whole request went up, if there is one."""
        for upstream in self.pool.upstreams:
            call = upstream.call
            if call is not None and call.request_sent:
                upstream.call = None
                body = b"answer %d" % self.answered
                self.answered += 1
                call.on_response_head(ResponseHead(200, b"OK", [
                    (b"Content-Length", b"content-length", b"%d" % len(body)),
                    (b"Date", b"date", UPSTREAM_DATE[6:-2])], True), LENGTH)
                call.on_response_body(body)
                call.on_response_end()
                return True
        return False

    def forwarded(self) -> list[tuple]:
        """Each request the upstream got, parsed back: method, target, fields, body."""
        return [parse_request(b"".join(upstream.sent)) for upstream in self.pool.upstreams]

    def status(self) -> int:
        return int(bytes(self.transport.data).split(b" ", 2)[1])

    def refused(self) -> tuple[int, str, bool, bool]:
        """The one answer written: its status and error, whether it said Connection: close,
        and whether the connection was closed (our side shut) after it."""
        head, _, body = bytes(self.transport.data).partition(b"\r\n\r\n")
        transport = self.transport
        return (self.status(), json.loads(body)["error"], b"\r\nConnection: close" in head,
                transport.eof or transport.closed)


def upstream_answer(n: int) -> bytes:
    body = b"answer %d" % n
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body) + UPSTREAM_DATE + b"\r\n" + body


class _Collector:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    def on_message_begin(self) -> None:
        self.messages.append({"url": b"", "fields": [], "body": b""})

    def on_url(self, url: bytes) -> None:
        self.messages[-1]["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1]["fields"].append((name, value))

    def on_body(self, body: bytes) -> None:
        self.messages[-1]["body"] += body


def parse_request(data: bytes) -> tuple:
    """One whole request as (method, target, fields but framing, body): how it was framed
    (its chunk sizes follow how the client's bytes arrived) is left out."""
    collector = _Collector()
    parser = HttpRequestParser(collector)
    parser.feed_data(data)
    (message,) = collector.messages
    framing = (b"content-length", b"transfer-encoding")
    return (parser.get_method(), message["url"],
            [(n, v) for n, v in message["fields"] if n.lower() not in framing], message["body"])


@pytest.fixture
async def client() -> Client:
    return Client(asyncio.get_running_loop())


# -- refused before anything is forwarded --------------------------------------------------------

GET = b"GET /up/x HTTP/1.1\r\nHost: p\r\n"


@pytest.mark.parametrize("request_bytes, status, error", [
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                 400, "bad_request", id="content-length-and-transfer-encoding"),
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                 400, "bad_request", id="two-content-lengths"),
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: -1\r\n\r\n",
                 400, "bad_request", id="negative-content-length"),
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
                 400, "bad_request", id="chunked-twice"),
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: identity\r\n\r\n",
                 400, "bad_request", id="identity"),
    pytest.param(b"POST /up/x HTTP/1.0\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 400, "bad_request", id="transfer-encoding-in-http-1.0"),
    pytest.param(GET + b"X: a\rb\r\n\r\n", 400, "bad_request", id="cr-inside-a-value"),
    pytest.param(GET + b"X: a\r\n folded\r\n\r\n", 400, "bad_request", id="obsolete-folding"),
    pytest.param(GET + b"X : a\r\n\r\n", 400, "bad_request", id="space-before-colon"),
    # `GET  /x` (two spaces) is accepted: llhttp parses on whitespace boundaries, which RFC
    # 9112 §3 allows, and the upstream gets a request line the proxy writes itself.
    pytest.param(b"GET /up/x HTTP/3.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported", id="http-3.0"),
    pytest.param(b"GET /up/x HTTP/2.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported", id="http-2.0"),
    pytest.param(GET + b"Expect: 200-ok\r\n\r\n", 417, "expectation_failed", id="unknown-expectation"),
    pytest.param(GET + b"X-Big: " + b"b" * MAX_HEADER_BYTES + b"\r\n\r\n",
                 431, "request_header_fields_too_large", id="header-section-too-large"),
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
                 413, "payload_too_large", id="content-length-too-large"),
    pytest.param(GET + b"Host: q\r\n\r\n", 400, "bad_request", id="two-hosts"),
    pytest.param(b"GET /up/../x HTTP/1.1\r\nHost: p\r\n\r\n", 400, "bad_request", id="dot-segment"),
    pytest.param(b"GET /up/%2e%2e/x HTTP/1.1\r\nHost: p\r\n\r\n", 400, "bad_request", id="encoded-dot-segment"),
    pytest.param(b"GET /up/%2E./x?y=1 HTTP/1.1\r\nHost: p\r\n\r\n", 400, "bad_request",
                 id="mixed-dot-segment"),
    # The head and a broken first chunk in one read: refused before any upstream is asked.
    pytest.param(b"POST /up/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 400, "bad_request", id="head-and-broken-chunk-in-one-read"),
])
async def test_a_hostile_or_malformed_request_is_refused_and_never_forwarded(
        client, request_bytes, status, error):
    client.feed(request_bytes)
    assert client.refused() == (status, error, True, True)
    assert client.pool.calls == []
    assert client.registry.get("up.default").bulkhead.in_flight == 0


async def test_a_refused_request_ends_the_connection_so_what_follows_is_never_served(client):
    client.feed(GET + b"Host: q\r\n\r\n" + GET + b"\r\n")
    assert (client.refused(), client.pool.calls) == ((400, "bad_request", True, True), [])


async def test_a_broken_request_behind_a_good_one_is_answered_after_it_in_order(client):
    client.connection.data_received(GET + b"\r\n" + GET + b"X : a\r\n\r\n")
    assert (client.pool.calls, bytes(client.transport.data)) == (["target http://127.0.0.1:9101", "acquire"], b"")
    client.answer_ready()
    first, _, rest = bytes(client.transport.data).partition(b"answer 0")
    assert first + b"answer 0" == upstream_answer(0)
    assert rest.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert (len(client.pool.upstreams), client.transport.eof) == (1, True)


# -- served in order, however the bytes come ---------------------------------------------------------

PIPELINE = (
    b"GET /up/a?q=1 HTTP/1.1\r\nHost: p\r\nAccept: */*\r\n\r\n"
    b"POST /up/b HTTP/1.1\r\nHost: p\r\nContent-Length: 11\r\n\r\nhello world"
    b"PUT /up/c HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"DELETE /up/d HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\n"
)
FORWARDED = [(b"X-Forwarded-For", b"10.0.0.7"), (b"X-Forwarded-Proto", b"http"), (b"X-Forwarded-Host", b"p")]
HOST = (b"Host", b"127.0.0.1:9101")
EXPECTED = [
    (b"GET", b"/a?q=1", [HOST, (b"Accept", b"*/*"), *FORWARDED], b""),
    (b"POST", b"/b", [HOST, *FORWARDED], b"hello world"),
    (b"PUT", b"/c", [HOST, *FORWARDED], b"hello, world"),
    (b"DELETE", b"/d", [HOST, *FORWARDED], b""),
]
ANSWERS = b"".join(upstream_answer(n) for n in range(4))


async def test_pipelined_requests_are_forwarded_one_at_a_time_and_answered_in_order(client):
    client.connection.data_received(PIPELINE)
    assert [b"".join(u.sent).split(b"\r\n", 1)[0] for u in client.pool.upstreams] == [b"GET /a?q=1 HTTP/1.1"]
    for n in range(4):
        assert len(client.pool.upstreams) == n + 1  # the next one goes up only after this answer
        assert bytes(client.transport.data) == b"".join(upstream_answer(k) for k in range(n))
        assert client.answer_one()
    assert not client.answer_one()
    assert (client.forwarded(), bytes(client.transport.data)) == (EXPECTED, ANSWERS)
    assert (client.transport.closed, client.transport.eof, client.registry.get("up.default").bulkhead.in_flight) == (
        False, False, 0)


async def test_requests_fed_one_byte_at_a_time_parse_to_the_same_requests(client):
    client.feed(*(PIPELINE[at:at + 1] for at in range(len(PIPELINE))))
    assert (client.forwarded(), bytes(client.transport.data)) == (EXPECTED, ANSWERS)


async def test_requests_split_at_every_position_parse_to_the_same_requests():
    loop = asyncio.get_running_loop()
    for at in range(len(PIPELINE) + 1):
        client = Client(loop)
        client.feed(PIPELINE[:at], PIPELINE[at:])
        assert (at, client.forwarded(), bytes(client.transport.data)) == (at, EXPECTED, ANSWERS)


def encode_chunked(body: bytes, sizes: list[int]) -> bytes:
    out, at = b"", 0
    for size in sizes:
        piece = body[at:at + size]
        if not piece:
            break
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
        at += len(piece)
    if at < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - at, body[at:])
    return out + b"0\r\n\r\n"


_request = st.tuples(
    st.sampled_from(["get", "length", "chunked"]),
    st.text(alphabet="abcxyz019-", min_size=1, max_size=8),
    st.binary(max_size=80),
    st.lists(st.integers(1, 30), max_size=5),
)


@settings(max_examples=100, deadline=None)
@given(requests=st.lists(_request, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 1000), max_size=12))
async def test_a_pipelined_stream_split_anywhere_serves_the_same_requests_in_order(requests, cuts):
    stream = b""
    expected = []
    for kind, name, body, sizes in requests:
        target = b"/up/" + name.encode()
        if kind == "get":
            stream += b"GET %s HTTP/1.1\r\nHost: p\r\n\r\n" % target
            body = b""
        elif kind == "length":
            stream += b"POST %s HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (target, len(body), body)
        else:
            stream += b"POST %s HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (
                target, encode_chunked(body, sizes))
        method = b"GET" if kind == "get" else b"POST"
        expected.append((method, target[3:], [HOST, *FORWARDED], body))
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    pieces = [stream[start:end] for start, end in zip([0, *points], [*points, len(stream)])]
    client = Client(asyncio.get_running_loop())
    client.feed(*pieces)
    assert client.forwarded() == expected
    assert bytes(client.transport.data) == b"".join(upstream_answer(n) for n in range(len(requests)))


# -- the open path's shortcut: no exchange for a request an open breaker refuses -------------------


def _open_answers(data: bytes) -> list[tuple[int, dict]]:
    """Each answer in `data`: its status and JSON body."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        answers.append((int(head.split(b" ", 2)[1]), json.loads(rest[:length])))
        data = rest[length:]
    return answers


async def test_an_open_breaker_refuses_whole_requests_at_once_counted_as_an_exchange_would(client):
    runtime = client.registry.get("up.default")
    runtime.breaker.force_open()
    client.feed(GET + b"\r\n" + b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc" + GET + b"\r\n")
    answers = _open_answers(bytes(client.transport.data))
    assert [(status, body["error"], body["retry_after"]) for status, body in answers] == [
        (503, "circuit_open", None)] * 3
    assert (client.pool.calls, client.transport.closed, runtime.bulkhead.in_flight) == ([], False, 0)
    assert (runtime.metrics.rejected.value, runtime.metrics.codes[503].value,
            runtime.breaker.view().calls_rejected) == (3, 3, 3)


async def test_a_request_whose_body_is_still_coming_is_refused_by_its_exchange_alike(client):
    runtime = client.registry.get("up.default")
    runtime.breaker.force_open()
    client.feed(b"POST /up/x HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\na")
    assert _open_answers(bytes(client.transport.data))[0][1]["error"] == "circuit_open"
    client.feed(b"bc" + GET + b"\r\n")  # the rest is read and dropped; the connection serves on
    assert len(_open_answers(bytes(client.transport.data))) == 2
    assert (client.pool.upstreams, client.transport.closed, runtime.metrics.rejected.value) == ([], False, 2)


async def test_an_open_breaker_answers_head_with_the_head_alone_and_http10_with_a_close(client):
    client.registry.get("up.default").breaker.force_open()
    client.feed(b"HEAD /up/x HTTP/1.1\r\nHost: p\r\n\r\n")
    head = bytes(client.transport.data)
    assert head.startswith(b"HTTP/1.1 503 ") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length: " in head and not client.transport.closed  # the length, no body
    client.feed(b"GET /up/x HTTP/1.0\r\nHost: p\r\n\r\n")
    rest = bytes(client.transport.data)[len(head):]
    assert b"Connection: close\r\n" in rest and rest.endswith(b"}")
    assert client.transport.closed or client.transport.eof
