"""The one thread that writes the database: the event loop awaits commits, never waits on them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lockerd.errors import StoreError
from lockerd.logs import get_logger
from lockerd.store.db import Database, open_database

log = get_logger("lockerd.writer")

T = TypeVar("T")
# SQLite's own autocheckpoint threshold: 1000 pages of 4 KiB.
CHECKPOINT_BYTES = 4096 * 1000
# After a complete checkpoint the log is written again from its start, so its file no longer
# grows: the daemon's own commits (a few pages each) are then counted instead.
CHECKPOINT_JOBS = 250
Job = Callable[[Database], T]


class Writer(Protocol):
    """What the services write through: `run` a job on the connection that owns writes, or
    `submit` it and await its future later (the job is queued at once). `after`, given with
    a durable job, is called once the job returned and its commit is on the disk, before the
    future is settled, on the thread that ran the job: the pulse that the commit reports
    goes out from there (it must be quick and never raise). `hold_s`: the caller's thread
    blocks up to that long for the job to have run (see `DbWriter.submit`)."""

    async def run(self, fn: Job[T], *, durable: bool = True) -> T: ...

    def submit(self, fn: Job[T], *, durable: bool = True,
               after: Callable[[], None] | None = None,
               hold_s: float = 0.0) -> asyncio.Future[T]: ...

    async def flush(self) -> None: ...


class InlineWriter:
    """A `Writer` that runs each job at once on the caller's own connection (always at
    synchronous=FULL): for a controller built without the daemon's writer thread, as a
    test that drives one step at a time builds it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def run(self, fn: Job[T], *, durable: bool = True) -> T:
        return fn(self._db)

    def submit(self, fn: Job[T], *, durable: bool = True,
               after: Callable[[], None] | None = None,
               hold_s: float = 0.0) -> asyncio.Future[T]:
        # The job has run when this returns: there is nothing to hold for.
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(fn(self._db))
        except Exception as exc:  # noqa: BLE001 - raised again by whoever awaits the future
            future.set_exception(exc)
        else:
            _call_after(after)
        return future

    async def flush(self) -> None:
        return None


@dataclass(slots=True)
class _Task:
    fn: Job[Any]
    durable: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    after: Callable[[], None] | None
    ran: threading.Event | None = None


