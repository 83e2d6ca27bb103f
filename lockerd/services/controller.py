"""The controller: hal input events in, core decisions out (events, pulses, display)."""

from __future__ import annotations

import asyncio
import hmac
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime

from hal.base import (
    Device,
    Display,
    DisplayMessage,
    DoorChanged,
    DoorState,
    HealthChanged,
    InputEvent,
    KeyPressed,
    LockDriver,
    OccupancyChanged,
    Scanned,
    TamperChanged,
)
from hal.errors import HalError
from lockerd.core import entry as entry_mod
from lockerd.core import messages
from lockerd.core.access import (
    CompartmentView,
    Decision,
    Granted,
    Reason,
    Refused,
    evaluate_code,
    pickup_target,
)
from lockerd.core.actions import Action, Begin, ParcelIn, ParcelOut, Pulse, Record, Show
from lockerd.core.budget import BudgetState, OpenBudget
from lockerd.core.compartment import Access, Compartment
from lockerd.core.deposit import DepositSession, SessionCredential
from lockerd.core.entry import CodeEntry
from lockerd.core.lockout import CONSUMED_USE_EVENTS, Lockout, LockoutState, RateLimiter
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.services.clock import Clock
from lockerd.store.codes import DERIVED_PREFIX, CodeStore
from lockerd.store.db import Database
from lockerd.store.events import EventLog, StoredEvent
from lockerd.store.parcels import ParcelStore, SpentTokens
from lockerd.trust.digest import code_digest, derived_pickup_code
from lockerd.trust.keyring import Keyring
from lockerd.trust.qrtoken import QrToken, check_qr_token, decode_qr_token, is_qr_token

log = get_logger("lockerd.controller")

MAX_SCAN_CODE_LENGTH = 64


def load_lockout_state(db: Database) -> LockoutState:
    raw = db.get_meta("lockout")
    if not isinstance(raw, dict):
        return LockoutState()
    try:
        return LockoutState(**raw)
    except TypeError:
        return LockoutState()


BUDGET_META = "open_budget"
DEFAULT_OPENS_PER_HOUR = 10


def load_budget_state(db: Database) -> BudgetState:
    raw = db.get_meta(BUDGET_META)
    if not isinstance(raw, dict):
        return BudgetState()
    try:
        opens = tuple(float(at) for at in raw.get("opens", ()))
        return BudgetState(opens=opens, reported_at=float(raw.get("reported_at", 0.0)))
    except (TypeError, ValueError):
        return BudgetState()


@dataclass(frozen=True, slots=True)
class DepositRules:
    """[deposits] and the derived-code settings of [codes], as the controller needs them."""

    sizes: tuple[str, ...] = ("S", "M", "L")
    session_idle_s: float = 60.0
    derived_digits: int | None = None  # None: derived pickup codes are not accepted


_TOKEN_REASONS = {r.value: r for r in Reason}


class RequestRefused(Exception):
    """A command or technician asked for something the bank cannot do now; says why."""


class OpenBudgetSpent(RequestRefused):
    """An open past `[commands] max_opens_per_hour` without an authorised override."""


