"""Shared by the hostile-input tests: a raw upstream that records every byte it is sent and
parses them strictly (llhttp, as the proxy does), a raw client, and the checks each case ends
with: the status, the connection closed, nothing reached the upstream, and a normal request on
a new connection still served.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from httptools import HttpParserError, HttpRequestParser

from tests.e2e.test_wire import Conn

CONFIG = """
    storage: {path: $db}
    server: {max_body_bytes: 100000, max_header_bytes: 8192}
    defaults: {failure_threshold: 3, failure_rate_threshold: 0, slow_call_rate_threshold: 0, timeout_ms: 2000}
    services:
      up:
        upstream: $up
"""


@dataclass
class Received:
    """One request as the upstream's own strict parser saw it."""

    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    in_head: bool = True

    def header(self, name: str) -> list[bytes]:
        lname = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == lname]

    @property
    def names(self) -> list[bytes]:
        return [key.lower() for key, _ in self.headers]


class _UpstreamConnection(asyncio.Protocol):
    def __init__(self, owner: RawUpstream) -> None:
        self.owner = owner
        self.raw = bytearray()
        self.parser = HttpRequestParser(self)
        self.current: Received | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.raw.append(self.raw)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.parser.feed_data(data)
        except HttpParserError as exc:
            self.owner.errors.append(f"{type(exc).__name__}: {exc}")
            self.transport.close()  # type: ignore[union-attr]

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self.current = Received()

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        (self.current.headers if self.current.in_head else self.current.trailers).append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.in_head = False
        self.current.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.owner.requests.append(self.current)
        body = b"upstream ok"
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"  # type: ignore[union-attr]
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class RawUpstream:
    """Records every byte each upstream connection received (`data`), every request its own
    strict parser completed (`requests`), and every parse error (`errors`)."""

    def __init__(self) -> None:
        self.raw: list[bytearray] = []
        self.requests: list[Received] = []
        self.errors: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpstreamConnection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.raw)

    def clear(self) -> None:
        for chunk in self.raw:  # pooled connections stay listed: what they get next counts
            del chunk[:]
        self.requests.clear()
        self.errors.clear()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxy\r\n{extra}\r\n".encode()


async def still_served(proxy, upstream: RawUpstream | None = None) -> None:
    """A normal request on a new connection is answered 200 by the upstream."""
    before = len(upstream.requests) if upstream is not None else 0
    conn = await Conn.open(proxy)
    try:
        conn.send(get("/up/still-served"))
        status, _, body = await conn.response()
        assert (status, body) == (200, b"upstream ok")
    finally:
        conn.close()
    if upstream is not None:
        assert len(upstream.requests) == before + 1
        assert upstream.requests[-1].target == b"/still-served"
        assert upstream.errors == []
        upstream.clear()  # the next check starts from nothing again


async def refused(proxy, upstream: RawUpstream, data: bytes | list[bytes], status: int | tuple[int, ...],
                  *, closed: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a new connection: the answer is `status` (one of them), the connection is
    closed when `closed`, not a byte reached the upstream, and others are still served."""
    conn = await Conn.open(proxy)
    for piece in data if isinstance(data, list) else [data]:
        conn.send(piece)
        await asyncio.sleep(0.01)
    answer = await conn.response()
    statuses = status if isinstance(status, tuple) else (status,)
    assert answer[0] in statuses, answer
    if closed:
        assert answer[1].get("connection") == "close", answer
        assert await conn.closed()
    conn.close()
    assert upstream.data == b"", upstream.data
    assert upstream.requests == []
    await still_served(proxy, upstream)
    return answer
