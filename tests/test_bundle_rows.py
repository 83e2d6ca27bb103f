"""A bundle file verified and applied a chunk of rows at a time (lockerd/apply/bundlefile.py)
against `verify_and_apply` of the whole parsed bundle: the same codes, the same event, and
every refusal with the same reason and message, on real SQLite files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from trustkit import NOW, bundle_doc, code_entry_doc, keys, role, sign_bundle

from lockerd.apply.bundle import ApplyContext, verify_and_apply
from lockerd.apply.bundlefile import BundleRefused, verify_and_apply_file
from lockerd.errors import TrustError
from lockerd.store.db import Database, open_database
from lockerd.trust.bundle import SnapshotRows, read_envelope, verify_snapshot_rows
from lockerd.trust.dsse import parse_envelope

CODES_KEYS = keys(1)
CODES_ROLE = role(CODES_KEYS, 1)
KEYRING_EXPIRES = NOW + timedelta(days=30)


def _context(held: int = 16, floor_reset: bool = False) -> ApplyContext:
    return ApplyContext(codes_role=CODES_ROLE, keyring_expires_at=KEYRING_EXPIRES,
                        locker_id="L1", held=held, floor_reset=floor_reset)


@pytest.fixture
def dbs(tmp_path: Path) -> Iterator[tuple[Database, Database]]:
    old, new = open_database(tmp_path / "old.db"), open_database(tmp_path / "new.db")
    try:
        yield old, new
    finally:
        old.close()
        new.close()


def _state(db: Database) -> tuple[list[Any], list[Any], str | None]:
    codes = db.conn.execute("SELECT * FROM codes ORDER BY digest").fetchall()
    events = [(t, json.loads(d)) for t, d in
              db.conn.execute("SELECT type, data FROM events ORDER BY seq").fetchall()]
    return codes, events, db.get_meta("codes_version")


def _both(raw: bytes, dbs: tuple[Database, Database], tmp_path: Path,
          **context: Any) -> tuple[object, object]:
    """Each way's outcome: the state it left, or (reason, message) of its refusal."""
    old_db, new_db = dbs
    path = tmp_path / "bundle.json"
    path.write_bytes(raw)
    outcomes: list[object] = []
    try:
        verify_and_apply(old_db, raw, context=_context(**context), source="s", now=lambda: NOW)
        outcomes.append(_state(old_db))
    except TrustError as exc:
        outcomes.append((exc.reason, str(exc)))
    try:
        verify_and_apply_file(new_db, path, context=_context(**context), source="s",
                              now=lambda: NOW)
        outcomes.append(_state(new_db))
    except BundleRefused as exc:
        outcomes.append((exc.reason, str(exc)))
    return outcomes[0], outcomes[1]


def _entries(n: int) -> list[dict[str, object]]:
    return [code_entry_doc(f"p-{i}", digest=f"{i:064x}", compartment=str(i % 16 + 1),
                           parcel_id=f"PX{i}", not_before=None if i % 3 else
                           "2026-11-28T00:00:00Z", not_after=f"2026-12-0{i % 9 + 1}T01:02:03Z")
            for i in range(n)]


def test_a_snapshot_is_read_in_chunks_and_applied_alike(dbs: tuple[Database, Database],
                                                        tmp_path: Path) -> None:
    raw = sign_bundle(bundle_doc(upsert=_entries(2500), revoke=["p-9999"]), CODES_KEYS)
    verified = verify_snapshot_rows(read_envelope(raw), codes_role=CODES_ROLE,
                                    keyring_expires_at=KEYRING_EXPIRES, locker_id="L1",
                                    held_version=16, now=NOW)
    assert isinstance(verified, SnapshotRows)
    assert [len(c) for c in verified.chunks()] == [1000, 1000, 500]
    old, new = _both(raw, dbs, tmp_path)
    assert old == new
    assert isinstance(new, tuple) and len(new[0]) == 2500


def test_a_delta_goes_the_parsed_way(dbs: tuple[Database, Database], tmp_path: Path) -> None:
    raw = sign_bundle(bundle_doc(base_version=16, upsert=_entries(3)), CODES_KEYS)
    old, new = _both(raw, dbs, tmp_path)
    assert old == new and isinstance(new, tuple) and len(new[0]) == 3


def _snapshot_with(index: int, **overrides: object) -> dict[str, object]:
    entries = _entries(1500)
    entries[index] = {**entries[index], **overrides}
    return bundle_doc(upsert=entries)


def _upsert(doc: dict[str, object]) -> list[object]:
    """A bundle document's entries."""
    upsert = doc["upsert"]
    assert isinstance(upsert, list)
    return upsert


def _without_field(index: int, field: str) -> dict[str, object]:
    entries = _entries(1200)
    del entries[index][field]
    return bundle_doc(upsert=entries)


