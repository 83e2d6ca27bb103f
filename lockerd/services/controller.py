"""The executor: hal input events into the bank, its actions out (commit, pulse, display)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime

from hal.base import (
    ArmedPulse,
    Device,
    Display,
    DisplayMessage,
    DoorChanged,
    HealthChanged,
    InputEvent,
    KeyPressed,
    LockDriver,
    OccupancyChanged,
    Scanned,
    TamperChanged,
)
from hal.errors import HalError
from lockerd.core.actions import ParcelIn, ParcelOut, Pulse, Record, Show
from lockerd.core.bank import (
    AskHelp,
    Bank,
    BankAction,
    CredentialDecision,
    Log,
    Resolve,
    Save,
    Settled,
)

# Re-exported: the services and the composition root import them from here.
from lockerd.core.bank import DepositRules as DepositRules
from lockerd.core.bank import OpenBudgetSpent as OpenBudgetSpent
from lockerd.core.bank import RequestRefused as RequestRefused
from lockerd.core.budget import BudgetState, OpenBudget
from lockerd.core.compartment import Compartment
from lockerd.core.deposit import DepositSession
from lockerd.core.events import EventType
from lockerd.core.help import HelpLimitState
from lockerd.core.lockout import LockoutState
from lockerd.logs import get_logger
from lockerd.services.clock import Clock
from lockerd.services.credentials import CredentialService
from lockerd.services.help import HelpRequests, new_help_ids
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database
from lockerd.store.events import EventLog, StoredEvent
from lockerd.store.parcels import ParcelStore, SpentTokens
from lockerd.store.writer import InlineWriter, Writer

log = get_logger("lockerd.controller")

LOCKOUT_META = "lockout"
BUDGET_META = "open_budget"
HELP_LIMIT_META = "help_limit"
# How long the loop's thread blocks for the commit before a pulse (`DbWriter.submit`'s
# `hold_s`): that commit and the frame after it then run without waiting for the loop. About
# four of this machine's fsyncs; a slower disk's commit outlasts it, and the loop goes on.
ACCESS_COMMIT_HOLD_S = 0.002


def load_lockout_state(db: Database) -> LockoutState:
    raw = db.get_meta(LOCKOUT_META)
    if not isinstance(raw, dict):
        return LockoutState()
    try:
        return LockoutState(**raw)
    except TypeError:
        return LockoutState()


def load_budget_state(db: Database) -> BudgetState:
    raw = db.get_meta(BUDGET_META)
    if not isinstance(raw, dict):
        return BudgetState()
    try:
        opens = tuple(float(at) for at in raw.get("opens", ()))
        return BudgetState(opens=opens, reported_at=float(raw.get("reported_at", 0.0)))
    except (TypeError, ValueError):
        return BudgetState()


def load_help_limit_state(db: Database) -> HelpLimitState:
    raw = db.get_meta(HELP_LIMIT_META)
    if not isinstance(raw, dict):
        return HelpLimitState()
    try:
        return HelpLimitState(requests=tuple(float(at) for at in raw.get("requests", ())),
                              refused=int(raw.get("refused", 0)))
    except (TypeError, ValueError):
        return HelpLimitState()


def _log_events(stored: list[StoredEvent]) -> None:
    for event in stored:
        log.info("event", type=event.type, seq=event.seq, compartment=event.compartment,
                 code_id=event.code_id)


class Controller:
    """Runs the bank: one task takes each input in turn, gives it to the bank and carries out
    what the bank decided, in order.

    Every decision is committed to the event log before the hardware acts on it (safety rule
    1), and a credential's use changes in the same transaction as the event that reports it.
    """

    def __init__(
        self,
        *,
        bank: Bank,
        credentials: CredentialService,
        db: Database,
        events: EventLog,
        codes: CodeStore,
        lock: LockDriver,
        display: Display | None,
        pulse_s: float,
        clock: Clock,
        parcels: ParcelStore | None = None,
        tokens: SpentTokens | None = None,
        online: Callable[[], bool] | None = None,
        writer: Writer | None = None,
        commit_hold_s: float = ACCESS_COMMIT_HOLD_S,
    ) -> None:
        self.bank = bank
        self._credentials = credentials
        self._db = db
        # Every write goes through the writer (the daemon's: a thread with its own
        # connection), so a commit that waits for the lock or the disk never stalls the loop.
        self._writer: Writer = writer or InlineWriter(db)
        self._commit_hold_s = commit_hold_s  # see ACCESS_COMMIT_HOLD_S
        self._events = events
        self._codes = codes
        self._lock = lock
        self._display = display
        self._pulse_s = pulse_s
        self._clock = clock
        self._parcels = parcels or ParcelStore(db)
        self._tokens = tokens or SpentTokens(db)
        self._inputs: asyncio.Queue[InputEvent | None] = asyncio.Queue()
        self._display_until: float | None = None
        # A message decided while more input is already queued: drawn once the queue is empty,
        # so a burst of keys costs one redraw, not one per key.
        self._undrawn: DisplayMessage | None = None
        self._pulses: set[asyncio.Task[None]] = set()
        self._flushes: set[asyncio.Task[object]] = set()
        self._service_saved = self._service_snapshot()
        self._service_shown = self._out_of_service()
        # Opens requested by a command, a self-test or a technician, awaiting the door sensor.
        self._awaiting: dict[str, asyncio.Future[str]] = {}
        self.busy_since: float | None = None  # set while an input is being handled
        # A commit by the writer's connection empties this connection's page cache: the
        # first lookup after it reads the codes' upper pages again (see `_warm_lookup`).
        self._lookup_cold = True
        self._taps: list[Callable[[InputEvent], None]] = []
        self.last_message: DisplayMessage | None = None
        # Whether a help request can reach the backend now; without [mqtt] it never can.
        self.online: Callable[[], bool] = online or (lambda: False)
        self.help_requests = HelpRequests(db)
        # Told (compartment, in_service) once the change is saved: the deadline keeper.
        self.service_listeners: list[Callable[[str, bool], object]] = []

    # -- the bank's state, under the names the services read --------------------------------

    @property
    def compartments(self) -> dict[str, Compartment]:
        return self.bank.compartments

    @property
    def session(self) -> DepositSession | None:
        return self.bank.session

    @property
    def rules(self) -> DepositRules:
        return self.bank.rules

    @rules.setter
    def rules(self, rules: DepositRules) -> None:
        self.bank.rules = rules

    @property
    def credentials(self) -> CredentialService:
        """The credentials service deciding on each code and token (its settings included)."""
        return self._credentials

    @property
    def open_budget(self) -> OpenBudget:
        return self.bank.open_budget

    # -- wiring -----------------------------------------------------------------------------

    def emit(self, event: InputEvent) -> None:
        """The callback every input device gets: never blocks, never raises."""
        self._inputs.put_nowait(event)

    async def run(self) -> None:
        await self._show(self.bank.idle_message())
        while True:
            await self.step(await self._next_input())

    async def step(self, event: InputEvent | None) -> None:
        """One turn of the run loop: handle an input (None: woken to look at the deadlines
        again), then whatever is due. A test with its own clock drives the controller so."""
        self.busy_since = self._clock.monotonic()
        if event is not None:
            await self.handle(event)
        # In a burst of queued input (a code arriving in one read), what is due is looked at
        # once, after its last event: a few microseconds late, and not once per key.
        if event is None or self._inputs.empty():
            await self._tick()
            if self._undrawn is not None:
                await self._draw(self._undrawn)
            if event is None or isinstance(event, KeyPressed):
                self._prepare_code()
                if event is not None and event.key.isdigit():
                    self._warm_lookup()
        self.busy_since = None

    def _prepare_code(self) -> None:
        """A key handled (or a tick) with nothing else queued: the digest of the digits
        typed so far is made now, between two keys, and not after the '#' (see
        `CredentialService.prepare`); once nothing is typed (cleared, timed out, submitted,
        the keypad taken by a session or help) it is forgotten. A burst (the code and '#' in
        one read) makes it after the '#', as before."""
        typed = self.bank.code_being_typed()
        if typed is None:
            self._credentials.forget()
        elif typed != self._credentials.prepared:
            self._credentials.prepare(typed)

    def _warm_lookup(self) -> None:
        """A digit typed with nothing else queued: a code is on its way, and its '#' will be
        looked up. After a commit the loop's connection has lost its page cache (another
        connection wrote), so one lookup of no code reads the codes' upper pages again now,
        while the customer types, and not after the '#'. (A lookup right after the writer's
        commit took 88 us here, 58 us so warmed, 38 us in a hot loop.) Once per commit; a
        burst (the code and '#' in one read) skips it."""
        if self._lookup_cold:
            self._lookup_cold = False
            self._codes.lookup("")

    async def _next_input(self) -> InputEvent | None:
        if not self._inputs.empty():
            return self._inputs.get_nowait()
        deadline = self._next_deadline()
        if deadline is None:
            return await self._inputs.get()
        timeout = max(0.0, deadline - self._clock.monotonic())
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives in the same loop turn as an input, and the daemon would never stop.
        try:
            async with asyncio.timeout(timeout):
                return await self._inputs.get()
        except TimeoutError:
            return None

    def _next_deadline(self) -> float | None:
        present = [d for d in (self.bank.deadline(), self._display_until) if d is not None]
        return min(present) if present else None

    # -- inputs -----------------------------------------------------------------------------

    def add_tap(self, listener: Callable[[InputEvent], None]) -> Callable[[], None]:
        """Diagnostics (keypad and scanner echo): `listener` sees every input event until the
        returned function is called."""
        self._taps.append(listener)

        def remove() -> None:
            if listener in self._taps:
                self._taps.remove(listener)

        return remove

    async def handle(self, event: InputEvent) -> None:
        for tap in list(self._taps):
            tap(event)
        t = self._clock.monotonic()
        actions: list[BankAction] = []
        match event:
            case KeyPressed(key=key):
                actions = self.bank.key(key, t=t, wall=self._clock.wall().timestamp())
            case Scanned(data=data):
                actions = self.bank.scan(data, t=t, wall=self._clock.wall().timestamp())
            case DoorChanged(compartment=cid, state=state):
                actions = self.bank.door(cid, state, t=t)
            case OccupancyChanged(compartment=cid, occupied=occupied):
                actions = self.bank.occupancy(cid, occupied, t=t)
            case TamperChanged(open=is_open):
                actions = [Record(EventType.TAMPER, data={"open": is_open})]
            case HealthChanged(device=device, ok=ok, detail=detail):
                kind = EventType.HARDWARE_RECOVERED if ok else EventType.HARDWARE_FAULT
                actions = [Log("info" if ok else "error", kind,
                               {"device": device, "detail": detail}),
                           Record(kind, data={"device": device, "detail": detail})]
        await self._execute(actions)

    async def submit(self, code: str, *, source: str) -> None:
        """The one validation path of every entered or scanned code."""
        await self._execute(self.bank.submit(code, source=source, t=self._clock.monotonic(),
                                             wall=self._clock.wall().timestamp()))

    async def submit_token(self, text: str, *, source: str) -> None:
        """A scanned QR token (PROTOCOL section 9): verified offline, then used like a code."""
        await self._execute([Resolve(text, source, token=True)])

    def _resolve(self, request: Resolve) -> CredentialDecision:
        views, now = self.bank.views(), self._clock.wall()
        if request.token:
            return self._credentials.token(request.text, source=request.source, views=views,
                                           now=now)
        return self._credentials.code(request.text, source=request.source, views=views,
                                      now=now, derived_digits=self.bank.rules.derived_digits)

    # -- requests from commands and technicians --------------------------------------------

    async def open_for(self, cid: str, *, kind: str, source: str, ref: Mapping[str, str],
                       budgeted: bool = False, override: bool = False) -> str:
        """Open a compartment under the same door rules as a code: report, pulse, wait for
        the door sensor, one retry, then jammed. Returns "opened" or "jammed"; raises
        RequestRefused when the compartment cannot be opened now, OpenBudgetSpent when a
        `budgeted` open (a remote or console open) is past the open budget and not an
        authorised `override`."""
        try:
            actions = self.bank.request_open(
                cid, kind=kind, source=source, ref=ref, budgeted=budgeted, override=override,
                t=self._clock.monotonic(), wall=self._clock.wall().timestamp())
        except OpenBudgetSpent as exc:
            await self._execute(list(exc.actions))
            raise
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._awaiting[cid] = outcome
        try:
            await self._execute(actions)
            # The controller task may be asleep with no deadline: it must see this one.
            self._inputs.put_nowait(None)
            return await outcome
        finally:
            self._awaiting.pop(cid, None)

    async def set_service(self, cid: str, in_service: bool, reason: str) -> bool:
        """Take a compartment out of service or back in; False when nothing changed."""
        actions = self.bank.set_service(cid, in_service, reason, t=self._clock.monotonic())
        await self._execute(actions)
        return bool(actions)

    async def health(self, devices: Mapping[str, Device]) -> dict[str, dict[str, object]]:
        report: dict[str, dict[str, object]] = {}
        for name, device in devices.items():
            try:
                h = await device.health()
                report[name] = {"ok": h.ok, "detail": h.detail}
            except HalError as exc:
                report[name] = {"ok": False, "detail": str(exc)}
        return report

    async def clear_lockout(self) -> None:
        for action in self.bank.clear_lockout():
            if isinstance(action, Save):
                await self._save(action)

    # -- time -------------------------------------------------------------------------------

    async def _tick(self) -> None:
        now = self._clock.monotonic()
        await self._execute(self.bank.tick(now))
        if self._display_until is not None and now >= self._display_until:
            self._display_until = None
            await self._show(self.bank.idle_message())

    # -- outputs ----------------------------------------------------------------------------

    async def _execute(self, actions: list[BankAction]) -> None:
        if not actions:
            return
        pending: list[Record] = []
        # Log lines of a batch are written once its outputs are out: a line costs more than
        # the lookup that opens a door, and a customer waits on the pulse, not on the journal.
        logs: list[Log] = []
        recorded = False
        # Only a commit before a pulse (or a help request sent upstream) waits for the disk
        # (safety rule 1); the others are flushed right after, while the customer sees the
        # door or the display already.
        try:
            for action in actions:
                # isinstance, not match: this loop runs for every input, and the class patterns
                # cost more than the rest of a key press.
                if isinstance(action, Record):
                    pending.append(action)
                    recorded = True
                    continue
                if isinstance(action, Log):
                    logs.append(action)
                    continue
                if isinstance(action, Settled):
                    self._settle(action)
                    continue
                # Everything recorded so far is committed before the next output.
                if isinstance(action, Pulse):
                    await self._commit_then_pulse(pending, action.compartment)
                    pending = []
                    continue
                if pending:
                    await self.commit(*pending, durable=isinstance(action, AskHelp))
                    pending = []
                await self._carry_out(action)
            if pending:
                await self.commit(*pending, durable=False)
        finally:
            for line in logs:
                getattr(log, line.level)(line.message, **line.fields)
        if recorded:
            # A compartment leaves or re-enters service only with the event that says so.
            await self._save_service_if_changed()

    async def _carry_out(self, action: Show | Save | AskHelp | Resolve) -> None:
        """One output, once everything recorded before it is committed."""
        if isinstance(action, Show):
            await self._show(action.message, hold_s=action.hold_s)
        elif isinstance(action, Save):
            await self._save(action)
        elif isinstance(action, AskHelp):
            help_id, reference = new_help_ids()
            await self._execute(self.bank.help_sent(
                action, help_id=help_id, reference=reference, online=self.online(),
                t=self._clock.monotonic()))
        else:
            await self._execute(self.bank.decide(
                self._resolve(action), source=action.source, t=self._clock.monotonic(),
                wall=self._clock.wall().timestamp()))

    def _settle(self, settled: Settled) -> None:
        """An open in progress reached its end. The waiting request sees it only after this
        batch is committed: it runs when this task next yields, and every await of
        `_execute` commits first."""
        outcome = self._awaiting.get(settled.compartment)
        if outcome is not None and not outcome.done():
            outcome.set_result(settled.outcome)

    async def _save(self, action: Save) -> None:
        key: str
        value: object
        if action.what == "lockout":
            key, value = LOCKOUT_META, asdict(self.bank.lockout.state)
        elif action.what == "help_limit":
            help_state = self.bank.help_limit.state
            key, value = HELP_LIMIT_META, {"requests": list(help_state.requests),
                                           "refused": help_state.refused}
        else:
            state = self.bank.open_budget.state
            key, value = BUDGET_META, {"opens": list(state.opens),
                                       "reported_at": state.reported_at}
        await self._writer.run(lambda db: db.set_meta(key, value))
        self._lookup_cold = True

    async def commit(self, *records: Record, durable: bool = True) -> list[StoredEvent]:
        """Commit events in one transaction, each with the changes it reports (a credential's
        use, a parcel on record), through the writer. `durable`: on the disk when this
        returns (one fsync); otherwise committed (and read back by every reader) at once and
        flushed to the disk right after, and the outbox woken only once it is, so that
        nothing is published that a power cut could still take back."""
        if not records:
            return []
        stored = await self._writer.run(self._write_job(records), durable=durable)
        self._committed(stored, durable=durable)
        return stored

    def _write_job(self, records: Sequence[Record]) -> Callable[[Database], list[StoredEvent]]:
        """The writer's job committing `records` in one transaction, stamped now."""
        at = self._clock.wall()

        def write(db: Database) -> list[StoredEvent]:
            with db.transaction() as conn:
                stored = []
                for record in records:
                    stored.append(self._events.append(
                        conn, type=record.type, at=at, compartment=record.compartment,
                        code_id=record.code_id, data=record.data))
                    self._apply_effects(conn, record, at)
            return stored

        return write

    def _committed(self, stored: list[StoredEvent], *, durable: bool) -> None:
        """What follows a commit on the loop: caches dropped, the outbox woken (once the
        events are on the disk), the event lines written."""
        if not stored:
            return
        self._codes.forget_cached()
        self._lookup_cold = True
        if durable:
            self._events.notify()
        else:
            self._notify_when_flushed()
        _log_events(stored)

    async def _commit_then_pulse(self, records: list[Record], cid: str) -> None:
        """Commit `records` durably, then pulse `cid` (safety rule 1).

        The pulse runs in a task of its own (so that a door opening during it is seen at
        once), and that task waits for the commit itself: the writer's answer wakes it
        first, and it sends the frame before this task goes on to the commit's follow-up
        (the outbox's wake, the event lines), the display and the batch's log lines. The
        task is made while the commit is on its way to the disk, not after. Returns once
        the frame is sent or the pulse is under way; raises what the commit raised, and
        then nothing is pulsed.

        A lock driver that can (Kerong) arms the pulse first: the writer's thread then sends
        the frame itself right after the commit, and the pulse task only completes it."""
        armed: ArmedPulse | None = None
        durable: asyncio.Future[list[StoredEvent]] | None = None
        if records:
            try:
                armed = await self._lock.arm_pulse(cid)
            except HalError as exc:  # pulsed the usual way, after the commit
                log.warning("lock pulse not armed", compartment=cid, error=str(exc))
            try:
                durable = self._writer.submit(self._write_job(records), durable=True,
                                              after=None if armed is None else armed.fire,
                                              hold_s=self._commit_hold_s)
            except BaseException:
                if armed is not None:
                    armed.release()
                raise
        committed: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._pulse_when_durable(cid, durable, committed, armed),
                                   name=f"pulse:{cid}")
        self._pulses.add(task)
        task.add_done_callback(self._pulses.discard)
        if armed is not None:
            # However the task ends (a failed commit, cancelled even before it first ran),
            # the output is free again; after `finish` this does nothing.
            release = armed.release
            task.add_done_callback(lambda _task: release())
        self._committed(await committed, durable=True)

    async def _pulse_when_durable(self, cid: str,
                                  durable: asyncio.Future[list[StoredEvent]] | None,
                                  committed: asyncio.Future[list[StoredEvent]],
                                  armed: ArmedPulse | None) -> None:
        """The pulse task of `_commit_then_pulse`: `committed` gets what `durable` gave (or
        raised), and the pulse goes out only once the commit is on the disk (an armed one
        went out from the writer's thread already)."""
        try:
            stored = [] if durable is None else await durable
        except Exception as exc:  # noqa: BLE001 - raised again by the controller's task
            if not committed.done():
                committed.set_exception(exc)
            return
        except asyncio.CancelledError:
            if not committed.done():
                committed.set_exception(RuntimeError("the pulse was cancelled"))
            raise
        if committed.cancelled():
            # The controller stopped waiting (the daemon stops) before the commit was on
            # the disk: as when it awaited the commit itself, nothing more is pulsed.
            self._committed(stored, durable=True)
            return
        # The controller's task is woken now, and runs once this one first waits: after the
        # frame is written (the bus free) or the output is on.
        committed.set_result(stored)
        await self._pulse(cid, armed)

    def _notify_when_flushed(self) -> None:
        task = asyncio.create_task(self._flushed_then_notify(), name="events-flushed")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flushed_then_notify(self) -> None:
        try:
            await self._writer.flush()
        finally:
            self._events.notify()

    def _apply_effects(self, conn: sqlite3.Connection, record: Record, at: datetime) -> None:
        use = record.use
        if use is not None and use.delta:
            if use.cti is not None:
                self._tokens.change(conn, use.cti, use.expires or 0, use.delta)
            elif use.code_id is not None and use.digest is not None:
                self._codes.change_uses(conn, use.code_id, use.digest, use.delta)
            if use.support is not None:
                self._codes.change_support_use(conn, *use.support, use.delta)
        match record.parcel:
            case ParcelIn(parcel_id=parcel_id, code_id=code_id) if record.compartment:
                self._parcels.put(conn, record.compartment, parcel_id, code_id, at)
            case ParcelOut() if record.compartment:
                self._parcels.remove(conn, record.compartment)
        if record.help is not None:
            self.help_requests.mark(conn, record.help, at)

    async def help_reply(self, help_id: str, *, outcome: str, message: str) -> None:
        """A verified reply to a help request: recorded, shown if its customer still waits."""
        await self._execute(self.bank.help_reply(help_id, outcome=outcome, message=message))

    async def commit_event(self, type_: str, data: Mapping[str, object]) -> StoredEvent:
        return (await self.commit(Record(type_, data=data)))[0]

    def record_on_loop(self, type_: str, data: Mapping[str, object]) -> StoredEvent:
        """One event with no effects, committed at once on the loop's own connection: for
        the console's login events, whose callers cannot await and whose tests and users
        read the event right after the reply. Short (one row), and it waits at most for
        one short transaction of another writer (a snapshot is staged in those)."""
        event = self._events.record(type=type_, at=self._clock.wall(), data=data)
        log.info("event", type=event.type, seq=event.seq, compartment=None, code_id=None)
        return event

    async def _pulse(self, cid: str, armed: ArmedPulse | None = None) -> None:
        try:
            if armed is not None:
                await armed.finish()
            else:
                await self._lock.pulse(cid, self._pulse_s)
        except HalError as exc:
            log.error("lock pulse failed", compartment=cid, error=str(exc))
            await self.commit(Record(EventType.HARDWARE_FAULT, compartment=cid,
                               data={"device": "lock", "detail": str(exc)}))

    async def _show(self, message: DisplayMessage, *, hold_s: float | None = None) -> None:
        self.last_message = message
        self._display_until = None if hold_s is None else self._clock.monotonic() + hold_s
        if self._display is None:
            return
        if not self._inputs.empty():
            # More input is queued (a burst of keys): it decides what is shown next.
            self._undrawn = message
            return
        await self._draw(message)

    async def _draw(self, message: DisplayMessage) -> None:
        self._undrawn = None
        if self._display is None:
            return
        try:
            await self._display.show(message)
        except HalError as exc:
            log.warning("display failed", error=str(exc))

    async def wait_pulses(self) -> None:
        if self._pulses:
            await asyncio.gather(*self._pulses, return_exceptions=True)

    # -- service state ----------------------------------------------------------------------

    def _service_snapshot(self) -> dict[str, str]:
        """What a restart must find out of service: a door in its guided-retry window too."""
        return {cid: reason for cid, c in self.compartments.items()
                if (reason := c.restart_service_reason) is not None}

    def _out_of_service(self) -> set[str]:
        return {cid for cid, c in self.compartments.items() if not c.in_service}

    async def _save_service_if_changed(self) -> None:
        snapshot = self._service_snapshot()
        if snapshot != self._service_saved:
            await self._writer.run(lambda db: db.set_meta("out_of_service", snapshot))
            self._service_saved = snapshot
        shown = self._out_of_service()
        if shown == self._service_shown:
            return
        changed = shown ^ self._service_shown
        self._service_shown = shown
        for cid in sorted(changed):
            for listener in self.service_listeners:
                listener(cid, cid not in shown)
            await self.announce_service(cid)

    async def announce_service(self, cid: str) -> None:
        try:
            await self._lock.show_service(cid, self.compartments[cid].in_service)
        except HalError as exc:
            log.warning("could not show service state", compartment=cid, error=str(exc))
