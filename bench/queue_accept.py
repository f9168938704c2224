"""Durable queue acceptances per second through circuit-proxy (group commit at work).

    .venv/bin/python -m bench.queue_accept [--seconds 5] [--connections 64] [--payments]

Starts `python -m proxy run` on loopback with a notification route whose upstream is a port
nobody listens on: the first call is refused (and queued, `on_failure`), the breaker opens
and every further request is accepted by the queue fallback: stored in SQLite with
synchronous=FULL, committed, then answered 202. A small keep-alive load generator (raw
asyncio, one request at a time per connection) posts for a fixed time; the proxy is pinned to
core 1 and the load to core 0 when `taskset` and two cores are there. After SIGTERM the
database is counted: every 202 must be a stored row. Bounded: about `--seconds` + 5 s.
Not a pass/fail test; it prints what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(workdir: Path, port_nobody_uses: int, payments: bool) -> Path:
    (workdir / "config").mkdir(parents=True)
    (workdir / "fallback_responses").mkdir()
    limits = ", amount_field: amount, floor_limit: 100, exposure_cap: 1000000000" if payments else ""
    config = workdir / "config" / "breakers.yaml"
    config.write_text(textwrap.dedent(f"""\
        server: {{max_body_bytes: 65536}}
        storage: {{path: {workdir / "var" / "bench.db"}}}
        defaults: {{failure_threshold: 1, open_timeout_ms: 3600000, max_open_timeout_ms: 3600000,
                   connect_timeout_ms: 500, max_concurrent: 0}}
        services:
          svc:
            upstream: http://127.0.0.1:{port_nobody_uses}
            routes:
              accept:
                match: {{methods: [POST], path: /accept}}
                fallback: {{type: queue, max_depth: 100000000{limits}}}
        """))
    return config


def pinned(core: int) -> list[str]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and cores >= 2 else []


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"proxy not listening on {port} after {timeout_s} s")


async def read_response(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(port: int, seconds: float, connections: int, payments: bool) -> tuple[Counter, list[float], float]:
    statuses: Counter = Counter()
    latencies: list[float] = []

    def request(n: int) -> bytes:
        body = json.dumps({"amount": 1 + n % 50, "currency": "EUR", "order_id": f"o-{n}"} if payments
                          else {"to": f"c{n}@example.com", "template": "shipped", "data": {"n": n}}).encode()
        return (b"POST /svc/accept HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    # The first call is refused upstream, queued on failure, and opens the breaker.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(0))
    statuses[await read_response(reader)] += 1
    writer.close()

    started = time.perf_counter()
    deadline = started + seconds

    async def worker(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = index
        try:
            while (now := time.perf_counter()) < deadline:
                writer.write(request(n))
                statuses[await read_response(reader)] += 1
                latencies.append(time.perf_counter() - now)
                n += connections
        finally:
            writer.close()

    await asyncio.gather(*(worker(i + 1) for i in range(connections)))
    return statuses, latencies, time.perf_counter() - started


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_accept", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load duration (at most 60)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--payments", action="store_true", help="with the payment limits checked")
    args = parser.parse_args(argv)
    seconds = min(max(args.seconds, 0.5), 60.0)
    with tempfile.TemporaryDirectory(prefix="queue-accept-") as tmp:
        workdir = Path(tmp)
        config = write_config(workdir, free_port(), args.payments)
        port = free_port()
        log = (workdir / "proxy.log").open("wb")
        proc = subprocess.Popen(
            [*pinned(1), sys.executable, "-m", "proxy", "run", "--config", str(config), "--port", str(port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "CIRCUIT_PROXY_ADMIN_TOKEN": "bench"})
        try:
            wait_listening(port, proc)
            if pinned(0):
                os.sched_setaffinity(0, {0})
            statuses, latencies, elapsed = asyncio.run(load(port, seconds, args.connections, args.payments))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        with sqlite3.connect(workdir / "var" / "bench.db") as db:
            stored = db.execute("SELECT count(*) FROM queue_items").fetchone()[0]
        accepted = statuses.get(202, 0)
        rate = (accepted - 1) / elapsed
        print(f"queue acceptances through circuit-proxy ({'payments, limits checked' if args.payments else 'notifications'}),"
              f" {args.connections} connections, {elapsed:.1f} s, synchronous=FULL")
        others = {status: count for status, count in statuses.items() if status != 202}
        print(f"  accepted (202): {accepted}   other answers: {others}")
        print(f"  rate: {rate:,.0f} acceptances/s")
        print(f"  latency: p50 {percentile(latencies, 50) * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms")
        print(f"  stored rows: {stored} ({'every 202 is on disk' if stored == accepted else 'MISMATCH'})")
        return 0 if stored == accepted else 1


if __name__ == "__main__":
    sys.exit(main())
