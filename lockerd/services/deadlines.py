"""The heartbeat and the local extension of pickup deadlines (PROTOCOL section 14)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Protocol

from lockerd.core.compartment import Compartment
from lockerd.core.deadlines import HEARTBEAT_S, DeadlineClock, Heartbeat, extension_s
from lockerd.core.events import EventType
from lockerd.logs import get_logger
from lockerd.store.codes import CodeStore, ExtendableCode
from lockerd.store.db import Database
from lockerd.store.events import EventLog, StoredEvent
from lockerd.store.writer import InlineWriter, Writer
from lockerd.timeutil import format_time

log = get_logger("lockerd.deadlines")

HEARTBEAT_META = "heartbeat"


class DeadlineTime(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> datetime: ...


class DeadlineKeeper:
    """Writes the heartbeat (one small write a minute at most) and extends the pickup codes
    of the parcels that waited behind a bank that was down or a compartment out of service,
    each code by at most `cap_s` in total, with a `code.extended` event in the same
    transaction as the extension."""

    def __init__(self, *, db: Database, codes: CodeStore, events: EventLog,
                 clock: DeadlineTime, synchronised: Callable[[], bool],
                 compartments: Callable[[], Mapping[str, Compartment]], cap_s: int,
                 interval_s: float = HEARTBEAT_S, writer: Writer | None = None) -> None:
        self._db = db
        # The heartbeat and the extensions are written by the daemon's writer thread.
        self._writer: Writer = writer or InlineWriter(db)
        self._codes = codes
        self._events = events
        self._clock = clock
        self._synchronised = synchronised
        self._compartments = compartments
        self._cap_s = cap_s
        self._interval_s = interval_s
        self._deadlines = DeadlineClock(Heartbeat.from_json(db.get_meta(HEARTBEAT_META)),
                                        mono=clock.monotonic())
        self._written_at: float | None = None  # monotonic time of the last heartbeat write
        self._pending: set[asyncio.Task[list[StoredEvent]]] = set()

    @property
    def heartbeat(self) -> Heartbeat:
        return self._deadlines.heartbeat

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self._interval_s)

    async def settled(self) -> None:
        """Wait for the extensions started by compartments coming back in service."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _out_of_service(self) -> set[str]:
        return {cid for cid, c in self._compartments().items() if not c.in_service}

    async def tick(self) -> list[StoredEvent]:
        """The heartbeat, and at the first one on a synchronised clock since the start, the
        extension for the downtime. Writes nothing if the last write is under a minute old."""
        mono = self._clock.monotonic()
        if self._written_at is not None and mono - self._written_at < self._interval_s:
            return []
        wall = self._clock.wall()
        downtime = self._deadlines.tick(mono=mono, wall=wall.timestamp(),
                                        synced=self._synchronised(),
                                        out_of_service=self._out_of_service())
        self._written_at = mono
        if not downtime:
            beat = self.heartbeat.to_json()
            await self._writer.run(lambda db: db.set_meta(HEARTBEAT_META, beat), durable=False)
            return []
        held = {cid: c for cid, c in self._compartments().items() if _may_hold_parcel(c)}
        return await self._extend(held, downtime, wall, reason="downtime")

    def service_changed(self, cid: str, in_service: bool) -> None:
        """A compartment left service (its count starts) or came back: its codes are then
        extended by a task of their own (the scan of the codes runs in a worker thread)."""
        mono = self._clock.monotonic()
        others = self._out_of_service() - {cid}
        if not in_service:
            self._deadlines.out_of_service(cid, mono=mono, out_of_service=others)
            return
        waited = self._deadlines.back_in_service(cid, mono=mono, out_of_service=others)
        comp = self._compartments().get(cid)
        if not waited or comp is None or not _may_hold_parcel(comp):
            return
        task = asyncio.create_task(
            self._extend({cid: comp}, waited, self._clock.wall(), reason="out_of_service"),
            name=f"extend:{cid}")
        self._pending.add(task)
        task.add_done_callback(self._extension_done)

    def _extension_done(self, task: asyncio.Task[list[StoredEvent]]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("pickup deadline extension failed", error=str(exc))

    def _scan(self, compartments: set[str], parcels: set[str]) -> list[ExtendableCode]:
        """The candidate codes, read on a connection of this worker thread's own: one pass
        over the codes table must not hold up the event loop (safety rule 9)."""
        uri = self._db.path.resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=10.0)
        try:
            return self._codes.pickup_codes(compartments=compartments, parcels=parcels,
                                            conn=conn)
        finally:
            conn.close()

    async def _extend(self, held: Mapping[str, Compartment], waited_s: float, wall: datetime,
                      *, reason: str) -> list[StoredEvent]:
        """Extend by `waited_s` the live pickup codes of the parcels in `held` that had not
        expired when the wait began; the heartbeat is written in the same transaction."""
        by_parcel = {c.parcel_id: cid for cid, c in held.items() if c.parcel_id is not None}
        began = wall.timestamp() - waited_s
        plan: list[tuple[ExtendableCode, str, int]] = []
        candidates = await asyncio.to_thread(self._scan, set(held), set(by_parcel))
        for code in candidates:
            cid = code.compartment if code.compartment in held else by_parcel.get(
                code.parcel_id or "")
            by = extension_s(waited_s, already_s=code.extended_s, cap_s=self._cap_s)
            if cid is None or by == 0 or code.not_after <= began:
                continue
            plan.append((code, cid, by))
        beat = self.heartbeat.to_json()

        def write(db: Database) -> list[StoredEvent]:
            stored: list[StoredEvent] = []
            with db.transaction() as conn:
                for code, cid, by in plan:
                    if not self._codes.set_extension(conn, code, code.extended_s + by):
                        continue  # a bundle changed the code while it was being read
                    not_after = datetime.fromtimestamp(code.not_after + by, UTC)
                    stored.append(self._events.append(
                        conn, type=EventType.CODE_EXTENDED, at=wall, compartment=cid,
                        code_id=code.id, data={"extended_by_s": by, "reason": reason,
                                               "not_after": format_time(not_after)}))
                db.set_meta(HEARTBEAT_META, beat, conn=conn)
            return stored

        stored = await self._writer.run(write)
        if stored:
            self._events.notify()
            log.info("pickup deadlines extended", reason=reason, codes=len(stored),
                     waited_s=round(waited_s))
        return stored


def _may_hold_parcel(comp: Compartment) -> bool:
    """A parcel on record, or a compartment not seen empty: its codes' deadlines wait."""
    return comp.parcel_id is not None or comp.occupied is not False
