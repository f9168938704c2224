"""Breaker state and periodic metric snapshots in SQLite (§6): `circuit_breakers` and
`circuit_breaker_metrics`.

Every transition (automatic, forced or restored) rewrites the breaker's row through
`Storage.record`: queued, batched by the storage writer, never awaited, so a transition costs
a deque append. At start-up, before the first request, `restore` puts every stored state back:
an open breaker stays open for what remained of its period (measured on the wall clock across
the restart), a forced or disabled one stays so. A breaker whose policy or upstream changed
meanwhile (another config hash: the old evidence is about something else) keeps only a state
an operator set. A snapshot task writes calls, failures, slow calls, rejections and latency
quantiles per breaker every `storage.snapshot_interval_s` and deletes rows older than
`storage.retention_hours`. `Persistence` is what the app starts and stops; this module knows no
HTTP server and never makes a request wait for the disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from typing import Any

from proxy.background import stop_task
from proxy.config.model import Settings
from proxy.core.breaker import Breaker, State, Transition
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry, ReloadResult, RouteRuntime
from proxy.storage.base import BatchedStorage
from proxy.storage.sqlite import Storage, StorageError, register_schema

log = logging.getLogger(__name__)

register_schema("circuit_breakers", [
    """
    CREATE TABLE circuit_breakers (
        name TEXT PRIMARY KEY,          -- <service>.<route>
        service TEXT NOT NULL,
        route TEXT NOT NULL,
        state TEXT NOT NULL,            -- closed | open | half_open | forced_open | forced_closed | disabled
        opened_at_wall REAL,            -- epoch seconds; open, half_open, forced_open
        retry_at_wall REAL,             -- epoch seconds; open only: when it turns half_open
        open_count INTEGER NOT NULL,    -- opens since last closed: the backoff step
        forced_open INTEGER NOT NULL,   -- 1 while an operator holds it open
        forced_closed INTEGER NOT NULL, -- 1 while an operator holds it closed
        disabled INTEGER NOT NULL,      -- 1 while it only counts (shadow mode)
        config_hash TEXT NOT NULL,      -- of `config`: a changed policy starts afresh
        config TEXT NOT NULL,           -- {"upstream", "policy"}: the route's effective settings, JSON
        updated_wall REAL NOT NULL
    );
    CREATE TABLE circuit_breaker_metrics (
        id INTEGER PRIMARY KEY,
        breaker TEXT NOT NULL,
        at_wall REAL NOT NULL,
        state TEXT NOT NULL,
        calls_success INTEGER NOT NULL, -- cumulative since start or the last reset
        calls_failure INTEGER NOT NULL,
        calls_rejected INTEGER NOT NULL,
        slow_calls INTEGER NOT NULL,
        failure_rate REAL,              -- over the window; NULL below minimum_calls
        slow_call_rate REAL,
        latency_p50_s REAL,             -- of upstream calls since the previous snapshot
        latency_p95_s REAL,
        latency_p99_s REAL
    );
    CREATE INDEX circuit_breaker_metrics_at ON circuit_breaker_metrics (at_wall);
    CREATE INDEX circuit_breaker_metrics_breaker ON circuit_breaker_metrics (breaker, at_wall)
    """,
])

UPSERT = (
    "INSERT INTO circuit_breakers (name, service, route, state, opened_at_wall, retry_at_wall,"
    " open_count, forced_open, forced_closed, disabled, config_hash, config, updated_wall)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
    " service = excluded.service, route = excluded.route, state = excluded.state,"
    " opened_at_wall = excluded.opened_at_wall, retry_at_wall = excluded.retry_at_wall,"
    " open_count = excluded.open_count, forced_open = excluded.forced_open,"
    " forced_closed = excluded.forced_closed, disabled = excluded.disabled,"
    " config_hash = excluded.config_hash, config = excluded.config, updated_wall = excluded.updated_wall")
DELETE = "DELETE FROM circuit_breakers WHERE name = ?"
SELECT = ("SELECT name, state, opened_at_wall, retry_at_wall, open_count, config_hash"
          " FROM circuit_breakers")
SNAPSHOT = (
    "INSERT INTO circuit_breaker_metrics (breaker, at_wall, state, calls_success, calls_failure,"
    " calls_rejected, slow_calls, failure_rate, slow_call_rate, latency_p50_s, latency_p95_s,"
    " latency_p99_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
EXPIRE = "DELETE FROM circuit_breaker_metrics WHERE at_wall < ?"
HISTORY = ("SELECT breaker, at_wall, calls_success, calls_failure, calls_rejected, latency_p50_s,"
           " latency_p95_s FROM circuit_breaker_metrics WHERE at_wall >= ? ORDER BY breaker, at_wall")
_MANUAL = {State.FORCED_OPEN: Breaker.force_open, State.FORCED_CLOSED: Breaker.force_closed,
           State.DISABLED: Breaker.disable}
QUANTILES = (0.5, 0.95, 0.99)


def config_json(runtime: RouteRuntime) -> str:
    """What the breaker guards and how: upstream and effective policy, canonical JSON."""
    def plain(value: Any) -> Any:
        if isinstance(value, (frozenset, set)):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    document = {"upstream": runtime.upstream, "policy": plain(dataclasses.asdict(runtime.route.policy))}
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def config_hash(config: str) -> str:
    return hashlib.sha256(config.encode()).hexdigest()[:16]


def quantiles(buckets: list[tuple[float, float]], qs: tuple[float, ...] = QUANTILES) -> list[float | None]:
    """Quantiles from cumulative histogram buckets [(upper bound, count)], interpolated within a
    bucket as Prometheus' histogram_quantile does; None when there were no calls."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return [None for _ in qs]
    answers: list[float | None] = []
    for q in qs:
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if bound == float("inf"):
                    answers.append(lower_bound)  # beyond the last finite bucket: its bound
                else:
                    share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
                    answers.append(lower_bound + (bound - lower_bound) * share)
                break
            lower_bound, lower_count = bound, count
    return answers


