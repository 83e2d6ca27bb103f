"""Parcels on record in the compartments, and QR tokens spent here: both change only together
with the event that reports the change, inside the controller's transaction."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

from lockerd.store.db import Database
from lockerd.timeutil import format_time


@dataclass(frozen=True, slots=True)
class ParcelRecord:
    compartment: str
    parcel_id: str
    code_id: str | None
    deposited_at: str


class ParcelStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> dict[str, ParcelRecord]:
        """compartment -> the parcel deposited there and not yet picked up."""
        rows = self._db.conn.execute(
            "SELECT compartment, parcel_id, code_id, deposited_at FROM parcels").fetchall()
        return {r[0]: ParcelRecord(*r) for r in rows}

    def put(self, conn: sqlite3.Connection, compartment: str, parcel_id: str,
            code_id: str | None, at: datetime) -> None:
        conn.execute(
            "INSERT INTO parcels VALUES (?, ?, ?, ?) ON CONFLICT(compartment) DO UPDATE SET"
            " parcel_id = excluded.parcel_id, code_id = excluded.code_id,"
            " deposited_at = excluded.deposited_at",
            (compartment, parcel_id, code_id, format_time(at)))

    def remove(self, conn: sqlite3.Connection, compartment: str) -> None:
        conn.execute("DELETE FROM parcels WHERE compartment = ?", (compartment,))


class SpentTokens:
    """QR token ids (cti, hex) used on this locker: a token is accepted once, even across
    restarts."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def is_spent(self, cti: str) -> bool:
        row = self._db.conn.execute("SELECT 1 FROM spent_tokens WHERE cti = ?", (cti,)).fetchone()
        return row is not None

    def change(self, conn: sqlite3.Connection, cti: str, expires: int, delta: int) -> None:
        """Spend (+1) or give back (-1) a token, inside the caller's event transaction."""
        if delta > 0:
            conn.execute("INSERT OR IGNORE INTO spent_tokens VALUES (?, ?)", (cti, expires))
        elif delta < 0:
            conn.execute("DELETE FROM spent_tokens WHERE cti = ?", (cti,))

    def prune(self, before: datetime) -> int:
        """Forget tokens that expired before `before`: they are refused as expired anyway."""
        with self._db.transaction() as conn:
            cur = conn.execute("DELETE FROM spent_tokens WHERE expires < ?",
                               (int(before.timestamp()),))
        return cur.rowcount
