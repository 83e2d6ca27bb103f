"""The database writer thread: jobs in order, errors handed back, the loop free while one waits."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog

from lockerd.store import Database, EventLog, open_database
from lockerd.store.writer import DbWriter
from lockerd.timeutil import utcnow

pytestmark = pytest.mark.unit


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[DbWriter]:
    open_database(tmp_path / "lockerd.db").close()
    w = DbWriter(tmp_path / "lockerd.db")
    w.start()
    yield w
    await asyncio.to_thread(w.close)


def append(type_: str) -> Callable[[Database], int]:
    def job(db: Database) -> int:
        with db.transaction() as conn:
            return EventLog(db).append(conn, type=type_, at=utcnow()).seq
    return job


async def test_jobs_run_in_the_order_submitted_and_return_their_result(
        writer: DbWriter, tmp_path: Path) -> None:
    seqs = await asyncio.gather(*(writer.run(append(f"t.{i}"), durable=i % 2 == 0)
                                  for i in range(20)))
    assert seqs == sorted(seqs) and len(set(seqs)) == 20
    # Committed when run returns, durable or not: another connection reads it at once.
    reader = open_database(tmp_path / "lockerd.db")
    try:
        types = [e.type for e in EventLog(reader).recent(50)]
    finally:
        reader.close()
    assert types == [f"t.{i}" for i in range(20)]
    await writer.flush()


async def test_an_error_in_a_job_is_raised_to_its_caller_and_the_writer_goes_on(
        writer: DbWriter) -> None:
    def bad(db: Database) -> None:
        with db.transaction() as conn:
            conn.execute("INSERT INTO nowhere VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        await writer.run(bad)
    assert isinstance(await writer.run(append("after")), int)


async def test_the_loop_runs_on_while_a_commit_waits_for_the_lock(
        writer: DbWriter, tmp_path: Path) -> None:
    other = sqlite3.connect(tmp_path / "lockerd.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's long transaction
    job = asyncio.create_task(writer.run(append("waiting")))
    turns = 0
    for _ in range(50):
        await asyncio.sleep(0)
        turns += 1
    assert not job.done() and turns == 50
    other.execute("COMMIT")
    other.close()
    assert isinstance(await job, int)


async def test_after_runs_on_the_writer_thread_once_the_commit_is_readable_before_the_wake(
        writer: DbWriter, tmp_path: Path) -> None:
    seen: list[tuple[int, list[str], bool]] = []
    future: asyncio.Future[int] | None = None

    def after() -> None:
        # What another connection finds at this moment, and whether the caller knows yet.
        reader = sqlite3.connect(tmp_path / "lockerd.db")
        try:
            types = [r[0] for r in reader.execute("SELECT type FROM events")]
        finally:
            reader.close()
        assert future is not None
        seen.append((threading.get_ident(), types, future.done()))

    future = writer.submit(append("lock.pulse"), after=after)
    await future
    assert seen == [(seen[0][0], ["lock.pulse"], False)]
    assert seen[0][0] != threading.get_ident()


async def test_after_is_not_called_when_the_job_fails_and_a_failing_after_is_logged(
        writer: DbWriter) -> None:
    calls: list[str] = []

    def bad(db: Database) -> None:
        with db.transaction() as conn:
            conn.execute("INSERT INTO nowhere VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        await writer.submit(bad, after=lambda: calls.append("after"))
    assert calls == []

    def broken() -> None:
        raise RuntimeError("port gone")

    with structlog.testing.capture_logs() as logged:
        seq = await writer.submit(append("still"), after=broken)
    assert isinstance(seq, int)  # the commit's result reaches its caller all the same
    assert [(e["event"], e["error"]) for e in logged] == [
        ("the follow-up of a commit failed", "RuntimeError('port gone')")]


async def test_a_held_submit_returns_once_its_job_and_after_have_run(
        writer: DbWriter, tmp_path: Path) -> None:
    calls: list[str] = []

    def slow(db: Database) -> int:
        time.sleep(0.05)  # a commit slower than the loop's way back to its poll
        return append("lock.pulse")(db)

    future = writer.submit(slow, after=lambda: calls.append("after"), hold_s=5.0)
    # Back on the loop without awaiting: the job committed and its follow-up ran.
    assert calls == ["after"]
    reader = sqlite3.connect(tmp_path / "lockerd.db")
    try:
        assert [r[0] for r in reader.execute("SELECT type FROM events")] == ["lock.pulse"]
    finally:
        reader.close()
    assert isinstance(await future, int)  # settled as usual, by the loop
    # Without a hold the same job is only on its way when submit returns.
    future = writer.submit(slow, after=lambda: calls.append("unheld"))
    assert calls == ["after"]
    await future
    assert calls == ["after", "unheld"]


async def test_a_hold_ends_after_hold_s_and_the_job_goes_on_without_it(
        writer: DbWriter) -> None:
    gate = threading.Event()
    released: list[bool] = []

    def waits(db: Database) -> int:
        # Released by the loop's thread, which it can only do once the hold has ended.
        released.append(gate.wait(timeout=30.0))
        return append("late")(db)

    future = writer.submit(waits, hold_s=0.05)
    assert released == [] and not future.done()
    gate.set()
    assert isinstance(await future, int)
    assert released == [True]


async def test_after_is_refused_with_a_lazy_commit(writer: DbWriter) -> None:
    with pytest.raises(ValueError, match="durable commit only"):
        writer.submit(append("lazy"), durable=False, after=lambda: None)
    assert isinstance(await writer.run(append("next")), int)


async def test_without_a_busy_handler_the_writer_reads_and_writes_beside_a_busy_writer(
        writer: DbWriter, tmp_path: Path) -> None:
    # The writer's connection waits for no lock but BEGIN's (which it retries itself): its
    # reads outside a transaction and its transactions run while another connection commits
    # and checkpoints as fast as it can, and none of them is refused as locked.
    stop = threading.Event()
    other_commits = 0

    def other_writer() -> None:
        nonlocal other_commits
        conn = sqlite3.connect(tmp_path / "lockerd.db", isolation_level=None, timeout=10.0)
        try:
            while not stop.is_set():
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO meta (key, value) VALUES ('other', ?)"
                             " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                             (str(other_commits),))
                conn.execute("COMMIT")
                other_commits += 1
                if other_commits % 20 == 0:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        for i in range(150):
            await writer.run(lambda db: db.get_meta("other"), durable=False)
            await writer.run(append(f"t.{i}"), durable=i % 10 == 0)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
    assert other_commits > 0
    reader = open_database(tmp_path / "lockerd.db")
    try:
        assert len(EventLog(reader).recent(500)) == 150
    finally:
        reader.close()


async def test_a_closed_writer_refuses_jobs(tmp_path: Path) -> None:
    open_database(tmp_path / "lockerd.db").close()
    w = DbWriter(tmp_path / "lockerd.db")
    w.start()
    await w.run(append("last"), durable=False)
    await asyncio.to_thread(w.close)
    with pytest.raises(RuntimeError, match="closed"):
        await w.run(append("late"))


async def until_checkpoints(w: DbWriter, n: int) -> None:
    for _ in range(2000):
        if w.checkpoints >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"no checkpoint {n} (had {w.checkpoints})")


def wal_frames(path: Path) -> tuple[int, int]:
    """(frames in the log, frames checkpointed) as a no-op checkpoint reports them."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # A PASSIVE checkpoint of a log already checkpointed copies nothing.
        _busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    return int(log_frames), int(done)


