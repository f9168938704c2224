"""The shop's traffic and the checks on what came of it, shared by the chaos test and the soak.

- `shipped_config_text(...)`: `config/breakers.yaml` as shipped, with the upstreams, the storage
  path and (optionally) shorter open periods and queue retry back-off rewritten.
- `ShopLoad`: an open-loop, bounded generator of checkouts. Each checkout is the four calls a
  shop makes, in order: stock lookup, shipping quote, charge (with an Idempotency-Key),
  notification (with an Idempotency-Key). Every request's latency and answer are kept.
- `classify`: what answered a request: the upstream, a fallback, or one of the contract's
  errors (502/503/504 JSON with a documented `error`); anything else is `unexpected`.
- `queue_problems`: every 202 from a queue delivered exactly once per key and in acceptance
  order, no charge made twice, nothing recorded that the client was told was not done.

Loopback only; everything bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("payment", "inventory", "notification", "shipping")

STOCK = "inventory.stock"
QUOTE = "shipping.quotes"
CHARGE = "payment.charges"
NOTIFY = "notification.notifications"
ROUTES = (STOCK, QUOTE, CHARGE, NOTIFY)
QUEUES = (CHARGE, NOTIFY)

# The contract's own answers (README, docs/fallbacks.md): status → documented `error` values.
CONTRACT_ERRORS = {
    502: {"upstream_unreachable"},
    503: {"circuit_open", "bulkhead_full", "queue_full", "offline_limit", "queue_unavailable"},
    504: {"upstream_timeout"},
}
COUNTRIES = ("IT", "DE", "FR", "NO", "GB", "US", "JP", "CA", "ES", "PL")


# -- config ---------------------------------------------------------------------------------

def shipped_document() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "breakers.yaml").read_text())


def shipped_config_text(upstreams: dict[str, str], db: str, *, open_timeout_ms: int | None = None,
                        max_open_timeout_ms: int | None = None,
                        queue_retry_ms: tuple[int, int] | None = None) -> str:
    """The shipped config with `upstreams` (service → URL or `$service`) and storage `db`.

    `open_timeout_ms`/`max_open_timeout_ms` shorten the open periods (shipped: 60 s, 300 s);
    `queue_retry_ms = (base, max)` shortens the queues' retry back-off (default 500 ms, 60 s).
    Nothing else changes."""
    document = shipped_document()
    for name, service in document["services"].items():
        service["upstream"] = upstreams[name]
    document["storage"]["path"] = db
    if open_timeout_ms is not None:
        document["defaults"]["open_timeout_ms"] = open_timeout_ms
    if max_open_timeout_ms is not None:
        document["defaults"]["max_open_timeout_ms"] = max_open_timeout_ms
    if queue_retry_ms is not None:
        for service in document["services"].values():
            for route in service.get("routes", {}).values():
                fallback = (route or {}).get("fallback")
                if fallback and fallback.get("type") == "queue":
                    fallback["retry_base_ms"], fallback["retry_max_ms"] = queue_retry_ms
    return yaml.safe_dump(document, sort_keys=False)


def route_timeouts_s(document: dict[str, Any] | None = None) -> dict[str, float]:
    """Each shop route's `timeout_ms` (route > service > defaults), in seconds."""
    document = document or shipped_document()
    default = document["defaults"]["timeout_ms"]
    timeouts = {}
    for route in ROUTES:
        service_name, route_name = route.split(".")
        service = document["services"][service_name]
        settings = service["routes"][route_name] or {}
        timeouts[route] = settings.get("timeout_ms", service.get("timeout_ms", default)) / 1000
    return timeouts


def substitute(text: str, values: dict[str, str]) -> str:
    return string.Template(text).substitute(values)


# -- answers --------------------------------------------------------------------------------

@dataclass(slots=True)
class Sample:
    route: str
    started: float  # monotonic
    latency_s: float
    status: int  # 0: no answer (client timeout, reset, …)
    kind: str  # upstream | upstream_error | fallback:<type> | contract:<error> | unanswered | unexpected
    detail: str = ""


