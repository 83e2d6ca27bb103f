"""A snapshot built beside the live codes: fill in short transactions, one swap, discard, refuse."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from lockerd.errors import TrustError
from lockerd.store import CodeStore, Database, EventLog, open_database
from lockerd.store.db import CODES_TABLE
from lockerd.store.staging import (
    ADD_CHUNK,
    CHUNK_ROWS,
    RETIRED,
    RETIRED_TABLE,
    SIDE_SUFFIX,
    STAGED,
    STAGING_TABLE,
    CodeStaging,
    SnapshotMeta,
)
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodeEntry, CodesBundle

pytestmark = pytest.mark.unit

NOW = utcnow()


def entry(i: int, *, parcel: str | None = None) -> CodeEntry:
    return CodeEntry(id=f"c-{i}", kind="pickup", digest=f"{i:064x}",
                     not_after=NOW + timedelta(days=1), compartment="1", parcel_id=parcel)


def meta(version: int, revoke: tuple[str, ...] = ()) -> SnapshotMeta:
    return SnapshotMeta(version=version, issued_at=NOW, expires_at=NOW + timedelta(days=1),
                        revoke=revoke)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return open_database(tmp_path / "lockerd.db")


def tables(db: Database) -> set[str]:
    return {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def side_files(db: Database) -> list[Path]:
    return list(db.path.parent.glob(f"{db.path.name}{SIDE_SUFFIX}*"))


def live(db: Database) -> int:
    return int(db.conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0])


def held(db: Database, n: int) -> None:
    CodeStore(db).apply(CodesBundle(
        locker_id="L1", version=1, base_version=None, issued_at=NOW,
        expires_at=NOW + timedelta(days=1), upsert=tuple(entry(i) for i in range(n)),
        revoke=()))


def test_parts_fill_the_staging_table_and_one_swap_makes_them_live(db: Database) -> None:
    held(db, 10)
    events = EventLog(db)
    staging = CodeStaging(db)
    staging.begin(2)
    staging.add([entry(i, parcel=f"P{i}") for i in range(100, 100 + CHUNK_ROWS + 5)])
    staging.add([entry(i) for i in range(5000, 5010)])
    # Nothing of it is live before the swap.
    codes = CodeStore(db)
    assert live(db) == 10 and codes.version() == 1
    assert codes.lookup(f"{100:064x}") is None
    count = staging.swap(meta(2), with_event=lambda conn: events.append(
        conn, type="cache.updated", at=NOW, data={"version": 2}))
    assert count == CHUNK_ROWS + 15 == live(db) == codes.count()
    assert codes.version() == 2
    assert codes.lookup(f"{100:064x}") is not None and codes.lookup(f"{1:064x}") is None
    assert codes.parcel_pickup_code("P101") is not None
    assert [e.type for e in events.recent(5)] == ["cache.updated"]
    assert STAGING_TABLE not in tables(db) and RETIRED_TABLE not in tables(db)
    assert db.integrity_ok()


def test_the_key_tables_move_with_the_codes_and_find_what_they_key(tmp_path: Path) -> None:
    db = open_database(tmp_path / "lockerd.db")
    for version in (1, 2, 3):
        staging = CodeStaging(db)
        staging.begin(version)
        staging.add([entry(i, parcel="P" if i < 3 else None) for i in range(version, 6)])
        assert len(side_files(db)) == 1
        staging.swap(meta(version, revoke=("c-4",)))
        assert not side_files(db)
        left = set(STAGED.values()) | set(RETIRED.values())
        assert not left & tables(db)
    # Version 3 held c-3, c-4 and c-5, less c-4 (revoked); none of them names a parcel.
    ids = db.conn.execute("SELECT id FROM code_ids ORDER BY id").fetchall()
    assert ids == [("c-3",), ("c-5",)]
    assert db.conn.execute("SELECT COUNT(*) FROM code_parcels").fetchone()[0] == 0
    assert CodeStore(db).parcel_pickup_code("P") is None
    staging = CodeStaging(db)
    staging.begin(4)
    staging.add([entry(i, parcel="P") for i in (7, 8)])
    staging.swap(meta(4))
    record = CodeStore(db).parcel_pickup_code("P")
    assert record is not None and record.id == "c-7"
    assert CodeStore(db).parcels_with_pickup_codes() == ("P",)
    plan = str(db.conn.execute("EXPLAIN QUERY PLAN SELECT digest FROM code_parcels"
                               " WHERE parcel_id = 'P'").fetchall())
    assert "SEARCH" in plan
    assert db.integrity_ok()
    db.close()


def test_a_database_of_an_earlier_lockerd_gets_its_key_tables(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    db = open_database(path)
    db.conn.executescript("DROP TABLE codes; DROP TABLE code_ids; DROP TABLE code_parcels;")
    # The codes table as an earlier lockerd made it: a UNIQUE id and a parcel index.
    db.conn.execute(CODES_TABLE.format(table="codes").replace("id          TEXT NOT NULL,",
                                                               "id TEXT NOT NULL UNIQUE,"))
    db.conn.execute("CREATE INDEX codes_by_parcel ON codes (parcel_id)"
                    " WHERE parcel_id IS NOT NULL")
    db.conn.executemany("INSERT INTO codes VALUES (?, ?, 'pickup', '1', ?, NULL, ?, 1)",
                        [(f"{i:064x}", f"c-{i}", "P" if i == 2 else None, 2_000_000_000)
                         for i in range(4)])
    db.close()
    again = open_database(path)
    codes = CodeStore(again)
    record = codes.parcel_pickup_code("P")
    assert record is not None and record.id == "c-2"
    assert again.conn.execute("SELECT COUNT(*) FROM code_ids").fetchone()[0] == 4
    assert "codes_by_parcel" not in {r[0] for r in again.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index'")}
    # A delta revoking by id finds the code through the key table.
    codes.apply(CodesBundle(locker_id="L1", version=2, base_version=0, issued_at=NOW,
                            expires_at=NOW + timedelta(days=1), upsert=(), revoke=("c-2",)))
    assert codes.lookup(f"{2:064x}") is None and codes.parcel_pickup_code("P") is None
    assert live(again) == 3
    again.close()


def test_an_id_given_twice_is_malformed_and_says_so(db: Database) -> None:
    held(db, 5)
    staging = CodeStaging(db)
    staging.begin(2)
    staging.add([entry(100)])
    twice = CodeEntry(id="c-100", kind="pickup", digest=f"{999:064x}",
                      not_after=NOW + timedelta(days=1))
    with pytest.raises(TrustError, match="same code id to two codes") as err:
        staging.add([twice])
    assert err.value.reason == "malformed"
    staging.discard()
    assert live(db) == 5 and not side_files(db)


def test_a_digest_given_twice_across_parts_is_malformed_and_nothing_changes(
        db: Database) -> None:
    held(db, 5)
    staging = CodeStaging(db)
    staging.begin(2)
    staging.add([entry(i) for i in range(100, 110)])
    twice = CodeEntry(id="other", kind="pickup", digest=f"{105:064x}",
                      not_after=NOW + timedelta(days=1))
    with pytest.raises(TrustError) as err:
        staging.add([twice])
    assert err.value.reason == "malformed"
    staging.discard()
    assert live(db) == 5 and CodeStore(db).version() == 1
    assert STAGING_TABLE not in tables(db)
    with pytest.raises(RuntimeError, match="begin"):
        staging.swap(meta(2))


def test_one_add_of_more_than_a_chunk_checks_across_its_chunks(db: Database) -> None:
    """`add` stages its entries a chunk at a time: a digest given again in a later chunk of
    the same call is still refused, and a clean call stages every entry with its parcel."""
    staging = CodeStaging(db)
    staging.begin(2)
    entries = [entry(i, parcel=f"PX{i}") for i in range(ADD_CHUNK + 5)]
    twice = CodeEntry(id="other", kind="pickup", digest=entries[3].digest,
                      not_after=NOW + timedelta(days=1))
    with pytest.raises(TrustError) as err:
        staging.add([*entries, twice])
    assert err.value.reason == "malformed"
    staging.discard()
    staging.begin(2)
    staging.add(entries)
    assert staging.swap(meta(2)) == ADD_CHUNK + 5
    assert CodeStore(db).parcel_pickup_code(f"PX{ADD_CHUNK + 4}") is not None


def test_add_before_begin_is_refused_even_with_nothing_to_add(db: Database) -> None:
    with pytest.raises(RuntimeError, match="begin"):
        CodeStaging(db).add([])


def test_a_malformed_snapshot_through_apply_leaves_the_live_set(db: Database) -> None:
    held(db, 5)
    bad = CodesBundle(locker_id="L1", version=2, base_version=None, issued_at=NOW,
                      expires_at=NOW + timedelta(days=1),
                      upsert=(entry(100), CodeEntry(id="x", kind="pickup", digest=f"{100:064x}",
                                                    not_after=NOW + timedelta(days=1))),
                      revoke=())
    with pytest.raises(TrustError) as err:
        CodeStore(db).apply(bad)
    assert err.value.reason == "malformed"
    assert live(db) == 5 and CodeStore(db).version() == 1 and CodeStore(db).count() == 5
    assert STAGING_TABLE not in tables(db)


def test_begin_discards_what_a_crashed_fill_left(tmp_path: Path) -> None:
    db = open_database(tmp_path / "lockerd.db")
    held(db, 3)
    crashed = CodeStaging(db)
    crashed.begin(7)
    crashed.add([entry(i) for i in range(100, 100 + 3 * CHUNK_ROWS)])
    db.close()  # as a kill would leave it: the staging table on the disk
    db = open_database(tmp_path / "lockerd.db")
    assert STAGING_TABLE in tables(db) and live(db) == 3
    staging = CodeStaging(db)
    staging.begin(8)
    staging.add([entry(1)])
    assert staging.swap(meta(8)) == 1 == live(db)
    db.close()


def test_the_swap_keeps_uses_of_codes_still_issued_and_revokes(db: Database) -> None:
    held(db, 3)
    codes = CodeStore(db)
    with db.transaction() as conn:
        codes.change_uses(conn, "c-0", f"{0:064x}", +1)
        codes.change_uses(conn, "c-1", f"{1:064x}", +1)
    staging = CodeStaging(db)
    staging.begin(2)
    staging.add([entry(0), entry(2)])
    assert staging.swap(meta(2, revoke=("c-2", "derived:PX9"))) == 1
    record = codes.lookup(f"{0:064x}")
    assert record is not None and record.uses == 1
    assert codes.lookup(f"{2:064x}") is None
    assert db.conn.execute("SELECT id FROM code_uses").fetchall() == [("c-0",)]
    assert codes.derived_revoked("PX9")


def test_a_swap_for_another_version_is_refused(db: Database) -> None:
    staging = CodeStaging(db)
    staging.begin(3)
    with pytest.raises(ValueError, match="version 3"):
        staging.swap(meta(4))
    staging.discard()


def test_a_writer_commits_between_the_fill_transactions(tmp_path: Path) -> None:
    """Another connection's commits go on while a snapshot is filled: each waits for one
    fill transaction at the most, never for the fill, and none is refused as locked."""
    path = tmp_path / "lockerd.db"
    db = open_database(path)
    held(db, 1)
    other = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    n = 40 * CHUNK_ROWS
    done = threading.Event()
    commits: list[int] = []

    def fill() -> None:
        worker = open_database(path)
        try:
            staging = CodeStaging(worker)
            staging.begin(2)
            staging.add([entry(i) for i in range(10, 10 + n)])
            staging.swap(meta(2))
        finally:
            worker.close()
            done.set()

    thread = threading.Thread(target=fill)
    thread.start()
    try:
        # At a pace like the daemon's (events come a few milliseconds apart at the most); a
        # writer in a tight loop would starve the fill instead, SQLite's lock being unfair.
        while not done.wait(0.002):
            other.execute("BEGIN IMMEDIATE")
            other.execute("INSERT INTO meta VALUES ('probe', '1') ON CONFLICT(key)"
                          " DO UPDATE SET value = value + 1")
            other.execute("COMMIT")
            commits.append(1)
    finally:
        thread.join()
        other.close()
    assert live(db) == n and commits
    db.close()


def side_settings(db: Database) -> tuple[int, int, int]:
    conn = db.conn
    return (int(conn.execute("PRAGMA synchronous").fetchone()[0]),
            int(conn.execute("PRAGMA secure_delete").fetchone()[0]),
            int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]))


def test_a_retired_set_over_drop_rows_is_emptied_in_steps_then_dropped(db: Database) -> None:
    """The set replaced is deleted in short steps down to `drop_rows`, the rest dropped with
    its table; the connection's settings are its own again after the fill and the swap."""
    held(db, 700)
    codes = CodeStore(db)
    with db.transaction() as conn:
        codes.change_uses(conn, "c-650", f"{650:064x}", +1)
    before = side_settings(db)
    staging = CodeStaging(db, drop_rows=50)
    staging.begin(2)
    staging.add([entry(i) for i in range(600, 1900)])
    assert side_settings(db) == before
    assert staging.swap(meta(2)) == 1300 == live(db) == codes.count()
    assert side_settings(db) == before
    assert RETIRED_TABLE not in tables(db) and STAGING_TABLE not in tables(db)
    record = codes.lookup(f"{650:064x}")
    assert record is not None and record.uses == 1
    assert codes.lookup(f"{599:064x}") is None and codes.lookup(f"{1899:064x}") is not None
    assert db.integrity_ok()


