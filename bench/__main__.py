"""circuit-proxy benchmarks: `./dev bench` (or `python -m bench`), see bench/README.md.

Starts a static upstream, the naive aiohttp proxy and circuit-proxy on 127.0.0.1 (the proxies
pinned to core 1, the load and the upstream to core 0 when there are two cores), runs the
scenarios interleaved, prints a markdown table and writes JSON + markdown to bench/results/.
Bounded: `--quick` takes about three minutes, the full run about fifteen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import fleet, procs, report, resilience, scenarios

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_config(workdir: Path, upstream_port: int, faulty_port: int, reaction_services: list[str],
                 name: str = "bench", hang_services: list[str] | None = None,
                 retry_services: list[str] | None = None, pool_bound: int = 0) -> Path:
    """The config circuit-proxy runs with: the healthy service, two open-path services and
    one fresh service per reaction, hang or retry run (so every run starts from a breaker that
    never opened, a slow threshold never learned and an unspent retry budget). `pool_bound`:
    server.upstream_max_connections (0, the default: no bound)."""
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "fallback_responses").mkdir(exist_ok=True)
    (workdir / "fallback_responses" / "bench.json").write_text(json.dumps({
        "status": 200, "headers": {"Content-Type": "application/json"},
        "body": {"fallback": True, "breaker": "{{breaker}}"}}))
    reaction = ""
    for service in reaction_services:  # not `name`: that one names the config and the database
        reaction += textwrap.dedent(f"""\
          {service}:
            upstream: http://127.0.0.1:{faulty_port}
            failure_threshold: {scenarios.FAILURE_THRESHOLD}
            timeout_ms: {scenarios.REACTION_TIMEOUT_MS}
            open_timeout_ms: {scenarios.REACTION_OPEN_MS}
            backoff_multiplier: 1.0
            max_concurrent: {scenarios.BULKHEAD if service.endswith('_bh') else 0}
        """)
    text = textwrap.dedent(f"""\
        server: {{host: 127.0.0.1, port: 8080, upstream_max_connections: {pool_bound}}}
        storage: {{path: {workdir / 'var' / (name + '.db')}}}
        defaults:
          jitter: 0.0
          max_concurrent: 0
        services:
          bench:
            upstream: http://127.0.0.1:{upstream_port}
          openplain:
            upstream: http://127.0.0.1:{faulty_port}
            failure_threshold: 1
            open_timeout_ms: 3600000
            max_open_timeout_ms: 3600000
          openstatic:
            upstream: http://127.0.0.1:{faulty_port}
            failure_threshold: 1
            open_timeout_ms: 3600000
            max_open_timeout_ms: 3600000
            routes:
              default:
                fallback: {{type: static, file: bench.json}}
        """) + textwrap.indent(reaction, "  ") + resilience.services_yaml(
            faulty_port, hang_services or [], retry_services or [])
    path = workdir / "config" / f"{name}.yaml"
    path.write_text(text)
    return path


async def run(args: argparse.Namespace) -> dict:
    proxy_prefix, load_prefix = ([], []) if args.no_pin else procs.pinning()
    if load_prefix:
        os.sched_setaffinity(0, {0})  # the steady-rate generator runs here: with the load
    # Children inherit the raised priority: proxies, upstreams and load stay ahead of whatever
    # else runs on a shared machine (reported in the table's header).
    prioritised = bool(procs.raise_priority()) if not args.no_nice else False
    use_wrk = shutil.which("wrk") is not None and args.loadgen != "builtin"
    plan = scenarios.Plan.make(quick=args.quick, duration=args.duration, reps=args.reps,
                               load_prefix=load_prefix, use_wrk=use_wrk,
                               budget_s=args.budget or (150 if args.quick else 900))
    only = set(args.only.split(",")) if args.only else {"healthy", "open", "reaction", "hang", "retry",
                                                        "queue", "fleet"}
    workdir = Path(tempfile.mkdtemp(prefix="circuit-bench-"))
    log(f"working in {workdir}; load generator: {'wrk' if use_wrk else 'built-in'}; "
        f"pinning: {'proxies on core 1, load + upstream on core 0' if proxy_prefix else 'none'}")
    started: list[procs.Proc] = []
    results: dict = {"meta": {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                   f"{platform.python_version()}, {platform.system()} {platform.release()}",
        "load_generator": "wrk" if use_wrk else "built-in (bench/loadgen.py)",
        "pinning": ("proxy on core 1, load + upstream on core 0" if proxy_prefix else "none")
                   + (", all at nice -10" if prioritised else ""),
        "quick": plan.quick, "reps": plan.reps, "duration_s": plan.duration,
        "reaction_fault_s": plan.reaction_fault_s, "matrix": plan.healthy_matrix}}
    try:
        upstream = procs.start_upstream(load_prefix, workdir)
        faulty = procs.start_upstream(load_prefix, workdir, "faulty-upstream")
        started += [upstream, faulty]
        reaction_services = [f"r{i}{suffix}" for i in range(plan.reps * 3) for suffix in ("", "_bh")]
        hang_services = resilience.hang_services(plan.reps)
        retry_services = resilience.retry_services(plan.reps)
        config = write_config(workdir, upstream.port, faulty.port, reaction_services,
                              hang_services=hang_services, retry_services=retry_services)
        circuit = procs.start_circuit_proxy(proxy_prefix, workdir, config,
                                            {"CIRCUIT_PROXY_ADMIN_TOKEN": "bench"})
        started.append(circuit)
        naive = procs.start_naive(proxy_prefix, workdir, upstream.port, 5.0)
        naive_faulty = procs.start_naive(proxy_prefix, workdir, faulty.port,
                                         scenarios.REACTION_TIMEOUT_MS / 1000, "naive-faulty")
        bare = procs.start_bare_relay(proxy_prefix, workdir, upstream.port)
        responder = procs.start_bare_relay(proxy_prefix, workdir, 0, "bare-responder")  # the open path's floor
        started += [naive, naive_faulty, bare, responder]
        others = []
        for index, spec in enumerate(args.also or []):
            label, _, root = spec.partition("=")
            other_config = write_config(workdir, upstream.port, faulty.port, [], name=f"also{index}")
            others.append(procs.start_circuit_proxy(proxy_prefix, workdir, other_config,
                                                    {"CIRCUIT_PROXY_ADMIN_TOKEN": "bench"},
                                                    root=Path(root).resolve(), name=f"circuit-proxy@{label}"))
        started += others
        # The same tree with a bounded upstream pool, beside the default (no bound) where
        # many connections make it matter (200 and 1,000 client connections).
        pooled_config = write_config(workdir, upstream.port, faulty.port, [], name="pooled",
                                     pool_bound=scenarios.POOL_BOUND)
        pooled = procs.start_circuit_proxy(proxy_prefix, workdir, pooled_config,
                                           {"CIRCUIT_PROXY_ADMIN_TOKEN": "bench"},
                                           name=scenarios.POOLED_LABEL)
        started.append(pooled)
        if "healthy" in only:
            results["healthy"] = await scenarios.healthy(plan, upstream, naive, circuit, log, others,
                                                          bare=bare, pooled=pooled)
        if "open" in only:
            results["open_path"] = await scenarios.open_path(plan, circuit, faulty, log, floor=responder)
        if "reaction" in only:
            results["reaction"] = await scenarios.reaction(plan, circuit, naive_faulty, faulty,
                                                           reaction_services, log)
        if "hang" in only:
            results["hang"] = await resilience.hang(plan, circuit, naive_faulty, faulty, hang_services, log)
        if "retry" in only:
            results["retry"] = await resilience.retry_storm(plan, circuit, naive_faulty, faulty,
                                                            retry_services, log)
        if "queue" in only:
            results["queue"] = await scenarios.queue_accept(plan, workdir, log)
        if "fleet" in only:  # its own upstream, proxies and PostgreSQL (bench/fleet.py)
            results["fleet"] = await fleet.scenario(plan.quick, log)
    finally:
        for proc in reversed(started):
            proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (about 3 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per closed-loop run")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--only", help="comma list of healthy,open,reaction,hang,retry,queue,fleet")
    parser.add_argument("--loadgen", choices=("auto", "builtin"), default="auto",
                        help="auto: wrk when installed, else the built-in generator")
    parser.add_argument("--budget", type=float, help="seconds after which optional repetitions stop")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--also", action="append", metavar="LABEL=DIR",
                        help="also measure circuit-proxy from another checkout (healthy path), "
                             "e.g. --also before=/tmp/wt-before")
    parser.add_argument("--no-nice", action="store_true", help="do not raise the priority of what is measured")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, config)")
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: PLC0415
        results = uvloop.run(run(args))
    except ImportError:
        results = asyncio.run(run(args))
    text = report.render(results)
    if results.get("fleet"):
        text += "\n\n### Fleet (bench/fleet.py)\n\n" + fleet.render(results["fleet"]) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    (RESULTS / f"{stamp}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{stamp}.md").write_text(text)
    charted = report.write_chart(results, RESULTS / f"{stamp}.png")
    log(f"wrote bench/results/{stamp}.json, .md{' and .png' if charted else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
