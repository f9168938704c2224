"""Shared breakers across a fleet of proxies, through PostgreSQL (§8 `cluster.share_breakers`).

Each proxy still decides on its own hot path from its own counts: nothing here is called per
request, and no request waits for the database. What is shared goes through the tables of
`runtime/cluster_sql.py`, on one asyncpg connection of this module's own:

- every transition of this proxy's breakers (and its forced or disabled states) rewrites its
  row, one per breaker per node, and is announced with NOTIFY;
- on a NOTIFY, every `RESYNC_S` and on reconnecting (NOTIFY is lost while away), the rows of
  the live nodes are read back: a closed breaker opens when `quorum` other live nodes have it
  open, with their `retry_at` (adopted, not a backoff of its own); a half-open one follows a
  newer open period or a close that came from another node's successful trial;
- half-open trials are the fleet's: whoever claims the breaker in `cluster_trials` runs them,
  the others hold theirs (`Breaker.hold_trials`) and keep rejecting until it closes;
- an operator's action on one proxy is written to `cluster_actions` and applied by all;
- a node's heartbeat keeps it live; one gone for `NODE_TTL_S` no longer counts.

When the database is unreachable each proxy goes on alone (no hold, its own decisions), says
so (`status()["connected"]`, the `circuit_proxy_cluster_connected` gauge, a WARNING) and
reconnects by itself with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.background import stop_task, wait_event
from proxy.config.model import Settings
from proxy.core.breaker import Breaker, State, Transition
from proxy.core.clock import Clock
from proxy.runtime import cluster_sql as sql
from proxy.runtime.metrics import Metrics
from proxy.runtime.registry import Registry, ReloadResult

log = logging.getLogger(__name__)

RESYNC_S = 1.0  # rows re-read at least this often, NOTIFY or not
NODE_TTL_S = 5.0  # a node without a heartbeat for this long is gone
TRIAL_TTL_S = 5.0  # a trial claim not renewed for this long is anyone's
QUERY_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
BACKOFF_S = (0.2, 2.0)  # reconnect: first wait, cap
PRUNE_EVERY = 600  # rounds between clean-ups of nodes gone for an hour (about ten minutes)

# The admin actions (§6) as a node applies them when another node's operator acted.
ACTIONS: dict[str, Callable[[Breaker], None]] = {
    "force-open": Breaker.force_open,
    "force-closed": Breaker.force_closed,
    "disable": Breaker.disable,
    "reset": Breaker.reset,
}
_STANDING = {"force-open": State.FORCED_OPEN, "force-closed": State.FORCED_CLOSED,
             "disable": State.DISABLED}
_MANUAL = frozenset(_STANDING.values())

# What a lost or refused database looks like from here (a timeout included).
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Row:
    """One node's breaker, as read back from `cluster_breakers`."""
    breaker: str
    node_id: str
    state: str
    reason: str
    opened_at_wall: float | None
    retry_at_wall: float | None
    open_count: int
    updated: float  # database time of the write (epoch seconds)
    episode: float  # database time its current open/half-open spell began (epoch seconds)


