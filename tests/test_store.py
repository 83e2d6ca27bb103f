"""The SQLite stores: atomic bundle application, local consumption, seq never reused."""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockerd.errors import StoreError, TrustError
from lockerd.store import CodeStore, Database, EventLog, open_database
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodeEntry, CodesBundle

pytestmark = pytest.mark.unit

NOW = utcnow()


def entry(code_id: str, digest_char: str, compartment: str = "1") -> CodeEntry:
    return CodeEntry(id=code_id, kind="pickup", digest=digest_char * 64,
                     not_after=NOW + timedelta(days=1), compartment=compartment)


def bundle(version: int, upsert: list[CodeEntry], *, base: int | None = None,
           revoke: tuple[str, ...] = ()) -> CodesBundle:
    return CodesBundle(locker_id="L1", version=version, base_version=base, issued_at=NOW,
                       expires_at=NOW + timedelta(days=1), upsert=tuple(upsert), revoke=revoke)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return open_database(tmp_path / "lockerd.db")


def consume(db: Database, codes: CodeStore, code_id: str, digest: str, delta: int = 1) -> None:
    with db.transaction() as conn:
        codes.change_uses(conn, code_id, digest, delta)


def test_database_uses_wal_and_full_sync(db: Database) -> None:
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.integrity_ok()


