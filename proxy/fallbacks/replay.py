"""The replay worker: delivers one queue's requests, in acceptance order, once the upstream is
healthy again (§5).

Each replay goes through the route's breaker like any call: while it is open the worker waits
(woken by the transition, or by polling, since open → half_open is lazy); in half_open it
takes a trial permit, so a successful replay closes the breaker as a client's call would; the
outcome is recorded. A 2xx is delivered, a 4xx is the request's own fault (dead letter at
once), anything else (5xx, refused, reset, timeout) is retried with exponential backoff and
becomes a dead letter after `max_attempts` attempts the upstream received (a refused
connection says nothing about the request, so a long outage never dead-letters the head of
the queue). The head of the queue blocks the rest: order matters more than throughput for an
outbox.

Every replay carries the Idempotency-Key given at acceptance, so a request delivered just
before a crash and delivered again after the restart is done once by the upstream. A mark
(delivered, dead letter) is committed before the next item of the queue is sent, and the
worker waits for that commit however long the disk takes (§5): after kill -9 at most the item
that was in flight is sent again. This module never drops a pending request and never sends
one without its key. It reaches the upstream only through the book's `UpstreamClient` (the app's
pooled connections), never a client of its own.

In a fleet (§8: a shared PostgreSQL) every replica runs a worker for each queue, and the one
holding the queue's lease (`queue_fleet`: owner, expiry on the database's clock) delivers. It
is claimed with `SELECT … FOR UPDATE SKIP LOCKED` (a replica never waits on another's claim)
when free or expired, renewed before each send, for the send's timeout plus LEASE_MARGIN_S,
and given back on stop. A replica killed mid-delivery leaves its lease to expire; the next
holder starts again at the head, re-sending at most the item that was in flight, with the same
Idempotency-Key (done once by the upstream). A worker that finds its lease gone, or taken
afresh after a lapse, drops the page it read and starts again at the head. A fleet's worker
reloads the queue's counters (the fleet's) each time it polls.
"""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from proxy.background import stop_task, wait_event
from proxy.core.breaker import Permit, State
from proxy.core.outcome import is_failure
from proxy.fallbacks.queue import DEFAULT_STORE_TIMEOUT_S, ItemState, QueueBook, QueueState
from proxy.fallbacks.queue_fleet import CLAIM, LEASE_MARGIN_S, LEASE_ROW, RELEASE
from proxy.storage.base import StorageError

if TYPE_CHECKING:
    from proxy.runtime.registry import RouteRuntime

log = logging.getLogger(__name__)

PAGE = 200  # pending requests read at a time
_SELECT = ("SELECT id, method, target, headers, body, amount, attempts FROM queue_items"
           " WHERE queue = ? AND state = 'pending' ORDER BY id LIMIT ?")
_MARK = "UPDATE queue_items SET state = ?, attempts = ?, last_error = ?, updated_wall = ? WHERE id = ?"
_ATTEMPT = "UPDATE queue_items SET attempts = ?, last_error = ?, updated_wall = ? WHERE id = ?"
_WAITING = (State.OPEN, State.FORCED_OPEN)