class Cluster:
    """The fleet link of one proxy: `start` after the stored states are back, `stop` before
    the storage closes."""

    def __init__(self, settings: Settings, registry: Registry, clock: Clock, metrics: Metrics, *,
                 node_id: str, url: str | None) -> None:
        self.node_id = node_id
        self._url = url
        self._registry = registry
        self._clock = clock
        self._gauge = metrics.cluster_connected()
        self.connected = False
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._tried = asyncio.Event()  # the first connection attempt is over, either way
        self._dirty: set[str] = set()  # breakers whose row must be rewritten
        self._reasons: dict[str, str] = {}  # breaker → reason of its last transition
        self._outbox: list[tuple[str, str]] = []  # operator actions to share
        self._last_action = 0
        self._first = True
        self._said_alone = False  # the first failed attempt is logged, not every retry
        self._live_nodes = 0
        self.rounds = 0  # resyncs done: the fleet's rows read back and acted on
        self._timers: dict[str, asyncio.TimerHandle] = {}

    # -- what the app and the status page see ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        """/status.json's `cluster` (§8)."""
        return {"connected": self.connected, "node_id": self.node_id,
                "quorum": self._registry.settings.cluster.quorum,
                "live_nodes": self._live_nodes if self.connected else None}

    async def start(self) -> None:
        self._registry.add_listener(self.on_transition)
        self._registry.add_action_listener(self.on_action)
        self._dirty.update(self._registry.routes)
        self._gauge.set(0)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster")
        try:  # in step with the fleet before the first request, unless the database is away
            await asyncio.wait_for(self._tried.wait(), CONNECT_TIMEOUT_S + 1)
        except TimeoutError:
            pass

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await stop_task(task)
        self.connected = False
        for timer in self._timers.values():
            timer.cancel()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:  # a clean stop: the fleet stops counting this node at once
                async with asyncio.timeout(1.0):
                    for statement in sql.LEAVE:
                        await conn.execute(statement, self.node_id)
            except DB_ERRORS:
                pass
            await _close(conn)

    # -- listeners (synchronous, on transitions and admin actions; never block) ----------------

    def on_transition(self, transition: Transition) -> None:
        name = transition.breaker
        self._reasons[name] = transition.reason
        self._dirty.add(name)
        runtime = self._registry.get(name)
        if runtime is not None:
            breaker = runtime.breaker
            if transition.to_state is State.OPEN and self.connected:
                # Its half-open trial is the fleet's: held until this node has claimed it.
                breaker.hold_trials(True)
                retry_after = breaker.retry_after()
                if retry_after is not None:
                    self._wake_in(name, retry_after)
            elif transition.to_state is not State.HALF_OPEN:
                breaker.hold_trials(False)
        self._wake.set()

    def on_reload(self, settings: Settings, result: ReloadResult) -> None:
        """A Reloader listener: a rebuilt breaker starts closed, and its row must say so."""
        self._dirty.update(result.added)
        self._dirty.update(result.changed)
        self._wake.set()

    def on_action(self, name: str, action: str) -> None:
        if not self.connected:
            log.warning("admin %s applies to this proxy only: the fleet's database is unreachable",
                        action, extra={"breaker": name, "action": action})
            return
        self._outbox.append((name, action))
        self._wake.set()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload != self.node_id:
            self._wake.set()

    def _wake_in(self, name: str, seconds: float) -> None:
        """Claim the trial as soon as the open period ends, not at the next resync."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(max(seconds, 0.0) + 0.005,
                                                                   self._wake.set)

    # -- the connection ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_S[0]
        while True:
            try:
                if self._url is None:
                    raise ConnectionError("no database URL (storage.url, or storage.url_env unset)")
                await self._connect()
                delay = BACKOFF_S[0]
                while True:
                    await self._tick()
                    self._tried.set()
                    await wait_event(self._wake, RESYNC_S)
                    self._wake.clear()
                    if self._conn is None or self._conn.is_closed():
                        raise ConnectionError("connection to the database closed")
            except (*DB_ERRORS, ConnectionError) as exc:
                self._lost(exc)
            except Exception:  # noqa: BLE001  (a bug here must not end the fleet link for good)
                log.exception("cluster sync failed")
                self._lost(None)
            self._tried.set()
            conn, self._conn = self._conn, None
            if conn is not None:
                await _close(conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT_S)
        self._conn = conn
        async with conn.transaction():
            for statement in sql.SCHEMA:
                await conn.execute(statement, timeout=QUERY_TIMEOUT_S)
        await conn.add_listener(sql.CHANNEL, self._on_notify)
        conn.add_termination_listener(lambda _conn: self._wake.set())
        await conn.execute(sql.HEARTBEAT, self.node_id, timeout=QUERY_TIMEOUT_S)
        await self._prune(conn)
        if self._first:
            await self._standing_actions(conn)
            self._first = False
        # NOTIFY was lost while away: every row of ours is written again, theirs read again.
        self._dirty.update(self._registry.routes)
        self.connected = True
        self._said_alone = False
        self._gauge.set(1)
        log.info("cluster connected: breakers shared with the fleet",
                 extra={"node": self.node_id, "quorum": self._registry.settings.cluster.quorum})
        for runtime in self._registry.routes.values():
            if runtime.breaker.state is State.OPEN:
                runtime.breaker.hold_trials(True)
                retry_after = runtime.breaker.retry_after()
                if retry_after is not None:
                    self._wake_in(runtime.name, retry_after)

    def _lost(self, exc: BaseException | None) -> None:
        if self.connected or not self._said_alone:
            self._said_alone = True
            log.warning("cluster disconnected: this proxy goes on alone until the database is back (%s)",
                        exc or "error", extra={"node": self.node_id})
        self.connected = False
        self._gauge.set(0)
        for runtime in self._registry.routes.values():
            runtime.breaker.hold_trials(False)  # alone, it runs its own trials

    # -- one round: heartbeat, write, apply, read ------------------------------------------------

    async def _tick(self) -> None:
        conn = self._conn
        assert conn is not None
        await conn.execute(sql.HEARTBEAT, self.node_id, timeout=QUERY_TIMEOUT_S)
        await self._flush(conn)
        await self._apply_actions(conn)
        await self._resync(conn)
        self.rounds += 1
        if self.rounds % PRUNE_EVERY == 0:
            await self._prune(conn)

    async def _prune(self, conn: asyncpg.Connection) -> None:
        for statement in sql.PRUNE:
            await conn.execute(statement, timeout=QUERY_TIMEOUT_S)

    async def _flush(self, conn: asyncpg.Connection) -> None:
        outbox, self._outbox = self._outbox, []
        dirty, self._dirty = self._dirty, set()
        try:
            for name, action in outbox:
                await conn.execute(sql.ADD_ACTION, name, action, self.node_id, timeout=QUERY_TIMEOUT_S)
            rows = []
            for name in dirty:
                runtime = self._registry.get(name)
                if runtime is None:
                    continue  # its route left the config
                exported = runtime.breaker.export_state()
                rows.append((name, self.node_id, exported["state"], self._reasons.get(name, "start"),
                             exported["opened_at_wall"], exported["retry_at_wall"],
                             exported["open_count"]))
            if rows:
                await conn.executemany(sql.WRITE_ROW, rows, timeout=QUERY_TIMEOUT_S)
                released = [(row[0], self.node_id) for row in rows if row[2] != State.HALF_OPEN.value]
                if released:
                    await conn.executemany(sql.RELEASE_TRIAL, released, timeout=QUERY_TIMEOUT_S)
            if rows or outbox:
                await conn.execute(sql.NOTIFY, sql.CHANNEL, self.node_id, timeout=QUERY_TIMEOUT_S)
        except BaseException:
            self._dirty |= dirty  # written on the next round (or after reconnecting)
            raise

    async def _standing_actions(self, conn: asyncpg.Connection) -> None:
        """A node joining: where each breaker's manual state stands, not its whole history."""
        self._last_action = await conn.fetchval(sql.LAST_ACTION_ID, timeout=QUERY_TIMEOUT_S)
        for breaker_name, action in await conn.fetch(sql.LATEST_ACTIONS, timeout=QUERY_TIMEOUT_S):
            runtime = self._registry.get(breaker_name)
            if runtime is None or action not in ACTIONS:
                continue
            state = runtime.breaker.state
            if _STANDING.get(action, State.CLOSED if state in _MANUAL else state) is not state:
                self._apply(runtime.breaker, breaker_name, action, "fleet")

    async def _apply_actions(self, conn: asyncpg.Connection) -> None:
        for action_id, breaker_name, action, node in await conn.fetch(
                sql.ACTIONS_SINCE, self._last_action, timeout=QUERY_TIMEOUT_S):
            self._last_action = action_id
            runtime = self._registry.get(breaker_name)
            if node != self.node_id and runtime is not None and action in ACTIONS:
                self._apply(runtime.breaker, breaker_name, action, node)

    def _apply(self, breaker: Breaker, name: str, action: str, node: str) -> None:
        ACTIONS[action](breaker)
        log.info("admin %s from the fleet", action, extra={"breaker": name, "action": action, "node": node})

    async def _resync(self, conn: asyncpg.Connection) -> None:
        records = await conn.fetch(sql.LIVE_ROWS, NODE_TTL_S, timeout=QUERY_TIMEOUT_S)
        self._live_nodes = await conn.fetchval(sql.LIVE_NODES, NODE_TTL_S, timeout=QUERY_TIMEOUT_S)
        by_breaker: dict[str, list[Row]] = {}
        for record in records:
            row = Row(*record)
            by_breaker.setdefault(row.breaker, []).append(row)
        quorum = self._registry.settings.cluster.quorum
        for name, runtime in list(self._registry.routes.items()):
            breaker = runtime.breaker
            state = breaker.state  # applies a due open → half_open first
            if name in self._dirty:
                continue  # our row is about to change: decide on the next round
            rows = by_breaker.get(name, [])
            mine = next((row for row in rows if row.node_id == self.node_id), None)
            others = [row for row in rows if row.node_id != self.node_id]
            now_wall = self._clock.wall()
            open_rows = [row for row in others if row.state == State.OPEN.value
                         and row.retry_at_wall is not None and row.retry_at_wall > now_wall]
            if state is State.CLOSED:
                if len(open_rows) >= quorum:  # §8: a quorum of the fleet has it open
                    self._adopt(breaker, open_rows)
                continue
            if state is not State.OPEN and state is not State.HALF_OPEN:
                continue  # forced or disabled: the operator's word stands
            if mine is not None and any(
                    row.state == State.CLOSED.value and row.reason == "success_threshold"
                    and row.updated > mine.episode for row in others):
                breaker.follow_close()  # the fleet's trial succeeded after this one opened
                continue
            if state is State.HALF_OPEN:
                if open_rows:  # a newer open period: the trial failed, or fresh failures
                    self._adopt(breaker, open_rows)
                    continue
                owner = await conn.fetchval(sql.CLAIM_TRIAL, name, self.node_id, TRIAL_TTL_S,
                                            timeout=QUERY_TIMEOUT_S)
                breaker.hold_trials(owner is None)  # None: another live node runs it

    def _adopt(self, breaker: Breaker, open_rows: list[Row]) -> None:
        row = max(open_rows, key=lambda r: (r.retry_at_wall, r.node_id))  # the same one everywhere
        assert row.retry_at_wall is not None
        if breaker.adopt_open(retry_at_wall=row.retry_at_wall, opened_at_wall=row.opened_at_wall,
                              open_count=row.open_count):
            log.info("breaker opened with the fleet", extra={"breaker": breaker.name, "node": row.node_id})


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=1.0)
    except DB_ERRORS:
        conn.terminate()
