"""A snapshot's codes built beside the live set in short transactions, then swapped in at once."""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lockerd.errors import TrustError
from lockerd.store.db import CODE_TABLES, Database
from lockerd.store.diskspace import ROW_BYTES, ensure_room, keep_free_of
from lockerd.store.turn import WriteTurn

if TYPE_CHECKING:  # the apply process stages rows and must not import the bundle's crypto
    from lockerd.trust.bundle import CodeEntry

STAGING_TABLE = "codes_staging"
RETIRED_TABLE = "codes_retired"
# Each live table of the code cache (store/db.py CODE_TABLES), the table its next snapshot is
# built in, and the name it has once replaced, until it is emptied.
STAGED = {"codes": STAGING_TABLE, "code_ids": "code_ids_staging",
          "code_parcels": "code_parcels_staging"}
RETIRED = {"codes": RETIRED_TABLE, "code_ids": "code_ids_retired",
           "code_parcels": "code_parcels_retired"}
# The rows of a snapshot as they come are first kept in a side file beside the database (its
# path and this suffix), in tables of the same shapes: there they are sorted by each key as
# they are added, in transactions as large as a call's rows, with no log and no fsync (nothing
# of it is live, the daemon never reads or locks it, and a crash leaves a file the next
# `begin` deletes). The live database then gets each table in its own key order: appended at
# its end, a few pages written per transaction instead of about one per row and key.
SIDE_SUFFIX = "-staging"
# The staging that began last (its token), in meta: the owner of the staging tables.
OWNER_META = "codes_staging_owner"
# The rows of each key table, in the column order of a codes row (entry_row's).
_KEY_COLUMNS = {"codes": (0, 1, 2, 3, 4, 5, 6, 7), "code_ids": (1, 0), "code_parcels": (4, 0)}
# The primary key of each.
_KEYS = {"codes": ("digest",), "code_ids": ("id",), "code_parcels": ("parcel_id", "digest")}
# A fill (or emptying) transaction ends after TXN_WORK_S of work or CHUNK_ROWS rows, whichever
# comes first: a writer waiting for the lock (the daemon's next event) waits for one of these,
# never for the set. Bounded by time, not by rows, as a row's cost grows with the table and
# with the other processes on the CPU: 200 rows held the lock 2-30 ms on a busy 2-core machine.
TXN_WORK_S = 0.001
CHUNK_ROWS = 1000
STAGING_CACHE_KIB = 65536
# A pause between two steps (`_GiveWay`): at least every PAUSE_EVERY_S, and after every
# step where the write lock's doorbell cannot be used.
GAP_S = 0.001
PAUSE_EVERY_S = 0.01
# `add` turns this many entries into rows at a time (a side-file transaction each).
ADD_CHUNK = 10_000
# The staging connection flushes the log it wrote at most this often (`_LogFlusher`).
FLUSH_S = 0.01
# A side table of at most this many rows is dropped in one transaction, not emptied in steps:
# DROP TABLE reads each of its pages once and (without secure_delete) writes none of them,
# 17-29 ms for 100 000 rows (the lock held once), where deleting them in 1 ms steps took
# over 10 s, each row deleted rewriting a page of an index with random keys.
DROP_ROWS = 100_000
# The staging connection's checkpoint threshold (pages of 4 KiB) while it fills or empties a
# side table: each of its transactions rewrites about a page per row, and a checkpoint (two
# fsyncs and the copy) every 1000 pages took most of a fill's time. The log grows to about
# this size at the most, then is written again from its start.
CHECKPOINT_PAGES = 8000
# The most the log grows while a snapshot is copied in (pages of 4 KiB), in a check for disk.
_LOG_BYTES = CHECKPOINT_PAGES * 4096
# The copy checks the disk is not filling up every this many steps (a statvfs each).
ROOM_EVERY_STEPS = 256

# Kept in step with lockerd.store.codes (which imports this module for snapshots).
_COUNT_META = "codes_count"
_FLOOR_RESET_META = "codes_floor_reset"
_DERIVED_PREFIX = "derived:"

