"""The data path's own CPU per request, without sockets: what the proxy's Python costs.

    python -m bench.hotpath [--requests 200000] [--reps 5] [--open]

A real `App` (config as in the bench: one route, metrics, breaker, deadlines, headers all on)
serves requests on a `ClientConnection` whose transport, and the pooled upstream connection's,
only keep what is written. Each request is fed as one read, the upstream's answer (the bench
upstream's 100 B response, bytes as on the wire) as another, so llhttp, routing, the breaker,
metrics and both header rewrites run exactly as under wrk, but no syscall, epoll wake-up or
other process is measured. Prints µs per request (best and median of the reps): the figure to
move when cutting the Python, low-noise enough to compare two trees a few percent apart
(run it from another checkout to compare). `--open`: the breaker is forced open and every
request is a rejection without a fallback (the open path). The whole-process figure under
load is `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.upstream import SMALL

REQUEST = b"GET /bench/small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


class _Sink:
    """A transport that keeps nothing: what is written is counted and dropped."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written += sum(map(len, data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def _measure(requests: int, reps: int, open_breaker: bool) -> list[float]:
    from proxy.app import App
    from proxy.config.load import parse_settings
    from proxy.http.connection import ClientConnection
    from proxy.http.upstream import UpstreamConnection

    with tempfile.TemporaryDirectory(prefix="circuit-proxy-hotpath-") as tmp:
        settings = parse_settings(
            "server: {host: 127.0.0.1, port: 8080}\n"
            f"storage: {{path: {Path(tmp) / 'hotpath.db'}}}\n"
            "defaults: {max_concurrent: 0}\n"
            "services:\n  bench:\n    upstream: http://127.0.0.1:9\n", source="<hotpath>", environ={})
        app = App(settings)
        await app.start("127.0.0.1", 0)
        try:
            server = app.server
            assert server is not None
            client = ClientConnection(server)
            client.connection_made(_Sink())  # type: ignore[arg-type]
            pool = server.env.pool
            target = pool.target("http://127.0.0.1:9")
            upstream = UpstreamConnection(pool, target)
            upstream.connection_made(_Sink())  # type: ignore[arg-type]
            pool.release(upstream)
            feed_request, feed_answer = client.data_received, upstream.data_received
            if open_breaker:
                app.registry.get("bench.default").breaker.force_open()
                return _timed(lambda: feed_request(REQUEST), client, requests, reps)
            for _ in range(2000):  # warm: caches, the interpreter's specialisations
                feed_request(REQUEST)
                feed_answer(SMALL)
            if upstream.closed or client.lost or pool.targets[target.url].idle != [upstream]:
                raise RuntimeError("the hot path did not run as a keep-alive exchange")

            def one() -> None:
                feed_request(REQUEST)
                feed_answer(SMALL)

            return _timed(one, client, requests, reps)
        finally:
            client.connection_lost(None)  # the sinks never report it: the drain would wait for them
            if app.server is not None:
                for target in app.server.env.pool.targets.values():
                    for connection in list(target.idle):
                        connection.connection_lost(None)
            await app.close()


def _timed(one: object, client: object, requests: int, reps: int) -> list[float]:
    """µs per call of `one()`, `reps` times over `requests` calls (after a warm-up)."""
    for _ in range(2000):  # warm: caches, the interpreter's specialisations
        one()  # type: ignore[operator]
    if client.lost or client.handler is not None:  # type: ignore[attr-defined]
        raise RuntimeError("a request was not answered at once, on a kept connection")
    timings = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(requests):
            one()  # type: ignore[operator]
        timings.append((time.perf_counter() - started) / requests * 1e6)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--open", action="store_true", help="the open path: every request rejected")
    args = parser.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    timings = runner(_measure(args.requests, args.reps, args.open))
    print(f"{'open path' if args.open else 'data path'}, no sockets: best {min(timings):.2f} µs / request, "
          f"median {statistics.median(timings):.2f} ({len(timings)} × {args.requests:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
