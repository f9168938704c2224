"""The floor: the least a Python reverse proxy on uvloop + httptools can do per request.

    python -m bench.bare_relay --port 0 --upstream-port 9000

Parse the client's request with llhttp, write it to a pooled keep-alive upstream connection
(head rewritten to `Host` + the client's other fields, Content-Length bodies only), parse the
answer with llhttp and relay its bytes back as they come. Nothing else: no breaker, no
metrics, no timeouts, no header policy, no error answers beyond dropping the connection.
It is what the features cost is measured against (bench/README.md, PERFORMANCE.md), not a
proxy to run. Prints "ready <port>" once listening.

    python -m bench.bare_relay --port 0 --answer

The open path's floor instead: every request is answered at once with one fixed 503 (the
size of circuit-proxy's circuit_open answer), no upstream: parse, one write, nothing else.
"""

from __future__ import annotations

import argparse
import asyncio

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; answers are relayed to `client`."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None and not client.closed:
            client.transport.write(data)  # type: ignore[union-attr]  # raw bytes; the parser finds the end
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        self.pool.append(self)
        if client is not None:
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and not self.client.closed:
            self.client.transport.close()  # type: ignore[union-attr]


class Client(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.fields: list[bytes] = []
        self.url = b""
        self.body: list[bytes] = []
        self.queue: list[bytes] = []  # complete requests waiting for the one in flight
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.fields = []
        self.body = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"host", b"connection", b"keep-alive"):
            self.fields.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.relay.answer is not None:
            self.transport.write(self.relay.answer)  # type: ignore[union-attr]
            return
        method = self.parser.get_method()
        data = b"".join([method, b" ", self.url, b" HTTP/1.1\r\n", self.relay.host_line,
                         *self.fields, b"\r\n", *self.body])
        if self.busy:
            self.queue.append(data)
        else:
            self.busy = True
            self.relay.forward(self, data)

    def answered(self) -> None:
        if self.queue:
            self.relay.forward(self, self.queue.pop(0))
        else:
            self.busy = False


# The size and shape of circuit-proxy's open-path answer (§4), fixed.
_OPEN_BODY = b'{"error": "circuit_open", "breaker": "openplain.default", "retry_after": 3599.9}'
OPEN_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(_OPEN_BODY)).encode() + b"\r\nRetry-After: 3600\r\n"
               b"Date: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n" + _OPEN_BODY)


class Relay:
    def __init__(self, upstream_port: int, answer: bytes | None = None) -> None:
        self.answer = answer  # every request answered with these bytes, no upstream (--answer)
        self.port = upstream_port
        self.host_line = f"Host: 127.0.0.1:{upstream_port}\r\n".encode()
        self.pool: list[Upstream] = []

    def forward(self, client: Client, data: bytes) -> None:
        if self.pool:
            upstream = self.pool.pop()
            upstream.client = client
            upstream.transport.write(data)  # type: ignore[union-attr]
        else:
            asyncio.get_running_loop().create_task(self._connect_and_send(client, data))

    async def _connect_and_send(self, client: Client, data: bytes) -> None:
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: Upstream(self.pool), "127.0.0.1", self.port)
        except OSError:
            if not client.closed:
                client.transport.close()  # type: ignore[union-attr]
            return
        upstream.client = client
        upstream.transport.write(data)  # type: ignore[union-attr]


async def serve(port: int, upstream_port: int, answer: bytes | None = None) -> None:
    relay = Relay(upstream_port, answer)
    server = await asyncio.get_running_loop().create_server(lambda: Client(relay), "127.0.0.1", port,
                                                            backlog=4096)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_relay")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, default=0)
    parser.add_argument("--answer", action="store_true", help="answer every request 503 at once (no upstream)")
    args = parser.parse_args()
    if not args.answer and not args.upstream_port:
        parser.error("--upstream-port is needed to relay (or --answer)")
    if uvloop is not None:
        uvloop.install()
    try:
        asyncio.run(serve(args.port, args.upstream_port, OPEN_ANSWER if args.answer else None))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
