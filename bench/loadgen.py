"""Built-in HTTP/1.1 load generators: closed-loop (the fallback when wrk is missing) and
steady-rate (open-loop, for latency while a breaker is open and for the reaction scenarios).

    python -m bench.loadgen closed --url http://127.0.0.1:8080/x -c 50 -d 5   # JSON on stdout

Raw asyncio protocols with keep-alive, so one Python process can drive a few tens of
thousands of requests per second; wrk is still preferred for closed-loop throughput.
Steady-rate requests go out on schedule whatever the earlier ones are doing (a busy
connection is never waited for: another one is opened), so a stalled proxy cannot hide its
stall (no coordinated omission). Latency is measured from the moment each request is written:
the event loop's timers fire up to ~1 ms late, which would otherwise be counted against the
proxy; the lateness itself is kept per sample (`sent - scheduled`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


@dataclass(slots=True)
class Result:
    status: int  # 0: connection error / broken response
    error: str | None  # the JSON body's "error" field for error responses, or the exception
    body: bytes = b""


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Result] | None = None
        self.buffer = b""
        self.status = 0
        self.head_done = False
        self.body_left = -1  # -1: until close; -2: chunked
        self.body = bytearray()
        self.keep_body = False
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if self.head_done and self.body_left == -1:
                waiter.set_result(self._result())
            else:
                waiter.set_result(Result(0, type(exc).__name__ if exc else "closed"))

    def request(self, data: bytes, keep_body: bool) -> asyncio.Future[Result]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.head_done = False
        self.body = bytearray()
        self.keep_body = keep_body
        self.transport.write(data)
        return self.waiter

    def _result(self) -> Result:
        body = bytes(self.body)
        error = None
        if self.status >= 400 and body.startswith(b"{"):
            try:
                error = json.loads(body).get("error")
            except (ValueError, AttributeError):
                error = None
        return Result(self.status, error, body)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.head_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            head = buffer[:end].lower()
            buffer = buffer[end + 4:]
            self.status = int(head[9:12])
            self.head_done = True
            self.keep_alive = b"\r\nconnection: close" not in head
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                self.body_left = int(head[at + 17:stop if stop >= 0 else None])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.body_left = -2
            elif self.status in (204, 304) or 100 <= self.status < 200:
                self.body_left = 0
            else:
                self.body_left = -1
        keep = self.keep_body or self.status >= 400
        if self.body_left >= 0:
            take = min(self.body_left, len(buffer))
            if keep:
                self.body += buffer[:take]
            self.body_left -= take
            buffer = buffer[take:]
            if self.body_left == 0:
                self._finish()
        elif self.body_left == -2:
            while True:
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(buffer[:line_end].split(b";")[0], 16)
                if size == 0:
                    if buffer.find(b"\r\n\r\n", line_end) < 0:  # the blank line after trailers
                        break
                    buffer = b""
                    self._finish()
                    return
                if len(buffer) < line_end + 2 + size + 2:
                    break
                if keep:
                    self.body += buffer[line_end + 2:line_end + 2 + size]
                buffer = buffer[line_end + 2 + size + 2:]
        else:
            if keep:
                self.body += buffer
            buffer = b""
        self.buffer = buffer

    def _finish(self) -> None:
        waiter, self.waiter = self.waiter, None
        if not self.keep_alive and self.transport is not None:
            self.transport.close()
            self.closed = True
        if waiter is not None and not waiter.done():
            waiter.set_result(self._result())


class Pool:
    """Keep-alive connections to one host:port, opened on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[ClientProtocol] = []

    async def acquire(self) -> ClientProtocol:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(ClientProtocol, self.host, self.port)
        return protocol

    def release(self, connection: ClientProtocol) -> None:
        if not connection.closed:
            self.idle.append(connection)

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()
        self.idle.clear()


def request_bytes(method: str, host: str, port: int, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench\r\n"
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def one(pool: Pool, data: bytes, *, timeout: float = 30.0, keep_body: bool = False) -> Result:
    try:
        connection = await pool.acquire()
    except OSError as exc:
        return Result(0, type(exc).__name__)
    try:
        result = await asyncio.wait_for(connection.request(data, keep_body), timeout)
    except asyncio.TimeoutError:
        if connection.transport is not None:
            connection.transport.close()
        return Result(0, "client_timeout")
    pool.release(connection)
    return result


# -- closed loop ----------------------------------------------------------------------------


async def closed_loop(url: str, connections: int, duration: float, method: str = "GET") -> dict:
    """N connections, each sending its next request as soon as the last answer is in."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    data = request_bytes(method, host, port, parts.path + (f"?{parts.query}" if parts.query else ""))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        pool = Pool(host, port)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            result = await one(pool, data)
            latencies.append(time.perf_counter() - started)
            statuses[result.status] = statuses.get(result.status, 0) + 1
        pool.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
        "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
        "p999_ms": _ms(percentile(latencies, 99.9)),
        "errors": sum(n for status, n in statuses.items() if status == 0 or status >= 400),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# -- steady rate ----------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    scheduled: float  # perf_counter() when the request was due
    sent: float  # when it was written (the event loop's timers are late by up to ~1 ms)
    done: float
    status: int
    error: str | None


@dataclass
class SteadyRun:
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # event name → perf_counter()


async def steady_rate(host: str, port: int, path: str, rate: float, duration: float, *,
                      events: list[tuple[float, object]] | None = None, method: str = "GET",
                      timeout: float = 10.0) -> SteadyRun:
    """`rate` requests per second for `duration` seconds, each on an idle keep-alive
    connection (a new one when none is idle). `events` are (seconds after start, coroutine
    function) pairs run on schedule; their start times are recorded in `marks`."""
    data = request_bytes(method, host, port, path)
    pool = Pool(host, port)
    run = SteadyRun()
    pending: set[asyncio.Task] = set()
    interval = 1.0 / rate
    start = time.perf_counter()
    total = int(duration * rate)
    scheduled_events = sorted(events or [], key=lambda e: e[0])

    async def fire(due: float) -> None:
        sent = time.perf_counter()
        result = await one(pool, data, timeout=timeout)
        run.samples.append(Sample(due, sent, time.perf_counter(), result.status, result.error))

    async def event(name: str, at: float, action) -> None:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.marks[name] = time.perf_counter()
        await action()

    for at, action in scheduled_events:
        task = asyncio.ensure_future(event(getattr(action, "__name__", str(at)), at, action))
        pending.add(task)
        task.add_done_callback(pending.discard)
    for i in range(total):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(fire(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=timeout + 1)
    pool.close()
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    commands = parser.add_subparsers(dest="command", required=True)
    closed = commands.add_parser("closed", help="closed-loop load, JSON summary on stdout")
    closed.add_argument("--url", required=True)
    closed.add_argument("-c", "--connections", type=int, default=50)
    closed.add_argument("-d", "--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: PLC0415
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(closed_loop(args.url, args.connections, args.duration))), flush=True)


if __name__ == "__main__":
    main()
