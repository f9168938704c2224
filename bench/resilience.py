"""Hang detection (§3a) and retries (§3b) under load: the `hang` and `retry` scenarios.

- `hang`: a steady 200 req/s through a route with `timeout_ms: 1000` against an upstream that
  answers in ~1 ms; after a warm-up long enough for `slow_call_duration_ms: auto` to learn,
  the upstream hangs. Upstream contacts after the hang began, for circuit-proxy without the
  §3a keys, with `slow_call_duration_ms: auto` + `max_slow_in_flight: 5`, and the naive proxy.
  The run itself is the reaction scenario's (`scenarios.reaction_run`).
- `retry`: the upstream fails a share of calls at random, first 20 %, then 100 %, under a
  steady 200 req/s. Per phase: client success rate and upstream calls per client request (the
  amplification), for a route with `retry: {attempts: 2, backoff_ms: 25, budget_percent: 20}`,
  the same route without retry, the retrying route with a breaker that cannot trip (so the
  budget alone bounds the amplification), and the naive proxy.

Every circuit-proxy run has a service of its own in the generated config (`services_yaml`),
so no run inherits an open breaker, a learned threshold or a spent retry budget.
"""

from __future__ import annotations

import json
import re
import textwrap
import time

from bench import loadgen
from bench.procs import Proc, http_get, upstream_control
from bench.scenarios import (FAILURE_THRESHOLD, REACTION_OPEN_MS, REACTION_TIMEOUT_MS, Plan, median,
                             reaction_run)

RATE = 200  # client requests per second, both scenarios
HANG_WARM_S = 1.6  # 320 calls at 200 req/s: `auto` needs 100 successes, recomputes every 64
MAX_SLOW_IN_FLIGHT = 5
RETRY = {"attempts": 2, "backoff_ms": 25, "budget_percent": 20}
ERROR_RATES = (0.2, 1.0)  # the retry scenario's two phases

HANG_VARIANTS = {  # suffix → (label, extra keys)
    "plain": ("circuit-proxy (no §3a keys)", {}),
    "auto": (f"circuit-proxy, auto + max_slow_in_flight {MAX_SLOW_IN_FLIGHT}",
             {"slow_call_duration_ms": "auto", "max_slow_in_flight": MAX_SLOW_IN_FLIGHT}),
}
RETRY_VARIANTS = {  # suffix → (label, extra keys)
    "noretry": ("circuit-proxy, no retry", {}),
    "retry": ("circuit-proxy, retry", {"retry": RETRY}),
    "retrynb": ("circuit-proxy, retry, breaker cannot trip",
                {"retry": RETRY, "failure_threshold": 0, "failure_rate_threshold": 0}),
    # The same with a 25 % budget: at 20 % failures a 20 % budget caps the success rate at
    # 1 - 0.2 + 0.2 × 0.8 = 96 % (plus the 1 retry/s floor); 25 % covers the 24 % of requests
    # that want a retry, so this row shows what the retries themselves achieve.
    "retry25nb": ("circuit-proxy, retry with budget_percent 25, breaker cannot trip",
                  {"retry": {**RETRY, "budget_percent": 25}, "failure_threshold": 0,
                   "failure_rate_threshold": 0}),
}


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def hang_services(reps: int) -> list[str]:
    return [f"hang{i}_{suffix}" for i in range(reps) for suffix in HANG_VARIANTS]


def retry_services(reps: int) -> list[str]:
    return [f"retry{i}_{suffix}" for i in range(reps) for suffix in RETRY_VARIANTS]


def services_yaml(faulty_port: int, hang: list[str], retry: list[str]) -> str:
    """The `services:` entries (indented for that map) of the given hang and retry services."""
    text = ""
    for name in hang + retry:
        suffix = name.rpartition("_")[2]
        extra = (HANG_VARIANTS if name.startswith("hang") else RETRY_VARIANTS)[suffix][1]
        keys = {"upstream": f"http://127.0.0.1:{faulty_port}", "failure_threshold": FAILURE_THRESHOLD,
                "timeout_ms": REACTION_TIMEOUT_MS, "open_timeout_ms": REACTION_OPEN_MS,
                "backoff_multiplier": 1.0, "max_concurrent": 0, **extra}
        text += f"{name}:\n" + "".join(f"  {k}: {_flow(v)}\n" for k, v in keys.items())
    return textwrap.indent(text, "  ")