BAD = {
    "kind": _snapshot_with(5, kind="parcel"),
    "digest-case": _snapshot_with(1100, digest="AB" * 32),
    "digest-newline": _snapshot_with(7, digest="ab" * 32 + "\n"),
    "compartment": _snapshot_with(1200, compartment="A_1"),
    "compartment-empty": _snapshot_with(3, compartment=""),
    "compartment-int": _snapshot_with(3, compartment=7),
    "max_uses": _snapshot_with(1499, max_uses=0),
    "max_uses-bool": _snapshot_with(2, max_uses=True),
    "not_after": _snapshot_with(1000, not_after="tomorrow"),
    "not_after-month": _snapshot_with(10, not_after="2026-13-01T00:00:00Z"),
    "not_before": _snapshot_with(999, not_before="2026-11-29T03:00:00"),
    "id-empty": _snapshot_with(4, id=""),
    "parcel-empty": _snapshot_with(4, parcel_id=""),
    "no-not_after": _without_field(1100, "not_after"),
    "no-digest": _without_field(0, "digest"),
    "id-twice": _snapshot_with(1400, id="p-3"),
    "id-twice-same-chunk": _snapshot_with(4, id="p-3"),
    "digest-twice": _snapshot_with(1300, digest=f"{2:064x}"),
    "id-twice-then-bad-entry": {**_snapshot_with(1001, id="p-2"),
                                "upsert": [*_upsert(_snapshot_with(1001, id="p-2"))[:1450],
                                           code_entry_doc("z", kind="x")]},
    "digest-twice-then-bad-entry": {
        "upsert": [*_upsert(_snapshot_with(20, digest=f"{2:064x}")), code_entry_doc("z",
                                                                                  kind="x")],
        **{k: v for k, v in bundle_doc().items() if k != "upsert"}},
    "revoked-entry": {**bundle_doc(upsert=_entries(1300)), "revoke": ["p-1250"]},
    "revoke-empty": {**bundle_doc(upsert=_entries(10)), "revoke": ["p-1", ""]},
    "locker": bundle_doc(locker_id="L 1", upsert=_entries(5)),
    "issued_at": {**bundle_doc(upsert=_entries(5)), "issued_at": "now"},
    "version": {**bundle_doc(upsert=_entries(5)), "version": "17"},
    "rollback-and-bad-entry": {**_snapshot_with(1100, kind="x"), "version": 3},
    "rollback-and-id-twice": {**_snapshot_with(1100, id="p-1"), "version": 3},
    "rollback": {**bundle_doc(upsert=_entries(1100)), "version": 16},
    "wrong-locker": bundle_doc(locker_id="L2", upsert=_entries(5)),
    "expired": bundle_doc(expires_at=NOW, upsert=_entries(5)),
    "not-an-object": b"[]",
    "not-json": b"{",
}


@pytest.mark.parametrize("doc", BAD.values(), ids=BAD.keys())
def test_refusals_are_the_parsed_ones(doc: dict[str, object] | bytes,
                                      dbs: tuple[Database, Database], tmp_path: Path) -> None:
    old, new = _both(sign_bundle(doc, CODES_KEYS), dbs, tmp_path)
    assert isinstance(old, tuple) and isinstance(old[0], str), old
    assert new == old
    # Nothing was changed: no codes, no staging table left.
    assert dbs[1].conn.execute("SELECT count(*) FROM codes").fetchone()[0] == 0
    assert dbs[1].conn.execute("SELECT count(*) FROM sqlite_master WHERE name = "
                               "'codes_staging'").fetchone()[0] == 0


def test_a_refused_rollback_says_its_signed_version(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_bytes(sign_bundle(bundle_doc(version=16, upsert=_entries(3)), CODES_KEYS))
    db = open_database(tmp_path / "db")
    try:
        with pytest.raises(BundleRefused) as err:
            verify_and_apply_file(db, path, context=_context(), source="s", now=lambda: NOW)
    finally:
        db.close()
    assert (err.value.reason, err.value.signed_version) == ("rollback", 16)


def _envelopes() -> dict[str, bytes]:
    good = sign_bundle(bundle_doc(upsert=_entries(3)), CODES_KEYS)
    doc = json.loads(good)
    escaped = good.replace(b"/", b"\\/")
    assert escaped != good  # the base64 of this payload has a '/' to escape
    return {
        "plain": good,
        "escaped": escaped,
        "spaced": json.dumps(doc, indent=2).encode(),
        "bad-base64": json.dumps({**doc, "payload": doc["payload"][:-1]}).encode(),
        "non-ascii": json.dumps({**doc, "payload": "é" + doc["payload"]},
                                ensure_ascii=False).encode(),
        "payload-number": json.dumps({**doc, "payload": 5}).encode(),
        "bad-sig": json.dumps({**doc, "signatures": [{"keyid": "k", "sig": "***"}]}).encode(),
        "no-signatures": json.dumps({k: v for k, v in doc.items() if k != "signatures"}).encode(),
        "invalid-utf8": good.replace(b'"payloadType"', b'"payloadType\xff"'),
    }


@pytest.mark.parametrize("raw", _envelopes().values(), ids=_envelopes().keys())
def test_read_envelope_is_parse_envelope(raw: bytes) -> None:
    try:
        expected: object = parse_envelope(raw)
    except TrustError as exc:
        expected = (exc.reason, str(exc))
    try:
        got: object = read_envelope(raw)
    except TrustError as exc:
        got = (exc.reason, str(exc))
    assert got == expected


TIMES = ["2026-12-01T01:02:03Z", "2028-02-29T23:59:59Z", "2027-02-29T00:00:00Z",
         "2026-12-01T24:00:00Z", "2026-12-01T23:60:00Z", "2026-12-01T23:59:60Z",
         "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
         "1969-12-31T23:59:59Z", "2026-12-01T01:02:03.5Z", "2026-12-01T01:02:03z",
         "2026-12-01T01:02:03Z\n", "2026-12-01t01:02:03Z", "2026-1-01T01:02:03Z",
         "2026-12-01T01:02:0٣Z", "2026-13-01T00:00:00Z", "2026-12-00T00:00:00Z", ""]


@pytest.mark.parametrize("text", TIMES)
def test_epoch_is_parse_time(text: str) -> None:
    from lockerd.timeutil import parse_time
    from lockerd.trust.bundle import _epoch

    try:
        expected: object = int(parse_time(text).timestamp())
    except ValueError:
        expected = ValueError
    days: dict[str, int] = {}
    for _ in range(2):  # the day parsed, then taken from `days`
        try:
            got: object = _epoch(text, days)
        except ValueError:
            got = ValueError
        assert got == expected
