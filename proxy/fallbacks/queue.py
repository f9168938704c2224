"""`queue`: store-and-forward (§5): payment "offline mode", the notification outbox.

A request the breaker will not let through (or that got no answer) is written to SQLite, and
only once that COMMIT is on disk does the client get `202` with `X-Queue-Id` and the
`Idempotency-Key` every replay will carry (the client's, or one made here). The limits
(`max_depth`, the payment `floor_limit` and `exposure_cap`) are checked inside the storage
writer's transaction, against counters only that transaction changes, so they are exact under
any concurrency and a refused request stores nothing. `replay.ReplayWorker` delivers.

Acceptance is idempotent per (queue, client Idempotency-Key): a retry of a request whose key is
already in the queue (pending, delivered or dead letter) gets the first acceptance's answer
again, with `Idempotent-Replayed: true`, stores nothing and counts against no limit. That
lookup runs in the same writer transaction as the insert, so concurrent retries make one row.

One `QueueBook` per app holds every queue (named after its breaker): its counters (depth,
dead letters, exposure) live in memory so /status.json never reads the database.

In a fleet (a `shared` storage: PostgreSQL, §8) other replicas accept and deliver too: an
acceptance takes the fleet's lock in the writer's transaction, then reads the queue's counters,
the client's key and the next id (max + 1, so ids keep acceptance order) from the tables
(`queue_fleet`). The in-memory counters are then the fleet's as last seen. Never a 202 before
the commit; never a replay of a maybe-delivered request that has no Idempotency-Key. This
module never imports `replay` (which imports it): `build` hands each queue its worker factory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict

from proxy.config.model import Route
from proxy.core.breaker import State, Transition
from proxy.core.clock import Clock
from proxy.core.headers import upstream_request_headers
from proxy.core.messages import Answer, Request
from proxy.fallbacks.base import (
    FallbackContext,
    Recorder,
    UpstreamClient,
    dig,
    json_or_none,
    request_body,
    service_target,
)
from proxy.fallbacks.log import EXPIRE as EXPIRE_LOGS
from proxy.fallbacks.queue_fleet import FLEET_COUNTS, FLEET_LOCK, FLEET_LOOKUP
from proxy.storage.base import BatchedStorage as Storage
from proxy.storage.base import StorageError, register_schema

if TYPE_CHECKING:
    from proxy.runtime.metrics import Metrics
    from proxy.runtime.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_STORE_TIMEOUT_S = 5.0  # a queue whose route left the config (reload) still answers in time
LOG_EVERY_S = 10.0

register_schema("queue", [
    """
    CREATE TABLE queue_items (
        id INTEGER PRIMARY KEY,         -- acceptance order, across every queue
        queue TEXT NOT NULL,            -- the breaker's name
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead_letter')),
        accepted_wall REAL NOT NULL,
        updated_wall REAL NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,           -- path + query after /<service>, byte for byte
        headers TEXT NOT NULL,          -- JSON [[name, value], …]: end-to-end, Idempotency-Key included
        body BLOB NOT NULL,
        idempotency_key TEXT NOT NULL,
        amount TEXT,                    -- decimal text of amount_field, for the exposure cap
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX queue_items_by_state ON queue_items (queue, state, id)
    """,
    # Expiry of delivered requests (housekeeping) without a scan.
    "CREATE INDEX queue_items_done ON queue_items (state, updated_wall)",
    # Idempotent acceptance: is this client's key already in the queue?
    "CREATE INDEX queue_items_by_key ON queue_items (queue, idempotency_key)",
])

INSERT = ("INSERT INTO queue_items (id, queue, state, accepted_wall, updated_wall, method, target,"
          " headers, body, idempotency_key, amount) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)")
FIND_KEY = "SELECT id FROM queue_items WHERE queue = ? AND idempotency_key = ? ORDER BY id LIMIT 1"
COUNTS = "SELECT state, count(*) FROM queue_items WHERE queue = ? GROUP BY state"
AMOUNTS = "SELECT amount FROM queue_items WHERE queue = ? AND state = 'pending' AND amount IS NOT NULL"
EXPIRE_DELIVERED = "DELETE FROM queue_items WHERE state = 'delivered' AND updated_wall < ?"
HOUSEKEEPING_INTERVAL_S = 600.0
IDEMPOTENCY_KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"  # on the repeated answer to a retried acceptance (as Stripe names it)
# Recomputed or meaningless on replay.
_NOT_STORED = frozenset({"content-length", "expect"})


class ItemState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD_LETTER = "dead_letter"


class Refused(Exception):
    """An acceptance limit said no; nothing was stored."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


def _decimal(value: Any) -> Decimal | None:
    """A JSON amount as an exact decimal, or None when it is not a finite number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


@dataclass(frozen=True, slots=True)
class QueueOptions:
    max_depth: int
    max_attempts: int
    max_body_bytes: int
    amount_field: tuple[str, ...] | None
    floor_limit: Decimal | None
    exposure_cap: Decimal | None
    retry_base_s: float
    retry_max_s: float
    replay_timeout_s: float | None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> QueueOptions:
        def limit(key: str) -> Decimal | None:
            value = options.get(key)
            return None if value is None else _decimal(value)
        field = options.get("amount_field")
        timeout = options.get("replay_timeout_ms")
        return cls(max_depth=int(options["max_depth"]), max_attempts=int(options["max_attempts"]),
                   max_body_bytes=int(options["max_body_bytes"]),
                   amount_field=tuple(field.split(".")) if field else None,
                   floor_limit=limit("floor_limit"), exposure_cap=limit("exposure_cap"),
                   retry_base_s=options["retry_base_ms"] / 1000, retry_max_s=options["retry_max_ms"] / 1000,
                   replay_timeout_s=None if timeout is None else timeout / 1000)

    @property
    def is_limited(self) -> bool:
        return self.floor_limit is not None or self.exposure_cap is not None

    def backoff_s(self, attempts: int) -> float:
        """Wait after the `attempts`-th failed replay: exponential, capped."""
        return min(self.retry_max_s, self.retry_base_s * 2 ** min(attempts - 1, 60))


class Worker(Protocol):
    """Delivers one queue's pending requests (`replay.ReplayWorker`)."""

    def start(self) -> None: ...
    async def stop(self) -> None: ...


WorkerFactory = Callable[["QueueBook", "QueueState"], Worker]


class QueueState:
    """One queue's counters, options, wake-up event and metric children (bound once)."""

    def __init__(self, name: str, options: QueueOptions, metrics: Metrics | None,
                 make_worker: WorkerFactory) -> None:
        self.name = name
        self.options = options
        self.make_worker = make_worker
        self.depth = 0  # pending, counting acceptances being committed
        self.dead = 0
        self.exposure = Decimal(0)  # sum of pending amounts
        self.changes = 0  # bumped by each acceptance and mark: a reload read before one is stale
        self.ready = asyncio.Event()  # counters loaded from the database
        self.wake = asyncio.Event()  # something to deliver, or the breaker let calls through
        self.worker: Worker | None = None
        self.depth_gauge = metrics.queue_depth.labels(name) if metrics else None
        self.dead_gauge = metrics.queue_dead_letters.labels(name) if metrics else None
        if metrics is not None and options.amount_field is not None:  # read at scrape time
            metrics.watch_queue(name, lambda: (self.exposure, self.options.exposure_cap))
        self.replayed = {result: metrics.queue_replayed.labels(name, result.value)
                         for result in (ItemState.DELIVERED, ItemState.DEAD_LETTER)} if metrics else {}
        self.retried = metrics.queue_replayed.labels(name, "retried") if metrics else None
        self.unavailable = 0  # acceptances refused because storage could not take them
        self.unavailable_logged = -LOG_EVERY_S

    def show_counts(self) -> None:
        """Depth and dead letters into their gauges, after the counters moved."""
        if self.depth_gauge is not None:
            self.depth_gauge.set(self.depth)
        if self.dead_gauge is not None:
            self.dead_gauge.set(self.dead)


class QueueBook:
    """Every queue of the app, their acceptance and their replay workers.

    `client` may be set after construction (the app's pooled client exists once it started);
    until then a replay attempt is put back, not counted, and retried after a backoff.
    """

    def __init__(self, storage: Storage, clock: Clock, metrics: Metrics | None = None, *,
                 client: UpstreamClient | None = None, poll_s: float = 0.5,
                 node_id: str = "local") -> None:
        self.storage = storage
        self.shared = storage.shared  # a fleet: other replicas accept and deliver too
        self.node_id = node_id  # the lease owner's name in a fleet (App: host name + process id)
        self.clock = clock
        self.metrics = metrics
        self.client = client
        self.poll_s = poll_s
        self.registry: Registry | None = None
        self.next_id = 1
        self._queues: dict[str, QueueState] = {}
        self._running = False
        self._starting: set[asyncio.Task[None]] = set()  # queues added by a reload
        self._housekeeper: asyncio.Task[None] | None = None

    # -- building (at load and reload) ---------------------------------------------------------

    def fallback(self, route: Route, worker_factory: WorkerFactory) -> QueueFallback:
        """The route's queue (kept across reloads: same name, same queue); once the book runs,
        `worker_factory(book, state)` makes the worker that delivers it (`replay.ReplayWorker`)."""
        spec = route.fallback
        assert spec is not None
        options = QueueOptions.from_options(spec.options)
        state = self._queues.get(route.breaker_name)
        if state is None:
            state = self._queues[route.breaker_name] = QueueState(
                route.breaker_name, options, self.metrics, worker_factory)
            if self._running:
                task = asyncio.get_running_loop().create_task(self._start_queue(state))
                self._starting.add(task)
                task.add_done_callback(self._starting.discard)
        state.options = options
        return QueueFallback(self, state, spec.on_failure)

    def attach(self, registry: Registry) -> None:
        self.registry = registry
        registry.add_listener(self._on_transition)

    def _on_transition(self, transition: Transition) -> None:
        state = self._queues.get(transition.breaker)
        if state is not None and transition.to_state not in (State.OPEN, State.FORCED_OPEN):
            state.wake.set()

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load counters from the database and start one replay worker per queue."""
        if not self.shared:  # a fleet's ids come from the table, at each acceptance
            rows = await self.storage.fetchall("SELECT max(id) FROM queue_items")
            self.next_id = (rows[0][0] or 0) + 1
        self._running = True
        for state in self._queues.values():
            await self._start_queue(state)
        self._housekeeper = asyncio.get_running_loop().create_task(self._expire(), name="fallback-expiry")

    async def _expire(self) -> None:
        """Delivered requests and fallback_logs older than `storage.retention_hours` go, now and
        then; dead letters stay until someone deals with them."""
        while True:
            if self.registry is not None:
                cutoff = self.clock.wall() - self.registry.settings.storage.retention_hours * 3600
                self.storage.record(EXPIRE_DELIVERED, (cutoff,))
                self.storage.record(EXPIRE_LOGS, (cutoff,))
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)

    async def load_counts(self, state: QueueState) -> None:
        """Depth, dead letters and exposure from the table (in a fleet: the fleet's)."""
        seen = state.changes
        if self.shared:  # polled by every replica: the database's counters, not a count
            [(depth, exposure, dead)] = await self.storage.fetchall(FLEET_COUNTS, (state.name,) * 3)
        else:
            counts = dict(await self.storage.fetchall(COUNTS, (state.name,)))
            amounts = await self.storage.fetchall(AMOUNTS, (state.name,))
            depth = counts.get(ItemState.PENDING.value, 0)
            dead = counts.get(ItemState.DEAD_LETTER.value, 0)
            exposure = sum((Decimal(a) for (a,) in amounts), Decimal(0))
        if state.changes != seen:
            return  # an acceptance or a mark of ours moved them meanwhile: the next reload
        state.depth, state.dead, state.exposure = depth, dead, Decimal(exposure)
        state.show_counts()

    async def _start_queue(self, state: QueueState) -> None:
        try:
            await self.load_counts(state)
        except StorageError as exc:
            if not self.shared:
                raise
            # The fleet's database is away: acceptance checks the table itself and answers 503
            # until it is back; the worker loads the counters then.
            log.warning("queue %s: counters not loaded yet: %s", state.name, exc)
        state.ready.set()
        if state.depth:
            log.info("queue %s: %d pending from before, replaying", state.name, state.depth)
        state.worker = state.make_worker(self, state)
        state.worker.start()

    async def stop(self) -> None:
        self._running = False
        housekeeper, self._housekeeper = self._housekeeper, None
        if housekeeper is not None:
            housekeeper.cancel()
            await asyncio.gather(housekeeper, return_exceptions=True)
        for state in self._queues.values():
            if state.worker is not None:
                await state.worker.stop()
                state.worker = None

    # -- reading ---------------------------------------------------------------------------------

    def statuses(self) -> list[dict[str, Any]]:
        """`[{"name", "depth", "dead_letter"}]` for /status.json, from memory."""
        return [{"name": s.name, "depth": s.depth, "dead_letter": s.dead,
                 "exposure": float(s.exposure) if s.options.amount_field else None}
                for s in self._queues.values()]

    def get(self, name: str) -> QueueState | None:
        return self._queues.get(name)

    async def dead_letters(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters of a queue, without headers or body (they hold secrets)."""
        rows = await self.storage.fetchall(
            "SELECT id, method, target, idempotency_key, attempts, last_error, accepted_wall, updated_wall"
            " FROM queue_items WHERE queue = ? AND state = 'dead_letter' ORDER BY id DESC LIMIT ?",
            (name, limit))
        keys = ("id", "method", "target", "idempotency_key", "attempts", "last_error",
                "accepted_wall", "updated_wall")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # -- acceptance (the request path) ---------------------------------------------------------

    async def accept(self, state: QueueState, request: Request, ctx: FallbackContext) -> Answer | None:
        options = state.options
        client_key = request.headers.get(IDEMPOTENCY_KEY, "").strip() or None
        if ctx.maybe_delivered and client_key is None:
            return None  # §4: it may have been done already; a replay without a key could do it twice
        if not self._running:
            return None
        body = await request_body(request, ctx, options.max_body_bytes)
        if body is None:
            return None  # too large to store, or already sent upstream: the contract's error stands
        amount = None
        if options.amount_field is not None:
            amount = _decimal(dig(json_or_none(body), options.amount_field))
            if options.is_limited:
                field = ".".join(options.amount_field)
                if amount is None:
                    return self._refused(state, request, Refused(
                        "offline_limit", f"{field} must be a number ≥ 0 to be accepted offline"))
                if options.floor_limit is not None and amount > options.floor_limit:
                    return self._refused(state, request, Refused(
                        "offline_limit", f"{field} {amount} exceeds floor_limit {options.floor_limit}"))
        await state.ready.wait()
        key = client_key or f"cp-{uuid.uuid4()}"
        _, target = service_target(request)
        headers = [[name, value] for name, value in upstream_request_headers(
            request.headers.items(), request.headers.getall("Connection", []),
            client_ip=request.client_ip, proto=request.scheme, host=request.host)
            if name.lower() not in _NOT_STORED]
        if client_key is None:
            headers.append([IDEMPOTENCY_KEY, key])
        now = self.clock.wall()
        row = [None, state.name, now, now, request.method, target, json.dumps(headers), body, key,
               None if amount is None else str(amount)]
        added = amount or Decimal(0)
        replayed = False

        def prepare(*found: tuple[tuple[Any, ...], ...]) -> tuple[tuple[str, list[Any]], ...]:
            # In the writer's transaction, serialised with every other acceptance: exact limits.
            nonlocal replayed
            if self.shared:
                return prepare_in_fleet(*found[0][0])
            if found and found[0]:
                # This client's key is already queued: the same answer again, nothing stored,
                # nothing counted (a retry after a network blip must not double the exposure).
                row[0] = found[0][0][0]
                replayed = True
                return ()
            if state.depth >= options.max_depth:
                raise Refused("queue_full", f"{state.depth} requests waiting (max_depth {options.max_depth})")
            if options.exposure_cap is not None and state.exposure + added > options.exposure_cap:
                raise Refused("offline_limit", f"outstanding {state.exposure} + {added} would exceed "
                                               f"exposure_cap {options.exposure_cap}")
            row[0] = self.next_id
            self.next_id += 1
            state.changes += 1
            state.depth += 1
            state.exposure += added
            return ((INSERT, row),)

        def prepare_in_fleet(next_id: int, found_id: int | None, depth: int,
                             exposure: Decimal) -> tuple[tuple[str, list[Any]], ...]:
            # After the fleet's lock: the table's own count, exposure and key are exact.
            nonlocal replayed
            if client_key is not None and found_id is not None:
                row[0] = found_id
                replayed = True
                return ()
            if depth >= options.max_depth:
                raise Refused("queue_full", f"{depth} requests waiting (max_depth {options.max_depth})")
            if options.exposure_cap is not None and exposure + added > options.exposure_cap:
                raise Refused("offline_limit", f"outstanding {exposure} + {added} would exceed "
                                               f"exposure_cap {options.exposure_cap}")
            row[0] = next_id
            state.changes += 1
            state.depth = depth + 1
            state.exposure = exposure + added
            return ((INSERT, row),)

        def undo() -> None:
            if not replayed:
                state.changes += 1
                state.depth -= 1
                state.exposure -= added

        if self.shared:
            lock, lookup = FLEET_LOCK, (FLEET_LOOKUP, (state.name, key, state.name, state.name))
        else:
            # Only a client's key can come back; one made here is new by construction.
            lock, lookup = None, None if client_key is None else (FIND_KEY, (state.name, key))
        try:
            # Not stored within the route's timeout: not stored at all (§5), so a 503 here is
            # as true as a 202.
            await self.storage.transact(prepare, undo, lookup=lookup, lock=lock,
                                        within_s=self._timeout_s(state))
        except Refused as refusal:
            return self._refused(state, request, refusal)
        except StorageError as exc:
            return self._unavailable(state, request, exc)
        item_id = row[0]
        headers_out = {"X-Queue-Id": str(item_id), IDEMPOTENCY_KEY: key}
        if replayed:
            headers_out[REPLAYED] = "true"
            request.detail = f"queue_id={item_id} replayed"
        else:
            state.show_counts()
            state.wake.set()
            request.detail = f"queue_id={item_id}"
        return Answer.json(202, {"status": "queued", "queue": state.name, "queue_id": item_id,
                                 "idempotency_key": key}, headers_out)

    def _timeout_s(self, state: QueueState) -> float:
        runtime = self.registry.get(state.name) if self.registry is not None else None
        return runtime.timeout_s if runtime is not None else DEFAULT_STORE_TIMEOUT_S

    def _unavailable(self, state: QueueState, request: Request, exc: StorageError) -> Answer:
        """§5: the disk or database could not take it in time; never a 202, never circuit_open.
        Logged once per LOG_EVERY_S per queue with a count, not once per request."""
        state.unavailable += 1
        now = self.clock.monotonic()
        if now - state.unavailable_logged >= LOG_EVERY_S:
            state.unavailable_logged = now
            log.error("queue %s: requests not stored (%d so far): %s", state.name, state.unavailable, exc)
        request.detail = "queue_unavailable"
        return Answer.json(503, {"error": "queue_unavailable", "breaker": state.name,
                                 "detail": "the request could not be stored; nothing was queued"})

    @staticmethod
    def _refused(state: QueueState, request: Request, refusal: Refused) -> Answer:
        request.detail = f"{refusal.error}: {refusal.detail}"
        return Answer.json(503, {"error": refusal.error, "breaker": state.name, "detail": refusal.detail})


class QueueFallback:
    """The data path's view of one queue."""

    type = "queue"

    def __init__(self, book: QueueBook, state: QueueState, on_failure: bool) -> None:
        self.book = book
        self.state = state
        self.on_failure = on_failure
        # So a call that fails after sending can still be stored (§4, `on_failure`).
        self.buffer_request_bytes = state.options.max_body_bytes

    async def serve(self, request: Request, ctx: FallbackContext) -> Answer | None:
        return await self.book.accept(self.state, request, ctx)

    def recorder(self, request: Request, status: int, headers: CIMultiDict[str]) -> Recorder | None:
        return None
