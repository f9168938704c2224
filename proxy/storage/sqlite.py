"""The embedded storage: one aiosqlite connection to a file, WAL, every COMMIT fsynced.

The batched writer, group commit and the schema registry are `base.BatchedStorage`'s; this
module opens the file, applies the migrations and gives the writer its five primitives
(BEGIN IMMEDIATE takes SQLite's write lock at once). It must never run SQLite on the event
loop's thread. Single process: nothing else writes the file (`shared` is False).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.storage.base import (
    BatchedStorage,
    Params,
    Statement,
    StorageError,
    register_schema,
    registered_schemas,
    same_sql_runs,
)
from proxy.storage.schema import pending_migrations

__all__ = ["Params", "Statement", "Storage", "StorageError", "register_schema", "registered_schemas"]

log = logging.getLogger(__name__)


class Storage(BatchedStorage):
    """The database file at `path`, its writer task and its one connection."""

    dialect = "sqlite"
    errors = (sqlite3.Error, ValueError)

    def __init__(self, path: str | Path, *, batch_max: int = 1000, flush_interval_s: float = 0.05,
                 buffer_max: int = 20_000, busy_timeout_ms: int = 1000,
                 schemas: Mapping[str, Sequence[str]] | None = None) -> None:
        """`schemas` replaces the registered ones (tests); None: every `register_schema`."""
        super().__init__(str(path), batch_max=batch_max, flush_interval_s=flush_interval_s,
                         buffer_max=buffer_max, schemas=schemas)
        self.path = str(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file and its folder, WAL, synchronous=FULL, migrations; start the writer."""
        if self.path != ":memory:":
            await asyncio.to_thread(Path(self.path).parent.mkdir, parents=True, exist_ok=True)
        try:
            self._conn = await aiosqlite.connect(self.path, isolation_level=None)
            await self._conn.execute_fetchall("PRAGMA journal_mode=WAL")
            # A 202 means on disk: every COMMIT is fsynced, WAL included.
            await self._conn.execute_fetchall("PRAGMA synchronous=FULL")
            await self._conn.execute_fetchall(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            await self._migrate()
        except sqlite3.Error as exc:
            await self._close_connection()
            raise StorageError(f"{self.path}: cannot open database: {exc}") from exc
        except BaseException:
            await self._close_connection()  # its thread would keep the process alive
            raise
        self._start_writer()
        log.info("storage: %s open", self.path)

    async def close(self) -> None:
        """Write every pending record and promise, then close the connection."""
        await self._stop_writer()
        await self._close_connection()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _migrate(self) -> None:
        conn = self._conn
        assert conn is not None
        await conn.execute_fetchall(
            "CREATE TABLE IF NOT EXISTS schema_versions"
            " (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        versions = dict(await conn.execute_fetchall("SELECT component, version FROM schema_versions"))
        for component, number, script in pending_migrations(self.schemas(), versions, str(self.path)):
            try:
                await conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script};\n"
                    f"INSERT INTO schema_versions (component, version) VALUES ('{component}', {number})"
                    " ON CONFLICT(component) DO UPDATE SET version = excluded.version;\nCOMMIT;")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    await conn.execute_fetchall("ROLLBACK")
                raise StorageError(f"{self.path}: migration {number} of {component} failed: {exc}") from exc
            log.info("storage: %s schema at version %d", component, number)

    # -- limits (for operators and tests) -----------------------------------------------------

    async def set_max_pages(self, pages: int) -> int:
        """For operators and tests: cap the file size in pages (`PRAGMA max_page_count` on this
        connection, not stored in the file); returns the cap now in force.

        SQLite never sets it below the file's current size, so a small `pages` means "no room
        to grow": writes that need a new page fail as on a full disk (SQLITE_FULL), with what
        that implies (queue acceptance 503 `queue_unavailable`, records dropped and counted).
        Raise it again to give the room back; nothing else needs to be restarted. Runs between
        two transactions of the writer (under its lock)."""
        if self._conn is None:
            raise StorageError(f"{self.path}: storage is not open")
        async with self._lock:
            rows = await self._conn.execute_fetchall(f"PRAGMA max_page_count = {int(pages)}")
        return int(next(iter(rows))[0])

    async def set_read_only(self, read_only: bool) -> None:
        """For operators and tests: refuse (True) or allow again (False) every write on this
        connection (`PRAGMA query_only`), as if the file had become read-only; reads go on.

        Writes then fail as they would on a read-only file (SQLITE_READONLY), with what that
        implies (queue acceptance 503 `queue_unavailable`, records dropped and counted). Unlike
        a chmod, it works for root too and on a connection that is already open. Runs between
        two transactions of the writer (under its lock)."""
        if self._conn is None:
            raise StorageError(f"{self.path}: storage is not open")
        async with self._lock:
            await self._conn.execute_fetchall(f"PRAGMA query_only = {'ON' if read_only else 'OFF'}")

    # -- the writer's primitives ------------------------------------------------------------

    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise ValueError("storage connection is closed")
        return self._conn

    async def _begin(self) -> None:
        await self._connection().execute_fetchall("BEGIN IMMEDIATE")

    async def _end(self) -> None:
        await self._connection().execute_fetchall("COMMIT")

    async def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                await conn.execute_fetchall("ROLLBACK")
            except sqlite3.Error:
                log.exception("storage: rollback failed")

    async def _query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return list(await self._connection().execute_fetchall(sql, params))

    async def _execute(self, statements: Sequence[Statement]) -> None:
        """Inside a transaction; consecutive statements with the same SQL go in one executemany."""
        conn = self._connection()
        for sql, runs in same_sql_runs(statements):
            if len(runs) == 1:
                await conn.execute_fetchall(sql, runs[0])
            else:
                await conn.executemany(sql, runs)