async def _status(circuit: Proc, service: str) -> dict:
    status, _, body = await http_get(circuit.port, "/status.json")
    for entry in json.loads(body)["breakers"] if status == 200 else []:
        if entry["service"] == service:
            return entry
    return {}


async def _retry_metrics(circuit: Proc, service: str) -> dict[str, int]:
    """circuit_breaker_retries_total of the service's breaker(s), by result."""
    _, _, body = await http_get(circuit.port, "/metrics")
    out: dict[str, int] = {}
    pattern = re.compile(r'^circuit_breaker_retries_total\{([^}]*)\} ([0-9.e+]+)$', re.M)
    for labels, value in pattern.findall(body.decode()):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("breaker", "").split(".")[0] == service:  # breaker: "<service>.<route>"
            out[fields["result"]] = out.get(fields["result"], 0) + int(float(value))
    return out


# -- hang ---------------------------------------------------------------------------------------


async def hang(plan: Plan, circuit: Proc, naive_faulty: Proc, faulty: Proc, services: list[str],
               log) -> list[dict]:
    cases = [*HANG_VARIANTS, "naive"]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    pool = list(services)
    for rep in range(plan.reps):
        for case in cases:
            if rep and time.monotonic() > plan.deadline:
                log("hang: time budget spent, skipping the remaining repetitions")
                break
            learned: dict = {}
            extra = []
            if case == "naive":
                port, path = naive_faulty.port, "/x"
            else:
                service = next(s for s in pool if s.endswith("_" + case))
                pool.remove(service)  # a breaker that never opened, a threshold never learned
                port, path = circuit.port, f"/{service}/x"

                async def before_fault(service: str = service) -> None:
                    learned.update(await _status(circuit, service))

                extra = [(HANG_WARM_S - 0.15, before_fault)]
            run = await reaction_run(plan, faulty, port, path, "hang", warm=HANG_WARM_S,
                                     extra_events=extra)
            run["slow_threshold_ms"] = learned.get("slow_threshold_ms")
            run["successes_before_fault"] = (learned.get("calls") or {}).get("success")
            runs[case].append(run)
    rows = []
    for case in cases:
        if not runs[case]:
            continue
        label = HANG_VARIANTS[case][0] if case in HANG_VARIANTS else "naive aiohttp proxy"
        row = {"variant": case, "target": label, "timeout_ms": REACTION_TIMEOUT_MS, "reps": runs[case]}
        for key in ("leaked", "leaked_before_open", "probes", "time_to_fail_fast_ms",
                    "time_to_first_success_ms", "slow_threshold_ms", "successes_before_fault"):
            row[key] = median([run[key] for run in runs[case]])
        row["leaked_each"] = [run["leaked_before_open"] for run in runs[case]]
        row["leaked_total_each"] = [run["leaked"] for run in runs[case]]
        rows.append(row)
        log(f"hang   {label:<45} leaked before open {row['leaked_each']} during the hang "
            f"{row['leaked_total_each']}  fail-fast {row['time_to_fail_fast_ms']} ms  "
            f"threshold {row['slow_threshold_ms']} ms")
    await upstream_control(faulty, "mode/healthy")
    return rows


# -- retry storm --------------------------------------------------------------------------------


