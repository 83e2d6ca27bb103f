"""One SQLite database file per bank: connection, pragmas, schema, transactions, settings."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lockerd.errors import StoreError
from lockerd.store.turn import WriteTurn

SCHEMA_VERSION = 1
RETRY_S = 0.0005
BUSY_TIMEOUT_MS = 10_000

# The code cache: one row per code, keyed by digest (the lookup of an entered code), and two
# key tables beside it for what is found by code id (deltas, revocations; an id is given to
# one code only) and by parcel (support codes, help at the locker). They are tables, not
# indexes of `codes`, so that a snapshot can be built beside the live set with each of the
# three filled in its own key order (lockerd/store/staging.py): an index is written in the
# order its table's rows come, and rows in digest order put the id and parcel keys at random
# pages, about a page written to the log per row and key. A snapshot is built in tables of the
# same shapes and renamed into their places. (A database of an earlier lockerd keeps its
# `codes` table, with a UNIQUE id index, until its next snapshot replaces it.)
CODES_TABLE = """CREATE TABLE {table} (
    digest      TEXT PRIMARY KEY,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL,
    compartment TEXT,
    parcel_id   TEXT,
    not_before  INTEGER,
    not_after   INTEGER NOT NULL,
    max_uses    INTEGER NOT NULL
) WITHOUT ROWID"""
CODE_IDS_TABLE = """CREATE TABLE {table} (
    id     TEXT PRIMARY KEY,
    digest TEXT NOT NULL
) WITHOUT ROWID"""
CODE_PARCELS_TABLE = """CREATE TABLE {table} (
    parcel_id TEXT NOT NULL,
    digest    TEXT NOT NULL,
    PRIMARY KEY (parcel_id, digest)
) WITHOUT ROWID"""
# The live tables of the code cache, each with the CREATE TABLE of its shape.
CODE_TABLES = {"codes": CODES_TABLE, "code_ids": CODE_IDS_TABLE,
               "code_parcels": CODE_PARCELS_TABLE}

# One database, so that consuming a code and recording its event are one transaction: no code
# is ever consumed without its event, and no event claims a consumption that did not happen.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- The outbox. AUTOINCREMENT: a seq is never reused, even after the rows are pruned.
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    at           TEXT NOT NULL,
    compartment  TEXT,
    code_id      TEXT,
    data         TEXT NOT NULL,
    class        TEXT NOT NULL DEFAULT 'access',
    published_at TEXT
);

-- The code cache: digests only, never plain codes.
{codes_table};

-- Every verified remote command, written BEFORE it runs: at most once, even across crashes.
CREATE TABLE IF NOT EXISTS commands (
    cmd_id      TEXT PRIMARY KEY,
    action      TEXT NOT NULL,
    status      TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    received_at TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    result_sent INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Local consumption, keyed by id AND digest: the same id with a new digest is a new code.
CREATE TABLE IF NOT EXISTS code_uses (
    id     TEXT NOT NULL,
    digest TEXT NOT NULL,
    uses   INTEGER NOT NULL,
    PRIMARY KEY (id, digest)
) WITHOUT ROWID;

-- Tables added after the first release are additive (CREATE IF NOT EXISTS), so a database
-- of an older lockerd opens unchanged and keeps schema_version 1.

-- Parcels deposited here and not yet picked up: what derived pickup codes are checked against.
CREATE TABLE IF NOT EXISTS parcels (
    compartment  TEXT PRIMARY KEY,
    parcel_id    TEXT NOT NULL,
    code_id      TEXT,
    deposited_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS parcels_by_id ON parcels (parcel_id);

-- QR tokens spent on this locker, by cti; kept until they have expired anyway.
CREATE TABLE IF NOT EXISTS spent_tokens (
    cti     TEXT PRIMARY KEY,
    expires INTEGER NOT NULL
) WITHOUT ROWID;

-- Derived pickup codes a bundle revoked (id "derived:<parcel_id>"). Revocation is for good:
-- a later snapshot that does not repeat it does not bring the code back.
CREATE TABLE IF NOT EXISTS revoked_derived (
    parcel_id TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
) WITHOUT ROWID;

-- Support codes used here, once per (parcel, 10-minute window); written with the
-- pickup.opened that used one, removed with a pickup.incomplete that gives it back.
CREATE TABLE IF NOT EXISTS support_uses (
    parcel_id TEXT NOT NULL,
    window    INTEGER NOT NULL,
    PRIMARY KEY (parcel_id, window)
) WITHOUT ROWID;
-- Local extensions of a code's not_after (downtime, out of service), for the not_after the
-- bundle set: a bundle that sets another not_after for the code replaces the extension.
CREATE TABLE IF NOT EXISTS code_extensions (
    id             TEXT NOT NULL,
    digest         TEXT NOT NULL,
    base_not_after INTEGER NOT NULL,
    extended_s     INTEGER NOT NULL,
    PRIMARY KEY (id, digest)
) WITHOUT ROWID;
""".format(codes_table=CODES_TABLE.format(table="IF NOT EXISTS codes"))


