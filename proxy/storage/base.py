"""What every storage shares: the schema registry, and the batched writer with group commit.

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
such as "is this Idempotency-Key already queued?", raced by nothing either). On a database that
other processes write too, a job may name a `lock` statement to run before its lookup (a lock
the others take as well), so the lookup, read after it, sees what they committed.

SQL is written once, SQLite-style (`?` placeholders, SQLite column types); a subclass runs it on
its engine (`sqlite.Storage`, `postgres.PostgresStorage`) through five primitives: begin,
commit, rollback, query, execute. Components declare their tables with `register_schema`
(`schema.py`); `open` applies what each is missing. Never let a request wait for a record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.background import wait_event
from proxy.storage.schema import COMPONENT, StorageError, register_schema, registered_schemas

__all__ = ["COMPONENT", "BatchedStorage", "Params", "Statement", "StorageError", "register_schema",
           "registered_schemas"]


COMPLAIN_EVERY_S = 10.0  # a storage trouble is logged at most this often, with a count

Params = Sequence[Any]
Statement = tuple[str, Params]


def same_sql_runs(statements: Sequence[Statement]) -> Iterator[tuple[str, list[Params]]]:
    """Consecutive statements with the same SQL, grouped: (sql, [params, ...]) each, so an
    engine sends a run as one `executemany`."""
    start = 0
    while start < len(statements):
        sql = statements[start][0]
        end = start + 1
        while end < len(statements) and statements[end][0] == sql:
            end += 1
        yield sql, [params for _, params in statements[start:end]]
        start = end


@dataclass(slots=True, eq=False)
class _Job:
    prepare: Callable[..., Sequence[Statement]]  # () or (rows of lookup,)
    undo: Callable[[], None] | None
    future: asyncio.Future[None]
    lookup: Statement | None = None
    lock: Statement | None = None  # run before lookup, in a statement of its own
    seen: tuple[tuple[Any, ...], ...] = ()  # what lookup returned when prepare ran
    statements: Sequence[Statement] = field(default=())
    deadline: float | None = None  # loop time: not written at all unless begun before it

    def is_late(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() > self.deadline


class BatchedStorage(ABC):
    """The writer task, its record buffer and promise jobs, over one connection of a subclass."""

    dialect: ClassVar[str]
    # Other processes write the same database (a fleet): in-memory counters are only a view.
    shared: ClassVar[bool] = False
    # What the engine raises when a statement or the connection fails (not a bug of ours).
    errors: ClassVar[tuple[type[BaseException], ...]] = (ValueError,)

    def __init__(self, label: str, *, batch_max: int = 1000, flush_interval_s: float = 0.05,
                 buffer_max: int = 20_000, schemas: Mapping[str, Sequence[str]] | None = None) -> None:
        """`label` names the database in messages (never a password); `schemas` replaces the
        registered ones (tests); None: every `register_schema` of this dialect."""
        self.label = label
        self._log = logging.getLogger(type(self).__module__)  # the engine's module names its lines
        self._schemas = schemas
        self._batch_max = batch_max
        self._flush_interval_s = flush_interval_s
        self._buffer_max = buffer_max
        self._complaints: dict[str, tuple[float, int]] = {}  # topic → (last logged, since then)
        self._records: deque[Statement] = deque()
        self._jobs: list[_Job] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # held for each transaction; reads wait for a whole one
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.dropped = 0  # records lost because the buffer was full or the database refused them
        self._dropping = False
        self.commits = 0  # transactions committed by the writer (group commit makes this small)
        self._stalled = False  # the last batch could not even begin: pause before the next try

    @property
    def is_open(self) -> bool:
        return self._writer is not None and not self._closing

    def schemas(self) -> Mapping[str, Sequence[str]]:
        return registered_schemas(self.dialect) if self._schemas is None else self._schemas

    # -- the engine's primitives -------------------------------------------------------------

    @abstractmethod
    async def _begin(self) -> None:
        """Start the writer's transaction (taking the write lock at once where there is one)."""

    @abstractmethod
    async def _end(self) -> None:
        """COMMIT."""

    @abstractmethod
    async def _rollback(self) -> None:
        """ROLLBACK if a transaction is open; never raises."""

    @abstractmethod
    async def _query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One statement's rows."""

    @abstractmethod
    async def _execute(self, statements: Sequence[Statement]) -> None:
        """Inside a transaction, in order."""

    def _is_unreachable(self, exc: BaseException) -> bool:
        """Could not even begin because the database is away (not merely busy): the jobs are
        refused at once instead of being tried again until they are late."""
        return False

    # -- life cycle ----------------------------------------------------------------------------

    def _start_writer(self) -> None:
        self._closing = False
        self._writer = asyncio.get_running_loop().create_task(self._run(), name="storage-writer")

    async def _stop_writer(self) -> None:
        """Write every pending record and promise, then let the writer end."""
        if self._writer is not None:
            self._closing = True
            self._wake.set()
            await self._writer
            self._writer = None

    # -- writes ----------------------------------------------------------------------------

    def record(self, sql: str, params: Params = ()) -> bool:
        """Enqueue a write that is only a record; False when it was dropped (buffer full)."""
        records = self._records
        if len(records) >= self._buffer_max or self._closing:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                self._log.warning("storage: record buffer full (%d), dropping records until it drains",
                            self._buffer_max)
            return False
        records.append((sql, params))
        if len(records) == 1 or len(records) >= self._batch_max:
            self._wake.set()  # start the flush timer, or write a full batch now
        return True

    async def transact(self, prepare: Callable[..., Sequence[Statement]],
                       undo: Callable[[], None] | None = None, *, lookup: Statement | None = None,
                       lock: Statement | None = None, within_s: float | None = None) -> None:
        """Run `prepare` in the writer's next transaction and return once it is committed.

        `prepare` runs on the event loop, serialised with every other job: it may check and
        change in-memory state, then returns the statements to write, or raises to refuse
        (the exception comes back here and nothing is written). If the statements cannot be
        committed, `undo` is called (by the writer, so even when the caller has gone) and
        StorageError is raised. A caller that is cancelled does not cancel the write.

        With `lookup` (sql, params), `prepare(rows)` gets that query's rows, read inside the
        same transaction after every earlier statement of the batch (and after `lock`, when
        given). Should the batch fail and the job be written alone, the lookup runs again first;
        rows that changed meanwhile make it StorageError (with `undo`) rather than a promise
        built on what is no longer there.

        With `within_s`, a job the writer has not begun to write within that many seconds
        (the database locked, the disk full and retried) is not written at all: StorageError,
        and `undo` if it was prepared. So a caller that gives up on it never finds it
        written later behind its back.
        """
        if self._writer is None or self._closing:
            raise StorageError(f"{self.label}: storage is not open")
        loop = asyncio.get_running_loop()
        job = _Job(prepare, undo, loop.create_future(), lookup, lock if lookup is not None else None,
                   deadline=None if within_s is None else loop.time() + within_s)
        self._jobs.append(job)
        self._wake.set()
        await asyncio.shield(job.future)

    async def commit_promise(self, sql: str, params: Params = ()) -> None:
        """One statement, committed (group commit) before this returns."""
        await self.transact(lambda: ((sql, params),))

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Rows of a query; never sees half of a transaction."""
        if not self.is_open:
            raise StorageError(f"{self.label}: storage is not open")
        async with self._lock:
            try:
                return await self._query(sql, params)
            except self.errors as exc:
                raise StorageError(f"{self.label}: read failed: {exc}") from exc

    async def write_now(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One statement in a transaction of its own, committed before this returns, outside
        the batches: for a claim whose answer the caller needs at once (a replay lease)."""
        if not self.is_open:
            raise StorageError(f"{self.label}: storage is not open")
        async with self._lock:
            try:
                await self._begin()
                rows = await self._query(sql, params)
                await self._end()
            except self.errors as exc:
                await self._rollback()
                raise StorageError(f"{self.label}: write failed: {exc}") from exc
            except BaseException:
                await self._rollback()
                raise
        return rows

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
                await wait_event(self._wake, self._flush_interval_s)
            jobs, self._jobs = self._jobs, []
            records = [self._records.popleft() for _ in range(min(len(self._records), self._batch_max))]
            try:
                await self._write(records, jobs)
                if self._stalled:
                    # Its jobs are back in the queue, untouched: trying again at once would spin
                    # on a database that refuses to begin (locked, unreachable) until they are late.
                    self._stalled = False
                    await asyncio.sleep(self._flush_interval_s)
            except Exception as exc:
                # A bug here must not kill the writer: every later promise would wait forever.
                self._log.exception("storage: writer failed; %d records lost", len(records))
                self.dropped += len(records)
                for job in jobs:
                    _settle(job.future, StorageError(f"{self.label}: write failed: {exc}"))
                await asyncio.sleep(self._flush_interval_s)
            if self._dropping and len(self._records) < self._buffer_max // 2:
                self._dropping = False
                self._log.warning("storage: record buffer drained; %d records dropped so far", self.dropped)

    async def _write(self, records: list[Statement], jobs: list[_Job]) -> None:
        if any(job.lookup is not None for job in jobs):
            await self._write_looked_up(records, jobs)
            return
        statements = list(records)
        ready: list[_Job] = []
        async with self._lock:
            for job in jobs:
                if job.is_late():
                    _settle(job.future, StorageError(f"{self.label}: not written in time"))
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
            except self.errors as exc:
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
        ready: list[_Job] = []
        pending = list(records)
        async with self._lock:
            index = 0
            looking_up = False
            began = False
            try:
                # Inside the try: a database that refuses to begin (read-only, locked, gone) is a
                # failed batch like any other, not a bug of the writer.
                await self._begin()
                began = True
                for index, job in enumerate(jobs):
                    if job.is_late():
                        _settle(job.future, StorageError(f"{self.label}: not written in time"))
                        continue
                    if job.lookup is not None:
                        await self._execute(pending)
                        pending = []
                        looking_up = True
                        job.seen = await self._look_up(job)
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
                await self._end()
            except self.errors as exc:
                await self._rollback()
                if looking_up:  # its own query failed: retrying it could fail forever
                    _settle(jobs[index].future, StorageError(f"{self.label}: lookup failed: {exc}"))
                    index += 1
                # Jobs whose prepare never ran go to the next batch, untouched, unless their
                # time is up (or the database is away): then they are refused now, before the
                # records are retried.
                away = not began and self._is_unreachable(exc)
                for job in jobs[index:]:
                    if away:
                        _settle(job.future, StorageError(f"{self.label}: write failed: {exc}"))
                    elif job.is_late():
                        _settle(job.future, StorageError(f"{self.label}: not written in time"))
                self._jobs[:0] = [job for job in jobs[index:] if not job.future.done()]
                self._stalled = not ready and not records and bool(self._jobs)
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

    async def _look_up(self, job: _Job) -> tuple[tuple[Any, ...], ...]:
        assert job.lookup is not None
        if job.lock is not None:
            await self._query(*job.lock)
        return tuple(await self._query(*job.lookup))

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
        self._log.log(level, message, *args)

    async def _write_alone(self, records: list[Statement], jobs: list[_Job]) -> None:
        lost = 0
        for statement in records:
            try:
                await self._commit([statement])
            except self.errors as exc:
                lost += 1
                self._complain("dropped", "storage: record dropped: %s: %s",
                               statement[0].split("(")[0].strip(), exc, level=logging.ERROR)
        self.dropped += lost
        for job in jobs:
            if job.is_late():
                # Prepared, but its batch failed and it is too late to try it alone.
                _settle(job.future, StorageError(f"{self.label}: not written in time"))
                if job.undo is not None:
                    job.undo()
                continue
            try:
                await self._commit(job.statements, job)
            except self.errors as exc:
                _settle(job.future, StorageError(f"{self.label}: write failed: {exc}"))
                if job.undo is not None:
                    job.undo()
            else:
                _settle(job.future, None)

    async def _commit(self, statements: Sequence[Statement], job: _Job | None = None) -> None:
        """One transaction. With a `job` that has a lookup, the lookup runs again first and must
        return what its prepare saw (ValueError otherwise: the promise no longer holds)."""
        await self._begin()
        try:
            if job is not None and job.lookup is not None and await self._look_up(job) != job.seen:
                raise ValueError("the rows its check read changed before it could be written")
            await self._execute(statements)
            await self._end()
        except BaseException:
            await self._rollback()
            raise
        self.commits += 1


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