class Controller:
    """Owns the compartments' state machines and the keypad buffer; one task runs it.

    Every decision is committed to the event log before the hardware acts on it, and a code's
    use changes in the same transaction as the event that reports it.
    """

    def __init__(
        self,
        *,
        locker_id: str,
        compartments: Mapping[str, Compartment],
        entry: CodeEntry,
        lockout: Lockout,
        rejections: RateLimiter,
        db: Database,
        events: EventLog,
        codes: CodeStore,
        code_key: bytes,
        lock: LockDriver,
        display: Display | None,
        pulse_s: float,
        clock: Clock,
        parcels: ParcelStore | None = None,
        tokens: SpentTokens | None = None,
        keyring: Callable[[], Keyring | None] = lambda: None,
        deposits: DepositRules | None = None,
        open_budget: OpenBudget | None = None,
    ) -> None:
        self.locker_id = locker_id
        self.compartments = dict(compartments)
        self._entry = entry
        self._lockout = lockout
        self._rejections = rejections
        self._db = db
        self._events = events
        self._codes = codes
        self._code_key = code_key
        self._lock = lock
        self._display = display
        self._pulse_s = pulse_s
        self._clock = clock
        self._parcels = parcels or ParcelStore(db)
        self._tokens = tokens or SpentTokens(db)
        self._keyring = keyring
        self.rules = deposits or DepositRules()
        self.open_budget = open_budget or OpenBudget(per_hour=DEFAULT_OPENS_PER_HOUR,
                                                     state=load_budget_state(db))
        self.session: DepositSession | None = None
        self._inputs: asyncio.Queue[InputEvent | None] = asyncio.Queue()
        self._display_until: float | None = None
        self._pulses: set[asyncio.Task[None]] = set()
        self._service_saved = self._service_snapshot()
        # Opens requested by a command, a self-test or a technician, awaiting the door sensor.
        self._awaiting: dict[str, asyncio.Future[str]] = {}
        self.busy_since: float | None = None  # set while an input is being handled
        self._taps: list[Callable[[InputEvent], None]] = []
        self.last_message: DisplayMessage | None = None

    # -- wiring -----------------------------------------------------------------------------

    def emit(self, event: InputEvent) -> None:
        """The callback every input device gets: never blocks, never raises."""
        self._inputs.put_nowait(event)

    async def run(self) -> None:
        await self._show(self._idle_message())
        while True:
            await self.step(await self._next_input())

    async def step(self, event: InputEvent | None) -> None:
        """One turn of the run loop: handle an input (None: woken to look at the deadlines
        again), then whatever is due. A test with its own clock drives the controller so."""
        self.busy_since = self._clock.monotonic()
        if event is not None:
            await self.handle(event)
        await self._tick()
        self.busy_since = None

    async def _next_input(self) -> InputEvent | None:
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
        candidates = [self._entry.deadline(), self._display_until]
        if self.session is not None:
            candidates.append(self.session.deadline())
        candidates += [c.deadline() for c in self.compartments.values()]
        present = [d for d in candidates if d is not None]
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
        match event:
            case KeyPressed(key=key):
                await self._on_key(key)
            case Scanned(data=data):
                await self._on_scan(data)
            case DoorChanged(compartment=cid, state=state):
                await self._on_door(cid, state)
            case OccupancyChanged(compartment=cid, occupied=occupied):
                comp = self.compartments.get(cid)
                if comp is None:
                    log.warning("occupancy change for an unknown compartment", compartment=cid)
                else:
                    await self._execute(comp.occupancy_changed(occupied))
            case TamperChanged(open=is_open):
                await self._execute([Record("tamper", data={"open": is_open})])
            case HealthChanged(device=device, ok=ok, detail=detail):
                kind = "hardware.recovered" if ok else "hardware.fault"
                (log.info if ok else log.error)(kind, device=device, detail=detail)
                await self._execute([Record(kind, data={"device": device, "detail": detail})])

    async def _on_key(self, key: str) -> None:
        now = self._clock.monotonic()
        if self.session is not None:
            # A deposit session holds the keypad: keys choose sizes, * ends it.
            await self._execute(self.session.key(key, self._views(), now))
            return
        remaining = self._lockout.remaining(self._clock.wall().timestamp())
        if remaining > 0:
            await self._show(messages.locked_out(remaining), hold_s=3.0)
            return
        for outcome in self._entry.press(key, now):
            match outcome:
                case entry_mod.Submitted(code=code):
                    await self.submit(code, source="keypad")
                case entry_mod.Typing(count=count):
                    await self._show(messages.typing(count), hold_s=None)
                case entry_mod.Cleared():
                    await self._show(messages.cleared(), hold_s=3.0)
                case entry_mod.TimedOut():
                    await self._show(messages.timed_out(), hold_s=3.0)
                case entry_mod.TooLong():
                    await self._show(messages.too_long(), hold_s=3.0)
                case entry_mod.StuckKey(key=stuck):
                    log.warning("keypad key seems stuck", key=stuck)
                    await self._execute([
                        Record("hardware.fault",
                               data={"device": "keypad", "detail": f"key {stuck!r} seems stuck"}),
                        Show(messages.keypad_fault(), hold_s=10.0),
                    ])
                case entry_mod.InvalidKey(key=bad):
                    log.warning("keypad sent an unknown key; ignored", key=repr(bad))

    async def _on_scan(self, data: str) -> None:
        text = data.strip()
        if self.session is not None:
            # In a deposit session the scanner reads parcel labels.
            await self._execute(self.session.label(text, self._views(),
                                                   self._clock.monotonic()))
            return
        if text.isascii() and text.isdigit() and len(text) <= MAX_SCAN_CODE_LENGTH:
            await self.submit(text, source="scanner")
            return
        if is_qr_token(text):
            await self.submit_token(text, source="scanner")
            return
        await self._refuse(Refused(Reason.UNREADABLE), source="scanner")

    async def _on_door(self, cid: str, state: DoorState) -> None:
        comp = self.compartments.get(cid)
        if comp is None:
            log.warning("door change for an unknown compartment", compartment=cid)
            return
        if state is DoorState.UNKNOWN:
            log.warning("door sensor does not know the door state", compartment=cid)
            return
        await self._execute(comp.door_changed(state is DoorState.OPEN, self._clock.monotonic()))

    # -- validation -------------------------------------------------------------------------

    async def submit(self, code: str, *, source: str) -> None:
        """The one validation path of every entered or scanned code."""
        wall = self._clock.wall()
        remaining = self._lockout.remaining(wall.timestamp())
        if remaining > 0:
            await self._refuse(Refused(Reason.LOCKED_OUT), source=source, remaining_s=remaining)
            return
        record = self._codes.lookup(code_digest(self._code_key, self.locker_id, code))
        views = self._views()
        decision: Decision = evaluate_code(record, now=wall, compartments=views)
        if record is None and self.rules.derived_digits is not None:
            decision = self._derived(code, views) or decision
        if isinstance(decision, Refused):
            await self._refuse(decision, source=source)
            return
        if decision.kind == "pickup":
            await self._grant(decision, source=source)
            return
        assert decision.code_id is not None
        await self._start_session(SessionCredential(
            kind=decision.kind, source=source, code_id=decision.code_id, digest=decision.digest,
            parcel_id=decision.parcel_id, compartment=decision.compartment))

    def _derived(self, code: str, views: Mapping[str, CompartmentView]) -> Decision | None:
        """A derived pickup code (PROTOCOL section 4) of a parcel that lies here, if `code` is
        one. Only parcels on record can match, so the cost is one HMAC per occupied door."""
        digits = self.rules.derived_digits
        if digits is None or len(code) != digits:
            return None
        for cid, view in views.items():
            parcel_id = view.parcel_id
            if parcel_id is None:
                continue
            expected = derived_pickup_code(self._code_key, self.locker_id, parcel_id, digits)
            if not hmac.compare_digest(expected, code):
                continue
            code_id = DERIVED_PREFIX + parcel_id
            if self._codes.derived_revoked(parcel_id):
                return Refused(Reason.REVOKED, code_id=code_id, compartment=cid)
            return pickup_target(code_id, compartment=cid, parcel_id=parcel_id,
                                 compartments=views)
        return None

    async def submit_token(self, text: str, *, source: str) -> None:
        """A scanned QR token (PROTOCOL section 9): verified offline, then used like a code."""
        keyring = self._keyring()
        if keyring is None:
            await self._refuse(Refused(Reason.NO_KEYRING), source=source)
            return
        ref: dict[str, str] = {}
        try:
            token = decode_qr_token(text, qr_role=keyring.qr)
            # Signed by a qr key from here on: a refusal names the token, so the backend can
            # tell whose it was. A forged or broken token's claimed cti is never reported.
            ref = {"cti": token.cti_hex}
            check_qr_token(token, keyring_expires_at=keyring.expires_at,
                           locker_id=self.locker_id, now=self._clock.wall())
        except TrustError as exc:
            log.info("QR token refused", reason=exc.reason, error=str(exc))
            await self._refuse(Refused(_TOKEN_REASONS.get(exc.reason, Reason.MALFORMED),
                                       ref=ref), source=source)
            return
        await self._use_token(token, source=source)

    async def _use_token(self, token: QrToken, *, source: str) -> None:
        ref = {"cti": token.cti_hex}
        if self._tokens.is_spent(token.cti_hex):
            await self._refuse(Refused(Reason.USED, compartment=token.compartment, ref=ref),
                               source=source)
            return
        expires = int(token.expires_at.timestamp())
        if token.kind != "pickup":
            await self._start_session(SessionCredential(
                kind=token.kind, source=source, cti=token.cti_hex, cti_expires=expires,
                parcel_id=token.parcel_id, compartment=token.compartment))
            return
        decision = pickup_target(None, compartment=token.compartment, parcel_id=token.parcel_id,
                                 compartments=self._views(), ref=ref)
        if isinstance(decision, Refused):
            await self._refuse(decision, source=source)
            return
        await self._grant(decision, source=source, ref=ref, cti=token.cti_hex,
                          cti_expires=expires)

    async def _grant(self, granted: Granted, *, source: str, ref: Mapping[str, str] | None = None,
                     cti: str | None = None, cti_expires: int | None = None) -> None:
        # No lockout reset here: the door has not opened, and the parcel may stay inside.
        log.info("access granted", compartment=granted.compartment, code_id=granted.code_id,
                 kind=granted.kind, source=source, **(ref or {}))
        assert granted.compartment is not None
        comp = self.compartments[granted.compartment]
        access = Access(code_id=granted.code_id, digest=granted.digest, kind=granted.kind,
                        source=source, ref=dict(ref or {}), parcel_id=granted.parcel_id,
                        cti=cti, cti_expires=cti_expires)
        await self._execute(comp.begin_access(access, self._clock.monotonic()))

    async def _start_session(self, credential: SessionCredential) -> None:
        # No lockout reset here: a deposit or courier credential can be presented again.
        log.info("deposit session started", kind=credential.kind, code_id=credential.code_id,
                 cti=credential.cti, source=credential.source)
        now = self._clock.monotonic()
        # Digits typed before a scan started the session would time out over its prompt.
        self._entry.discard()
        self.session = DepositSession(credential, sizes=self.rules.sizes,
                                      idle_timeout_s=self.rules.session_idle_s, t=now)
        await self._execute(self.session.start(self._views(), now))

    def _lockout_success(self) -> None:
        """A use was consumed for good (CONSUMED_USE_EVENTS): the keypad's failures are
        forgiven."""
        if self._lockout.state != LockoutState():
            self._lockout.record_success()
            self._save_lockout()

    def _views(self) -> dict[str, CompartmentView]:
        return {cid: c.view() for cid, c in self.compartments.items()}

    def _idle_message(self) -> DisplayMessage:
        prompt = self.session.prompt() if self.session is not None else None
        return prompt or messages.idle()

    async def _refuse(self, refused: Refused, *, source: str, remaining_s: float = 0.0) -> None:
        wall = self._clock.wall()
        actions: list[Action] = []
        if refused.reason.counts_as_guess:
            started = self._lockout.record_failure(wall.timestamp())
            self._save_lockout()
            if started is not None:
                remaining_s = started
                actions.append(Record("keypad.lockout", data={
                    "seconds": started, "lockouts": self._lockout.state.lockouts}))
        log.info("access refused", reason=refused.reason.value, compartment=refused.compartment,
                 code_id=refused.code_id, source=source)
        # Rejections are evented, but rate-limited: a flood must not fill the outbox.
        if self._rejections.allow(self._clock.monotonic()):
            data: dict[str, object] = {"reason": refused.reason.value, "source": source,
                                       **refused.ref}
            suppressed = self._rejections.take_suppressed()
            if suppressed:
                data["suppressed"] = suppressed
            actions.insert(0, Record("code.rejected", compartment=refused.compartment,
                                     code_id=refused.code_id, data=data))
        shown = remaining_s if remaining_s > 0 else 0.0
        actions.append(Show(messages.refused(
            Reason.LOCKED_OUT if shown else refused.reason, remaining_s=shown), hold_s=5.0))
        await self._execute(actions)

    # -- requests from commands and technicians --------------------------------------------

    async def open_for(self, cid: str, *, kind: str, source: str, ref: Mapping[str, str],
                       budgeted: bool = False, override: bool = False) -> str:
        """Open a compartment under the same door rules as a code: report, pulse, wait for
        the door sensor, one retry, then jammed. Returns "opened" or "jammed"; raises
        RequestRefused when the compartment cannot be opened now, OpenBudgetSpent when a
        `budgeted` open (a remote or console open) is past the open budget and not an
        authorised `override`."""
        comp = self.compartments.get(cid)
        if comp is None:
            raise RequestRefused(f"no compartment {cid!r} in this bank")
        if not comp.in_service:
            raise RequestRefused(f"compartment {cid} is out of service "
                                 f"({comp.service_reason}); put it back in service first")
        if not comp.view().idle:
            raise RequestRefused(f"compartment {cid} is busy ({comp.phase.value})")
        if budgeted:
            # Counted only now that the door will be pulsed: an open refused for any reason,
            # the budget included, does not count.
            ref = self._spend_budget(cid, source=source, ref=ref, override=override)
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._awaiting[cid] = outcome
        try:
            access = Access(code_id=None, digest=None, kind=kind, source=source, ref=ref)
            log.info("access granted", compartment=cid, code_id=None, kind=kind, source=source,
                     **ref)
            await self._execute(comp.begin_access(access, self._clock.monotonic()))
            # The controller task may be asleep with no deadline: it must see this one.
            self._inputs.put_nowait(None)
            return await outcome
        finally:
            self._awaiting.pop(cid, None)

    def _spend_budget(self, cid: str, *, source: str, ref: Mapping[str, str],
                      override: bool) -> Mapping[str, str]:
        """Count one open against the budget (safety rule 8), or refuse it. The first refusal
        of an hour, remote or console alike, is evented as `security.open_budget`."""
        budget = self.open_budget
        now = self._clock.wall().timestamp()
        within = budget.left(now) > 0
        if budget.take(now, override=override):
            self._save_budget()
            # An override is named in every event of its open, so the backend sees it.
            return ref if within else {**ref, "open_budget": "override"}
        if budget.report_due(now):
            self.commit(Record("security.open_budget", compartment=cid, data={
                "max_opens_per_hour": budget.per_hour, "source": source, **ref}))
        self._save_budget()
        log.warning("open refused: open budget spent", compartment=cid, source=source, **ref)
        raise OpenBudgetSpent(
            f"the open budget is spent: {budget.used(now)} remote and console opens in the "
            f"last hour, [commands] max_opens_per_hour is {budget.per_hour}")

    def _save_budget(self) -> None:
        state = self.open_budget.state
        self._db.set_meta(BUDGET_META, {"opens": list(state.opens),
                                        "reported_at": state.reported_at})

    async def set_service(self, cid: str, in_service: bool, reason: str) -> bool:
        """Take a compartment out of service or back in; False when nothing changed."""
        comp = self.compartments.get(cid)
        if comp is None:
            raise RequestRefused(f"no compartment {cid!r} in this bank")
        actions = comp.set_service(in_service, reason)
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

    def _save_lockout(self) -> None:
        self._db.set_meta("lockout", asdict(self._lockout.state))

    def clear_lockout(self) -> None:
        self._lockout.clear()
        self._save_lockout()

    # -- time -------------------------------------------------------------------------------

    async def _tick(self) -> None:
        now = self._clock.monotonic()
        if self._entry.tick(now) is not None:
            await self._show(messages.timed_out(), hold_s=3.0)
        for comp in self.compartments.values():
            actions = comp.tick(now)
            if actions:
                await self._execute(actions)
        if self.session is not None:
            await self._execute(self.session.tick(now))
        if self._display_until is not None and now >= self._display_until:
            self._display_until = None
            await self._show(self._idle_message())

    # -- outputs ----------------------------------------------------------------------------

    async def _execute(self, actions: list[Action]) -> None:
        pending: list[Record] = []
        follow: list[Action] = []
        consumed = False
        for action in actions:
            if isinstance(action, Record):
                pending.append(action)
                consumed = consumed or action.type in CONSUMED_USE_EVENTS
                self._resolve(action)
                follow += self._session_hook(action)
                continue
            # Everything recorded so far is durable before the next output (safety rule 1).
            self.commit(*pending)
            pending = []
            match action:
                case Pulse(compartment=cid):
                    self._start_pulse(cid)
                case Show(message=message, hold_s=hold_s):
                    await self._show(message, hold_s=hold_s)
                case Begin(compartment=cid, access=access):
                    await self._execute(self.compartments[cid].begin_access(
                        access, self._clock.monotonic()))
        self.commit(*pending)
        if consumed:
            self._lockout_success()
        if follow:
            await self._execute(follow)
        if self.session is not None and self.session.ended:
            log.info("deposit session ended", deposits=self.session.deposits)
            self.session = None
        await self._save_service_if_changed()

    def _session_hook(self, record: Record) -> list[Action]:
        """The deposit session learns how the door it opened went."""
        session = self.session
        if session is None or record.compartment is None:
            return []
        if record.type == "door.opened":
            session.door_opened(record.compartment)
            return []
        outcome = {"deposit.confirmed": "confirmed", "deposit.aborted": "aborted",
                   "door.jammed": "jammed"}.get(record.type)
        if outcome is None:
            return []
        return session.finished(record.compartment, outcome, self._clock.monotonic())

    def commit(self, *records: Record) -> list[StoredEvent]:
        """Make events durable in one transaction (one fsync), each with the changes it reports
        (a credential's use, a parcel on record)."""
        if not records:
            return []
        at = self._clock.wall()
        with self._db.transaction() as conn:
            stored = []
            for record in records:
                stored.append(self._events.append(
                    conn, type=record.type, at=at, compartment=record.compartment,
                    code_id=record.code_id, data=record.data))
                self._apply_effects(conn, record, at)
        self._events.notify()
        for event in stored:
            log.info("event", type=event.type, seq=event.seq, compartment=event.compartment,
                     code_id=event.code_id)
        return stored

    def _apply_effects(self, conn: sqlite3.Connection, record: Record, at: datetime) -> None:
        use = record.use
        if use is not None and use.delta:
            if use.cti is not None:
                self._tokens.change(conn, use.cti, use.expires or 0, use.delta)
            elif use.code_id is not None and use.digest is not None:
                self._codes.change_uses(conn, use.code_id, use.digest, use.delta)
        match record.parcel:
            case ParcelIn(parcel_id=parcel_id, code_id=code_id) if record.compartment:
                self._parcels.put(conn, record.compartment, parcel_id, code_id, at)
            case ParcelOut() if record.compartment:
                self._parcels.remove(conn, record.compartment)

    def _resolve(self, record: Record) -> None:
        outcome = self._awaiting.get(record.compartment or "")
        if outcome is None or outcome.done():
            return
        if record.type == "door.opened":
            outcome.set_result("opened")
        elif record.type == "door.jammed":
            outcome.set_result("jammed")

    def commit_event(self, type_: str, data: Mapping[str, object]) -> StoredEvent:
        return self.commit(Record(type_, data=data))[0]

    def _start_pulse(self, cid: str) -> None:
        # The pulse runs beside the controller so a door opening during it is seen at once.
        task = asyncio.create_task(self._pulse(cid), name=f"pulse:{cid}")
        self._pulses.add(task)
        task.add_done_callback(self._pulses.discard)

    async def _pulse(self, cid: str) -> None:
        try:
            await self._lock.pulse(cid, self._pulse_s)
        except HalError as exc:
            log.error("lock pulse failed", compartment=cid, error=str(exc))
            self.commit(Record("hardware.fault", compartment=cid,
                               data={"device": "lock", "detail": str(exc)}))

    async def _show(self, message: DisplayMessage, *, hold_s: float | None = None) -> None:
        self.last_message = message
        self._display_until = None if hold_s is None else self._clock.monotonic() + hold_s
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
        return {cid: c.service_reason for cid, c in self.compartments.items() if not c.in_service}

    async def _save_service_if_changed(self) -> None:
        snapshot = self._service_snapshot()
        if snapshot == self._service_saved:
            return
        self._db.set_meta("out_of_service", snapshot)
        changed = set(snapshot) ^ set(self._service_saved)
        self._service_saved = snapshot
        for cid in sorted(changed):
            await self.announce_service(cid)

    async def announce_service(self, cid: str) -> None:
        try:
            await self._lock.show_service(cid, self.compartments[cid].in_service)
        except HalError as exc:
            log.warning("could not show service state", compartment=cid, error=str(exc))
