"""The command journal: each verified cmd_id once, started before it runs, results to send."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lockerd.core.events import EventType
from lockerd.store.db import Database
from lockerd.store.events import EventLog
from lockerd.timeutil import format_time
from lockerd.trust.command import Command

STARTED = "started"


@dataclass(frozen=True, slots=True)
class CommandResult:
    cmd_id: str
    status: str  # ok | error | rejected | unknown
    detail: str

    def wire(self) -> dict[str, str]:
        return {"cmd_id": self.cmd_id, "status": self.status, "detail": self.detail}


class CommandJournal:
    """A command is journalled as `started` (with its event) before anything is done for it;
    one still `started` at startup died with the process and is reported `unknown`."""

    def __init__(self, db: Database, events: EventLog, *, notify: bool = True) -> None:
        self._db = db
        self._events = events
        self._notify = events.notify if notify else (lambda: None)

    @property
    def db(self) -> Database:
        return self._db

    def on(self, db: Database) -> CommandJournal:
        """The same journal through another connection (the writer thread's); its writes
        leave waking the outbox (`EventLog.notify`) to the caller, on the loop."""
        return CommandJournal(db, self._events, notify=False)

    def seen(self, cmd_id: str) -> bool:
        row = self._db.conn.execute("SELECT 1 FROM commands WHERE cmd_id = ?",
                                    (cmd_id,)).fetchone()
        return row is not None

    def start(self, cmd: Command, *, at: datetime) -> None:
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO commands (cmd_id, action, status, received_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (cmd.cmd_id, cmd.action, STARTED, format_time(at),
                 int(cmd.expires_at.timestamp())))
            self._events.append(conn, type=EventType.COMMAND_STARTED, at=at,
                                compartment=cmd.compartment,
                                data={"cmd_id": cmd.cmd_id, "action": cmd.action,
                                      "reason": cmd.reason})
        self._notify()

    def finish(self, cmd: Command, status: str, detail: str, *, at: datetime,
               data: dict[str, Any] | None = None) -> CommandResult:
        with self._db.transaction() as conn:
            conn.execute("UPDATE commands SET status = ?, detail = ? WHERE cmd_id = ?",
                         (status, detail, cmd.cmd_id))
            self._events.append(conn, type=EventType.COMMAND_RESULT, at=at,
                                compartment=cmd.compartment,
                                data={"cmd_id": cmd.cmd_id, "action": cmd.action,
                                      "status": status, "detail": detail, **(data or {})})
        self._notify()
        return CommandResult(cmd.cmd_id, status, detail)

    def recover(self, *, at: datetime) -> list[CommandResult]:
        """Mark every command a crash left `started` as `unknown`; never run it again."""
        rows = self._db.conn.execute(
            "SELECT cmd_id, action FROM commands WHERE status = ?", (STARTED,)).fetchall()
        detail = "the daemon stopped while the command ran; it was not run again"
        results = []
        for cmd_id, action in rows:
            with self._db.transaction() as conn:
                conn.execute("UPDATE commands SET status = 'unknown', detail = ?"
                             " WHERE cmd_id = ?", (detail, cmd_id))
                self._events.append(conn, type=EventType.COMMAND_RESULT, at=at,
                                    data={"cmd_id": cmd_id, "action": action,
                                          "status": "unknown", "detail": detail})
            results.append(CommandResult(cmd_id, "unknown", detail))
        if results:
            self._events.notify()
        return results

    def unsent_results(self) -> list[CommandResult]:
        rows = self._db.conn.execute(
            "SELECT cmd_id, status, detail FROM commands WHERE result_sent = 0"
            " AND status != ?", (STARTED,)).fetchall()
        return [CommandResult(r[0], r[1], r[2]) for r in rows]

    def mark_sent(self, cmd_id: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("UPDATE commands SET result_sent = 1 WHERE cmd_id = ?", (cmd_id,))

    def prune(self, *, before: datetime) -> int:
        """Forget commands expired before `before`: a replay of one is refused as expired."""
        with self._db.transaction() as conn:
            cur = conn.execute("DELETE FROM commands WHERE expires_at < ? AND status != ?",
                               (int(before.timestamp()), STARTED))
            return cur.rowcount
