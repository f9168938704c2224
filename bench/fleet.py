"""A fleet of three circuit-proxies in front of one failing upstream: how many calls reach it
with and without `cluster.share_breakers` (§8).

    .venv/bin/python -m bench.fleet [--seconds 3] [--rate 150] [--database-url postgresql://…]

Starts a throw-away PostgreSQL (tests/pg_server.py: initdb + pg_ctl in a temp dir) unless
`--database-url` names one, the static upstream (bench/upstream.py) in `error` mode (every
call a 500), and twice three `python -m proxy run` on loopback with the same config but for
`cluster.share_breakers` (false, then true with `quorum: 1`), each pair of runs on a database
of its own. Every breaker has `failure_threshold: 5`, a one-hour open period and no jitter.
Two traffic patterns, each on a fresh breaker (a service of its own), at a steady `--rate`
requests a second for `--seconds`:

- `one first`: the outage is seen by one replica first: requests go to replica A until it
  rejects, then round-robin to all three (a batch job on one pod, a replica that happens to
  be busiest);
- `spread`: round-robin to all three from the first request (what a load balancer does).

Reported per pattern: the upstream's own count of calls it received (the fleet's leak), the
client answers, and the time from the first replica's open to all three reporting open in
`/status.json` (polled every 20 ms). Bounded: about 4 × `--seconds` + 20 s. Not a pass/fail
test; it prints what it measured (a table, then one JSON line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

from bench import procs

THRESHOLD = 5
NODES = ("a", "b", "c")
PATTERNS = ("one_first", "spread")


def write_config(workdir: Path, node: str, mode: str, url: str, upstream_port: int) -> Path:
    share = "true" if mode == "shared" else "false"
    services = "".join(f"  {pattern}:\n    upstream: http://127.0.0.1:{upstream_port}\n" for pattern in PATTERNS)
    path = workdir / mode / "config" / f"{node}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    (workdir / mode / "fallback_responses").mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(f"""\
        server: {{host: 127.0.0.1}}
        storage: {{url: "{url}", path: {workdir / mode / 'var' / (node + '.db')}}}
        cluster: {{share_breakers: {share}, quorum: 1, node_id: {mode}-{node}}}
        defaults: {{failure_threshold: {THRESHOLD}, open_timeout_ms: 3600000, max_open_timeout_ms: 3600000,
                   jitter: 0, timeout_ms: 1000, max_concurrent: 0}}
        services:
        """) + services)
    return path


async def upstream_requests(upstream: procs.Proc) -> int:
    _, _, body = await procs.http_get(upstream.extra["control_port"], "/stats")
    return int(json.loads(body)["requests"])


async def state(proxy: procs.Proc, breaker: str) -> str:
    _, _, body = await procs.http_get(proxy.port, "/status.json")
    return next(b["state"] for b in json.loads(body)["breakers"] if b["name"] == breaker)


async def run_pattern(pattern: str, proxies: list[procs.Proc], upstream: procs.Proc, rate: float,
                      seconds: float) -> dict:
    breaker = f"{pattern}.default"
    before = await upstream_requests(upstream)
    answers: Counter[int] = Counter()
    opened: dict[str, float] = {}
    started = time.monotonic()
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set() and len(opened) < len(proxies):
            for proxy in proxies:
                if proxy.name not in opened and await state(proxy, breaker) == "open":
                    opened[proxy.name] = time.monotonic() - started
            await asyncio.sleep(0.02)

    async def one(proxy: procs.Proc) -> int:
        status, _, _ = await procs.http_get(proxy.port, f"/{pattern}/item")
        answers[status] += 1
        return status

    watcher = asyncio.create_task(watch())
    pending: set[asyncio.Task[int]] = set()
    if pattern == "one_first":
        while await one(proxies[0]) != 503:  # replica A alone, until it rejects
            await asyncio.sleep(1 / rate)
    interval = 1 / rate
    t0 = time.monotonic()
    tick = 0
    while time.monotonic() < t0 + seconds:  # open loop: each request on time, whatever the others do
        task = asyncio.create_task(one(proxies[tick % len(proxies)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
        tick += 1
        await asyncio.sleep(max(0.0, t0 + tick * interval - time.monotonic()))
    await asyncio.gather(*pending)
    await asyncio.sleep(0.2)  # the watcher's last look
    stop.set()
    await watcher
    contacts = await upstream_requests(upstream) - before
    spread = max(opened.values()) - min(opened.values()) if len(opened) == len(proxies) else None
    return {"upstream_calls": contacts, "answers": dict(sorted(answers.items())),
            "all_open": len(opened) == len(proxies),
            "first_to_all_open_ms": round(spread * 1000, 1) if spread is not None else None}


async def run(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="circuit-fleet-"))
    started: list[procs.Proc] = []
    pg = None
    results: dict = {"threshold": THRESHOLD, "replicas": len(NODES), "rate": args.rate, "seconds": args.seconds}
    try:
        if args.database_url:
            urls = {"alone": args.database_url, "shared": args.database_url}
        else:
            sys.path.insert(0, str(procs.ROOT))
            from tests.pg_server import PgServer  # noqa: PLC0415  (the tests' throw-away server)
            pg = PgServer()
            await asyncio.to_thread(pg.start)
            urls = {mode: await asyncio.to_thread(pg.create_database, f"fleet_{mode}")
                    for mode in ("alone", "shared")}
        upstream = procs.start_upstream([], workdir, "fleet-upstream")
        started.append(upstream)
        await procs.http_get(upstream.extra["control_port"], "/mode/error")
        for mode in ("alone", "shared"):
            proxies = []
            for node in NODES:
                config = write_config(workdir, node, mode, urls[mode], upstream.port)
                proxy = await asyncio.to_thread(procs.start_circuit_proxy, [], workdir, config,
                                                {"CIRCUIT_PROXY_ADMIN_TOKEN": "bench"}, name=f"{mode}-{node}")
                proxies.append(proxy)
                started.append(proxy)
            results[mode] = {pattern: await run_pattern(pattern, proxies, upstream, args.rate, args.seconds)
                             for pattern in PATTERNS}
            for proxy in proxies:
                proxy.stop()
    finally:
        for proc in reversed(started):
            proc.stop()
        if pg is not None:
            await asyncio.to_thread(pg.close)
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def render(results: dict) -> str:
    lines = [f"3 replicas, failure_threshold {THRESHOLD}, upstream answering 500, "
             f"{results['rate']:g} req/s for {results['seconds']:g} s per pattern", "",
             "| pattern | share_breakers | upstream calls | client answers | first open → all open |",
             "|---|---|---|---|---|"]
    for pattern in PATTERNS:
        for mode in ("alone", "shared"):
            r = results[mode][pattern]
            took = f"{r['first_to_all_open_ms']} ms" if r["first_to_all_open_ms"] is not None else "—"
            lines.append(f"| {pattern} | {'true, quorum 1' if mode == 'shared' else 'false'} | "
                         f"{r['upstream_calls']} | {r['answers']} | {took} |")
    return "\n".join(lines)


async def scenario(quick: bool, log) -> dict | None:
    """For `python -m bench` (`--only fleet`): one run, skipped when PostgreSQL is missing."""
    args = argparse.Namespace(seconds=2.0 if quick else 3.0, rate=150.0, database_url=None)
    try:
        results = await run(args)
    except RuntimeError as exc:  # no PostgreSQL binaries here, or one did not start
        log(f"fleet: skipped ({exc})")
        return None
    for mode in ("alone", "shared"):
        log(f"fleet  {mode}: upstream calls " + ", ".join(
            f"{pattern} {results[mode][pattern]['upstream_calls']}" for pattern in PATTERNS))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="steady traffic per pattern")
    parser.add_argument("--rate", type=float, default=150.0, help="requests a second, all replicas together")
    parser.add_argument("--database-url", help="an existing PostgreSQL (default: a throw-away one)")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    print(render(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
