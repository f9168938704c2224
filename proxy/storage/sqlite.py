"""The one aiosqlite connection: schema migrations per component, a batched background writer
and group commit for writes that are promises.

Two kinds of writes:
- `record(sql, params)`: a record (a fallback log, a snapshot). Never blocks and never waits:
  it goes into a bounded buffer that one writer task drains in batched transactions. When
  the buffer is full the record is dropped and counted (a WARNING once per burst).
- `transact(prepare, undo)` / `commit_promise(sql, params)`: a promise (a queued request the
  client will be told is safe). It returns only after COMMIT, and every promise that arrived
  while the previous COMMIT was on disk shares the next one (group commit), so a thousand
  concurrent acceptances cost a handful of fsyncs, not a thousand.

`prepare` runs on the event loop, inside the writer's transaction, one job after another: a
check it makes against state only it changes (a queue's depth, its exposure) cannot be raced.
A job may also name a `lookup` query: it runs inside that same transaction, after every
statement before it in the batch, and `prepare` gets its rows (a check against the table itself,
such as "is this Idempotency-Key already queued?", raced by nothing either).

Components declare their tables with `register_schema(component, migrations)`; `open` applies
what each is missing and records it in `schema_versions`. This module must never run SQLite on
the event loop's thread, and never let a request wait for a record.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

COMPLAIN_EVERY_S = 10.0  # a storage trouble is logged at most this often, with a count

Params = Sequence[Any]
Statement = tuple[str, Params]

_SCHEMAS: dict[str, tuple[str, ...]] = {}
_COMPONENT = re.compile(r"[a-z][a-z0-9_]*")


class StorageError(Exception):
    """The database cannot be opened, migrated or written."""


def register_schema(component: str, migrations: Sequence[str]) -> None:
    """Declare a component's migrations, oldest first; each is one SQL script.

    Append to the list to change a schema; never edit a migration that has shipped.
    """
    if not _COMPONENT.fullmatch(component):
        raise ValueError(f"component names use a-z, 0-9 and _, got {component!r}")
    known = _SCHEMAS.get(component)
    if known is not None and known != tuple(migrations):
        raise ValueError(f"schema of component {component!r} registered twice, differently")
    _SCHEMAS[component] = tuple(migrations)


def registered_schemas() -> dict[str, tuple[str, ...]]:
    return dict(_SCHEMAS)


@dataclass(slots=True, eq=False)
class _Job:
    prepare: Callable[..., Sequence[Statement]]  # () or (rows of lookup,)
    undo: Callable[[], None] | None
    future: asyncio.Future[None]
    lookup: Statement | None = None
    seen: tuple[tuple[Any, ...], ...] = ()  # what lookup returned when prepare ran
    statements: Sequence[Statement] = field(default=())
    deadline: float | None = None  # loop time: not written at all unless begun before it

    def is_late(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() > self.deadline


class Storage:
    """The database file at `path`, its writer task and its one connection."""

    def __init__(self, path: str | Path, *, batch_max: int = 1000, flush_interval_s: float = 0.05,
                 buffer_max: int = 20_000, busy_timeout_ms: int = 1000,
                 schemas: Mapping[str, Sequence[str]] | None = None) -> None:
        """`schemas` replaces the registered ones (tests); None: every `register_schema`."""
        self.path = str(path)
        self._schemas = schemas
        self._batch_max = batch_max
        self._flush_interval_s = flush_interval_s
        self._buffer_max = buffer_max
        self._busy_timeout_ms = busy_timeout_ms
        self._complaints: dict[str, tuple[float, int]] = {}  # topic → (last logged, since then)
        self._conn: aiosqlite.Connection | None = None
        self._records: deque[Statement] = deque()
        self._jobs: list[_Job] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # held for each transaction; reads wait for a whole one
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.dropped = 0  # records lost because the buffer was full
        self._dropping = False
        self.commits = 0  # transactions committed by the writer (group commit makes this small)

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._closing

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
        self._closing = False
        self._writer = asyncio.create_task(self._run(), name="storage-writer")
        log.info("storage: %s open", self.path)

    async def close(self) -> None:
        """Write every pending record and promise, then close the connection."""
        if self._writer is not None:
            self._closing = True
            self._wake.set()
            await self._writer
            self._writer = None
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
        schemas = _SCHEMAS if self._schemas is None else self._schemas
        for component, migrations in sorted(schemas.items()):
            if not _COMPONENT.fullmatch(component):
                raise StorageError(f"component names use a-z, 0-9 and _, got {component!r}")
            current = versions.get(component, 0)
            if current > len(migrations):
                raise StorageError(f"{self.path}: schema of {component} is version {current}, "
                                   f"newer than this program's {len(migrations)}")
            for number, script in enumerate(migrations[current:], start=current + 1):
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

    # -- writes ----------------------------------------------------------------------------

    def record(self, sql: str, params: Params = ()) -> bool:
        """Enqueue a write that is only a record; False when it was dropped (buffer full)."""
        records = self._records
        if len(records) >= self._buffer_max or self._closing:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("storage: record buffer full (%d), dropping records until it drains",
                            self._buffer_max)
            return False
        records.append((sql, params))
        if len(records) == 1 or len(records) >= self._batch_max:
            self._wake.set()  # start the flush timer, or write a full batch now
        return True

    async def transact(self, prepare: Callable[..., Sequence[Statement]],
                       undo: Callable[[], None] | None = None, *, lookup: Statement | None = None,
                       within_s: float | None = None) -> None:
        """Run `prepare` in the writer's next transaction and return once it is committed.

        `prepare` runs on the event loop, serialised with every other job: it may check and
        change in-memory state, then returns the statements to write, or raises to refuse
        (the exception comes back here and nothing is written). If the statements cannot be
        committed, `undo` is called (by the writer, so even when the caller has gone) and
        StorageError is raised. A caller that is cancelled does not cancel the write.

        With `lookup` (sql, params), `prepare(rows)` gets that query's rows, read inside the
        same transaction after every earlier statement of the batch. Should the batch fail and
        the job be written alone, the lookup runs again first; rows that changed meanwhile make
        it StorageError (with `undo`) rather than a promise built on what is no longer there.

        With `within_s`, a job the writer has not begun to write within that many seconds
        (the database locked, the disk full and retried) is not written at all: StorageError,
        and `undo` if it was prepared. So a caller that gives up on it never finds it
        written later behind its back.
        """
        if self._writer is None or self._closing:
            raise StorageError(f"{self.path}: storage is not open")
        loop = asyncio.get_running_loop()
        job = _Job(prepare, undo, loop.create_future(), lookup,
                   deadline=None if within_s is None else loop.time() + within_s)
        self._jobs.append(job)
        self._wake.set()
        await asyncio.shield(job.future)

    async def commit_promise(self, sql: str, params: Params = ()) -> None:
        """One statement, committed (group commit) before this returns."""
        await self.transact(lambda: ((sql, params),))

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Rows of a query; never sees half of a transaction."""
        if self._conn is None:
            raise StorageError(f"{self.path}: storage is not open")
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, params))

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

    # -- the writer ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._jobs and not self._records:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._jobs and len(self._records) < self._batch_max and not self._closing:
                # Only records: let them gather for a while, unless a promise or a full batch comes.
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._flush_interval_s)
                except TimeoutError:
                    pass
            jobs, self._jobs = self._jobs, []
            records = [self._records.popleft() for _ in range(min(len(self._records), self._batch_max))]
            try:
                await self._write(records, jobs)
            except Exception as exc:
                # A bug here must not kill the writer: every later promise would wait forever.
                log.exception("storage: writer failed; %d records lost", len(records))
                self.dropped += len(records)
                for job in jobs:
                    _settle(job.future, StorageError(f"{self.path}: write failed: {exc}"))
                await asyncio.sleep(self._flush_interval_s)
            if self._dropping and len(self._records) < self._buffer_max // 2:
                self._dropping = False
                log.warning("storage: record buffer drained; %d records dropped so far", self.dropped)

    async def _write(self, records: list[Statement], jobs: list[_Job]) -> None:
        if any(job.lookup is not None for job in jobs):
            await self._write_looked_up(records, jobs)
            return
        statements = list(records)
        ready: list[_Job] = []
        async with self._lock:
            for job in jobs:
                if job.is_late():
                    _settle(job.future, StorageError(f"{self.path}: not written in time"))
                    continue
                try:
                    job.statements = tuple(job.prepare())
                except Exception as exc:  # noqa: BLE001  (a refusal: it belongs to the caller)
                    _settle(job.future, exc)
                    continue
                statements.extend(job.statements)
                ready.append(job)
            if not statements:
                for job in ready:  # promises with nothing to write are kept at once
                    _settle(job.future, None)
                return
            try:
                await self._commit(statements)
            except (sqlite3.Error, ValueError) as exc:
                # One bad statement must not sink the others: write each part alone.
                self._complain("batch", "storage: batch of %d statements failed (%s); retrying them "
                               "one by one", len(statements), exc)
                await self._write_alone(records, ready)
                return
        for job in ready:
            _settle(job.future, None)

    async def _write_looked_up(self, records: list[Statement], jobs: list[_Job]) -> None:
        """One transaction in which each job's lookup sees every statement before it.

        Statements run as soon as a lookup follows them (no executemany across such jobs): a
        lookup must see the rows its predecessors in the batch are writing.
        """
        conn = self._conn
        if conn is None:
            raise ValueError("storage connection is closed")
        ready: list[_Job] = []
        pending = list(records)
        async with self._lock:
            index = 0
            looking_up = False
            try:
                # Inside the try: a database that refuses to begin (read-only, locked) is a
                # failed batch like any other, not a bug of the writer.
                await conn.execute_fetchall("BEGIN IMMEDIATE")
                for index, job in enumerate(jobs):
                    if job.is_late():
                        _settle(job.future, StorageError(f"{self.path}: not written in time"))
                        continue
                    if job.lookup is not None:
                        await self._execute(pending)
                        pending = []
                        looking_up = True
                        job.seen = tuple(await conn.execute_fetchall(*job.lookup))
                        looking_up = False
                    # No await from here to the next job: a failure never strikes a prepared job
                    # that is not in `ready`.
                    try:
                        job.statements = tuple(job.prepare(job.seen) if job.lookup is not None
                                               else job.prepare())
                    except Exception as exc:  # noqa: BLE001  (a refusal: it belongs to the caller)
                        _settle(job.future, exc)
                        continue
                    pending.extend(job.statements)
                    ready.append(job)
                index = len(jobs)
                await self._execute(pending)
                await conn.execute_fetchall("COMMIT")
            except (sqlite3.Error, ValueError) as exc:
                await self._rollback()
                if looking_up:  # its own query failed: retrying it could fail forever
                    _settle(jobs[index].future, StorageError(f"{self.path}: lookup failed: {exc}"))
                    index += 1
                # Jobs whose prepare never ran go to the next batch, untouched, unless their
                # time is up: then they are refused now, before the records are retried.
                for job in jobs[index:]:
                    if job.is_late():
                        _settle(job.future, StorageError(f"{self.path}: not written in time"))
                self._jobs[:0] = [job for job in jobs[index:] if not job.future.done()]
                self._complain("batch", "storage: batch of %d records and %d promises failed (%s); "
                               "retrying them one by one", len(records), len(ready), exc)
                await self._write_alone(records, ready)
                return
            except BaseException:
                await self._rollback()
                raise
            self.commits += 1
        for job in ready:
            _settle(job.future, None)

    async def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                await conn.execute_fetchall("ROLLBACK")
            except sqlite3.Error:
                log.exception("storage: rollback failed")

    def _complain(self, topic: str, message: str, *args: object, level: int = logging.WARNING) -> None:
        """Log a storage trouble at most once per COMPLAIN_EVERY_S per topic, with how many
        times it happened meanwhile: a broken disk must not turn every request into a log line."""
        now = time.monotonic()
        count = self._complaints.get(topic, (0.0, 0))[1] + 1
        last = self._complaints.get(topic, (-COMPLAIN_EVERY_S, 0))[0]
        if now - last < COMPLAIN_EVERY_S:
            self._complaints[topic] = (last, count)
            return
        self._complaints[topic] = (now, 0)
        if count > 1:
            message += f" ({count - 1} more since the last such line)"
        log.log(level, message, *args)

    async def _write_alone(self, records: list[Statement], jobs: list[_Job]) -> None:
        lost = 0
        for statement in records:
            try:
                await self._commit([statement])
            except (sqlite3.Error, ValueError) as exc:
                lost += 1
                self._complain("dropped", "storage: record dropped: %s: %s",
                               statement[0].split("(")[0].strip(), exc, level=logging.ERROR)
        self.dropped += lost
        for job in jobs:
            if job.is_late():
                # Prepared, but its batch failed and it is too late to try it alone.
                _settle(job.future, StorageError(f"{self.path}: not written in time"))
                if job.undo is not None:
                    job.undo()
                continue
            try:
                await self._commit(job.statements, job)
            except (sqlite3.Error, ValueError) as exc:
                _settle(job.future, StorageError(f"{self.path}: write failed: {exc}"))
                if job.undo is not None:
                    job.undo()
            else:
                _settle(job.future, None)

    async def _commit(self, statements: Sequence[Statement], job: _Job | None = None) -> None:
        """One transaction. With a `job` that has a lookup, the lookup runs again first and must
        return what its prepare saw (ValueError otherwise: the promise no longer holds)."""
        conn = self._conn
        if conn is None:
            raise ValueError("storage connection is closed")
        await conn.execute_fetchall("BEGIN IMMEDIATE")
        try:
            if job is not None and job.lookup is not None and (
                    tuple(await conn.execute_fetchall(*job.lookup)) != job.seen):
                raise ValueError("the rows its check read changed before it could be written")
            await self._execute(statements)
            await conn.execute_fetchall("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        self.commits += 1

    async def _execute(self, statements: Sequence[Statement]) -> None:
        """Inside a transaction; consecutive statements with the same SQL go in one executemany."""
        conn = self._conn
        if conn is None:
            raise ValueError("storage connection is closed")
        start = 0
        while start < len(statements):
            sql = statements[start][0]
            end = start + 1
            while end < len(statements) and statements[end][0] == sql:
                end += 1
            if end - start == 1:
                await conn.execute_fetchall(sql, statements[start][1])
            else:
                await conn.executemany(sql, [params for _, params in statements[start:end]])
            start = end


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    if future.done():  # only a cancelled (shielded) caller's future; nobody is listening
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
        # The caller may have been cancelled meanwhile: then nobody retrieves it, and that is fine.
        future.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[None]) -> None:
    future.exception()