def classify(status: int, headers: Any, body: bytes) -> tuple[str, str]:
    """(kind, detail) of one answer."""
    error = None
    if body[:1] == b"{":
        try:
            document = json.loads(body)
            error = document.get("error") if isinstance(document, dict) else None
        except ValueError:
            pass
    if status in CONTRACT_ERRORS and error in CONTRACT_ERRORS[status]:
        return f"contract:{error}", ""
    if "X-Fallback" in headers:
        return f"fallback:{headers['X-Fallback']}", ""
    if status >= 500 and error == "injected_failure":
        return "upstream_error", ""  # the upstream's own 5xx, passed through (§3: not a fallback)
    if status < 500:
        return "upstream", ""
    return "unexpected", f"{status} {body[:200]!r}"


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


# -- load -----------------------------------------------------------------------------------

@dataclass
class ShopLoad:
    """Checkouts started at `rate` a second (open loop: a slow answer never delays the next
    start), at most `max_in_flight` at once (beyond that a start is skipped and counted)."""

    base_url: str
    rate: float
    timeouts_s: dict[str, float]
    run_id: str = field(default_factory=lambda: os.urandom(3).hex())
    max_in_flight: int = 400
    client_margin_s: float = 5.0  # the client gives up this long after the route's timeout
    seed: int = 1
    samples: list[Sample] = field(default_factory=list)
    accepted: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    keys_by_kind: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: {q: defaultdict(set) for q in QUEUES})
    checkouts: int = 0
    skipped: int = 0
    keep_samples: bool = True

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.counts: dict[str, Counter[str]] = {route: Counter() for route in ROUTES}
        self.latencies: dict[str, list[float]] = {route: [] for route in ROUTES}
        self.max_latency: dict[str, tuple[float, str]] = {route: (0.0, "") for route in ROUTES}

    async def __aenter__(self) -> ShopLoad:
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, force_close=False)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain(5.0)
        assert self._session is not None
        await self._session.close()

    async def run(self, duration_s: float) -> None:
        """Start checkouts for `duration_s` seconds (does not wait for the last to end)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            due = start + n / self.rate
            if due - start >= duration_s:
                break
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            n += 1
            if len(self._tasks) >= self.max_in_flight:
                self.skipped += 1
                continue
            task = asyncio.create_task(self._checkout(self.checkouts))
            self.checkouts += 1
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait for the checkouts under way (each is bounded by the client timeouts)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _checkout(self, n: int) -> None:
        rng = self._rng
        order = f"{self.run_id}-o{n}"
        await self._call(STOCK, "GET", f"/inventory/stock/SKU-{rng.randint(1, 99):03d}")
        await self._call(QUOTE, "POST", "/shipping/quotes", body={
            "destination": {"country": rng.choice(COUNTRIES), "postcode": "10001"},
            "weight_kg": round(rng.uniform(0.2, 8), 1)})
        await self._call(CHARGE, "POST", "/payment/charges", key=f"{self.run_id}-pay{n}", body={
            "amount": rng.randint(5, 60), "currency": "EUR", "order_id": order})
        await self._call(NOTIFY, "POST", "/notification/notifications", key=f"{self.run_id}-ntf{n}", body={
            "to": f"customer{n}@example.com", "template": "order_confirmed", "data": {"order_id": order}})

    async def _call(self, route: str, method: str, path: str, *, body: dict | None = None,
                    key: str | None = None) -> None:
        assert self._session is not None
        headers = {"Idempotency-Key": key} if key else {}
        timeout = aiohttp.ClientTimeout(total=self.timeouts_s[route] + self.client_margin_s)
        started = time.monotonic()
        try:
            async with self._session.request(method, self.base_url + path, json=body, headers=headers,
                                             timeout=timeout) as response:
                data = await response.read()
                latency = time.monotonic() - started
                kind, detail = classify(response.status, response.headers, data)
                status = response.status
                if key is not None and route in QUEUES:
                    self._note_key(route, key, kind, status, response.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            latency = time.monotonic() - started
            status, kind, detail = 0, "unanswered", f"{type(exc).__name__}: {exc}"
            if key is not None:
                self.keys_by_kind[route]["unanswered"].add(key)
        self.counts[route][kind] += 1
        self.latencies[route].append(latency)
        if latency > self.max_latency[route][0]:
            self.max_latency[route] = (latency, f"{method} {path} -> {status} {kind}")
        if self.keep_samples or kind in ("unanswered", "unexpected"):
            self.samples.append(Sample(route, started, latency, status, kind, detail))

    def _note_key(self, route: str, key: str, kind: str, status: int, headers: Any) -> None:
        if kind == "fallback:queue" and status == 202:
            self.accepted[route].append((int(headers["X-Queue-Id"]), key))
            self.keys_by_kind[route]["queued"].add(key)
        elif kind == "upstream" and 200 <= status < 300:
            self.keys_by_kind[route]["done"].add(key)
        elif kind in ("contract:upstream_timeout", "contract:upstream_unreachable"):
            self.keys_by_kind[route]["unknown"].add(key)  # may or may not have been done
        else:
            self.keys_by_kind[route]["not_done"].add(key)  # refused, or the upstream's 5xx

    # -- figures ----------------------------------------------------------------------------

    def latency_problems(self, margin_s: float) -> list[str]:
        """Every request answered, each within its route's timeout + margin."""
        problems = []
        for route in ROUTES:
            limit = self.timeouts_s[route] + margin_s
            worst, what = self.max_latency[route]
            if worst > limit:
                late = sum(1 for v in self.latencies[route] if v > limit)
                problems.append(f"{route}: {late} answers later than {limit:.1f} s; worst "
                                f"{worst:.3f} s ({what})")
            for kind in ("unanswered", "unexpected"):
                if self.counts[route][kind]:
                    examples = [s.detail for s in self.samples if s.route == route and s.kind == kind][:3]
                    problems.append(f"{route}: {self.counts[route][kind]} {kind}: {examples}")
        return problems

    def summary(self) -> dict[str, Any]:
        routes = {}
        for route in ROUTES:
            values = self.latencies[route]
            routes[route] = {
                "requests": len(values),
                "kinds": dict(sorted(self.counts[route].items())),
                "p50_ms": _ms(percentile(values, 50)), "p99_ms": _ms(percentile(values, 99)),
                "max_ms": _ms(self.max_latency[route][0]), "max_was": self.max_latency[route][1],
                "timeout_ms": round(self.timeouts_s[route] * 1000),
            }
        return {"checkouts": self.checkouts, "skipped_starts": self.skipped,
                "requests": sum(len(v) for v in self.latencies.values()), "routes": routes,
                "accepted": {q: len(self.accepted[q]) for q in QUEUES}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


# -- what the upstreams got -----------------------------------------------------------------

async def fetch_records(session: aiohttp.ClientSession, upstreams: dict[str, str]) -> dict[str, list[dict]]:
    """GET /charges and GET /notifications on the fake services: what they did, in order."""
    out = {}
    for route, (service, path) in {CHARGE: ("payment", "/charges"),
                                   NOTIFY: ("notification", "/notifications")}.items():
        async with session.get(upstreams[service] + path) as response:
            assert response.status == 200, await response.text()
            out[route] = await response.json()
    return out


def queue_problems(load: ShopLoad, records: dict[str, list[dict]]) -> list[str]:
    """Exactly once per key, acceptance order per queue, nothing done that was refused."""
    problems = []
    for route in QUEUES:
        got = records[route]
        keys = [r["idempotency_key"] for r in got if str(r.get("idempotency_key", "")).startswith(load.run_id)]
        counts = Counter(keys)
        twice = sorted(k for k, c in counts.items() if c > 1)
        if twice:
            problems.append(f"{route}: {len(twice)} keys recorded more than once: {twice[:5]}")
        if route == CHARGE:
            orders = Counter(r.get("order_id") for r in got if str(r.get("order_id", "")).startswith(load.run_id))
            double = sorted(o for o, c in orders.items() if c > 1)
            if double:
                problems.append(f"{route}: {len(double)} orders charged more than once: {double[:5]}")
        kinds = load.keys_by_kind[route]
        present = set(keys)
        lost_queued = kinds["queued"] - present
        if lost_queued:
            problems.append(f"{route}: {len(lost_queued)} of {len(kinds['queued'])} queued (202) keys "
                            f"never delivered: {sorted(lost_queued)[:5]}")
        lost_done = kinds["done"] - present
        if lost_done:
            problems.append(f"{route}: {len(lost_done)} keys answered 2xx by the upstream but not "
                            f"recorded: {sorted(lost_done)[:5]}")
        phantom = kinds["not_done"] & present
        if phantom:
            problems.append(f"{route}: {len(phantom)} keys refused to the client (503/5xx) but done "
                            f"upstream: {sorted(phantom)[:5]}")
        both = kinds["queued"] & kinds["done"]
        if both:
            problems.append(f"{route}: {len(both)} keys both queued and answered directly")
        # Acceptance (queue id) order among the queued ones, as the upstream received them.
        position = {k: i for i, k in enumerate(keys)}
        expected = [k for _, k in sorted(load.accepted[route]) if k in position]
        delivered = sorted(expected, key=position.__getitem__)
        if delivered != expected:
            first = next(i for i, (a, b) in enumerate(zip(expected, delivered)) if a != b)
            problems.append(f"{route}: queued items delivered out of acceptance order, first at "
                            f"#{first}: expected {expected[first]}, got {delivered[first]}")
        ids = [qid for qid, _ in load.accepted[route]]
        if len(set(ids)) != len(ids):
            problems.append(f"{route}: one X-Queue-Id given to two requests")
    return problems


# -- the proxy's own view -------------------------------------------------------------------

async def proxy_status(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with session.get(base_url + "/status.json") as response:
        return await response.json()


def breaker_states(status: dict[str, Any]) -> dict[str, str]:
    return {b["name"]: b["state"] for b in status["breakers"]}


def queue_depths(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {q["name"]: (q["depth"], q["dead_letter"]) for q in status["queues"]}


async def settle(session: aiohttp.ClientSession, base_url: str, timeout_s: float,
                 load: ShopLoad | None = None, trickle_rate: float = 5.0) -> dict[str, Any]:
    """Until every breaker is closed and every queue empty (bounded), with a trickle of
    checkouts so that breakers without a probe get their half-open trials."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    status = await proxy_status(session, base_url)
    while loop.time() < end:
        states, depths = breaker_states(status), queue_depths(status)
        if all(s == "closed" for s in states.values()) and all(d == 0 for d, _ in depths.values()):
            break
        if load is not None:
            previous = load.rate
            load.rate = trickle_rate
            await load.run(1.0)
            load.rate = previous
        else:
            await asyncio.sleep(0.5)
        status = await proxy_status(session, base_url)
    return status


# -- the process ----------------------------------------------------------------------------

def rss_kb(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_summary(pid: int | str = "self", ports: dict[int, str] | None = None) -> Counter[str]:
    """Open TCP sockets of a process by (state, local → remote), ports named by `ports`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN", "04": "FIN_WAIT1",
              "05": "FIN_WAIT2", "09": "LAST_ACK", "07": "CLOSE"}
    names = ports or {}
    out: Counter[str] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[9] not in inodes:
                continue
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in parts[1:3])
            state = states.get(parts[3], parts[3])
            out[f"{state} {names.get(local, 'ephemeral')} -> {names.get(remote, 'ephemeral' if remote else '-')}"] += 1
    return out
