"""The local code cache: digests of issued codes, their validity, and local consumption."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lockerd.core.access import CodeRecord
from lockerd.errors import TrustError
from lockerd.store.db import Database
from lockerd.store.staging import REVOKE_BY_ID, CodeStaging, SnapshotMeta, entry_row, rows_for
from lockerd.trust.bundle import CodesBundle

_LOOKUP = """
SELECT c.id, c.kind, c.digest, c.compartment, c.parcel_id, c.not_before, c.not_after,
       c.max_uses, COALESCE(u.uses, 0)
FROM codes c LEFT JOIN code_uses u ON u.id = c.id AND u.digest = c.digest
WHERE c.digest = ?
"""
# A local extension (PROTOCOL section 14) is written into codes.not_after itself, so the
# lookup of an entered code costs what it did; code_extensions keeps the bundle's not_after
# and the total, to put the extension back when a bundle rewrites the row with the same one.
_PICKUP_CODES = """
SELECT c.id, c.digest, c.compartment, c.parcel_id,
       COALESCE(x.base_not_after, c.not_after), COALESCE(x.extended_s, 0)
FROM codes c LEFT JOIN code_uses u ON u.id = c.id AND u.digest = c.digest
LEFT JOIN code_extensions x ON x.id = c.id AND x.digest = c.digest
WHERE c.kind = 'pickup' AND COALESCE(u.uses, 0) < c.max_uses
  AND (c.compartment IN (SELECT value FROM json_each(?))
       OR c.parcel_id IN (SELECT value FROM json_each(?)))
"""
_STALE_EXTENSIONS = """
DELETE FROM code_extensions WHERE {where} NOT EXISTS (SELECT 1 FROM codes c
    WHERE c.id = code_extensions.id AND c.digest = code_extensions.digest
      AND c.not_after = code_extensions.base_not_after)