class DbWriter:
    """Runs write jobs, in the order they were submitted, on a thread with its own connection.

    A SQLite commit can wait for the write lock (another process's transaction, a checkpoint)
    or for the disk; on this thread that wait delays only the coroutine awaiting the job, and
    the event loop goes on with everything else (safety rule 9).

    `durable=True` (the default) commits at synchronous=FULL: the job's transaction is on the
    disk when `run` returns (an event before the pulse it reports). `durable=False` commits at
    synchronous=NORMAL, and the write-ahead log is flushed as soon as no job is waiting: the
    event is as durable a moment later, without the customer waiting for the flush. A durable
    commit flushes every earlier one with it, since the log is written in order.
    """

    def __init__(self, path: Path, *, name: str = "lockerd-writer",
                 checkpoint_bytes: int = CHECKPOINT_BYTES,
                 checkpoint_jobs: int = CHECKPOINT_JOBS) -> None:
        self._path = path
        self._wal = Path(f"{path}-wal")
        self._jobs: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._checkpointer = threading.Thread(target=self._checkpoints, name=f"{name}-wal",
                                              daemon=True)
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_jobs = checkpoint_jobs
        self._jobs_since_checkpoint = 0
        self._wal_size_at_checkpoint = 0
        self._due = threading.Event()
        self.checkpoints = 0
        """Checkpoints run so far (diagnostics and tests)."""
        self._stopping = False
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._unflushed = False
        self._closed = False

    def start(self) -> None:
        """Start the thread and open its connection; raises what opening raised."""
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error
        self._checkpointer.start()

    async def run(self, fn: Job[T], *, durable: bool = True) -> T:
        """Run `fn(db)` on the writer's thread and return what it returned (or raise what it
        raised). The job runs to its end even if the awaiting task is cancelled."""
        return await self.submit(fn, durable=durable)

    def submit(self, fn: Job[T], *, durable: bool = True,
               after: Callable[[], None] | None = None,
               hold_s: float = 0.0) -> asyncio.Future[T]:
        """Queue `fn(db)` for the writer's thread now; the future gets what it returned (or
        raised). For a caller that hands the wait to another task: the job is on its way
        before that task first runs. `after` (durable jobs only): see `Writer`.

        `hold_s`: the loop's thread then blocks, up to that long, until the job has run (its
        commit, its `after`), and returns either way; the future is settled as usual. For
        the commit a customer waits on (the one before a pulse): the writer's thread, woken
        while the loop's thread still ran, had to wait for the interpreter lock and be woken
        a second time when the loop at last blocked in its poll; the threads then took turns
        at the lock through the job. Held so, it is woken once and runs alone. Only a short
        hold is ever asked for: a slow disk (an SD card's fsync) holds the loop no longer."""
        if self._closed:
            raise RuntimeError("the database writer is closed")
        if after is not None and not durable:
            raise ValueError("`after` follows a durable commit only")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        ran = threading.Event() if hold_s > 0 else None
        self._jobs.put(_Task(fn, durable, loop, future, after, ran))
        if ran is not None:
            ran.wait(hold_s)
        return future

    async def flush(self) -> None:
        """Return once every commit submitted before it is on the disk."""
        await self.run(lambda _db: self._flush(), durable=True)

    def close(self) -> None:
        """Finish the jobs submitted, flush the log, close the connection (blocks)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._stopping = True
        self._due.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()

    # -- the writer's thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            db = open_database(self._path)
        except BaseException as exc:  # noqa: BLE001 - raised again by start()
            self._open_error = exc
            self._opened.set()
            return
        db.wait_for_lock_promptly()
        # Checkpoints are the checkpointer thread's: a commit that ran one would copy
        # megabytes of the log into the database before the pulse it precedes.
        db.conn.execute("PRAGMA wal_autocheckpoint=0")
        self._opened.set()
        synchronous_full = True
        try:
            while True:
                task = self._next()
                if task is None:
                    break
                if task.durable != synchronous_full:
                    synchronous_full = task.durable
                    db.conn.execute(f"PRAGMA synchronous={'FULL' if task.durable else 'NORMAL'}")
                # A durable job that committed flushed the log too; one that only read did
                # not, so it is left for the flush before the next wait (cheap when clean).
                self._unflushed = self._unflushed or not task.durable
                self._run(db, task)
        finally:
            self._flush()
            db.close()

    def _next(self) -> _Task | None:
        """The next job; before blocking for one, the log is flushed if a lazy commit left
        it unflushed."""
        try:
            return self._jobs.get_nowait()
        except queue.Empty:
            pass
        self._flush()
        return self._jobs.get()

    def _run(self, db: Database, task: _Task) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = task.fn(db)
        except BaseException as exc:  # noqa: BLE001 - raised again by the awaiting task
            error = exc
        else:
            # Committed at synchronous=FULL: on the disk. The unlock frame goes out from
            # here, not after the event loop has woken up for it (safety rule 1 holds).
            _call_after(task.after)
        self._wake_checkpointer_if_due()
        # The awaiting task is woken last: from here this thread only looks for the next
        # job and blocks, so the loop's thread (on its way to the pulse) does not wait for
        # the GIL behind this one's bookkeeping or the checkpointer's wake-up. (Woken before
        # the stat of the log instead, a burst pickup on tmpfs was slower in 3 runs of 4,
        # medians 2.9-3.9 ms against 1.7-2.2: the threads take turns at the GIL meanwhile.)
        # A loop already closed has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            task.loop.call_soon_threadsafe(_settle, task.future, result, error)
        if task.ran is not None:  # a loop held in `submit` goes on (and finds the settle)
            task.ran.set()

    def _wake_checkpointer_if_due(self) -> None:
        """Wake the checkpointer once the log has grown by `checkpoint_bytes` since its last
        checkpoint (any connection's commits, another process's too) or this thread has run
        `checkpoint_jobs` jobs since (the log reused from its start does not grow the file).
        Most commits wake nobody: a thread woken at each one would take the GIL just when
        the loop's thread needs it to send the pulse."""
        self._jobs_since_checkpoint += 1
        if self._jobs_since_checkpoint >= self._checkpoint_jobs:
            self._due.set()
            return
        try:
            size = self._wal.stat().st_size
        except FileNotFoundError:
            return
        if size >= self._wal_size_at_checkpoint + self._checkpoint_bytes:
            self._due.set()

    def _checkpoints(self) -> None:
        """Checkpoint (PASSIVE: writers go on meanwhile) on a connection of its own when the
        writer says one is due; woken by commits, never by a timer, so an idle daemon does
        nothing (a `lockerd import-bundle` beside it checkpoints its own pages)."""
        try:
            db = open_database(self._path)
        except StoreError as exc:  # the daemon runs on; the log only grows meanwhile
            log.error("the checkpointer could not open the database", error=str(exc))
            return
        db.conn.execute("PRAGMA wal_autocheckpoint=0")
        try:
            while True:
                self._due.wait()
                if self._stopping:
                    return
                # The mark moves before the wake-up is cleared: a commit meanwhile compares
                # with it and does not ask again for the checkpoint about to run.
                try:
                    self._wal_size_at_checkpoint = self._wal.stat().st_size
                except FileNotFoundError:
                    self._wal_size_at_checkpoint = 0
                self._jobs_since_checkpoint = 0
                self._due.clear()
                try:
                    db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # logged; a later commit wakes it again
                    log.warning("checkpoint failed", error=str(exc))
                self.checkpoints += 1
        finally:
            db.close()

    def _flush(self) -> None:
        if not self._unflushed:
            return
        self._unflushed = False
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: the database file itself was synced
        try:
            os.fdatasync(fd)
        except OSError as exc:
            log.error("could not flush the write-ahead log", error=str(exc))
        finally:
            os.close(fd)


def _call_after(after: Callable[[], None] | None) -> None:
    if after is None:
        return
    try:
        after()
    except Exception as exc:  # noqa: BLE001 - the job's result still reaches its caller
        log.error("the follow-up of a commit failed", error=repr(exc))


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    with contextlib.suppress(asyncio.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