def test_snapshot_replaces_everything_and_delta_updates(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a"), entry("b", "b")]))
    assert codes.count() == 2 and codes.version() == 1
    codes.apply(bundle(2, [entry("c", "c")]))
    assert codes.count() == 1 and codes.lookup("a" * 64) is None
    codes.apply(bundle(3, [entry("d", "d")], base=2, revoke=("c",)))
    assert codes.lookup("c" * 64) is None
    assert codes.lookup("d" * 64) is not None and codes.version() == 3


def test_use_survives_a_snapshot_that_still_lists_the_code(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a")]))
    consume(db, codes, "a", "a" * 64)
    codes.apply(bundle(2, [entry("a", "a"), entry("b", "b")]))
    record = codes.lookup("a" * 64)
    assert record is not None and record.uses == 1


def test_same_id_with_new_digest_is_a_new_code(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a")]))
    consume(db, codes, "a", "a" * 64)
    codes.apply(bundle(2, [entry("a", "e")], base=1))
    assert codes.lookup("a" * 64) is None
    fresh = codes.lookup("e" * 64)
    assert fresh is not None and fresh.uses == 0


def test_revoked_code_loses_its_uses(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a")]))
    consume(db, codes, "a", "a" * 64)
    codes.apply(bundle(2, [], base=1, revoke=("a",)))
    assert db.conn.execute("SELECT COUNT(*) FROM code_uses").fetchone()[0] == 0


def test_give_back_never_goes_below_zero(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a")]))
    consume(db, codes, "a", "a" * 64, -1)
    record = codes.lookup("a" * 64)
    assert record is not None and record.uses == 0


def test_bundle_with_two_ids_sharing_a_digest_changes_nothing(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a")]))
    with pytest.raises(TrustError) as info:
        codes.apply(bundle(2, [entry("x", "f"), entry("y", "f")]))
    assert info.value.reason == "malformed"
    assert codes.version() == 1
    assert codes.lookup("a" * 64) is not None and codes.lookup("f" * 64) is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True),
       st.sampled_from("abcdef"))
def test_failed_apply_is_all_or_nothing(tmp_path_factory: pytest.TempPathFactory,
                                        first: list[str], dup: str) -> None:
    db = open_database(tmp_path_factory.mktemp("db") / "x.db")
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry(c, c) for c in first]))
    before = db.conn.execute("SELECT * FROM codes ORDER BY id").fetchall()
    with pytest.raises(TrustError):
        codes.apply(bundle(2, [entry("n1", dup), entry("n2", dup)]))
    assert db.conn.execute("SELECT * FROM codes ORDER BY id").fetchall() == before
    assert codes.version() == 1
    db.close()


def test_seq_is_never_reused_after_pruning_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    db = open_database(path)
    log = EventLog(db)
    seqs = [log.record(type="tamper", at=NOW, data={"open": True}).seq for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    db.conn.execute("DELETE FROM events")  # what the outbox does once the backend acked
    db.close()
    db = open_database(path)
    assert EventLog(db).record(type="tamper", at=NOW).seq == 6
    db.close()


def test_event_wire_shape(db: Database) -> None:
    ev = EventLog(db).record(type="pickup.opened", at=NOW, compartment="7", code_id="p-1",
                             data={"attempt": 1})
    wire = ev.wire("L1")
    assert list(wire) == ["seq", "event_id", "type", "at", "locker_id", "compartment",
                          "code_id", "data"]
    assert wire["at"].endswith("Z") and wire["locker_id"] == "L1"


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the database"):
        open_database(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    db = open_database(path)
    db.set_meta("schema_version", 99)
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_database(path)


def test_transaction_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as conn:
        EventLog(db).append(conn, type="a", at=NOW)
        conn.execute("INSERT INTO meta (key, value) VALUES ('k', '1')")
        conn.execute("INSERT INTO meta (key, value) VALUES ('k', '2')")
    assert EventLog(db).last_seq() == 0


def real_count(db: Database) -> int:
    return int(db.conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0])


def test_the_code_count_is_kept_across_snapshots_deltas_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    db = open_database(path)
    codes = CodeStore(db)
    assert codes.count() == 0
    codes.apply(bundle(1, [entry("a", "a"), entry("b", "b"), entry("c", "c")]))
    # Kept in meta by the apply itself, not counted when asked.
    assert db.get_meta("codes_count") == real_count(db) == codes.count() == 3
    # Upserts (one new, one replacing an id with a new digest), revokes (one held, one not).
    codes.apply(bundle(2, [entry("d", "d"), entry("a", "e")], base=1, revoke=("b", "zz")))
    assert db.get_meta("codes_count") == real_count(db) == codes.count() == 3
    # A snapshot that revokes one of its own codes.
    codes.apply(bundle(3, [entry("x", "1"), entry("y", "2")], revoke=("y", "nope")))
    assert db.get_meta("codes_count") == real_count(db) == codes.count() == 1
    # A delta that changes no code (executemany over nothing).
    codes.apply(bundle(4, [], base=3))
    assert db.get_meta("codes_count") == real_count(db) == 1
    with pytest.raises(TrustError):
        codes.apply(bundle(5, [entry("m", "3"), entry("n", "3")], base=4))
    assert codes.count() == real_count(db) == 1
    db.close()
    db = open_database(path)
    try:
        assert CodeStore(db).count() == real_count(db) == 1
    finally:
        db.close()


def test_another_connection_applying_moves_the_count_seen_here(tmp_path: Path) -> None:
    # `lockerd import-bundle` applies from its own process while the daemon runs.
    daemon_db, import_db = open_database(tmp_path / "l.db"), open_database(tmp_path / "l.db")
    try:
        daemon_codes = CodeStore(daemon_db)
        assert daemon_codes.count() == 0
        CodeStore(import_db).apply(bundle(1, [entry("a", "a"), entry("b", "b")]))
        assert daemon_codes.count() == real_count(daemon_db) == 2
    finally:
        daemon_db.close()
        import_db.close()


def test_a_database_without_the_kept_count_is_counted_once(db: Database) -> None:
    codes = CodeStore(db)
    codes.apply(bundle(1, [entry("a", "a"), entry("b", "b")]))
    # As a database written before the count was kept.
    with db.transaction() as conn:
        conn.execute("DELETE FROM meta WHERE key = 'codes_count'")
    assert codes.count() == 2 and db.get_meta("codes_count") == 2
    with db.transaction() as conn:
        conn.execute("DELETE FROM meta WHERE key = 'codes_count'")
    # A delta on such a database starts from a real count.
    codes.apply(bundle(2, [entry("c", "c")], base=1, revoke=("a",)))
    assert db.get_meta("codes_count") == real_count(db) == 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(),
                          st.lists(st.tuples(st.sampled_from("abcdef"), st.sampled_from("0123")),
                                   max_size=5, unique_by=lambda t: t[1]),
                          st.lists(st.sampled_from("abcdefg"), max_size=3)),
                min_size=1, max_size=6))
def test_the_kept_count_matches_a_real_count_after_any_applies(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[bool, list[tuple[str, str]], list[str]]],
) -> None:
    db = open_database(tmp_path_factory.mktemp("db") / "x.db")
    codes = CodeStore(db)
    for version, (snapshot, upserts, revokes) in enumerate(steps, start=1):
        held = codes.version()
        # A digest given to two ids is refused and changes nothing; the count must agree.
        with contextlib.suppress(TrustError):
            codes.apply(bundle(version, [entry(i, d) for i, d in upserts],
                               base=None if snapshot else held, revoke=tuple(revokes)))
        assert codes.count() == real_count(db)
    db.close()