"""


@dataclass(frozen=True, slots=True)
class ExtendableCode:
    """A pickup code with uses left, as the extension of its deadline sees it."""

    id: str
    digest: str
    compartment: str | None
    parcel_id: str | None
    base_not_after: int  # the bundle's
    extended_s: int  # the local extension so far, for that not_after

    @property
    def not_after(self) -> int:
        return self.base_not_after + self.extended_s


# The bundle's pickup codes of a parcel with uses left (a revoked code is no longer stored),
# found through the key table of parcels (store/db.py).
_PARCEL_PICKUPS = """
SELECT {columns}
FROM code_parcels p JOIN codes c ON c.digest = p.digest
LEFT JOIN code_uses u ON u.id = c.id AND u.digest = c.digest
WHERE {parcel} c.kind = 'pickup' AND COALESCE(u.uses, 0) < c.max_uses
"""
_CODE_COLUMNS = ("c.id, c.kind, c.digest, c.compartment, c.parcel_id, c.not_before, "
                 "c.not_after, c.max_uses, COALESCE(u.uses, 0)")
_PARCEL_CODE = (_PARCEL_PICKUPS.format(columns=_CODE_COLUMNS, parcel="p.parcel_id = ? AND")
                + " ORDER BY c.id")
_PARCEL_IDS = _PARCEL_PICKUPS.format(columns="DISTINCT p.parcel_id", parcel="")


def _record(row: Any) -> CodeRecord:
    """A row of _LOOKUP or _PARCEL_CODE (sqlite3 rows are untyped)."""
    not_after = _dt(row[6])
    assert not_after is not None
    return CodeRecord(
        id=row[0], kind=row[1], digest=row[2], compartment=row[3], parcel_id=row[4],
        not_before=_dt(row[5]), not_after=not_after, max_uses=row[7], uses=row[8],
    )


def _epoch(dt: datetime | None) -> int | None:
    return None if dt is None else int(dt.timestamp())


def _dt(epoch: int | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


APPLY_CACHE_KIB = 65536
DERIVED_PREFIX = "derived:"
# Set (to the keyring version that did it) when a keyring replaced the codes role's keys;
# cleared by the snapshot that is then accepted at any version.
FLOOR_RESET_META = "codes_floor_reset"
# The number of rows in `codes`, written in the transaction of every apply.
COUNT_META = "codes_count"


class CodeStore:
    """Lookup is one indexed query on the digest; bundles are applied in one transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # parcels_with_pickup_codes, kept until this store changes a code or a use.
        self._parcel_ids: tuple[str, ...] | None = None

    def version(self) -> int:
        return int(self._db.get_meta("codes_version") or 0)

    def floor_reset_pending(self) -> bool:
        """Has a codes key rotation lifted the version floor, with no snapshot applied since?"""
        return self._db.get_meta(FLOOR_RESET_META) is not None

    def reset_floor(self, conn: sqlite3.Connection, *, keyring_version: int) -> None:
        """Lift the version floor, inside the caller's keyring transaction: a bundle signed
        by a stolen codes key at the highest version must not block the new key's bundles."""
        self._db.set_meta(FLOOR_RESET_META, keyring_version, conn=conn)

    def expires_at(self) -> datetime | None:
        value = self._db.get_meta("codes_expires_at")
        return _dt(value)

    def count(self) -> int:
        """The number of codes held, kept in meta by `apply` (telemetry asks at every
        interval: a COUNT(*) over a million codes took 38-83 ms)."""
        kept = self._db.get_meta(COUNT_META)
        if isinstance(kept, int):
            return kept
        # A database from before the count was kept: counted once, then kept.
        with self._db.transaction() as conn:
            return self._kept_count(conn)

    def _kept_count(self, conn: sqlite3.Connection) -> int:
        """The kept count, inside the caller's transaction; counted and stored if absent."""
        kept = self._db.get_meta(COUNT_META)
        if isinstance(kept, int):
            return kept
        counted = int(conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0])
        self._db.set_meta(COUNT_META, counted, conn=conn)
        return counted

    def lookup(self, digest: str) -> CodeRecord | None:
        row = self._db.conn.execute(_LOOKUP, (digest,)).fetchone()
        return None if row is None else _record(row)

    def derived_revoked(self, parcel_id: str) -> bool:
        """Has a bundle revoked the derived pickup code of this parcel ("derived:<id>")?"""
        row = self._db.conn.execute(
            "SELECT 1 FROM revoked_derived WHERE parcel_id = ?", (parcel_id,)).fetchone()
        return row is not None

    def parcels_with_pickup_codes(self) -> tuple[str, ...]:
        """The parcels named by a bundle pickup code with uses left: with the parcels on
        record, what a support code may be for. Asked on every wrong code, so kept until
        `apply` or `change_uses` (the only writers of codes and uses) runs."""
        if self._parcel_ids is None:
            self._parcel_ids = tuple(row[0] for row in self._db.conn.execute(_PARCEL_IDS))
        return self._parcel_ids

    def parcel_pickup_code(self, parcel_id: str) -> CodeRecord | None:
        """The parcel's pickup code with uses left (the first by id, if several)."""
        row = self._db.conn.execute(_PARCEL_CODE, (parcel_id,)).fetchone()
        return None if row is None else _record(row)

    def support_used(self, parcel_id: str, window: int) -> bool:
        """Has a support code of this parcel and window opened its door here?"""
        row = self._db.conn.execute(
            "SELECT 1 FROM support_uses WHERE parcel_id = ? AND window = ?",
            (parcel_id, window)).fetchone()
        return row is not None

    def change_support_use(self, conn: sqlite3.Connection, parcel_id: str, window: int,
                           delta: int) -> None:
        """Mark (+1) or give back (-1) a support code's one use, inside the caller's event
        transaction."""
        if delta > 0:
            conn.execute("INSERT OR IGNORE INTO support_uses VALUES (?, ?)", (parcel_id, window))
        elif delta < 0:
            conn.execute("DELETE FROM support_uses WHERE parcel_id = ? AND window = ?",
                         (parcel_id, window))

    def prune_support_uses(self, *, before_window: int) -> int:
        """Forget the support code marks of windows before `before_window`: a code of such
        a window is never accepted again, so its mark guards nothing."""
        with self._db.transaction() as conn:
            cur = conn.execute("DELETE FROM support_uses WHERE window < ?", (before_window,))
        return cur.rowcount

    def pickup_codes(self, *, compartments: Collection[str], parcels: Collection[str],
                     conn: sqlite3.Connection | None = None) -> list[ExtendableCode]:
        """The pickup codes with uses left that name one of `compartments` or `parcels`
        (one scan of the table, whatever the number of compartments). `conn`: a connection
        of the caller's (a worker thread's own, so that the scan keeps off the event loop)."""
        if not compartments and not parcels:
            return []
        rows = (conn or self._db.conn).execute(
            _PICKUP_CODES, (json.dumps(sorted(compartments)), json.dumps(sorted(parcels))))
        return [ExtendableCode(*row) for row in rows]

    def set_extension(self, conn: sqlite3.Connection, code: ExtendableCode,
                      extended_s: int) -> bool:
        """The code's total local extension is now `extended_s`, inside the caller's event
        transaction. False, and nothing written, when the code is no longer as `code` saw it
        (a bundle changed or revoked it since)."""
        cur = conn.execute(
            "UPDATE codes SET not_after = ? WHERE digest = ? AND id = ? AND not_after = ?",
            (code.base_not_after + extended_s, code.digest, code.id, code.not_after))
        if cur.rowcount != 1:
            return False
        conn.execute(
            "INSERT INTO code_extensions VALUES (?, ?, ?, ?) ON CONFLICT(id, digest) DO UPDATE"
            " SET base_not_after = excluded.base_not_after, extended_s = excluded.extended_s",
            (code.id, code.digest, code.base_not_after, extended_s))
        return True

    def change_uses(self, conn: sqlite3.Connection, code_id: str, digest: str, delta: int) -> None:
        """Consume (+1) or give back (-1) one use, inside the caller's event transaction."""
        self._parcel_ids = None
        conn.execute(
            "INSERT INTO code_uses (id, digest, uses) VALUES (?, ?, MAX(0, ?))"
            " ON CONFLICT(id, digest) DO UPDATE SET uses = MAX(0, uses + ?)",
            (code_id, digest, delta, delta),
        )

    def _reset_cache(self) -> None:
        self._db.conn.execute("PRAGMA cache_size=-2000")  # SQLite's default, ~2 MiB

    def apply(
        self, bundle: CodesBundle, *,
        with_event: Callable[[sqlite3.Connection], object] | None = None,
        on_rows: Callable[[int], object] | None = None,
    ) -> None:
        """Apply a verified snapshot or delta atomically: all of it, or nothing on any error.
        `with_event` appends the event that reports it, in the same transaction; `on_rows`
        hears how many rows of a snapshot are staged so far (`CodeStaging`).

        A blocking call, for a worker thread with a `Database` of its own: a snapshot is built
        beside the live codes in short transactions and swapped in by one short transaction
        (`CodeStaging`); a delta, small by nature, is one transaction."""
        try:
            if bundle.base_version is None:
                self._apply_snapshot(bundle, with_event, on_rows)
            else:
                self._apply_delta(bundle, with_event)
        finally:
            self._parcel_ids = None

    def forget_cached(self) -> None:
        """Another connection changed the codes or their uses: read them again when asked."""
        self._parcel_ids = None

    def _apply_snapshot(self, bundle: CodesBundle,
                        with_event: Callable[[sqlite3.Connection], object] | None,
                        on_rows: Callable[[int], object] | None = None) -> None:
        staging = CodeStaging(self._db, on_rows=on_rows)
        staging.begin(bundle.version, rows=len(bundle.upsert))
        try:
            staging.add(bundle.upsert)
            staging.swap(SnapshotMeta(version=bundle.version, issued_at=bundle.issued_at,
                                      expires_at=bundle.expires_at,
                                      revoke=tuple(bundle.revoke)), with_event=with_event)
        except BaseException:
            staging.discard()
            raise

    def _apply_delta(self, bundle: CodesBundle,
                     with_event: Callable[[sqlite3.Connection], object] | None) -> None:
        rows = [entry_row(e) for e in bundle.upsert]
        touched = [(i,) for i in bundle.revoke] + [(e.id,) for e in bundle.upsert]
        self._db.conn.execute(f"PRAGMA cache_size=-{APPLY_CACHE_KIB}")
        try:
            with self._db.transaction() as conn:
                count = self._write_rows(conn, bundle, rows, touched,
                                         held=self._kept_count(conn))
                self._db.set_meta(COUNT_META, count, conn=conn)
                self._db.set_meta("codes_version", bundle.version, conn=conn)
                self._db.set_meta("codes_expires_at", _epoch(bundle.expires_at), conn=conn)
                self._db.set_meta("codes_issued_at", _epoch(bundle.issued_at), conn=conn)
                if with_event is not None:
                    with_event(conn)
        finally:
            self._reset_cache()

    @staticmethod
    def _carry_extensions(conn: sqlite3.Connection, touched: Sequence[tuple[str]]) -> None:
        """An extension holds for the not_after it extended: a rewritten row with the same
        not_after gets it back, one with another not_after replaces it (and its total)."""
        conn.executemany(_STALE_EXTENSIONS.format(where="id = ? AND"), touched)
        rows = [row for (code_id,) in dict.fromkeys(touched) for row in conn.execute(
            "SELECT extended_s, digest, id FROM code_extensions WHERE id = ?", (code_id,))]
        conn.executemany(
            "UPDATE codes SET not_after = not_after + ? WHERE digest = ? AND id = ?", rows)

    @staticmethod
    def _write_rows(conn: sqlite3.Connection, bundle: CodesBundle,
                    rows: Sequence[tuple[object, ...]], touched: Sequence[tuple[str]], *,
                    held: int) -> int:
        """The code rows of a delta, inside the caller's transaction; a digest given to two
        code ids is refused as a malformed bundle. Returns the number of codes after it,
        from `held` (the number before) and the rows each statement changed."""
        try:
            count = held
            for table, sql in REVOKE_BY_ID:
                gone = conn.executemany(sql, touched).rowcount
                if table == "codes":
                    count -= gone
            count += conn.executemany(
                "INSERT INTO codes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows).rowcount
            conn.executemany("INSERT INTO code_ids VALUES (?, ?)", rows_for("code_ids", rows))
            conn.executemany("INSERT INTO code_parcels VALUES (?, ?)",
                             rows_for("code_parcels", rows))
            # A use stays recorded while the same (id, digest) is still issued; a revoked
            # or replaced code's uses go with it. A delta can only affect the ids it names.
            conn.executemany(
                "DELETE FROM code_uses WHERE id = ? AND NOT EXISTS (SELECT 1 FROM codes"
                " WHERE codes.id = code_uses.id AND codes.digest = code_uses.digest)", touched)
            CodeStore._carry_extensions(conn, touched)
            derived = [(i.removeprefix(DERIVED_PREFIX), bundle.version)
                       for i in bundle.revoke if i.startswith(DERIVED_PREFIX)]
            conn.executemany("INSERT OR IGNORE INTO revoked_derived VALUES (?, ?)", derived)
        except sqlite3.IntegrityError as exc:
            what = ("gives the same code id to two codes" if "code_ids" in str(exc) else
                    "gives the same digest to two code ids (two codes with the same plain code)")
            raise TrustError(f"codes bundle version {bundle.version} {what}: {exc}",
                             reason="malformed") from exc
        return count