class ReplayWorker:
    """One queue's delivery loop; `QueueBook` starts and stops it (a `queue.Worker`)."""

    def __init__(self, book: QueueBook, state: QueueState) -> None:
        self.book = book
        self.state = state
        self._task: asyncio.Task[None] | None = None
        # (id, state, attempts, last_error, amount) decided but not yet committed.
        self._marks: list[tuple[int, ItemState, int, str | None, Decimal]] = []
        self._lease_row = False  # the queue's row in queue_leases exists (a fleet only)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"replay-{self.state.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await stop_task(task)
        await self._flush()  # what was delivered stays delivered
        if self.book.shared and self._lease_row:
            try:  # the next replica need not wait for the lease to expire
                await self.book.storage.write_now(RELEASE, (self.state.name, self.book.node_id))
            except StorageError as exc:
                log.warning("queue %s: lease not given back (it expires by itself): %s", self.state.name, exc)

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        state = self.state
        shared = self.book.shared
        while True:
            try:
                if shared:
                    await self.book.load_counts(state)  # what the other replicas accepted and delivered
                if state.depth <= 0:
                    # Alone, an acceptance wakes the worker; in a fleet it may be another's.
                    await self._wait(self.book.poll_s if shared else None)
                    continue
                if shared and await self._claim() is None:
                    await self._wait(self.book.poll_s)  # another replica delivers this queue
                    continue
                rows = await self.book.storage.fetchall(_SELECT, (state.name, PAGE))
                if not rows:
                    await self._wait(self.book.poll_s)  # an acceptance is still being committed
                    continue
                for row in rows:
                    if not await self._replay(row):
                        break  # the lease was lost, or lapsed: start again at the head
                await self._flush()
            except StorageError as exc:
                log.error("queue %s: replay paused: %s", state.name, exc)
                await asyncio.sleep(self.book.poll_s)

    async def _wait(self, timeout: float | None) -> None:
        """Until woken (acceptance, transition) or `timeout` seconds have passed."""
        await self._flush()
        wake = self.state.wake
        await wait_event(wake, timeout)
        wake.clear()

    async def _claim(self, runtime: RouteRuntime | None = None) -> bool | None:
        """Claim or renew the queue's lease: True renewed, False taken afresh, None not ours."""
        storage, name = self.book.storage, self.state.name
        if not self._lease_row:
            await storage.write_now(LEASE_ROW, (name,))
            self._lease_row = True
        if runtime is None:
            registry = self.book.registry
            runtime = registry.get(name) if registry is not None else None
        timeout_s = self.state.options.replay_timeout_s or (
            runtime.timeout_s if runtime is not None else DEFAULT_STORE_TIMEOUT_S)
        rows = await storage.write_now(CLAIM, (name, self.book.node_id, self.book.node_id,
                                                float(timeout_s + LEASE_MARGIN_S)))
        return bool(rows[0][0]) if rows else None

    async def _replay(self, row: tuple[Any, ...]) -> bool:
        """Deliver one item (or dead-letter it); False when, in a fleet, the lease is not held."""
        item_id, method, target, headers_json, body, amount, attempts = row
        headers = [(name, value) for name, value in json.loads(headers_json)]
        amount = Decimal(amount) if amount is not None else Decimal(0)
        failures = 0
        while True:
            runtime, permit = await self._permit()
            if self.book.shared:
                try:
                    held = await self._claim(runtime)
                except BaseException:
                    runtime.breaker.release(permit)
                    raise
                if held is not True:
                    runtime.breaker.release(permit)  # not ours to send, or the page is stale
                    return False
            result, error, sent = await self._send(runtime, permit, method, target, headers, body)
            options = self.state.options
            if result is ItemState.DELIVERED or result is ItemState.DEAD_LETTER:
                await self._mark(item_id, result, attempts + 1, error, amount)
                return True
            failures += 1
            if sent:
                # Only an attempt the upstream saw counts towards max_attempts: a long outage
                # (connections refused) must not turn the head of the queue into a dead letter.
                attempts += 1
                if attempts >= options.max_attempts:
                    await self._mark(item_id, ItemState.DEAD_LETTER, attempts, error, amount)
                    return True
            if self.state.retried is not None:
                self.state.retried.inc()
            self.book.storage.record(_ATTEMPT, (attempts, error, self.book.clock.wall(), item_id))
            delay = options.backoff_s(failures)
            log.info("queue %s: replay of %d failed (%s), attempt %d of %d, next in %.1f s",
                     self.state.name, item_id, error, attempts, options.max_attempts, delay)
            await self._flush()
            await asyncio.sleep(delay)

    async def _permit(self) -> tuple[RouteRuntime, Permit]:
        """A permit from the route's breaker, waiting while it is open or its trials are taken."""
        poll_s = self.book.poll_s
        while True:
            registry = self.book.registry
            runtime = registry.get(self.state.name) if registry is not None else None
            if runtime is None or runtime.fallback is None or runtime.fallback.type != "queue":
                await self._wait(poll_s)  # the route left the config: keep the requests, wait
                continue
            breaker = runtime.breaker
            if breaker.state in _WAITING:
                retry_after = breaker.retry_after()
                await self._wait(poll_s if retry_after is None else min(poll_s, max(retry_after, 0.001)))
                continue
            permit = breaker.try_acquire()
            if permit is None:
                await self._wait(poll_s)  # half-open and every trial slot is taken
                continue
            return runtime, permit

    async def _send(self, runtime: RouteRuntime, permit: Permit, method: str, target: str,
                    headers: list[tuple[str, str]], body: bytes
                    ) -> tuple[ItemState | None, str | None, bool]:
        """(delivered | dead_letter | None for retry, error text, did the upstream get it)."""
        client = self.book.client
        breaker = runtime.breaker
        if client is None:
            breaker.release(permit)
            return None, "no upstream client", False
        total = self.state.options.replay_timeout_s or runtime.timeout_s
        try:
            reply = await client.call(runtime.upstream, method, target, headers, body,
                                      timeout_s=total, connect_timeout_s=runtime.connect_timeout_s)
        except BaseException:
            # Cancelled (stop, reload) or a bug in the client: the permit goes back unrecorded,
            # so a half-open trial slot is never lost; the exception goes on.
            breaker.release(permit)
            raise
        status = reply.status
        if status is None:
            # No response. Refused (never sent) says nothing about the request: `sent` is False.
            runtime.record(permit, failed=True)
            return None, f"{reply.reason or 'no response'}: {reply.detail}"[:300], reply.sent
        runtime.record(permit, failed=is_failure(status, runtime.failure_statuses))
        if 200 <= status < 300:
            return ItemState.DELIVERED, None, True
        error = f"HTTP {status}: {reply.body[:200].decode(errors='replace')}"
        if 400 <= status < 500:
            return ItemState.DEAD_LETTER, error, True  # the request itself is wrong: retrying cannot help
        return None, error, True

    # -- marks -------------------------------------------------------------------------------------

    async def _mark(self, item_id: int, result: ItemState, attempts: int, error: str | None,
                    amount: Decimal) -> None:
        if result is ItemState.DEAD_LETTER:
            log.warning("queue %s: request %d moved to dead letters after %d attempts: %s",
                        self.state.name, item_id, attempts, error)
        self._marks.append((item_id, result, attempts, error, amount))
        # Committed before the next item is sent: a crash re-sends only what was in flight.
        while not await self._flush():
            await asyncio.sleep(self.book.poll_s)

    async def _flush(self) -> bool:
        """Commit the marks decided so far; False (and kept for the next try) if it failed."""
        marks, self._marks = self._marks, []
        if not marks:
            return True
        state = self.state
        now = self.book.clock.wall()

        def prepare() -> list[tuple[str, tuple[Any, ...]]]:
            # Counters move inside the writer's transaction, as acceptances do.
            state.changes += 1
            for _, result, _, _, amount in marks:
                state.depth -= 1
                state.exposure -= amount
                state.dead += result is ItemState.DEAD_LETTER
            return [(_MARK, (result.value, attempts, error, now, item_id))
                    for item_id, result, attempts, error, _ in marks]

        def undo() -> None:
            state.changes += 1
            for _, result, _, _, amount in marks:
                state.depth += 1
                state.exposure += amount
                state.dead -= result is ItemState.DEAD_LETTER

        try:
            await self.book.storage.transact(prepare, undo)
        except StorageError as exc:
            log.error("queue %s: %d marks not stored yet, the queue waits for them: %s",
                      state.name, len(marks), exc)
            self._marks[:0] = marks
            return False
        state.show_counts()
        for _, result, _, _, _ in marks:
            child = state.replayed.get(result)
            if child is not None:
                child.inc()
        return True
