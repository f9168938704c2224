"""A fast static upstream for the benchmarks: a raw asyncio Protocol, so it is never the bottleneck.

    python -m bench.upstream --port 0 --control-port 0     # prints "ready <port> <control port>"

Answers every request with a canned response: `/large…` → 1 MiB body, anything else → 100 B
(both with Content-Length, keep-alive). Request bodies (Content-Length or chunked) are read
and dropped. The control port takes `GET /mode/<mode>` (healthy | error | hang | refuse) and
`GET /stats` → `{"requests": n, "errors": e, "mode": m, "error_rate": r}`:

- `error`   every request gets `500` (a small JSON body); `GET /mode/error?rate=0.2` fails
            that share of them at random (seeded, so runs are comparable) and answers the
            others as `healthy` does;
- `hang`    requests are read and counted but never answered;
- `refuse`  the listener and every open connection are closed, so connects are refused;
            the next other mode re-opens the listener on the same port.

Only the benchmark uses this; it lives beside the harness so the upstream under test is always
the same code, on every machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from urllib.parse import parse_qs

SMALL_BODY = b"x" * 99 + b"\n"  # 100 B
LARGE_BODY = b"y" * (1024 * 1024)  # 1 MiB


def _response(status: bytes, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nServer: bench-upstream\r\n\r\n" + body)


SMALL = _response(b"200 OK", SMALL_BODY)
LARGE = _response(b"200 OK", LARGE_BODY)
ERROR = _response(b"500 Internal Server Error", b'{"error": "injected"}', b"application/json")
MAX_HEAD = 64 * 1024


class Upstream:
    """Mode and counters shared by every connection of one upstream process."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.mode = "healthy"
        self.error_rate = 1.0  # share of requests `error` fails
        self.rng = random.Random(1)
        self.requests = 0
        self.errors = 0  # 500s answered
        self.connections: set[UpstreamProtocol] = set()
        self.server: asyncio.AbstractServer | None = None

    async def open(self) -> None:
        if self.server is None:
            loop = asyncio.get_running_loop()
            self.server = await loop.create_server(lambda: UpstreamProtocol(self), self.host, self.port,
                                                   reuse_address=True, backlog=4096)
            self.port = self.server.sockets[0].getsockname()[1]

    async def set_mode(self, mode: str) -> None:
        mode, _, query = mode.partition("?")
        if mode not in ("healthy", "error", "hang", "refuse"):
            raise ValueError(mode)
        rate = float(parse_qs(query).get("rate", ["1.0"])[0])
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate {rate}")
        self.error_rate = rate
        self.mode = mode
        if mode == "refuse":
            if self.server is not None:
                self.server.close()
                self.server = None
            for connection in list(self.connections):
                connection.transport.abort()
        else:
            await self.open()


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("upstream", "transport", "buffer", "body_left", "chunked")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.body_left = 0  # bytes of the current request body still to drop
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.upstream.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while buffer:
            if self.body_left:
                take = min(self.body_left, len(buffer))
                self.body_left -= take
                buffer = buffer[take:]
                continue
            if self.chunked:
                end = buffer.find(b"\r\n0\r\n\r\n")
                if end < 0 and not buffer.startswith(b"0\r\n\r\n"):
                    buffer = buffer[-8:]  # keep what may hold a split terminator
                    break
                self.chunked = False
                buffer = buffer[end + 7:] if end >= 0 else buffer[5:]
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self.transport.close()
                    return
                break
            head = buffer[:end]
            buffer = buffer[end + 4:]
            self._answer(head)
        self.buffer = buffer

    def _answer(self, head: bytes) -> None:
        upstream = self.upstream
        upstream.requests += 1
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = lower.find(b"\r\n", at + 2)
            self.body_left = int(lower[at + 17:stop if stop >= 0 else None])
        elif b"\r\ntransfer-encoding: chunked" in lower:
            self.chunked = True
        mode = upstream.mode
        if mode == "error" and (upstream.error_rate >= 1.0 or upstream.rng.random() < upstream.error_rate):
            upstream.errors += 1
            self.transport.write(ERROR)
        elif mode == "healthy" or mode == "error":
            path_start = head.find(b" ") + 1
            self.transport.write(LARGE if head.startswith(b"/large", path_start) else SMALL)
        # hang: counted, never answered; refuse: the connection is being closed


class ControlProtocol(asyncio.Protocol):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            path = self.buffer.split(b" ", 2)[1].decode()
            asyncio.ensure_future(self._answer(path))

    async def _answer(self, path: str) -> None:
        status = "200 OK"
        if path.startswith("/mode/"):
            try:
                await self.upstream.set_mode(path[len("/mode/"):])
            except (ValueError, OSError) as exc:
                status = f"400 {type(exc).__name__}"
        upstream = self.upstream
        document = json.dumps({"requests": upstream.requests, "errors": upstream.errors,
                               "mode": upstream.mode, "error_rate": upstream.error_rate}).encode()
        self.transport.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(document)}\r\nConnection: close\r\n\r\n".encode()
                             + document)
        self.transport.close()


async def main(host: str, port: int, control_port: int) -> None:
    upstream = Upstream(host, port)
    await upstream.open()
    loop = asyncio.get_running_loop()
    control = await loop.create_server(lambda: ControlProtocol(upstream), host, control_port,
                                       reuse_address=True)
    print(f"ready {upstream.port} {control.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: PLC0415
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(main(args.host, args.port, args.control_port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    run()
