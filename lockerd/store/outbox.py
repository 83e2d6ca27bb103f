"""The outbox view of the event log: what is not yet acknowledged, acks, pruning, shedding."""

from __future__ import annotations

from dataclasses import dataclass

from lockerd.store.db import Database
from lockerd.store.events import EventLog, StoredEvent

_COLUMNS = "seq, event_id, type, at, compartment, code_id, data"
PRUNE_BATCH = 5000  # acknowledged rows beyond keep_acked before a prune runs


@dataclass(frozen=True, slots=True)
class Pressure:
    """How full the outbox is after a shedding pass."""

    depth: int
    shed: int  # telemetry-class events dropped in this pass
    over_limit: bool  # still over max_events: only access and fault events left to keep
    # The seqs dropped, as inclusive (first, last) runs: a backend that must not acknowledge
    # past a gap learns from them (in `outbox.shed`) which gaps will never be filled.
    shed_runs: tuple[tuple[int, int], ...] = ()


class Outbox:
    """Events with seq above `acked_upto` are owed to the backend, in seq order.

    Acknowledged events are kept for a while (the console shows recent events) and pruned
    beyond `keep_acked`. Over `max_events` unacknowledged, the oldest telemetry-class events
    are shed; access and fault events are never dropped.
    """

    def __init__(self, db: Database, *, max_events: int, keep_acked: int = 1000) -> None:
        self._db = db
        self.max_events = max_events
        self.keep_acked = keep_acked

    @property
    def db(self) -> Database:
        return self._db

    def on(self, db: Database) -> Outbox:
        """The same outbox through another connection (the writer thread's)."""
        return Outbox(db, max_events=self.max_events, keep_acked=self.keep_acked)

    def acked_upto(self) -> int:
        return int(self._db.get_meta("acked_upto") or 0)

    def upper_bound_depth(self) -> int:
        row = self._db.conn.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0) - self.acked_upto()

    def depth(self) -> int:
        row = self._db.conn.execute(
            "SELECT COUNT(*) FROM events WHERE seq > ?", (self.acked_upto(),)).fetchone()
        return int(row[0])

    def pending(self, after_seq: int, limit: int) -> list[StoredEvent]:
        """Unacknowledged events after `after_seq`, oldest first."""
        start = max(after_seq, self.acked_upto())
        rows = self._db.conn.execute(
            f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (start, limit)).fetchall()
        return [EventLog._row(r) for r in rows]

    def pending_wire(self, after_seq: int, limit: int, locker_id: str) -> list[tuple[int, str]]:
        """Like `pending`, but as (seq, wire JSON) built by SQLite in the query: the outbox
        publishes bodies as they are, without decoding and re-encoding every event."""
        start = max(after_seq, self.acked_upto())
        rows = self._db.conn.execute(
            "SELECT seq, json_object('seq', seq, 'event_id', event_id, 'type', type, 'at', at,"
            " 'locker_id', ?, 'compartment', compartment, 'code_id', code_id,"
            " 'data', json(data)) FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (locker_id, start, limit)).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    def ack(self, upto_seq: int) -> int:
        """Record that the backend stored everything up to `upto_seq`; returns acked_upto.

        Only the mark is written here; acknowledged rows are pruned in large batches, since
        deleting a few hundred rows per ack costs more than the ack itself.
        """
        current = self.acked_upto()
        if upto_seq <= current:
            return current
        self._db.set_meta("acked_upto", upto_seq)
        if self._acked_rows_over(upto_seq) >= PRUNE_BATCH:
            self.prune()
        return upto_seq

    def prune(self) -> int:
        """Delete acknowledged events beyond the newest `keep_acked`."""
        upto = self.acked_upto()
        with self._db.transaction() as conn:
            cur = conn.execute("DELETE FROM events WHERE seq <= ?", (upto - self.keep_acked,))
        return cur.rowcount

    def _acked_rows_over(self, upto: int) -> int:
        row = self._db.conn.execute("SELECT MIN(seq) FROM events").fetchone()
        oldest = int(row[0]) if row[0] is not None else upto + 1
        return (upto - self.keep_acked) - oldest + 1

    def shed(self) -> Pressure:
        """Keep the unacknowledged events under max_events by dropping telemetry only."""
        depth = self.depth()
        over = depth - self.max_events
        if over <= 0:
            return Pressure(depth=depth, shed=0, over_limit=False)
        with self._db.transaction() as conn:
            seqs = [int(r[0]) for r in conn.execute(
                "SELECT seq FROM events WHERE seq > ? AND class = 'telemetry' ORDER BY seq"
                " LIMIT ?", (self.acked_upto(), over))]
            if seqs:
                conn.execute("DELETE FROM events WHERE class = 'telemetry' AND seq BETWEEN ? AND ?"
                             " AND seq > ?", (seqs[0], seqs[-1], self.acked_upto()))
        depth -= len(seqs)
        return Pressure(depth=depth, shed=len(seqs), over_limit=depth > self.max_events,
                        shed_runs=_runs(seqs))


def _runs(seqs: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted seqs as inclusive (first, last) runs of consecutive numbers."""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return tuple(runs)
