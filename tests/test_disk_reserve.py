"""A snapshot that would take the disk the events need is refused, and nothing held changes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from broker import Broker
from conftest import Running, running, wait_until
from test_daemon_process import lockerd
from test_parts_e2e import make_parts, plain_codes, send
from test_sync_mqtt import mqtt_overrides, publish

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.errors import TrustError
from lockerd.store import CodeStore, Database, open_database
from lockerd.store.diskspace import (
    KEEP_FREE_DEFAULT,
    KEEP_FREE_META,
    MIB,
    free_bytes,
    keep_free_of,
    record_keep_free,
)
from lockerd.store.staging import SIDE_SUFFIX, STAGED, CodeStaging, SnapshotMeta
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodeEntry, CodesBundle

NOW = utcnow()
CODE = "482913"
# More than any disk here has: every snapshot is refused for room.
HUGE_MB = 1 << 40


def entry(i: int) -> CodeEntry:
    return CodeEntry(id=f"c-{i}", kind="pickup", digest=f"{i:064x}",
                     not_after=NOW + timedelta(days=1), compartment="1", parcel_id=f"PX{i}")


def snapshot(version: int, n: int, start: int = 0) -> CodesBundle:
    return CodesBundle(locker_id="L1", version=version, base_version=None, issued_at=NOW,
                       expires_at=NOW + timedelta(days=1),
                       upsert=tuple(entry(i) for i in range(start, start + n)), revoke=())


def meta(version: int) -> SnapshotMeta:
    return SnapshotMeta(version=version, issued_at=NOW, expires_at=NOW + timedelta(days=1),
                        revoke=())


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = open_database(tmp_path / "lockerd.db")
    CodeStore(d).apply(snapshot(1, 50))
    return d


def nothing_staged(db: Database) -> bool:
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master")}
    side = list(db.path.parent.glob(f"{db.path.name}{SIDE_SUFFIX}*"))
    return not (tables & set(STAGED.values())) and not side


def still_version_1(db: Database) -> bool:
    codes = CodeStore(db)
    return codes.version() == 1 and codes.count() == 50 and \
        codes.lookup(f"{7:064x}") is not None


pytestmark = pytest.mark.unit


def test_the_reserve_is_recorded_once_and_read_back(tmp_path: Path) -> None:
    db = open_database(tmp_path / "lockerd.db")
    assert keep_free_of(db) == KEEP_FREE_DEFAULT  # never recorded: the default
    record_keep_free(db, 5 * MIB)
    assert keep_free_of(db) == 5 * MIB and db.get_meta(KEEP_FREE_META) == 5 * MIB
    db.set_meta(KEEP_FREE_META, "garbage")  # not a byte count: the default, not a crash
    assert keep_free_of(db) == KEEP_FREE_DEFAULT


def test_a_snapshot_too_big_for_the_disk_left_is_refused_before_anything_is_staged(
    db: Database,
) -> None:
    # Keep free all that is free now: a snapshot of 20 000 codes (about 16 MB staged) cannot
    # fit, unless 16 MB come free on this disk meanwhile.
    record_keep_free(db, free_bytes(db.path.parent))
    with pytest.raises(TrustError) as refused:
        CodeStore(db).apply(snapshot(2, 20_000, start=1000))
    assert refused.value.reason == "no_space"
    message = str(refused.value)
    assert "codes bundle version 2" in message and "MiB free" in message
    assert "[codes] keep_free_mb" in message
    assert still_version_1(db) and nothing_staged(db)


def test_a_disk_that_fills_while_the_rows_come_refuses_at_the_next_add(db: Database) -> None:
    """Snapshots in parts: the rows come a part at a time, and so does the check."""
    record_keep_free(db, free_bytes(db.path.parent) - 512 * 1024)
    staging = CodeStaging(db)
    staging.begin(2)  # no count given: nothing to check yet
    with pytest.raises(TrustError) as refused:
        staging.add([entry(i) for i in range(1000, 11_000)])  # about 4 MB
    assert refused.value.reason == "no_space"
    staging.discard()
    assert still_version_1(db) and nothing_staged(db)


def test_a_copy_that_would_not_fit_is_refused_by_the_swap(db: Database) -> None:
    record_keep_free(db, free_bytes(db.path.parent) - 4 * MIB)
    staging = CodeStaging(db)
    staging.begin(2)
    staging.add([entry(i) for i in range(1000, 2000)])  # about 0.4 MB: it fits
    # The copy: as much again as the side file, and a log that may grow to 32 MiB.
    with pytest.raises(TrustError) as refused:
        staging.swap(meta(2))
    assert refused.value.reason == "no_space"
    staging.discard()
    assert still_version_1(db) and nothing_staged(db)


def test_a_database_that_fills_up_during_the_copy_is_refused_as_no_space(db: Database) -> None:
    """SQLite's own "database or disk is full" (here its page limit, as a full disk gives
    it) in the middle of the copy: the snapshot is refused, the codes held stay."""
    staging = CodeStaging(db)
    staging.begin(2)
    staging.add([entry(i) for i in range(1000, 21_000)])
    pages = int(db.conn.execute("PRAGMA page_count").fetchone()[0])
    db.conn.execute(f"PRAGMA max_page_count={pages + 20}")
    with pytest.raises(TrustError) as refused:
        staging.swap(meta(2))
    assert refused.value.reason == "no_space"
    assert "filled the disk" in str(refused.value)
    db.conn.execute("PRAGMA max_page_count=4294967294")
    staging.discard()
    assert still_version_1(db) and nothing_staged(db)


@pytest.mark.e2e
def test_import_bundle_refuses_a_snapshot_with_no_room_and_says_what_to_do(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([PlainCode("p-1", CODE, "2")], parcels=["2"],
                   overrides={"codes": {"keep_free_mb": HUGE_MB}})
    res = lockerd("import-bundle", "-c", str(kit.config_path), str(kit.bundle_path))
    assert res.returncode == 1, res.stdout
    assert "refused (no_space)" in res.stderr and "keep_free_mb" in res.stderr
    assert "nothing was changed" in res.stderr
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        assert CodeStore(db).version() == 0 and nothing_staged(db)
    finally:
        db.close()
    # With the default reserve the same file goes in.
    text = kit.config_path.read_text().replace(f"keep_free_mb = {HUGE_MB}", "")
    kit.config_path.write_text(text)
    ok = lockerd("import-bundle", "-c", str(kit.config_path), str(kit.bundle_path))
    assert ok.returncode == 0, ok.stderr


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    overrides = mqtt_overrides(broker)
    overrides["codes"] = {"parts_idle_s": 0.3, "parts_timeout_s": 30.0}
    return make_kit([PlainCode("p-1", CODE, "3", parcel_id="PX1")], parcels=["3"],
                    import_files=False, overrides=overrides)


def no_room(r: Running) -> list[dict[str, object]]:
    return [dict(e.data) for e in r.events("cache.rejected") if e.data["reason"] == "no_space"]


@pytest.mark.e2e
async def test_over_mqtt_a_snapshot_with_no_room_is_rejected_and_the_bank_serves_on(
    kit: BankKit, broker: Broker,
) -> None:
    async with running(kit) as r:
        await publish(kit, broker, kit.keyring(version=1), "keyring.json")
        await publish(kit, broker, kit.bundle([PlainCode("p-1", CODE, "3", parcel_id="PX1")],
                                              version=5), "snapshot.json")
        await wait_until(lambda: r.app.codes.version() == 5, what="snapshot applied")
        # The disk fills up (as far as the reserve goes): what the daemon records at its
        # start, from [codes] keep_free_mb, set by another process.
        other = open_database(kit.state_dir / "lockerd.db")
        record_keep_free(other, HUGE_MB * MIB)
        other.close()
        # A whole snapshot...
        await publish(kit, broker, kit.bundle(plain_codes(30), version=6), "big.json")
        await wait_until(lambda: len(no_room(r)) == 1, what="cache.rejected no_space")
        assert no_room(r)[0]["what"] == "codes"
        assert "keep_free_mb" in str(no_room(r)[0]["detail"])
        # ... and one in parts: refused at its manifest, before any part is staged.
        manifest, parts = make_parts(kit, plain_codes(40), version=7)
        await send(broker, manifest, parts)
        await wait_until(lambda: len(no_room(r)) == 2, what="manifest refused for room")
        assert no_room(r)[1]["what"] == "codes/manifest"
        assert r.app.codes.version() == 5
        # The codes held still open their door.
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")
