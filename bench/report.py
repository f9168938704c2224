"""Markdown tables from one benchmark run's results (the JSON that `__main__` writes)."""

from __future__ import annotations

from pathlib import Path


def _n(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(results: dict) -> str:
    meta = results["meta"]
    out = [f"## circuit-proxy benchmark — {meta['started']}", "",
           f"{meta['machine']}; load: {meta['load_generator']}; pinning: {meta['pinning']}; "
           f"{meta['reps']} interleaved rep(s) of {meta['duration_s']} s each, medians shown"
           + ("; quick mode" if meta["quick"] else "") + ".", ""]
    healthy = results.get("healthy") or []
    if healthy:
        out += ["### Healthy path (closed loop)", ""]
        rows = []
        for row in healthy:
            rows.append([row["body"], str(row["connections"]), row["target"], _n(row["rps"], 0),
                         _n(row["p50_ms"]), _n(row["p99_ms"]), _n(row["p999_ms"]),
                         _n(row.get("cpu_s_per_1k"), 3), _n(row.get("rss_peak_mb"), 1),
                         _n(row.get("rss_growth_mb"), 1), str(row["errors"] + row["non_2xx"])])
        out += _table(["body", "conns", "target", "req/s", "p50 ms", "p99 ms", "p99.9 ms",
                       "CPU s / 1k req", "peak RSS MB", "RSS growth MB", "errors"], rows)
        out += [""] + [f"- {line}" for line in verdicts(results)] + [""]
    open_rows = results.get("open_path") or []
    if open_rows:
        out += ["### Open path (breaker open)", ""]
        rows = [[row["variant"], row.get("fallback_header") or "—", _n(row["rps"], 0),
                 _n(row["cpu_s_per_1k"] * 1000 if row.get("cpu_s_per_1k") else None, 1), _n(row["p50_ms"]),
                 _n(row["p99_ms"]), _n(row.get("steady_p50_ms"), 3), _n(row.get("steady_p99_ms"), 3),
                 _n(row.get("steady_p999_ms"), 3), str(row.get("leaked", "—"))] for row in open_rows]
        out += _table(["variant", "X-Fallback", "req/s (50 conns)", "CPU µs / request", "p50 ms", "p99 ms",
                       "200 req/s p50 ms", "200 req/s p99 ms", "200 req/s p99.9 ms",
                       "upstream calls leaked"], rows)
        if not healthy:  # else they were said under the healthy table
            out += [""] + [f"- {line}" for line in verdicts(results)]
        out.append("")
    reaction = results.get("reaction") or []
    if reaction:
        out += [f"### Reaction (steady 200 req/s; the upstream fails for {meta['reaction_fault_s']} s, then heals)",
                "", "circuit-proxy routes: `failure_threshold: 5`, `timeout_ms: 1000`, "
                "`open_timeout_ms: 1000`, `backoff_multiplier: 1`; the naive proxy has the same 1 s timeout. "
                "Leaked: calls that reached (or, refused, tried to reach) the upstream after it broke and "
                "before the breaker first rejected one; probes: half-open trial calls after that.", ""]
        rows = []
        for row in reaction:
            rows.append([row["fault"], row["target"] + (f" + bulkhead {row['bulkhead']}" if row["bulkhead"] else ""),
                         "/".join(str(n) for n in row["leaked_each"]), _n(row["threshold"], 0),
                         _n(row["probes"], 0),
                         _n(row["time_to_fail_fast_ms"], 1), _n(row["rejections_p99_ms"], 3),
                         _n(row["time_to_first_success_ms"], 1), _n(row["time_to_all_clear_ms"], 1)])
        out += _table(["upstream", "proxy", "calls leaked before open (each rep)", "threshold",
                       "half-open probes", "time to fail fast ms",
                       "rejection p99 ms", "first success after heal ms", "all clear after heal ms"], rows)
        out.append("")
    out += render_hang(results.get("hang") or [], meta)
    out += render_retry(results.get("retry") or [])
    queue = results.get("queue")
    out += ["### Durable queue", ""]
    if queue:
        out += [f"- acceptances per second (bench/queue_accept.py): {_n(queue.get('accepts_per_s'), 0)}", "",
                "```", queue.get("output", ""), "```"]
    else:
        out += ["- not measured in this run (bench/queue_accept.py absent, or not selected with --only)"]
    return "\n".join(out) + "\n"


def render_hang(rows: list[dict], meta: dict) -> list[str]:
    if not rows:
        return []
    out = [f"### Hang detection (steady 200 req/s; the upstream answers in ~1 ms, then hangs for "
           f"{meta['reaction_fault_s']} s)", "",
           "Routes: `timeout_ms: 1000`, `failure_threshold: 5`, `open_timeout_ms: 1000`; the §3a row adds "
           "`slow_call_duration_ms: auto` and `max_slow_in_flight: 5`, learned over a 1.6 s warm-up (320 calls). "
           "The naive proxy has the same 1 s timeout. Before open: calls that reached the upstream after it "
           "began hanging and before the breaker first rejected one; during the hang: every call the upstream "
           "received while hanging (half-open trials included).", ""]
    table = []
    for row in rows:
        table.append([row["target"], "/".join(str(n) for n in row["leaked_each"]),
                      "/".join(str(n) for n in row["leaked_total_each"]), _n(row["probes"], 0),
                      _n(row["slow_threshold_ms"], 1), _n(row["time_to_fail_fast_ms"], 1),
                      _n(row["time_to_first_success_ms"], 1)])
    out += _table(["proxy", "calls leaked before open (each rep)", "upstream contacts during the hang (each rep)",
                   "half-open trials", "slow threshold at the hang ms", "time to fail fast ms",
                   "first success after heal ms"], table)
    out += [""] + [f"- {line}" for line in hang_verdicts(rows)] + [""]
    return out


def hang_verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] == "auto" and row["leaked_each"]:
            worst = max(row["leaked_each"])
            lines.append(f"leak with `auto` + `max_slow_in_flight: 5`: {worst} at most "
                         f"(target ≤ 10: {'met' if worst <= 10 else 'NOT met'})")
    return lines