# The primary key of each staging and retired table (a retired `codes` of an earlier lockerd
# is keyed by digest too).
_KEY_OF = {name: _KEYS[live] for live in _KEYS for name in (STAGED[live], RETIRED[live])}

REVOKE_BY_ID = (
    # Each by its table's own key: a parcel row by (parcel_id, digest), read from the code
    # before it goes, so that none of them scans a table.
    ("code_parcels",
     "DELETE FROM code_parcels WHERE (parcel_id, digest) IN (SELECT c.parcel_id, c.digest"
     " FROM code_ids i JOIN codes c ON c.digest = i.digest WHERE i.id = ?"
     " AND c.parcel_id IS NOT NULL)"),
    ("codes", "DELETE FROM codes WHERE digest IN (SELECT digest FROM code_ids WHERE id = ?)"),
    ("code_ids", "DELETE FROM code_ids WHERE id = ?"),
)
"""Deleting codes by id, one statement per table, the id last."""

_STALE_USES = ("DELETE FROM code_uses WHERE NOT EXISTS (SELECT 1 FROM codes"
               " WHERE codes.id = code_uses.id AND codes.digest = code_uses.digest)")
_STALE_EXTENSIONS = (
    "DELETE FROM code_extensions WHERE NOT EXISTS (SELECT 1 FROM codes c"
    " WHERE c.id = code_extensions.id AND c.digest = code_extensions.digest"
    " AND c.not_after = code_extensions.base_not_after)")


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """What a snapshot says besides its codes: written with the swap that makes it live."""

    version: int
    issued_at: datetime
    expires_at: datetime
    revoke: tuple[str, ...] = ()


def _epoch(dt: datetime) -> int:
    return int(dt.timestamp())


def entry_row(e: CodeEntry) -> tuple[object, ...]:
    """A code entry as a row of the codes table (digests only, times in epoch seconds)."""
    return (e.digest, e.id, e.kind, e.compartment, e.parcel_id,
            None if e.not_before is None else _epoch(e.not_before), _epoch(e.not_after),
            e.max_uses)


class _LogFlusher:
    """Flushes the write-ahead log to the disk between side-table transactions, outside the
    write lock, once FLUSH_S has passed since its last flush.

    Side tables are written at synchronous=NORMAL: a commit appends its pages to the log and
    returns without waiting for the disk. The daemon's next durable commit (an event before a
    pulse, at synchronous=FULL) fsyncs the same log file, and so would wait for every page the
    staging transactions appended since its last one: megabytes, 10 ms at the median on a
    busy 2-core machine instead of 2 ms. Flushing here keeps that backlog to the pages of the
    last FLUSH_S, and the disk work on the staging side."""

    def __init__(self, db: Database) -> None:
        self._wal = f"{db.path}-wal"
        self._fd: int | None = None
        self._last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last < FLUSH_S:
            return
        self._last = now
        if self._fd is None:
            try:
                self._fd = os.open(self._wal, os.O_RDONLY)
            except FileNotFoundError:  # no log (yet): nothing of ours to flush
                return
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None


def _next_step(rows: int, started: float) -> int:
    """The rows of the next step, from the pace of one that did `rows` since `started`
    (`time.perf_counter`): about TXN_WORK_S of work, 10 to CHUNK_ROWS rows."""
    took = max(time.perf_counter() - started, 1e-6)
    return max(10, min(CHUNK_ROWS, int(rows * TXN_WORK_S / took)))