def test_a_discarded_fill_over_drop_rows_leaves_the_live_set(db: Database) -> None:
    held(db, 20)
    staging = CodeStaging(db, drop_rows=10)
    staging.begin(2)
    staging.add([entry(i) for i in range(100, 400)])
    staging.discard()
    assert STAGING_TABLE not in tables(db) and live(db) == 20 and CodeStore(db).version() == 1
    assert db.integrity_ok()


def test_a_staging_begun_later_takes_the_tables_and_the_earlier_cannot_swap(
        db: Database) -> None:
    held(db, 2)
    first, second = CodeStaging(db), CodeStaging(db)
    first.begin(2)
    first.add([entry(i) for i in range(10, 20)])
    second.begin(3)
    with pytest.raises(sqlite3.OperationalError, match="taken by another snapshot"):
        first.add([entry(30)])
    second.add([entry(i) for i in range(40, 45)])
    with pytest.raises((sqlite3.OperationalError, RuntimeError)):
        first.swap(meta(2))
    assert live(db) == 2 and CodeStore(db).version() == 1
    assert second.swap(meta(3)) == 5 == live(db)
    assert CodeStore(db).lookup(f"{40:064x}") is not None
    assert CodeStore(db).lookup(f"{10:064x}") is None and not side_files(db)