def _add_key_tables(conn: sqlite3.Connection) -> None:
    """Create the key tables of a new database, or give a database of an earlier lockerd
    (codes with a UNIQUE id and a parcel index) the key tables filled from its codes: once,
    in one transaction, when it is first opened."""
    have = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if {"code_ids", "code_parcels"} <= have:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(CODE_IDS_TABLE.format(table="code_ids"))
        conn.execute(CODE_PARCELS_TABLE.format(table="code_parcels"))
        conn.execute("INSERT INTO code_ids SELECT id, digest FROM codes")
        conn.execute("INSERT INTO code_parcels SELECT parcel_id, digest FROM codes"
                     " WHERE parcel_id IS NOT NULL")
        for name in ("codes_by_parcel", "codes_by_parcel_b"):  # the parcel index they had
            conn.execute(f"DROP INDEX IF EXISTS {name}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    """A connection with the pragmas lockerd relies on. Not shared between threads."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        # Set by `wait_for_lock_promptly`: BEGIN IMMEDIATE retried every RETRY_S instead of
        # SQLite's busy handler, whose sleeps grow to 100 ms between tries.
        self._lock_wait_s: float | None = None
        # Rung by every transaction (store/turn.py): a snapshot's copy in short steps lets
        # each of them in before its next step.
        self._turn = WriteTurn(path)

    def wait_for_lock_promptly(self, timeout_s: float = 10.0) -> None:
        """Take the write lock as soon as another connection's transaction ends (for the
        daemon's writer thread, which must not sleep 25-100 ms in SQLite's busy handler
        while a snapshot is staged in short transactions): BEGIN IMMEDIATE without the
        busy handler, retried every RETRY_S, for up to `timeout_s`.

        The connection then has no busy handler at all, and every write on it must be in
        `transaction()`. Nothing else on it waits for a lock: in WAL mode, statements inside
        BEGIN IMMEDIATE hold every lock they need, and a read outside one retries a race
        with a commit or a checkpoint inside SQLite itself (walTryBeginRead). Only a read
        while another connection rebuilds the log index (recovery, when the database is
        first opened after a crash with no connection left) would fail at once instead of
        waiting. (Switching the busy timeout off and on again around each BEGIN cost two
        statements on the way to every pulse: about 40 us of a cold pickup's 80 here.)"""
        self._lock_wait_s = timeout_s
        self.conn.execute("PRAGMA busy_timeout=0")

    def _begin(self) -> None:
        if self._lock_wait_s is None:
            self.conn.execute("BEGIN IMMEDIATE")
            return
        deadline = time.monotonic() + self._lock_wait_s
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(RETRY_S)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
        # Rung before BEGIN, let go after COMMIT: a copy looking between two of its steps
        # sees a writer that waits for the lock as well as one that holds it.
        rang = self._turn.ring()
        try:
            self._begin()
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
        finally:
            if rang:
                self._turn.release()

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any, *, conn: sqlite3.Connection | None = None) -> None:
        """Write one setting; inside a transaction pass its connection, else it commits alone."""
        sql = ("INSERT INTO meta (key, value) VALUES (?, ?)"
               " ON CONFLICT(key) DO UPDATE SET value = excluded.value")
        if conn is not None:
            conn.execute(sql, (key, json.dumps(value)))
            return
        with self.transaction() as c:
            c.execute(sql, (key, json.dumps(value)))

    def integrity_ok(self) -> bool:
        row = self.conn.execute("PRAGMA integrity_check").fetchone()
        return bool(row and row[0] == "ok")

    def close(self) -> None:
        self.conn.close()
        self._turn.close()


def open_database(path: Path) -> Database:
    """Open (creating if needed) the bank's database with WAL and synchronous=FULL."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits by surprise.
        conn = sqlite3.connect(path, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
        _add_key_tables(conn)
        db = Database(conn, path)
        version = db.get_meta("schema_version")
        if version is None:
            db.set_meta("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise StoreError(
                f"{path}: database schema version {version}, this lockerd expects "
                f"{SCHEMA_VERSION}"
            )
        return db
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot open the database: {exc}") from exc