class _GiveWay:
    """Between two side-table transactions: flush what the last one wrote to the log
    (`_LogFlusher`), and let a writer that waits for the lock (the daemon's, retrying every
    half millisecond) take it before the next one begins: while it rings the write lock's
    doorbell (store/turn.py, rung by every `Database.transaction`), wait until it is done.

    Besides, a pause of GAP_S at least every PAUSE_EVERY_S, for a writer that does not ring
    (not lockerd's: the sqlite3 shell, say), whose busy handler retries at moments of its own;
    and after every step where there is no doorbell (the state directory read-only to this
    process), as before there was one."""

    def __init__(self, db: Database, *, pause_every_s: float = PAUSE_EVERY_S) -> None:
        self.flush = _LogFlusher(db)
        self._turn = WriteTurn(db.path)
        self._pause_every_s = pause_every_s
        self._paused = time.monotonic()
        # How often it stepped aside for a writer, and paused GAP_S (the tests read them).
        self.stepped_aside = 0
        self.pauses = 0

    def __call__(self) -> None:
        self.flush()
        stepped_aside = self._turn.step_aside()
        self.stepped_aside += bool(stepped_aside)
        if stepped_aside is None or time.monotonic() - self._paused >= self._pause_every_s:
            time.sleep(GAP_S)
            self.pauses += 1
            self._paused = time.monotonic()

    def close(self) -> None:
        self.flush.close()
        self._turn.close()


class _Rows:
    """Rows `row_at(i)` for i from `start` below `count`, for one fill transaction's
    executemany: it stops after TXN_WORK_S (from its first row) or CHUNK_ROWS rows; `next` is
    the first not given."""

    def __init__(self, row_at: Callable[[int], tuple[object, ...]], count: int,
                 start: int) -> None:
        self._row_at = row_at
        self._start = start
        self.next = start
        self._end = min(count, start + CHUNK_ROWS)
        self._deadline = 0.0

    def __iter__(self) -> _Rows:
        return self

    def __next__(self) -> tuple[object, ...]:
        # The clock starts at the first row (executemany takes an iterator as it is, without
        # calling __iter__); at least one row per transaction, so a fill always moves on.
        if self.next == self._start:
            self._deadline = time.perf_counter() + TXN_WORK_S
        elif self.next >= self._end or time.perf_counter() > self._deadline:
            raise StopIteration
        row = self._row_at(self.next)
        self.next += 1
        return row


@contextmanager
def _side_table_settings(db: Database) -> Iterator[_GiveWay]:
    """The connection's settings while it fills or empties a side table, restored after.

    synchronous=NORMAL: nothing of a side table is live, and a crash leaves leftovers the next
    `begin` discards. secure_delete=FAST: the rows deleted are those of a snapshot replaced or
    never made live (digests only), and SQLite built with SECURE_DELETE (as Debian's is) would
    otherwise write every page a DROP TABLE frees. The checkpoint threshold: CHECKPOINT_PAGES.
    Yields what to call between transactions (`_GiveWay`)."""
    conn = db.conn
    give_way = _GiveWay(db)
    secure = conn.execute("PRAGMA secure_delete").fetchone()[0]
    checkpoint = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA secure_delete=FAST")
    conn.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
    try:
        yield give_way
    finally:
        give_way.close()
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA secure_delete={int(secure)}")
        conn.execute(f"PRAGMA wal_autocheckpoint={int(checkpoint)}")


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                       (name,)).fetchone()
    return row is not None


def rows_for(table: str, rows: Iterable[tuple[object, ...]]) -> Iterator[tuple[object, ...]]:
    """The rows of code table `table` (store/db.py CODE_TABLES) for codes rows (entry_row's):
    a parcel row for each code that names a parcel."""
    if table == "codes":
        yield from rows
        return
    first, second = _KEY_COLUMNS[table]
    for row in rows:
        if row[first] is not None:
            yield row[first], row[second]


def _malformed(version: int, table: str, exc: sqlite3.IntegrityError) -> TrustError:
    what = ("gives the same code id to two codes" if table == "code_ids" else
            "gives the same digest to two code ids (two codes with the same plain code)")
    return TrustError(f"codes bundle version {version} {what}: {exc}", reason="malformed")


def _disk_full(version: int, exc: sqlite3.OperationalError) -> TrustError:
    """The refusal of a snapshot the disk filled up under (SQLITE_FULL)."""
    return TrustError(f"codes bundle version {version} filled the disk as it was staged "
                      f"({exc}): free space on that filesystem, or raise [codes] "
                      "keep_free_mb so that a snapshot is refused before", reason="no_space")