def vm_steps(db: Database, fn: Callable[[], object]) -> int:
    """SQLite's virtual-machine steps (in hundreds) on `db`'s connection while `fn` runs."""
    work = 0

    def count() -> int:
        nonlocal work
        work += 1
        return 0

    db.conn.set_progress_handler(count, 100)
    try:
        fn()
    finally:
        db.conn.set_progress_handler(None, 0)
    return work


def _emptying_work(tmp_path: Path, n: int) -> int:
    """SQLite's virtual-machine steps (in hundreds) to replace a set of `n` codes that name
    parcels and to empty the retired tables in steps (drop_rows=0)."""
    db = open_database(tmp_path / f"work-{n}.db")
    staging = CodeStaging(db, drop_rows=0)
    staging.begin(1)
    staging.add([entry(i, parcel=f"P{i}") for i in range(n)])
    staging.swap(meta(1))
    staging = CodeStaging(db, drop_rows=0)
    staging.begin(2)
    staging.add([entry(i, parcel=f"P{i}") for i in range(n, n + 10)])
    # copies 10 rows a table, empties the n of each retired table
    work = vm_steps(db, lambda: staging.swap(meta(2)))
    assert not set(RETIRED.values()) & tables(db) and live(db) == 10
    db.close()
    return work


def test_emptying_a_retired_set_in_steps_costs_in_proportion_to_its_rows(
        tmp_path: Path) -> None:
    # Each step deletes the first rows of its table by the table's own key: a step that
    # looked its rows up by another column would scan the table, and the whole emptying
    # would grow with the square of the rows (16x for 4x the rows).
    small, large = _emptying_work(tmp_path, 1500), _emptying_work(tmp_path, 6000)
    assert large < 7 * small, (small, large)


