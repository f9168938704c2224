"""The benchmark scenarios: healthy path, open path, reaction to a failing upstream, and the
durable queue's acceptances. Each returns plain dicts that `report` renders and `__main__`
writes as JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen
from bench.procs import Proc, http_get, upstream_control

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
FAILURE_THRESHOLD = 5  # the reaction scenarios' breaker setting (consecutive failures)
REACTION_TIMEOUT_MS = 1000
REACTION_OPEN_MS = 1000
BULKHEAD = 10


NEW_CONNECTION = "100B, new connection per request"  # a healthy-matrix "body": Connection: close

@dataclass
class Plan:
    quick: bool
    duration: float  # seconds per closed-loop measurement
    reps: int
    healthy_matrix: list[tuple[str, int]]  # (body, connections)
    steady_seconds: float
    reaction_fault_s: float
    reaction_after_s: float
    load_prefix: list[str]
    use_wrk: bool
    deadline: float  # time.monotonic() after which optional work is skipped

    @classmethod
    def make(cls, *, quick: bool, duration: float | None, reps: int | None, load_prefix: list[str],
             use_wrk: bool, budget_s: float) -> Plan:
        if quick:
            matrix = [("100B", 1), ("100B", 50), ("100B", 200), ("1MB", 50)]
        else:
            matrix = [(body, c) for body in ("100B", "1MB") for c in (1, 50, 200)] + [("100B", 1000)]
        if use_wrk:  # a new connection per request: what a client without keep-alive costs
            matrix.append((NEW_CONNECTION, 50))
        return cls(quick=quick, duration=duration or (2.0 if quick else 5.0),
                   reps=reps or (1 if quick else 3), healthy_matrix=matrix,
                   steady_seconds=3.0 if quick else 6.0, reaction_fault_s=2.5 if quick else 3.0,
                   reaction_after_s=2.5 if quick else 3.0, load_prefix=load_prefix, use_wrk=use_wrk,
                   deadline=time.monotonic() + budget_s)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# -- closed-loop measurement (wrk, or the built-in generator) ---------------------------------


async def closed_loop(plan: Plan, url: str, connections: int, duration: float | None = None, *,
                      new_connections: bool = False) -> dict:
    """`new_connections`: every request on a connection of its own (`Connection: close`; wrk only)."""
    duration = duration or plan.duration
    if plan.use_wrk:
        threads = 1 if connections < 100 else 2
        cmd = [*plan.load_prefix, "wrk", f"-t{min(threads, connections)}", f"-c{connections}",
               f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(WRK_SCRIPT), url]
        if new_connections:
            cmd[-1:-1] = ["-H", "Connection: close"]
    else:
        cmd = [*plan.load_prefix, shutil.which("python3") or "python3", "-m", "bench.loadgen", "closed",
               "--url", url, "-c", str(connections), "-d", str(duration)]
        import sys  # noqa: PLC0415
        cmd[len(plan.load_prefix)] = sys.executable
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                cwd=Path(__file__).resolve().parent.parent)
    out, err = await asyncio.wait_for(proc.communicate(), duration + 60)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {(out + err).decode()[-500:]}")
    raw = json.loads(lines[-1])
    if plan.use_wrk:
        seconds = raw["duration_us"] / 1e6
        return {"requests": raw["requests"], "rps": raw["requests"] / seconds,
                "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                "p999_ms": raw["p999_us"] / 1000,
                "errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
                "non_2xx": raw["non_2xx_3xx"], "seconds": seconds}
    raw["non_2xx"] = raw.pop("errors")
    raw["errors"] = raw["statuses"].get("0", 0)
    return raw


class Sampler:
    """Peak RSS of a process while a measurement runs (polls VmRSS; VmHWM when resettable)."""

    def __init__(self, proc: Proc | None) -> None:
        self.proc = proc
        self.peak = 0.0
        self.before: float | None = None
        self._task: asyncio.Task | None = None
        self._hwm = False

    async def __aenter__(self) -> Sampler:
        if self.proc is not None:
            self.before = self.proc.rss_mb()
            self._hwm = self.proc.reset_peak()
            self.cpu_before = self.proc.cpu_seconds()
            self._task = asyncio.ensure_future(self._poll())
        return self

    async def _poll(self) -> None:
        assert self.proc is not None
        while True:
            self.peak = max(self.peak, self.proc.rss_mb() or 0.0)
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            assert self.proc is not None
            if self._hwm:
                self.peak = max(self.peak, self.proc.peak_mb() or 0.0)
            self.cpu = (self.proc.cpu_seconds() or 0.0) - (self.cpu_before or 0.0)


async def measure(plan: Plan, target: Proc | None, url: str, connections: int,
                  duration: float | None = None, *, new_connections: bool = False) -> dict:
    """One closed-loop run; CPU and memory of `target` (the proxy; None for the upstream)."""
    async with Sampler(target) as sampler:
        result = await closed_loop(plan, url, connections, duration, new_connections=new_connections)
    if target is not None:
        result["cpu_s"] = sampler.cpu
        result["cpu_s_per_1k"] = sampler.cpu / result["requests"] * 1000 if result["requests"] else None
        result["rss_before_mb"] = sampler.before
        result["rss_peak_mb"] = sampler.peak
        result["rss_growth_mb"] = sampler.peak - (sampler.before or 0.0)
    return result


def summarize(runs: list[dict]) -> dict:
    keys = ("rps", "p50_ms", "p99_ms", "p999_ms", "cpu_s_per_1k", "rss_peak_mb", "rss_growth_mb")
    out = {key: median([run.get(key) for run in runs]) for key in keys}
    out["errors"] = sum(run.get("errors", 0) for run in runs)
    out["non_2xx"] = sum(run.get("non_2xx", 0) for run in runs)
    out["reps"] = runs
    return out


# -- healthy path -------------------------------------------------------------------------------


POOL_BOUND = 64  # server.upstream_max_connections of the pooled variant
POOLED_LABEL = f"circuit-proxy, pool {POOL_BOUND}"
POOLED_FROM = 200  # client connections from which the pooled variant is measured too


async def healthy(plan: Plan, upstream: Proc, naive: Proc, circuit: Proc, log,
                  others: list[Proc] | None = None, bare: Proc | None = None,
                  pooled: Proc | None = None) -> list[dict]:
    paths = {"100B": "/small", "1MB": "/large", NEW_CONNECTION: "/small"}
    targets = [("upstream (direct)", None, upstream.port, ""), ("naive aiohttp proxy", naive, naive.port, "")]
    if bare is not None:  # the floor: uvloop + httptools, nothing else (bench/bare_relay.py)
        targets.append(("bare relay (floor)", bare, bare.port, ""))
    targets.append(("circuit-proxy", circuit, circuit.port, "/bench"))
    targets += [(other.name, other, other.port, "/bench") for other in others or []]
    if pooled is not None:
        targets.append((pooled.name, pooled, pooled.port, "/bench"))
    # Warm-up: connections pooled, code paths hot, allocator grown to its working size.
    for _, proc, port, prefix in targets:
        for body, path in paths.items():
            await closed_loop(plan, f"http://127.0.0.1:{port}{prefix}{path}", 50, 1.0)
    rows = []
    for body, connections in plan.healthy_matrix:
        # A connection per request is compared between the two proxies that answer
        # `Connection: close` with it (the bare relay and the static upstream keep theirs open).
        measured = [t for t in targets if (body != NEW_CONNECTION or t[1] is naive or t[1] is circuit)
                    and (t[1] is not pooled or (body != NEW_CONNECTION and connections >= POOLED_FROM))]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in measured}
        for rep in range(plan.reps):
            order = measured if rep % 2 == 0 else list(reversed(measured))
            for name, proc, port, prefix in order:
                url = f"http://127.0.0.1:{port}{prefix}{paths[body]}"
                runs[name].append(await measure(plan, proc, url, connections,
                                                new_connections=body == NEW_CONNECTION))
        for name, *_ in measured:
            row = {"body": body, "connections": connections, "target": name, **summarize(runs[name])}
            rows.append(row)
            log(f"healthy {body:>4} c={connections:<3} {name:<20} {row['rps']:>9.0f} req/s  "
                f"p99 {row['p99_ms']:.2f} ms  cpu/1k {_fmt(row['cpu_s_per_1k'])}")
    return rows


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# -- open path ----------------------------------------------------------------------------------


async def trip(port: int, path: str, want: str | None = None, attempts: int = 50) -> dict[str, str]:
    """Call until the breaker answers from memory (503 circuit_open, or a fallback)."""
    for _ in range(attempts):
        status, headers, body = await http_get(port, path)
        if "x-fallback" in headers or (status == 503 and b"circuit_open" in body):
            return headers
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{path}: the breaker did not open")


async def open_path(plan: Plan, circuit: Proc, faulty: Proc, log, floor: Proc | None = None) -> list[dict]:
    """The breaker open: rejections per second and their CPU, with and without a fallback,
    beside `floor` (bench/bare_relay.py --answer: a fixed 503, nothing else)."""
    await upstream_control(faulty, "mode/error")
    variants = [("breaker open, no fallback", "/openplain/x"),
                ("breaker open, static fallback", "/openstatic/x")]
    fallback_served = {}
    for name, path in variants:
        headers = await trip(circuit.port, path)
        fallback_served[name] = headers.get("x-fallback")
    before = (await upstream_control(faulty, "stats"))["requests"]
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    floor_runs: list[dict] = []
    for rep in range(plan.reps):
        for name, path in variants:
            runs[name].append(await measure(plan, circuit, f"http://127.0.0.1:{circuit.port}{path}", 50))
        if floor is not None:
            floor_runs.append(await measure(plan, floor, f"http://127.0.0.1:{floor.port}/x", 50))
    rows = []
    for name, path in variants:
        rows.append({"variant": name, "fallback_header": fallback_served[name], **summarize(runs[name]),
                     **await _steady(plan, circuit.port, path)})
    after = (await upstream_control(faulty, "stats"))["requests"]
    for row in rows:
        row["leaked"] = after - before  # both variants together: every call must stay in the proxy
        log(f"open   {row['variant']:<30} {row['rps']:>9.0f} req/s  steady p99 "
            f"{row['steady_p99_ms']} ms  leaked {row['leaked']}")
    if floor is not None:
        # The same steady rate against the floor: what the measuring client and the machine
        # add to every latency, proxy or not.
        rows.append({"variant": "bare responder (floor)", "fallback_header": None, **summarize(floor_runs),
                     **await _steady(plan, floor.port, "/x")})
        log(f"open   {rows[-1]['variant']:<30} {rows[-1]['rps']:>9.0f} req/s  steady p99 "
            f"{rows[-1]['steady_p99_ms']} ms")
    await upstream_control(faulty, "mode/healthy")
    return rows


async def _steady(plan: Plan, port: int, path: str, rate: int = 200) -> dict:
    """Latency at a steady `rate` (open loop, bench/loadgen.py)."""
    steady = await loadgen.steady_rate("127.0.0.1", port, path, rate, plan.steady_seconds)
    latencies = sorted(s.done - s.sent for s in steady.samples)
    statuses: dict[int, int] = {}
    for sample in steady.samples:
        statuses[sample.status] = statuses.get(sample.status, 0) + 1
    return {"steady_rate": rate, "steady_requests": len(latencies),
            "steady_p50_ms": _ms(loadgen.percentile(latencies, 50)),
            "steady_p99_ms": _ms(loadgen.percentile(latencies, 99)),
            "steady_p999_ms": _ms(loadgen.percentile(latencies, 99.9)),
            "steady_statuses": {str(k): v for k, v in statuses.items()}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# -- reaction -----------------------------------------------------------------------------------


async def reaction_run(plan: Plan, faulty: Proc, port: int, path: str, fault: str, *,
                       warm: float = 1.0, extra_events: list | None = None) -> dict:
    """One steady 200 req/s run: `warm` s healthy, the fault, then healed. `extra_events`
    are more (seconds after start, coroutine function) pairs for the load generator."""
    await upstream_control(faulty, "mode/healthy")
    counts: dict[str, int] = {}
    fault_s, after_s = plan.reaction_fault_s, plan.reaction_after_s

    async def fault_start() -> None:
        counts["at_fault"] = (await upstream_control(faulty, f"mode/{fault}"))["requests"]

    async def heal() -> None:
        counts["at_heal"] = (await upstream_control(faulty, "mode/healthy"))["requests"]

    run = await loadgen.steady_rate("127.0.0.1", port, path, 200, warm + fault_s + after_s,
                                    events=[(warm, fault_start), (warm + fault_s, heal),
                                            *(extra_events or [])],
                                    timeout=REACTION_TIMEOUT_MS / 1000 * 5)
    fault_at, heal_at = run.marks["fault_start"], run.marks["heal"]
    during = [s for s in run.samples if fault_at <= s.scheduled < heal_at]
    after = sorted((s for s in run.samples if s.scheduled >= heal_at), key=lambda s: s.scheduled)
    # Requests that reached the upstream while it was broken: counted by the upstream itself;
    # with `refuse` nothing arrives, so it is every connection attempt (each one a 502).
    leaked = counts["at_heal"] - counts["at_fault"]
    if fault == "refuse":
        leaked += sum(1 for s in during if s.status == 502)
    rejected = [s for s in during if s.status == 503 and s.error == "circuit_open"]
    fail_fast = min((s.done for s in rejected), default=None)
    # Split the calls that left the proxy: those before the breaker first rejected (the leak
    # the threshold allows) and the half-open probes after it (one per open period).
    # A call that left the proxy comes back as the fault's answer: 500 passed through, 502
    # refused, 504 timed out (or no answer at all). A call in flight when the fault began
    # counts too, hence the look back to just before the fault mark.
    opened = fail_fast if fail_fast is not None else heal_at
    hit = [s for s in run.samples if fault_at - 0.05 <= s.scheduled < heal_at
           and (s.status in (0, 500, 502, 504))]
    before_open = sum(1 for s in hit if s.scheduled < opened)
    first_ok = next((s for s in after if 200 <= s.status < 300), None)
    bad_after = [s for s in after if not 200 <= s.status < 300]
    open_latencies = sorted(s.done - s.sent for s in rejected)
    return {
        "leaked": leaked,
        "leaked_before_open": before_open,
        "probes": len(hit) - before_open,
        "bulkhead_rejected": sum(1 for s in during if s.error == "bulkhead_full"),
        "time_to_fail_fast_ms": None if fail_fast is None else round((fail_fast - fault_at) * 1000, 1),
        "time_to_first_success_ms": None if first_ok is None else round((first_ok.done - heal_at) * 1000, 1),
        "time_to_all_clear_ms": round(max([s.done - heal_at for s in bad_after], default=0.0) * 1000, 1),
        "rejections_p99_ms": _ms(loadgen.percentile(open_latencies, 99)),
        "requests": len(run.samples),
    }


async def reaction(plan: Plan, circuit: Proc, naive_faulty: Proc, faulty: Proc, services: list[str],
                   log) -> list[dict]:
    """`services` are the reaction services of the generated config, one per (fault, bulkhead, rep)."""
    cases = [("error", "circuit-proxy", False), ("error", "naive aiohttp proxy", False),
             ("refuse", "circuit-proxy", False), ("refuse", "naive aiohttp proxy", False),
             ("hang", "circuit-proxy", False), ("hang", "circuit-proxy", True),
             ("hang", "naive aiohttp proxy", False)]
    results: dict[tuple, list[dict]] = {case: [] for case in cases}
    pool = list(services)
    for rep in range(plan.reps):
        for case in cases:
            if time.monotonic() > plan.deadline:
                log("reaction: time budget spent, skipping the remaining repetitions")
                break
            fault, target, bulkhead = case
            if target == "circuit-proxy":
                service = next(s for s in pool if s.endswith("_bh") == bulkhead)
                pool.remove(service)  # each run gets a breaker that has never opened
                port, path = circuit.port, f"/{service}/x"
            else:
                port, path = naive_faulty.port, "/x"
            results[case].append(await reaction_run(plan, faulty, port, path, fault))
    rows = []
    for case in cases:
        fault, target, bulkhead = case
        runs = results[case]
        if not runs:
            continue
        row = {"fault": fault, "target": target, "bulkhead": BULKHEAD if bulkhead else None,
               "threshold": FAILURE_THRESHOLD if target == "circuit-proxy" else None,
               "timeout_ms": REACTION_TIMEOUT_MS, "reps": runs}
        for key in ("leaked", "leaked_before_open", "probes", "bulkhead_rejected", "time_to_fail_fast_ms",
                    "time_to_first_success_ms",
                    "time_to_all_clear_ms", "rejections_p99_ms"):
            row[key] = median([run[key] for run in runs])
        row["leaked_each"] = [run["leaked_before_open"] for run in runs]
        rows.append(row)
        log(f"react  {fault:<6} {target:<20} bulkhead={row['bulkhead']} leaked {row['leaked_each']} "
            f"fail-fast {row['time_to_fail_fast_ms']} ms  recover {row['time_to_first_success_ms']} ms")
    await upstream_control(faulty, "mode/healthy")
    return rows


# -- durable queue ------------------------------------------------------------------------------


async def queue_accept(plan: Plan, workdir: Path, log) -> dict | None:
    """bench/queue_accept.py (written with the queue fallback) when present, run as its own
    process (`python -m bench.queue_accept --seconds N`); its "rate: N acceptances/s" line is
    the figure, the rest of what it prints is kept in the JSON."""
    import re  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if not Path(__file__).with_name("queue_accept.py").exists():
        log("queue: bench/queue_accept.py not present, skipped")
        return None
    seconds = 3 if plan.quick else 5
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.queue_accept", "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    except asyncio.TimeoutError:
        proc.kill()
        log("queue: bench/queue_accept.py did not finish in time")
        return None
    text = out.decode(errors="replace")
    match = re.search(r"rate: ([0-9,.]+) acceptances/s", text)
    result = {"accepts_per_s": float(match.group(1).replace(",", "")) if match else None,
              "exit_code": proc.returncode, "output": text.strip()}
    log(f"queue  {result['accepts_per_s']} acceptances/s (exit {proc.returncode})")
    return result