async def metrics_history(storage: BatchedStorage, since_wall: float) -> list[tuple[Any, ...]]:
    """The snapshots since `since_wall`, per breaker in time order: (breaker, at_wall, success,
    failure, rejected, p50 s, p95 s); counts are cumulative since that process's start or the
    last reset. Read once, when the status page's history is put back after a restart."""
    return await storage.fetchall(HISTORY, (since_wall,))


class BreakerStore:
    """Writes breaker rows and snapshots for one registry; restores it at start-up."""

    def __init__(self, registry: Registry, storage: Storage, metrics: Metrics) -> None:
        self._registry = registry
        self._storage = storage
        self._metrics = metrics
        self._last_buckets: dict[str, list[tuple[float, float]]] = {}  # per breaker, last snapshot

    # -- rows ----------------------------------------------------------------------------------

    def save(self, runtime: RouteRuntime) -> None:
        """Queue the breaker's row as it is now (never waits)."""
        exported = runtime.breaker.export_state()
        state = State(exported["state"])
        text = config_json(runtime)  # transitions are rare: no need to cache it
        route = runtime.route
        self._storage.record(UPSERT, (
            runtime.name, route.service, route.name, state.value, exported["opened_at_wall"],
            exported["retry_at_wall"], exported["open_count"], int(state is State.FORCED_OPEN),
            int(state is State.FORCED_CLOSED), int(state is State.DISABLED), config_hash(text), text,
            self._registry.clock.wall()))

    def on_transition(self, transition: Transition) -> None:
        runtime = self._registry.get(transition.breaker)
        if runtime is not None:
            self.save(runtime)

    def on_reload(self, settings: Settings, result: ReloadResult) -> None:
        for name in result.removed:
            self._storage.record(DELETE, (name,))
            self._last_buckets.pop(name, None)
        for name in (*result.added, *result.changed):
            self.save(self._registry.routes[name])

    async def restore(self) -> int:
        """Put stored states back; returns how many breakers were not left in closed."""
        rows = await self._storage.fetchall(SELECT)
        restored = 0
        for name, state, opened_at_wall, retry_at_wall, open_count, digest in rows:
            runtime = self._registry.get(name)
            if runtime is None:
                continue  # its route left the config while the proxy was down
            try:
                state = State(state)
            except ValueError:
                log.warning("stored state %r of breaker %s is unknown; left closed", state, name)
                continue
            if digest == config_hash(config_json(runtime)):
                runtime.breaker.restore(state, opened_at_wall=opened_at_wall,
                                        retry_at_wall=retry_at_wall, open_count=open_count)
            elif state in _MANUAL:
                _MANUAL[state](runtime.breaker)  # guards something else now: only an operator's state stays
            else:
                continue
            if runtime.breaker.state is not State.CLOSED:
                restored += 1
                log.info("breaker state restored", extra={"breaker": name,
                                                          "to_state": runtime.breaker.state.value})
        for runtime in self._registry.routes.values():
            self.save(runtime)  # every breaker has a row, with its current config
        return restored

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self) -> None:
        """One row per breaker, and rows past the retention period deleted."""
        wall = self._registry.clock.wall()
        buckets = self._metrics.call_duration_buckets()
        for name, runtime in self._registry.routes.items():
            view = runtime.breaker.view()
            now = buckets.get(name, [])
            before = self._last_buckets.get(name)
            self._last_buckets[name] = now
            interval = now
            if before is not None and len(before) == len(now) and all(
                    c >= b for (_, c), (_, b) in zip(now, before)):
                interval = [(bound, c - b) for (bound, c), (_, b) in zip(now, before)]
            p50, p95, p99 = quantiles(interval)
            self._storage.record(SNAPSHOT, (
                name, wall, view.state.value, view.calls_success, view.calls_failure,
                view.calls_rejected, view.slow_calls, view.failure_rate, view.slow_call_rate,
                p50, p95, p99))
        retention_s = self._registry.settings.storage.retention_hours * 3600
        self._storage.record(EXPIRE, (wall - retention_s,))

    async def run_snapshots(self) -> None:
        while True:
            # Read each time: a reload may change the interval.
            await asyncio.sleep(self._registry.settings.storage.snapshot_interval_s)
            try:
                self.snapshot()
            except Exception:  # noqa: BLE001  (a bad snapshot must not end the next ones)
                log.exception("breaker metrics snapshot failed")


class Persistence:
    """Restore before serving, record while running, snapshot in the background (§6).

    The app calls `start` once the storage is open and before anything is served or replayed
    (queue replays go through the restored breakers), `stop` before the storage closes, and
    registers `on_reload` with the Reloader.
    """

    def __init__(self, registry: Registry, storage: Storage, metrics: Metrics) -> None:
        self._registry = registry
        self.store = BreakerStore(registry, storage, metrics)
        self._snapshots: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            restored = await self.store.restore()
        except StorageError:
            log.exception("breaker states could not be restored; every breaker starts closed")
            restored = 0
        log.info("breaker states restored: %d not closed", restored)
        self._registry.add_listener(self.store.on_transition)
        self._snapshots = asyncio.get_running_loop().create_task(
            self.store.run_snapshots(), name="breaker-snapshots")

    def on_reload(self, settings: Settings, result: ReloadResult) -> None:
        """A Reloader listener: rows for added and changed breakers, removed ones deleted."""
        self.store.on_reload(settings, result)

    async def stop(self) -> None:
        snapshots, self._snapshots = self._snapshots, None
        if snapshots is None:
            return  # never started, or already stopped
        await stop_task(snapshots)
        self.store.snapshot()  # the last word before the storage closes
