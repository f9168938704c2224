"""The queued requests as an operator sees them: a listing per queue, and what an operator may
do to a dead letter (send it again, or drop it).

Reads go through `Storage.fetchall`, changes through `Storage.transact`, in SQL that SQLite and
PostgreSQL both take. A change moves the queue's in-memory counters (depth, dead letters,
exposure) inside the writer's transaction, as acceptance and replay do, so the limits stay
exact. Only dead letters can be retried or dropped: a pending request belongs to its replay
worker. Listings leave out headers, bodies and query strings (they may hold secrets or personal data). This module never
sends anything upstream (a retried request goes back to its worker) and is never on the
request path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from proxy.core.breaker import State
from proxy.fallbacks.queue import ItemState, QueueBook, QueueState

if TYPE_CHECKING:
    from proxy.runtime.registry import Registry

log = logging.getLogger(__name__)

LISTED = 25  # pending requests (oldest first) and dead letters (newest first) per listing
_COLUMNS = ("id", "state", "accepted_wall", "updated_wall", "method", "target", "idempotency_key",
            "amount", "attempts", "last_error")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM queue_items WHERE queue = ? AND state = ?"
_PENDING = _SELECT + " ORDER BY id LIMIT ?"
_DEAD = _SELECT + " ORDER BY id DESC LIMIT ?"
_ONE = "SELECT state, amount FROM queue_items WHERE queue = ? AND id = ?"
_OLDEST = "SELECT min(accepted_wall) FROM queue_items WHERE queue = ? AND state = 'pending'"
_RETRY = ("UPDATE queue_items SET state = 'pending', attempts = 0, last_error = NULL, updated_wall = ?"
          " WHERE queue = ? AND id = ? AND state = 'dead_letter'")
_DROP = "DELETE FROM queue_items WHERE queue = ? AND id = ? AND state = 'dead_letter'"


class UnknownItem(LookupError):
    """No such queue, or no such request in it."""


class NotDeadLetter(Exception):
    """The request is pending or delivered: only a dead letter can be retried or dropped."""

    def __init__(self, state: str) -> None:
        super().__init__(f"the request is {state}, not a dead letter")
        self.state = state


@dataclass(frozen=True, slots=True)
class NextReplay:
    at_wall: float | None  # when the worker sends the head of the queue, if known
    text: str  # the same in words: "now", "when the breaker turns half-open", …


class QueueItems:
    """Listings and dead-letter actions over the app's `QueueBook`."""

    def __init__(self, book: QueueBook) -> None:
        self._book = book

    def _queue(self, name: str) -> QueueState:
        state = self._book.get(name)
        if state is None:
            raise UnknownItem(f"no queue {name}")
        return state

    def knows(self, name: str) -> bool:
        return self._book.get(name) is not None

    def limits(self, name: str) -> dict[str, Any]:
        """From memory, for every snapshot: the queue's limits (None when not set)."""
        state = self._book.get(name)
        if state is None:
            return {}
        options = state.options
        def number(value: Decimal | None) -> float | None:
            return None if value is None else float(value)
        return {"max_depth": options.max_depth, "max_attempts": options.max_attempts,
                "exposure_cap": number(options.exposure_cap), "floor_limit": number(options.floor_limit),
                "amount_field": ".".join(options.amount_field) if options.amount_field else None}

    async def listing(self, name: str) -> dict[str, Any]:
        """The queue's counters, its oldest request's age, the next replay and its requests."""
        state = self._queue(name)
        storage, now = self._book.storage, self._book.clock.wall()
        pending = await storage.fetchall(_PENDING, (name, ItemState.PENDING.value, LISTED))
        dead = await storage.fetchall(_DEAD, (name, ItemState.DEAD_LETTER.value, LISTED))
        oldest = (await storage.fetchall(_OLDEST, (name,)))[0][0] if state.depth > LISTED else None
        if oldest is None and pending:
            oldest = pending[0][2]
        items = [_item(row, now) for row in (*pending, *dead)]
        head = items[0] if pending else None
        following = next_replay(state, self._book.registry, head, now)
        return {"name": name, "depth": state.depth, "dead_letter": state.dead,
                "exposure": float(state.exposure) if state.options.amount_field else None,
                **self.limits(name), "oldest_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
                "next_replay_at": following.at_wall, "next_replay": following.text,
                "listed": LISTED, "items": items}

    async def retry(self, name: str, item_id: int) -> dict[str, Any]:
        """A dead letter goes back to pending, attempts from zero; its worker sends it in order."""
        state = self._queue(name)
        now = self._book.clock.wall()
        moved: list[Decimal] = []

        def prepare(rows: tuple[tuple[Any, ...], ...]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
            amount = _checked(rows)
            state.dead -= 1
            state.depth += 1
            state.exposure += amount
            moved.append(amount)
            return ((_RETRY, (now, name, item_id)),)

        def undo() -> None:
            for amount in moved:
                state.dead += 1
                state.depth -= 1
                state.exposure -= amount

        await self._book.storage.transact(prepare, undo, lookup=(_ONE, (name, item_id)))
        state.show_counts()
        state.wake.set()
        log.warning("queue %s: dead letter %d sent back for replay by an operator", name, item_id)
        return {"queue": name, "id": item_id, "state": ItemState.PENDING.value}

    async def drop(self, name: str, item_id: int) -> dict[str, Any]:
        """A dead letter is deleted: it will never be sent."""
        state = self._queue(name)
        dropped: list[bool] = []

        def prepare(rows: tuple[tuple[Any, ...], ...]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
            _checked(rows)
            state.dead -= 1
            dropped.append(True)
            return ((_DROP, (name, item_id)),)

        def undo() -> None:
            state.dead += len(dropped)

        await self._book.storage.transact(prepare, undo, lookup=(_ONE, (name, item_id)))
        state.show_counts()
        log.warning("queue %s: dead letter %d dropped by an operator", name, item_id)
        return {"queue": name, "id": item_id, "state": "dropped"}


def _checked(rows: tuple[tuple[Any, ...], ...]) -> Decimal:
    """The request's amount, once it is known to be a dead letter of this queue."""
    if not rows:
        raise UnknownItem("no such request in this queue")
    item_state, amount = rows[0]
    if item_state != ItemState.DEAD_LETTER.value:
        raise NotDeadLetter(item_state)
    return Decimal(amount) if amount is not None else Decimal(0)


def _item(row: tuple[Any, ...], now: float) -> dict[str, Any]:
    item = dict(zip(_COLUMNS, row, strict=True))
    item["age_s"] = round(max(0.0, now - item["accepted_wall"]), 1)
    item["amount"] = None if item["amount"] is None else float(Decimal(item["amount"]))
    item["target"] = item["target"].partition("?")[0]  # the path: a query string may hold personal data
    return item


def next_replay(state: QueueState, registry: Registry | None, head: dict[str, Any] | None,
                now: float) -> NextReplay:
    """When the worker sends the head of the queue, as far as can be told from outside it: it
    waits for the breaker, then backs off after a failed attempt (`max_attempts` aside)."""
    if state.depth <= 0 or head is None:
        return NextReplay(None, "nothing waiting")
    runtime = registry.get(state.name) if registry is not None else None
    if runtime is None:
        return NextReplay(None, "its route left the config: kept, not sent")
    view = runtime.breaker.view()
    if view.state is State.FORCED_OPEN:
        return NextReplay(None, "held: the breaker is forced open")
    if view.state is State.OPEN and view.retry_at_wall is not None:
        return NextReplay(view.retry_at_wall, "when the breaker turns half-open")
    if view.state is State.HALF_OPEN:
        return NextReplay(None, "with the next half-open trial")
    if head["last_error"] is not None:
        at = head["updated_wall"] + state.options.backoff_s(max(1, head["attempts"]))
        if at > now:
            return NextReplay(at, "after a backoff: the last attempt failed")
    return NextReplay(now, "now")