def render_retry(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    phase_s = rows[0]["phase_s"]
    out = [f"### Retry storm (steady 200 req/s; the upstream fails 20 % of calls at random for {phase_s:g} s, "
           f"then 100 % for {phase_s:g} s)", "",
           "Routes: `failure_threshold: 5`, `open_timeout_ms: 1000`, `timeout_ms: 1000`; retry rows add "
           "`retry: {attempts: 2, backoff_ms: 25, budget_percent: 20}`; \"breaker cannot trip\" adds "
           "`failure_threshold: 0, failure_rate_threshold: 0`. Each run starts on a fresh route, straight "
           "into the 20 % phase. Amplification: upstream calls / client requests; second half: the same "
           "over the second half of the phase.", ""]
    table = []
    for row in rows:
        table.append([row["target"], f"{row['error_rate'] * 100:.0f} %",
                      "/".join(_n(v, 1) for v in row["success_each"]),
                      "/".join(_n(v, 3) for v in row["amplification_each"]),
                      _n(row["amplification_second_half"], 3), _n(row["circuit_open"], 0),
                      _n(row["client_requests"], 0)])
    out += _table(["proxy", "upstream failing", "client success % (each rep)", "amplification (each rep)",
                   "amplification, second half", "503 circuit_open", "client requests"], table)
    retried = [row for row in rows if any(row.get("retries_each_run") or [])]
    if retried:
        out += ["", "Retries by result over each whole run (`circuit_breaker_retries_total`): " + "; ".join(
            f"{row['target']}: " + " / ".join(
                ", ".join(f"{k} {v}" for k, v in sorted(run.items())) for run in row["retries_each_run"])
            for row in retried)]
    out += [""] + [f"- {line}" for line in retry_verdicts(rows)] + [""]
    return out


def retry_verdicts(rows: list[dict]) -> list[str]:
    lines = []
    by = {(row["variant"], row["error_rate"]): row for row in rows}
    for variant in ("retry", "retrynb", "retry25nb"):
        full = by.get((variant, 1.0))
        if full and full["amplification_each"] and variant != "retry25nb":
            worst = max(full["amplification_each"])
            floor = 1.2 + 1 / 200  # §3b's 1 retry/s floor on top of the 20 % at 200 req/s
            verdict = ("met" if worst <= 1.2 else
                       f"NOT met by {worst - 1.2:.3f}, within the 1 retry/s floor's {floor:.3f}"
                       if worst <= floor else "NOT met")
            lines.append(f"{full['target']}, 100 % failing: amplification {worst:.3f}× at most "
                         f"(target ≤ 1.2×: {verdict})")
        part = by.get((variant, 0.2))
        if part and part["success_each"]:
            worst = min(part["success_each"])
            lines.append(f"{part['target']}, 20 % failing: client success {worst:.1f} % at least "
                         f"(target ≥ 98 %: {'met' if worst >= 98 else 'NOT met'})")
    return lines


def verdicts(results: dict) -> list[str]:
    """The issue's targets, checked against this run."""
    lines = []
    healthy = {(r["body"], r["connections"], r["target"]): r for r in results.get("healthy") or []}
    naive = healthy.get(("100B", 50, "naive aiohttp proxy"))
    ours = healthy.get(("100B", 50, "circuit-proxy"))
    if naive and ours and naive["rps"] and ours["rps"]:
        ratio = ours["rps"] / naive["rps"]
        lines.append(f"100 B, 50 conns: circuit-proxy {ratio:.2f}× the naive proxy's req/s "
                     f"(target ≥ 2×: {'met' if ratio >= 2 else 'NOT met'})")
        if ours.get("cpu_s_per_1k") and naive.get("cpu_s_per_1k"):
            cpu = ours["cpu_s_per_1k"] / naive["cpu_s_per_1k"]
            lines.append(f"CPU per 1k requests: {cpu:.2f}× the naive proxy's "
                         f"(target ≤ 0.5×: {'met' if cpu <= 0.5 else 'NOT met'})")
        for row in results.get("open_path") or []:
            if row["variant"].endswith("no fallback") and row["rps"]:
                ratio = row["rps"] / naive["rps"]
                lines.append(f"open breaker: rejections at {ratio:.1f}× the naive proxy's healthy req/s "
                             f"(target ≥ 4×: {'met' if ratio >= 4 else 'NOT met'}); p99 at 200 req/s "
                             f"{_n(row['steady_p99_ms'], 3)} ms (target < 1 ms: "
                             f"{'met' if (row['steady_p99_ms'] or 99) < 1 else 'NOT met'})")
    bare = healthy.get(("100B", 50, "bare relay (floor)"))
    if bare and ours and bare.get("cpu_s_per_1k") and ours.get("cpu_s_per_1k"):
        us = ours["cpu_s_per_1k"] * 1000  # CPU-s per 1k requests → µs per request
        floor = bare["cpu_s_per_1k"] * 1000
        lines.append(f"100 B, 50 conns: {us:.1f} µs CPU per request, {us / floor:.2f}× the bare relay's "
                     f"{floor:.1f} µs (target ≤ 25 µs and ≤ 2.3× the floor: "
                     f"{'met' if us <= 25 and us / floor <= 2.3 else 'NOT met'})")
    base = healthy.get(("100B", 50, "circuit-proxy"))
    wide = healthy.get(("100B", 1000, "circuit-proxy"))
    pooled = next((r for (body, conns, target), r in healthy.items()
                   if body == "100B" and conns == 1000 and target.startswith("circuit-proxy, pool")), None)
    for label, row in (("", wide), (f" ({pooled['target']})" if pooled else "", pooled)):
        if base and row and base.get("cpu_s_per_1k") and row.get("cpu_s_per_1k"):
            growth = row["cpu_s_per_1k"] / base["cpu_s_per_1k"]
            lines.append(f"1,000 conns{label}: CPU per request {growth:.2f}× the 50-connection figure, "
                         f"p99 {_n(row.get('p99_ms'), 1)} ms, {row.get('errors', 0)} socket errors "
                         f"(target ≤ 1.5× and none: "
                         f"{'met' if growth <= 1.5 and not row.get('errors') else 'NOT met'})")
    open_floor = next((row for row in results.get("open_path") or []
                       if row["variant"].startswith("bare responder") and row.get("cpu_s_per_1k")), None)
    for row in results.get("open_path") or []:
        if row["variant"].endswith("no fallback") and row.get("cpu_s_per_1k"):
            us = row["cpu_s_per_1k"] * 1000
            floor_note = (f", {us / (open_floor['cpu_s_per_1k'] * 1000):.2f}× the bare responder's "
                          f"{open_floor['cpu_s_per_1k'] * 1000:.1f} µs" if open_floor else "")
            lines.append(f"open breaker, no fallback: {us:.1f} µs CPU per rejection{floor_note} "
                         f"(target ≤ 10 µs: {'met' if us <= 10 else 'NOT met'})")
    if open_floor and open_floor.get("steady_p99_ms") is not None:
        lines.append(f"the bare responder at the same steady 200 req/s: p99 {open_floor['steady_p99_ms']:.3f} ms "
                     "(what the measuring client and the machine add, proxy or not)")
    large = healthy.get(("1MB", 50, "circuit-proxy"))
    if large and large.get("rss_growth_mb") is not None:
        lines.append(f"1 MB bodies at 50 conns: peak RSS growth {large['rss_growth_mb']:.1f} MB "
                     f"(target < 10 MB: {'met' if large['rss_growth_mb'] < 10 else 'NOT met'})")
    return lines


def write_chart(results: dict, path: Path) -> bool:
    """The healthy table as a PNG: CPU µs per request and req/s against connections, one line
    per target and body size. False (nothing written) without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415  (optional: installed with the test extras)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    rows = results.get("healthy") or []
    if not rows:
        return False
    fig, (cpu, rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        series.setdefault((row["target"], row["body"]), []).append(row)
    for (target, body), points in sorted(series.items()):
        points.sort(key=lambda r: r["connections"])
        xs = [r["connections"] for r in points]
        style = "-" if body == "100B" else "--"
        cpu_us = [r["cpu_s_per_1k"] * 1000 if r.get("cpu_s_per_1k") else None for r in points]
        if any(v is not None for v in cpu_us):
            cpu.plot(xs, cpu_us, style, marker="o", label=f"{target}, {body}")
        rate.plot(xs, [r["rps"] for r in points], style, marker="o", label=f"{target}, {body}")
    for axis, title in ((cpu, "CPU µs per request (the process measured)"), (rate, "requests per second")):
        axis.set_xscale("log")
        axis.set_xlabel("keep-alive connections")
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
    cpu.set_yscale("log")
    rate.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