class CodeStaging:
    """A snapshot's code rows built in tables beside the live codes (STAGED), then swapped in.

    Every call blocks (a worker thread's, with a `Database` of its own). `add` keeps the rows
    in a side file (SIDE_SUFFIX) sorted by each key; `swap` copies each table into the
    database in its key order, in short transactions at synchronous=NORMAL (until the swap
    nothing of it is live, and a crash leaves only leftovers that the next `begin` discards),
    then makes them live in one short transaction at synchronous=FULL: the renames, the
    snapshot's meta and its event.
    """

    def __init__(self, db: Database, *, cache_kib: int = STAGING_CACHE_KIB,
                 on_rows: Callable[[int], object] | None = None,
                 drop_rows: int = DROP_ROWS) -> None:
        # `cache_kib`: the page cache while filling (of the database and of the side file);
        # a receiver bounded in memory (snapshots in parts, services/parts.py) asks for less
        # than the default. `on_rows(n)`: called after each `add` with the rows staged so far
        # (an apply process reports its progress with it, lockerd/apply/child.py).
        # `drop_rows`: DROP_ROWS.
        self._db = db
        self._drop_rows = drop_rows
        self._cache_kib = cache_kib
        self._on_rows = on_rows
        self._version: int | None = None
        self._count = 0
        self._side: sqlite3.Connection | None = None
        self._token = ""
        self._side_path: Path | None = None
        self._keep_free = 0

    def begin(self, version: int, *, rows: int | None = None) -> None:
        """Discard any leftovers (tables and side files of a crashed fill or of another
        snapshot staged in another process, a retired set not yet emptied) and create empty
        staging tables for snapshot `version`, owned by this staging (OWNER_META): another
        that staged before finds its `add` and `swap` refused.

        Disk: a snapshot is refused, TrustError(reason="no_space"), when staging it would
        leave less than [codes] keep_free_mb free (lockerd/store/diskspace.py): here when
        `rows` (the snapshot's codes, if known) cannot fit, and at each `add` and before
        the copy of `swap` as it goes."""
        self.discard()
        self._retire_leftovers()
        for old in self._db.path.parent.glob(f"{self._db.path.name}{SIDE_SUFFIX}*"):
            old.unlink(missing_ok=True)
        self._keep_free = keep_free_of(self._db)
        if rows is not None:
            # The side file and the staging tables, and a log that may grow to its bound.
            self._ensure_room(2 * rows * ROW_BYTES + _LOG_BYTES, version)
        self._token = secrets.token_hex(8)
        self._side_path = Path(f"{self._db.path}{SIDE_SUFFIX}-{self._token}")
        conn = self._db.conn
        with self._db.transaction():
            for live, staged in STAGED.items():
                conn.execute(CODE_TABLES[live].format(table=staged))
            self._db.set_meta(OWNER_META, self._token, conn=conn)
        side = sqlite3.connect(self._side_path, isolation_level=None, check_same_thread=False)
        side.execute("PRAGMA journal_mode=OFF")
        side.execute("PRAGMA synchronous=OFF")
        side.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        for live, table in CODE_TABLES.items():
            side.execute(table.format(table=live))
        self._side = side
        self._version = version
        self._count = 0

    def _ensure_room(self, need_bytes: int, version: int) -> None:
        ensure_room(self._db, need_bytes, version=version, keep_free_bytes=self._keep_free)

    def _check_owner(self) -> None:
        """sqlite3.OperationalError if another staging has begun since this one did."""
        if self._db.get_meta(OWNER_META) != self._token:
            raise sqlite3.OperationalError(
                "the staging tables were taken by another snapshot staged since")

    def add(self, entries: Sequence[CodeEntry]) -> None:
        """Add code rows. A digest (or an id) given twice, here or in an earlier `add`, is
        refused as a malformed snapshot: TrustError(reason="malformed"). After any error the
        staging is over (the side file has no journal to roll a failed `add` back): `discard`,
        then `begin` again."""
        self._require()  # refused before `begin` even when there is nothing to add
        # Each chunk's rows are made once, not once per table they go to.
        for start in range(0, len(entries), ADD_CHUNK):
            self.add_rows([entry_row(e) for e in entries[start:start + ADD_CHUNK]])

    def add_rows(self, rows: Sequence[tuple[object, ...]]) -> None:
        """`add` for entries already in the table's shape (`entry_row`'s): a part decoded
        straight to rows (lockerd/trust/partwire.py)."""
        self._add(len(rows), lambda: iter(rows))

    def _add(self, count: int, rows: Callable[[], Iterator[tuple[object, ...]]]) -> None:
        version = self._require()
        side = self._side
        assert side is not None
        try:
            self._ensure_room(count * ROW_BYTES, version)
            self._check_owner()
            side.execute("BEGIN")
            for table in CODE_TABLES:
                try:
                    side.executemany(f"INSERT INTO {table} VALUES"
                                     f" ({', '.join('?' * len(_KEY_COLUMNS[table]))})",
                                     rows_for(table, rows()))
                except sqlite3.IntegrityError as exc:
                    raise _malformed(version, table, exc) from exc
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                        raise _disk_full(version, exc) from exc
                    raise
            side.execute("COMMIT")
        except BaseException:
            self._version = None
            self._close_side()
            raise
        self._count += count
        if self._on_rows is not None:
            self._on_rows(self._count)

    def _build(self) -> None:
        """Copy each side table into its staging table in key order, in transactions of about
        TXN_WORK_S (a step's rows from the last step's pace, at most CHUNK_ROWS): each
        appends to its table's last pages. One INSERT ... SELECT per step, on the side file
        attached, so that no row passes through Python."""
        # The fill's connection to the side file is done: its page cache (up to cache_kib)
        # is freed before the database's fills, so the two are not held at once.
        if self._side is not None:
            self._side.close()
            self._side = None
        conn = self._db.conn
        conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        path = self._side_path
        if path is None or not path.exists():  # deleted by a staging begun since
            self._check_owner()
            raise RuntimeError(f"the staged rows' side file {path} is gone")
        # The copy takes about what the side file takes, and the log may grow to its bound.
        self._ensure_room(path.stat().st_size + _LOG_BYTES, self._require())
        conn.execute("ATTACH DATABASE ? AS side", (str(path),))
        try:
            with _side_table_settings(self._db) as give_way:
                for live, staged in STAGED.items():
                    self._copy(live, staged, give_way)
        finally:
            conn.execute("DETACH DATABASE side")

    def _copy(self, live: str, staged: str, give_way: _GiveWay) -> None:
        conn = self._db.conn
        key = ", ".join(_KEYS[live])
        newest = ", ".join(f"{k} DESC" for k in _KEYS[live])
        after = f"({key}) > ({', '.join('?' * len(_KEYS[live]))})"
        last: tuple[object, ...] | None = None
        step = 100
        steps = 0
        while True:
            steps += 1
            if steps % ROOM_EVERY_STEPS == 0:  # others write to this disk too
                self._ensure_room(0, self._require())
            started = time.perf_counter()
            with self._db.transaction():
                self._check_owner()  # no step into the tables of a staging begun since
                where = "" if last is None else f"WHERE {after}"
                copied = conn.execute(
                    f"INSERT INTO {staged} SELECT * FROM side.{live} {where}"
                    f" ORDER BY {key} LIMIT {step}", last or ()).rowcount
                if copied:
                    last = tuple(conn.execute(
                        f"SELECT {key} FROM {staged} ORDER BY {newest} LIMIT 1").fetchone())
            if copied < step:
                return
            step = _next_step(copied, started)
            give_way()

    def swap(self, meta: SnapshotMeta, *,
             with_event: Callable[[sqlite3.Connection], object] | None = None) -> int:
        """Make the staged rows the live codes in one short transaction, with what `apply`
        writes for a snapshot (meta, stale uses and extensions, revoked derived codes) and
        the event `with_event` appends. Returns the number of codes after it. The set it
        replaced is emptied afterwards in short transactions."""
        version = self._require()
        if meta.version != version:
            raise ValueError(f"staging holds snapshot version {version}, not {meta.version}")
        try:
            self._build()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise _disk_full(version, exc) from exc
            raise
        self._close_side()
        conn = self._db.conn
        conn.execute("PRAGMA synchronous=FULL")
        revoked = [(i,) for i in dict.fromkeys(meta.revoke)]
        with self._db.transaction():
            self._check_owner()
            conn.execute("DELETE FROM meta WHERE key = ?", (OWNER_META,))
            for live, staged in STAGED.items():
                conn.execute(f"ALTER TABLE {live} RENAME TO {RETIRED[live]}")
                conn.execute(f"ALTER TABLE {staged} RENAME TO {live}")
            count = self._count
            for table, sql in REVOKE_BY_ID:
                gone = conn.executemany(sql, revoked).rowcount
                if table == "codes":
                    count -= gone
            # A use stays recorded while the same (id, digest) is still issued; an extension
            # while its not_after is still the bundle's (and is then carried onto the row).
            conn.execute(_STALE_USES)
            conn.execute(_STALE_EXTENSIONS)
            conn.executemany(
                "UPDATE codes SET not_after = not_after + ? WHERE digest = ? AND id = ?",
                conn.execute("SELECT extended_s, digest, id FROM code_extensions").fetchall())
            conn.executemany("INSERT OR IGNORE INTO revoked_derived VALUES (?, ?)",
                             [(i.removeprefix(_DERIVED_PREFIX), version)
                              for (i,) in revoked if i.startswith(_DERIVED_PREFIX)])
            self._db.set_meta(_COUNT_META, count, conn=conn)
            self._db.set_meta("codes_version", version, conn=conn)
            # A snapshot is the new floor.
            conn.execute("DELETE FROM meta WHERE key = ?", (_FLOOR_RESET_META,))
            self._db.set_meta("codes_expires_at", _epoch(meta.expires_at), conn=conn)
            self._db.set_meta("codes_issued_at", _epoch(meta.issued_at), conn=conn)
            if with_event is not None:
                with_event(conn)
        self._version = None
        self._retire_leftovers()
        return count

    def discard(self) -> None:
        """Drop the staging tables (whoever began them) and this staging's side file."""
        self._version = None
        self._count = 0
        self._close_side()
        for staged in STAGED.values():
            self._empty(staged)

    def _close_side(self) -> None:
        """Close and delete this staging's side file."""
        if self._side is not None:
            self._side.close()
            self._side = None
        if self._side_path is not None:
            self._side_path.unlink(missing_ok=True)

    def _require(self) -> int:
        if self._version is None:
            raise RuntimeError("no snapshot is being staged: call begin() first")
        return self._version

    def _retire_leftovers(self) -> None:
        for retired in RETIRED.values():
            self._empty(retired)

    def _empty(self, table: str) -> None:
        """Delete a side table's rows in short steps down to `drop_rows`, then drop it."""
        conn = self._db.conn
        # SQLite's default page cache: dropping reads every page once, through a small cache
        # as fast as through a big one.
        conn.execute("PRAGMA cache_size=-2000")
        if not _table_exists(conn, table):
            return
        key = ", ".join(_KEY_OF[table])
        with _side_table_settings(self._db) as give_way:
            left = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            step = 100
            while left > self._drop_rows:
                started = time.perf_counter()
                limit = min(step, left - self._drop_rows)
                with self._db.transaction():
                    # The first rows in key order: neighbours, on the table's first pages.
                    gone = conn.execute(
                        f"DELETE FROM {table} WHERE ({key}) IN"
                        f" (SELECT {key} FROM {table} ORDER BY {key} LIMIT {limit})").rowcount
                step = _next_step(gone, started)
                left -= gone
                if gone == 0:
                    break
                give_way()
            with self._db.transaction():
                conn.execute(f"DROP TABLE {table}")
