"""`fallback_cache`: the cache fallback's last-known-good entries, kept across a restart (§5).

The request path only marks a key dirty (a set add in `ResponseCache.put`); `CacheStore` writes
what changed once a second (`flush_interval_s`) and at shutdown, through `Storage.record`:
batched by the storage writer, never awaited, dropped and counted if it falls behind. A key
that left the cache (evicted, too old) loses its row the same way, so the table mirrors the
caches and stays bounded by their `max_entries`.

At start-up, before the first request, `restore` puts each row back into its route's cache
with its true age, measured on the wall clock across the restart: a row older than the
route's `max_age_s`, of a route that has no cache any more, or scaled with other factors than
the route's `scale` now, is deleted instead. The SQL is plain (an upsert with `ON CONFLICT`,
no engine-specific function), so any storage with the same interface holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import TYPE_CHECKING

from proxy.background import stop_task
from proxy.core.clock import Clock
from proxy.storage.base import BatchedStorage as Storage
from proxy.storage.base import StorageError, register_schema

if TYPE_CHECKING:
    from proxy.fallbacks.cache import CacheFallback

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0

register_schema("fallback_cache", [
    """
    CREATE TABLE fallback_cache (
        breaker TEXT NOT NULL,          -- <service>.<route>
        cache_key TEXT NOT NULL,        -- the request target (path + query), as sent
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,          -- JSON [[name, value], ...], as they will be served
        body BLOB NOT NULL,             -- already scaled
        scale TEXT NOT NULL,            -- JSON of the `scale` applied: other factors, not served
        stored_wall REAL NOT NULL,      -- epoch seconds when the upstream gave this answer
        PRIMARY KEY (breaker, cache_key)
    )
    """,
])

UPSERT = (
    "INSERT INTO fallback_cache (breaker, cache_key, status, headers, body, scale, stored_wall)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(breaker, cache_key) DO UPDATE SET"
    " status = excluded.status, headers = excluded.headers, body = excluded.body,"
    " scale = excluded.scale, stored_wall = excluded.stored_wall")
DELETE = "DELETE FROM fallback_cache WHERE breaker = ? AND cache_key = ?"
SELECT = ("SELECT breaker, cache_key, status, headers, body, scale, stored_wall FROM fallback_cache"
          " ORDER BY stored_wall")


def scale_text(scale: dict[str, float]) -> str:
    return json.dumps(scale, sort_keys=True, separators=(",", ":"))


class CacheStore:
    """Every cache fallback of one app, written behind and read back at start."""

    def __init__(self, storage: Storage, clock: Clock, *, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._storage = storage
        self._clock = clock
        self._flush_interval_s = flush_interval_s
        # By breaker name; weak, so a route a reload removed does not keep its cache alive.
        self._caches: weakref.WeakValueDictionary[str, CacheFallback] = weakref.WeakValueDictionary()
        self._task: asyncio.Task[None] | None = None
        self.restored = 0  # entries put back by the last `restore`

    def register(self, fallback: CacheFallback) -> None:
        """Called by each CacheFallback as it is built (at start and on reload).

        A route rebuilt by a reload (another `max_age_s`, say) takes over what the cache it
        replaces had learnt, when the scale is the same: the answers are still true."""
        previous = self._caches.get(fallback.name)
        self._caches[fallback.name] = fallback
        if previous is not None and previous is not fallback and previous.scale == fallback.scale:
            for key, entry in previous.cache.items():
                fallback.cache.put(key, entry)

    # -- start-up --------------------------------------------------------------------------

    async def restore(self) -> int:
        """Put stored entries back with their true age; delete the ones that cannot be."""
        try:
            rows = await self._storage.fetchall(SELECT)
        except StorageError as exc:
            log.warning("cache: stored entries not restored: %s", exc)
            return 0
        now_wall, now = self._clock.wall(), self._clock.monotonic()
        gone: list[tuple[str, str]] = []
        touched: set[str] = set()
        restored = 0
        for breaker, key, status, headers, body, scale, stored_wall in rows:
            fallback = self._caches.get(breaker)
            age = max(0.0, now_wall - float(stored_wall))  # a clock set back: as if just stored
            if fallback is None or age > fallback.max_age_s or scale != scale_text(fallback.scale):
                gone.append((breaker, key))
                continue
            try:
                kept = tuple((str(name), str(value)) for name, value in json.loads(headers))
            except (ValueError, TypeError):
                gone.append((breaker, key))
                continue
            fallback.restore(key, int(status), kept, bytes(body), now - age)
            touched.add(breaker)
            restored += 1
        for breaker in touched:
            # Rows that did not fit (max_entries, max_bytes) leave the table; the rest are there.
            fallback = self._caches[breaker]
            for key in fallback.cache.take_dirty():
                if not fallback.cache.contains(key):
                    gone.append((breaker, key))
                    restored -= 1
        for row in gone:
            self._storage.record(DELETE, row)
        self.restored = restored
        if rows:
            log.info("cache: %d entries restored, %d stored ones dropped (too old or no longer cached)",
                     restored, len(gone))
        return restored

    # -- write-behind ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cache-store")

    async def stop(self) -> None:
        """Before the storage closes: the last changes are written too."""
        if self._task is not None:
            task, self._task = self._task, None
            await stop_task(task)
        self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                self.flush()
            except Exception:  # a bug here must not end persistence for good
                log.exception("cache: flush failed")

    def flush(self) -> int:
        """Queue a write for every key changed since the last flush; how many were queued."""
        now_wall, now = self._clock.wall(), self._clock.monotonic()
        queued = 0
        for breaker, fallback in list(self._caches.items()):
            cache = fallback.cache
            scale = scale_text(fallback.scale)
            for key in cache.take_dirty():
                entry = cache.peek(key)
                if entry is None:
                    statement, params = DELETE, (breaker, key)
                else:
                    headers = json.dumps([list(pair) for pair in entry.headers], separators=(",", ":"))
                    stored_wall = now_wall - (now - entry.stored_at)
                    statement, params = UPSERT, (breaker, key, entry.status, headers, entry.body, scale,
                                                 stored_wall)
                if self._storage.record(statement, params):
                    queued += 1
                elif entry is not None:
                    cache.mark_dirty(key)  # the writer is behind: try again next time
        return queued