def _delta_work(tmp_path: Path, n: int) -> int:
    """SQLite's virtual-machine steps (in hundreds) for a delta that replaces and revokes 20
    codes naming parcels, among `n` held."""
    db = open_database(tmp_path / f"delta-{n}.db")
    staging = CodeStaging(db)
    staging.begin(1)
    staging.add([entry(i, parcel=f"P{i}") for i in range(n)])
    staging.swap(meta(1))
    work = vm_steps(db, lambda: CodeStore(db).apply(CodesBundle(
        locker_id="L1", version=2, base_version=1, issued_at=NOW,
        expires_at=NOW + timedelta(days=1),
        upsert=tuple(entry(i, parcel=f"Q{i}") for i in range(10)),
        revoke=tuple(f"c-{i}" for i in range(10, 20)))))
    assert live(db) == n - 10
    assert db.conn.execute("SELECT COUNT(*) FROM code_parcels").fetchone()[0] == n - 10
    assert CodeStore(db).parcel_pickup_code("Q3") is not None
    assert CodeStore(db).parcel_pickup_code("P3") is None
    db.close()
    return work


def test_a_delta_costs_what_it_touches_not_what_is_held(tmp_path: Path) -> None:
    # Every code row, id and parcel row a delta deletes is found by its table's key.
    small, large = _delta_work(tmp_path, 1000), _delta_work(tmp_path, 8000)
    assert large < 2 * small, (small, large)