async def test_the_checkpointer_runs_only_when_the_log_has_grown_or_many_jobs_ran(
        tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    open_database(path).close()
    w = DbWriter(path, checkpoint_bytes=64 * 4096, checkpoint_jobs=40)
    w.start()
    try:
        for i in range(10):  # a few small commits: no checkpoint copies them
            await w.run(append(f"small.{i}"))
        assert w.checkpoints == 0

        def big(db: Database) -> None:  # another writer's pages, e.g. an import's
            with db.transaction() as conn:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                 [(f"k{i}", "x" * 1000) for i in range(400)])

        await w.run(big)
        await w.run(append("after the big one"))
        await until_checkpoints(w, 1)
        log_frames, done = wal_frames(path)
        assert done == log_frames
        # The log's file keeps its size after a checkpoint; commits that reuse it from its
        # start are counted instead, and do not start a checkpoint each.
        for i in range(10):
            await w.run(append(f"reused.{i}"))
        assert w.checkpoints == 1
        for i in range(40):
            await w.run(append(f"many.{i}"))
        await until_checkpoints(w, 2)
    finally:
        await asyncio.to_thread(w.close)


async def test_a_durable_commit_is_on_the_disk_and_read_by_another_connection_when_it_returns(
        writer: DbWriter, tmp_path: Path) -> None:
    seq = await writer.run(append("lock.pulse"), durable=True)
    reader = open_database(tmp_path / "lockerd.db")
    try:
        assert [e.seq for e in EventLog(reader).recent(1, type_prefix="lock.pulse")] == [seq]
    finally:
        reader.close()
