"""The event log: every decision as a durable record, shaped for the MQTT outbox."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Only TELEMETRY_TYPES may ever be shed by a full outbox (lockerd.core.events says why).
from lockerd.core.events import TELEMETRY_TYPES as TELEMETRY_TYPES
from lockerd.core.events import outbox_class
from lockerd.store.db import Database
from lockerd.timeutil import format_time


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event_id: str
    type: str
    at: str
    compartment: str | None
    code_id: str | None
    data: Mapping[str, Any]

    def wire(self, locker_id: str) -> dict[str, Any]:
        """The event as PROTOCOL.md section 6 puts it on the wire."""
        return {
            "seq": self.seq,
            "event_id": self.event_id,
            "type": self.type,
            "at": self.at,
            "locker_id": locker_id,
            "compartment": self.compartment,
            "code_id": self.code_id,
            "data": dict(self.data),
        }


class EventLog:
    """Appends events inside the caller's transaction; reads them back in seq order."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._listeners: list[Callable[[], None]] = []

    def on_append(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each committed append (the outbox wakes up on it)."""
        self._listeners.append(listener)

    def notify(self) -> None:
        for listener in self._listeners:
            listener()

    def append(
        self,
        conn: sqlite3.Connection,
        *,
        type: str,
        at: datetime,
        compartment: str | None = None,
        code_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> StoredEvent:
        event_id = str(uuid.uuid4())
        at_text = format_time(at)
        body = dict(data or {})
        # The stored class is the one shedding reads: telemetry, or access for all it keeps.
        cls = "telemetry" if outbox_class(type).sheddable else "access"
        cur = conn.execute(
            "INSERT INTO events (event_id, type, at, compartment, code_id, data, class)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event_id, type, at_text, compartment, code_id, json.dumps(body), cls),
        )
        seq = cur.lastrowid
        assert seq is not None
        return StoredEvent(seq, event_id, type, at_text, compartment, code_id, body)

    def record(self, **kwargs: Any) -> StoredEvent:
        """Append one event in a transaction of its own."""
        with self._db.transaction() as conn:
            event = self.append(conn, **kwargs)
        self.notify()
        return event

    def recent(self, limit: int = 50, *, type_prefix: str = "") -> list[StoredEvent]:
        rows = self._db.conn.execute(
            "SELECT seq, event_id, type, at, compartment, code_id, data FROM events"
            " WHERE type LIKE ? ORDER BY seq DESC LIMIT ?",
            (type_prefix + "%", limit),
        ).fetchall()
        return [self._row(r) for r in reversed(rows)]

    def since(self, seq: int, limit: int = 1000) -> list[StoredEvent]:
        rows = self._db.conn.execute(
            "SELECT seq, event_id, type, at, compartment, code_id, data FROM events"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [self._row(r) for r in rows]

    def last_seq(self) -> int:
        row = self._db.conn.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    @staticmethod
    def _row(r: tuple[Any, ...]) -> StoredEvent:
        return StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]))