async def retry_run(plan: Plan, faulty: Proc, port: int, path: str, circuit: Proc | None,
                    service: str | None) -> dict:
    """Steady RATE req/s: `phase_s` at each error rate of ERROR_RATES, back to back, from a
    fresh route (no healthy warm-up: a warm-up would bank retry budget that the short phases
    would then spend, flattering both figures). Upstream calls are read at each phase's start,
    half-way through it and at its end."""
    phase_s = 3.0 if plan.quick else 5.0
    await upstream_control(faulty, "mode/healthy")
    for _ in range(3):  # connections opened, nothing more
        await http_get(port, path)
    marks: dict[str, dict] = {}
    events = []
    for index, rate in enumerate(ERROR_RATES):
        async def start(rate: float = rate, index: int = index) -> None:
            marks[f"start{index}"] = await upstream_control(faulty, f"mode/error?rate={rate}")
        async def half(index: int = index) -> None:
            marks[f"half{index}"] = await upstream_control(faulty, "stats")
        start.__name__, half.__name__ = f"start{index}", f"half{index}"
        events += [(index * phase_s, start), (index * phase_s + phase_s / 2, half)]

    async def end() -> None:
        marks["end"] = await upstream_control(faulty, "mode/healthy")
    events.append((len(ERROR_RATES) * phase_s, end))
    # the generator's last request is due just before `end`; a little longer so `end` runs
    run = await loadgen.steady_rate("127.0.0.1", port, path, RATE, len(ERROR_RATES) * phase_s + 0.05,
                                    events=events, timeout=REACTION_TIMEOUT_MS / 1000 * 5)
    if "end" not in marks:
        marks["end"] = await upstream_control(faulty, "mode/healthy")
        run.marks["end"] = time.perf_counter()
    phases = []
    for index, rate in enumerate(ERROR_RATES):
        begin = run.marks[f"start{index}"]
        middle = run.marks[f"half{index}"]
        stop = run.marks[f"start{index + 1}"] if index + 1 < len(ERROR_RATES) else run.marks["end"]
        stop_counts = marks[f"start{index + 1}"] if index + 1 < len(ERROR_RATES) else marks["end"]
        samples = [s for s in run.samples if begin <= s.scheduled < stop]
        second_half = [s for s in samples if s.scheduled >= middle]
        upstream_calls = stop_counts["requests"] - marks[f"start{index}"]["requests"]
        upstream_second_half = stop_counts["requests"] - marks[f"half{index}"]["requests"]
        statuses: dict[str, int] = {}
        for s in samples:
            statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        ok = sum(1 for s in samples if 200 <= s.status < 300)
        phases.append({
            "error_rate": rate, "client_requests": len(samples),
            "success_pct": round(100 * ok / len(samples), 2) if samples else None,
            "upstream_calls": upstream_calls,
            "amplification": round(upstream_calls / len(samples), 3) if samples else None,
            "amplification_second_half": (round(upstream_second_half / len(second_half), 3)
                                          if second_half else None),
            "upstream_errors": stop_counts["errors"] - marks[f"start{index}"]["errors"],
            "circuit_open": sum(1 for s in samples if s.error == "circuit_open"),
            "statuses": statuses,
        })
    result = {"phases": phases, "phase_s": phase_s}
    if circuit is not None and service is not None:
        result["retries"] = await _retry_metrics(circuit, service)
    return result


async def retry_storm(plan: Plan, circuit: Proc, naive_faulty: Proc, faulty: Proc, services: list[str],
                      log) -> list[dict]:
    cases = [*RETRY_VARIANTS, "naive"]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    pool = list(services)
    for rep in range(plan.reps):
        for case in cases:
            if rep and time.monotonic() > plan.deadline:
                log("retry: time budget spent, skipping the remaining repetitions")
                break
            if case == "naive":
                runs[case].append(await retry_run(plan, faulty, naive_faulty.port, "/x", None, None))
            else:
                service = next(s for s in pool if s.endswith("_" + case))
                pool.remove(service)  # fresh breaker and retry budget
                runs[case].append(await retry_run(plan, faulty, circuit.port, f"/{service}/x",
                                                  circuit, service))
    rows = []
    for case in cases:
        if not runs[case]:
            continue
        label = RETRY_VARIANTS[case][0] if case in RETRY_VARIANTS else "naive aiohttp proxy"
        for index, rate in enumerate(ERROR_RATES):
            phase = [run["phases"][index] for run in runs[case]]
            row = {"variant": case, "target": label, "error_rate": rate,
                   "phase_s": runs[case][0]["phase_s"], "reps": phase}
            for key in ("client_requests", "success_pct", "upstream_calls", "amplification",
                        "amplification_second_half", "circuit_open"):
                row[key] = median([p[key] for p in phase])
            row["success_each"] = [p["success_pct"] for p in phase]
            row["amplification_each"] = [p["amplification"] for p in phase]
            if index == len(ERROR_RATES) - 1 and "retries" in runs[case][0]:
                row["retries_each_run"] = [run["retries"] for run in runs[case]]
            rows.append(row)
            log(f"retry  {label:<42} {int(rate * 100):>3} % failing: success {row['success_each']} % "
                f"amplification {row['amplification_each']} (2nd half {row['amplification_second_half']})")
    await upstream_control(faulty, "mode/healthy")
    return rows
