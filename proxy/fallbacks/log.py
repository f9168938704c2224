"""`fallback_logs`: one row per fallback served (§5), written off the request path.

A row is a summary without secrets: time, breaker, fallback type, method, the path without
its query string (queries carry tokens), the outcome (status, reason) and a short detail the
fallback chose (`request.detail`: a queue id, a cache age). Never headers, never bodies.
Rows go through `Storage.record`: batched by the background writer, dropped and counted if it
falls behind; the request path never waits for the disk here.
"""

from __future__ import annotations

import logging

from proxy.core.clock import Clock
from proxy.core.messages import Request
from proxy.storage.sqlite import Storage, register_schema

log = logging.getLogger(__name__)

register_schema("fallback_logs", [
    """
    CREATE TABLE fallback_logs (
        id INTEGER PRIMARY KEY,
        at_wall REAL NOT NULL,          -- epoch seconds
        breaker TEXT NOT NULL,          -- <service>.<route>
        type TEXT NOT NULL,             -- static | cache | queue | table
        method TEXT NOT NULL,
        path TEXT NOT NULL,             -- raw path, query string left out
        status INTEGER NOT NULL,        -- what the client got
        reason TEXT NOT NULL,           -- open, forced_open, half_open_full, bulkhead_full, unreachable, timeout
        detail TEXT                     -- e.g. queue_id=12, age_s=30
    );
    CREATE INDEX fallback_logs_at ON fallback_logs (at_wall);
    CREATE INDEX fallback_logs_breaker ON fallback_logs (breaker, at_wall)
    """,
])

INSERT = ("INSERT INTO fallback_logs (at_wall, breaker, type, method, path, status, reason, detail)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
EXPIRE = "DELETE FROM fallback_logs WHERE at_wall < ?"
MAX_PATH = 512  # a log row, not an archive of hostile URLs


class FallbackLog:
    """The data path's `fallback_log` hook: enqueue one row, never wait."""

    __slots__ = ("_clock", "_storage")

    def __init__(self, storage: Storage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock

    def __call__(self, breaker: str, fallback_type: str, request: Request, status: int,
                 reason: str) -> None:
        """`reason` is a `proxy.core.outcome.Reason` (or its text); stored as plain text."""
        self._storage.record(INSERT, (self._clock.wall(), breaker, fallback_type, request.method,
                                      request.path[:MAX_PATH], status, str(reason), request.detail))
