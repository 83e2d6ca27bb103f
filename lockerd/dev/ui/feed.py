"""The events a bank recorded, read from its outbox database (read-only, polled by seq)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path

from lockerd.dev.ui.meaning import EventRow

POLL_LIMIT = 200
"""Most events read in one poll: a burst is shown over a few polls, the UI never stalls."""


class FeedError(Exception):
    """The events database cannot be read (missing, not a lockerd database, corrupt)."""


def _row(seq: int, type_: str, compartment: str | None, code_id: str | None,
         data: str) -> EventRow:
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = {}
    return EventRow(seq=seq, type=type_, compartment=compartment, code_id=code_id,
                    data=parsed if isinstance(parsed, dict) else {})


class EventFeed:
    """Reads the events after the last one read; never writes, never holds a lock.

    The database is opened read-only (`mode=ro`): in WAL mode a reader never blocks the
    daemon's writer. Each poll runs in a thread so the UI's loop (and an in-process daemon
    sharing it) never waits on the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_seq = 0
        self._conn: sqlite3.Connection | None = None
        # A poll runs in a worker thread; closing the connection under a read in progress
        # would crash sqlite, so reads and the close take turns.
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.is_file():
                raise FeedError(f"no events database at {self.path}")
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                         check_same_thread=False, timeout=1.0)
        return self._conn

    def _read(self, after: int) -> list[EventRow]:
        with self._lock:
            if self._closed:
                return []  # the UI is leaving: a last poll reads nothing
            try:
                rows = self._connect().execute(
                    "SELECT seq, type, compartment, code_id, data FROM events WHERE seq > ? "
                    "ORDER BY seq LIMIT ?", (after, POLL_LIMIT)).fetchall()
            except sqlite3.Error as exc:
                self._close()
                raise FeedError(f"cannot read events from {self.path}: {exc}") from exc
        return [_row(*r) for r in rows]

    async def poll(self) -> list[EventRow]:
        """The events recorded since the last poll, oldest first."""
        rows = await asyncio.to_thread(self._read, self.last_seq)
        if rows:
            self.last_seq = rows[-1].seq
        return rows

    def close(self) -> None:
        """Close the connection; a read under way in a thread finishes first (milliseconds)."""
        with self._lock:
            self._closed = True
            self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
