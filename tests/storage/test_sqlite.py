"""proxy/storage/sqlite.py (and base.py's writer) on a real SQLite file: migrations, batched records, group commit."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from proxy.storage import schema
from proxy.storage.sqlite import Storage, StorageError, register_schema, registered_schemas

NOTES = ["CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE)"]
INSERT = "INSERT INTO notes (text) VALUES (?)"


@pytest.fixture
async def open_storage(tmp_path):
    opened: list[Storage] = []

    async def open_(schemas=None, **options) -> Storage:
        storage = Storage(tmp_path / "deep" / "er" / "test.db", schemas=schemas or {"notes": NOTES},
                          **options)
        await storage.open()
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        await storage.close()


async def texts(storage: Storage) -> list[str]:
    return [text for (text,) in await storage.fetchall("SELECT text FROM notes ORDER BY id")]


async def test_open_creates_the_folder_with_wal_and_full_sync(open_storage, tmp_path):
    storage = await open_storage()
    assert (tmp_path / "deep" / "er" / "test.db").is_file()
    assert await storage.fetchall("PRAGMA journal_mode") == [("wal",)]
    assert await storage.fetchall("PRAGMA synchronous") == [(2,)]  # FULL
    assert await storage.fetchall("SELECT component, version FROM schema_versions") == [("notes", 1)]


async def test_migrations_apply_once_and_only_the_new_ones(open_storage):
    storage = await open_storage()
    await storage.commit_promise(INSERT, ("kept",))
    await storage.close()
    grown = [*NOTES, "ALTER TABLE notes ADD COLUMN tag TEXT; CREATE INDEX notes_tag ON notes (tag)",
             "UPDATE notes SET tag = 'old'"]
    storage = await open_storage({"notes": grown, "other": ["CREATE TABLE other (x)"]})
    assert await storage.fetchall("SELECT text, tag FROM notes") == [("kept", "old")]
    assert sorted(await storage.fetchall("SELECT component, version FROM schema_versions")) == [
        ("notes", 3), ("other", 1)]


async def test_a_failing_migration_names_itself_and_applies_nothing(open_storage, tmp_path):
    storage = await open_storage()
    await storage.close()
    broken = Storage(tmp_path / "deep" / "er" / "test.db",
                     schemas={"notes": [*NOTES, "CREATE TABLE extra (x); CREATE TABLE notes (y)"]})
    with pytest.raises(StorageError) as error:
        await broken.open()
    assert "migration 2 of notes failed: table notes already exists" in str(error.value)
    storage = await open_storage()
    assert await storage.fetchall("SELECT name FROM sqlite_master WHERE name = 'extra'") == []
    assert await storage.fetchall("SELECT version FROM schema_versions") == [(1,)]


async def test_a_newer_database_is_refused(open_storage, tmp_path):
    storage = await open_storage({"notes": [*NOTES, "SELECT 1"]})
    await storage.close()
    older = Storage(tmp_path / "deep" / "er" / "test.db", schemas={"notes": NOTES})
    with pytest.raises(StorageError, match="schema of notes is version 2, newer than this program's 1"):
        await older.open()


def test_register_schema_refuses_a_second_different_definition(monkeypatch):
    # Registered for this test only: every storage opened later would create its table.
    monkeypatch.setattr(schema, "_SCHEMAS", dict(schema._SCHEMAS))
    monkeypatch.setattr(schema, "_DIALECTS", dict(schema._DIALECTS))
    register_schema("test_twice", ["CREATE TABLE t (x)"])
    register_schema("test_twice", ["CREATE TABLE t (x)"])  # the same again: a no-op
    with pytest.raises(ValueError, match="registered twice"):
        register_schema("test_twice", ["CREATE TABLE t (y)"])
    with pytest.raises(ValueError, match="component names"):
        register_schema("Bad-Name", [])
    assert {"fallback_logs", "queue"} <= set(registered_schemas())
    register_schema("test_pg_only", ["CREATE TABLE p (x TEXT)"], dialect="postgresql")
    with pytest.raises(ValueError, match="registered twice"):
        register_schema("test_pg_only", ["CREATE TABLE p (x TEXT)"])
    assert "test_pg_only" not in registered_schemas("sqlite")
    assert {"test_pg_only", "queue"} <= set(registered_schemas("postgresql"))


async def test_records_are_written_in_batches_in_the_background(open_storage):
    storage = await open_storage(batch_max=100, flush_interval_s=0.05)
    for n in range(250):
        assert storage.record(INSERT, (f"n{n}",)) is True
    for _ in range(200):  # bounded: the writer drains within a few flush intervals
        if len(await texts(storage)) == 250:
            break
        await asyncio.sleep(0.01)
    assert await texts(storage) == [f"n{n}" for n in range(250)]
    assert storage.commits == 3


async def test_close_writes_what_is_still_buffered(open_storage, tmp_path):
    storage = await open_storage(flush_interval_s=60)
    storage.record(INSERT, ("late",))
    await storage.close()
    storage = await open_storage()
    assert await texts(storage) == ["late"]


async def test_a_full_buffer_drops_and_counts_and_warns_once(open_storage, caplog):
    storage = await open_storage(buffer_max=3, batch_max=100, flush_interval_s=60)
    with caplog.at_level(logging.WARNING, logger="proxy.storage.sqlite"):
        results = [storage.record(INSERT, (f"n{n}",)) for n in range(6)]
    assert results == [True, True, True, False, False, False]
    assert storage.dropped == 3
    assert [r.getMessage() for r in caplog.records] == [
        "storage: record buffer full (3), dropping records until it drains"]


async def test_concurrent_promises_share_one_commit(open_storage):
    storage = await open_storage()
    await asyncio.gather(*(storage.commit_promise(INSERT, (f"p{n}",)) for n in range(300)))
    assert await texts(storage) == [f"p{n}" for n in range(300)]
    assert storage.commits == 1


async def test_a_refusal_in_prepare_writes_nothing_and_reaches_only_its_caller(open_storage):
    storage = await open_storage()

    def refuse():
        raise LookupError("no room")

    results = await asyncio.gather(storage.commit_promise(INSERT, ("a",)), storage.transact(refuse),
                                   storage.commit_promise(INSERT, ("b",)), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "LookupError", "NoneType"]
    assert str(results[1]) == "no room"
    assert await texts(storage) == ["a", "b"]


async def test_a_failing_statement_is_undone_alone(open_storage):
    storage = await open_storage()
    await storage.commit_promise(INSERT, ("taken",))
    undone: list[str] = []
    jobs = [storage.transact(lambda t=text: [(INSERT, (t,))], lambda t=text: undone.append(t))
            for text in ("x", "taken", "y")]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StorageError)
    assert "UNIQUE constraint failed: notes.text" in str(results[1])
    assert undone == ["taken"]
    assert await texts(storage) == ["taken", "x", "y"]


async def test_a_cancelled_caller_does_not_cancel_its_write(open_storage):
    storage = await open_storage()
    task = asyncio.create_task(storage.commit_promise(INSERT, ("promised",)))
    await asyncio.sleep(0)  # the job is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await storage.commit_promise(INSERT, ("next",))
    assert await texts(storage) == ["promised", "next"]


async def test_promises_after_close_are_refused(open_storage):
    storage = await open_storage()
    await storage.close()
    with pytest.raises(StorageError, match="storage is not open"):
        await storage.commit_promise(INSERT, ("late",))
    assert storage.record(INSERT, ("late",)) is False


async def test_a_lookup_sees_the_statements_before_it_in_the_same_transaction(open_storage):
    storage = await open_storage()
    count = ("SELECT count(*) FROM notes", ())

    def prepare(rows):
        return [(INSERT, (f"n{rows[0][0]}",))]

    await asyncio.gather(*(storage.transact(prepare, lookup=count) for _ in range(5)),
                         storage.commit_promise(INSERT, ("plain",)))
    assert await texts(storage) == ["n0", "n1", "n2", "n3", "n4", "plain"]
    assert storage.commits == 1


async def test_a_failed_batch_checks_each_lookup_again_before_writing_it_alone(open_storage):
    storage = await open_storage()
    await storage.commit_promise(INSERT, ("taken",))
    execute, calls = storage._execute, []

    async def flaky(statements):
        # "x" goes in with the batch, then fails when written alone (a transient disk error).
        if ("x",) in [params for _, params in statements]:
            calls.append("x")
            if len(calls) == 2:
                raise sqlite3.OperationalError("disk I/O error")
        await execute(statements)

    storage._execute = flaky
    undone: list[str] = []
    after_x = ("SELECT text FROM notes WHERE text = 'x'", ())
    results = await asyncio.gather(
        storage.transact(lambda: [(INSERT, ("x",))], lambda: undone.append("x")),
        storage.transact(lambda rows: () if rows else [(INSERT, ("no x",))], lambda: undone.append("saw x"),
                         lookup=after_x),
        storage.transact(lambda rows: [(INSERT, ("taken",))], lambda: undone.append("taken"),
                         lookup=("SELECT 1", ())),
        storage.commit_promise(INSERT, ("z",)), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["StorageError", "StorageError", "StorageError", "NoneType"]
    assert [str(r).split(": ", 1)[1] for r in results[:3]] == [
        "write failed: disk I/O error",
        "write failed: the rows its check read changed before it could be written",
        "write failed: UNIQUE constraint failed: notes.text"]
    assert undone == ["x", "saw x", "taken"]
    assert await texts(storage) == ["taken", "z"]


async def test_a_failing_lookup_fails_its_own_job_only(open_storage):
    storage = await open_storage()
    results = await asyncio.gather(
        storage.commit_promise(INSERT, ("a",)),
        storage.transact(lambda rows: [(INSERT, ("never",))], lookup=("SELECT * FROM missing", ())),
        storage.transact(lambda rows: [(INSERT, (f"b{len(rows)}",))], lookup=("SELECT 1", ())),
        return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "StorageError", "NoneType"]
    assert str(results[1]).endswith("lookup failed: no such table: missing")
    assert await texts(storage) == ["a", "b1"]
