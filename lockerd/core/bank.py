"""The bank as one pure aggregate: compartments, code entry, deposit session, lockout, budget.

Inputs (a key, a scan, a door, a parcel sensor, a tick, a credential decision, a request)
go in with the time; actions come out in the order the executor must carry them out. The
compartments and the deposit session talk to each other here, never through the executor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hal.values import DisplayMessage, DoorState
from lockerd.core import entry as entry_mod
from lockerd.core import help as help_mod
from lockerd.core import messages
from lockerd.core.access import CompartmentView, Reason, Refused
from lockerd.core.actions import Action, Begin, HelpMark, Pulse, Record, Show
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment
from lockerd.core.credential import Access
from lockerd.core.deposit import DepositSession, SessionCredential
from lockerd.core.entry import CodeEntry
from lockerd.core.events import CONSUMED_USE_EVENTS, EventType
from lockerd.core.help import HelpFlow, HelpLimit, HelpRules
from lockerd.core.lockout import Lockout, LockoutState, RateLimiter
from lockerd.ids import is_qr_token

MAX_SCAN_CODE_LENGTH = 64


@dataclass(frozen=True, slots=True)
class DepositRules:
    """[deposits] and the derived-code settings of [codes], as the bank needs them."""

    sizes: tuple[str, ...] = ("S", "M", "L")
    session_idle_s: float = 60.0
    derived_digits: int | None = None  # None: derived pickup codes are not accepted


class RequestRefused(Exception):
    """A command or technician asked for something the bank cannot do now; says why."""


class OpenBudgetSpent(RequestRefused):
    """An open past `[commands] max_opens_per_hour` without an authorised override.

    `actions`: what the refusal itself leaves to record (the hour's `security.open_budget`
    event, the budget's new state), carried out before the refusal is raised further."""

    def __init__(self, message: str, actions: tuple[BankAction, ...] = ()) -> None:
        super().__init__(message)
        self.actions = actions


# -- credential decisions (made by the credentials service, from store and trust reads) ----


@dataclass(frozen=True, slots=True)
class OpenPickup:
    """A valid pickup credential: open `compartment` for `access`."""

    compartment: str
    access: Access


@dataclass(frozen=True, slots=True)
class StartSession:
    """A valid deposit or courier credential: a deposit session starts under it."""

    credential: SessionCredential


CredentialDecision = OpenPickup | StartSession | Refused


# -- what the bank asks of its executor, besides Record, Pulse and Show --------------------


@dataclass(frozen=True, slots=True)
class Resolve:
    """Look a credential up (store and trust reads) and give the decision to `Bank.decide`."""

    text: str
    source: str
    token: bool  # a scanned `LK1:` token; else a code typed or scanned as digits


@dataclass(frozen=True, slots=True)
class Save:
    """Persist this part of the bank's state, which must survive a restart."""

    what: Literal["lockout", "open_budget", "help_limit"]


@dataclass(frozen=True, slots=True)
class Settled:
    """The door of an open in progress reached an end: "opened" (seen open) or "jammed"."""

    compartment: str
    outcome: Literal["opened", "jammed"]


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the daemon's log (never a plain code or token)."""

    level: Literal["info", "warning", "error"]
    message: str
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AskHelp:
    """Name a help request (a fresh help_id and reference) and give it to `Bank.help_sent`."""

    tracking: str
    phone_last4: str


BankAction = Record | Pulse | Show | Resolve | Save | Settled | Log | AskHelp


class CompartmentViews(Mapping[str, CompartmentView]):
    """The compartments' views, each made on its first read and kept. Read it before the
    bank changes (as a decision does), not after."""

    __slots__ = ("_compartments", "_made")

    def __init__(self, compartments: Mapping[str, Compartment]) -> None:
        self._compartments = compartments
        self._made: dict[str, CompartmentView] = {}

    def __getitem__(self, cid: str) -> CompartmentView:
        view = self._made.get(cid)
        if view is None:
            view = self._made[cid] = self._compartments[cid].view()
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._compartments)

    def __len__(self) -> int:
        return len(self._compartments)


class Bank:
    """The whole bank's decisions. Pure and synchronous: `t` is monotonic seconds, `wall` is
    wall-clock seconds since the epoch (lockout and budget survive restarts on it)."""

    def __init__(
        self,
        *,
        compartments: Mapping[str, Compartment],
        entry: CodeEntry,
        lockout: Lockout,
        rejections: RateLimiter,
        open_budget: OpenBudget,
        rules: DepositRules | None = None,
        help_rules: HelpRules | None = None,
        help_limit: HelpLimit | None = None,
    ) -> None:
        self.compartments = dict(compartments)
        self.entry = entry
        self.lockout = lockout
        self.rejections = rejections
        self.open_budget = open_budget
        self.rules = rules or DepositRules()
        self.session: DepositSession | None = None
        self.help_rules = help_rules or HelpRules()
        self.help_limit = help_limit or HelpLimit(per_hour=self.help_rules.max_per_hour)
        self.help: HelpFlow | None = None

    # -- views ------------------------------------------------------------------------------

    def views(self) -> Mapping[str, CompartmentView]:
        """What each compartment looks like now, for a decision made at once: a view is made
        when first read, so the lookup of a code naming its door makes one, not one per door."""
        return CompartmentViews(self.compartments)

    def code_being_typed(self) -> str | None:
        """The digits a `#` would submit as a code now, or None: nothing typed, or the keypad
        is a deposit session's or the help flow's."""
        if self.session is not None or self.help is not None:
            return None
        return self.entry.typed or None

    def deadline(self) -> float | None:
        """The next time `tick` has something to do, or None."""
        candidates = [self.entry.deadline()]
        if self.session is not None:
            candidates.append(self.session.deadline())
        if self.help is not None:
            candidates.append(self.help.deadline())
        candidates += [c.deadline() for c in self.compartments.values()]
        present = [d for d in candidates if d is not None]
        return min(present) if present else None

    def idle_message(self) -> DisplayMessage:
        if self.help is not None:
            # A message held over help (a door closing elsewhere) gives the screen back.
            return self.help.prompt()
        prompt = self.session.prompt() if self.session is not None else None
        retry = self._retry_compartment()
        if prompt is None and retry is not None:
            # The jammed customer's prompt stays up for the window, whatever else was shown.
            prompt = messages.jam_retry(retry.id)
        return prompt or messages.idle(help_at_bank=self.help_rules.enabled)

    # -- inputs of the customer side --------------------------------------------------------

    def key(self, key: str, *, t: float, wall: float) -> list[BankAction]:
        if self.session is not None:
            # A deposit session holds the keypad: keys choose sizes, * ends it.
            return self._run(self.session.key(key, self.views(), t), t)
        if self.help is not None:
            return self._help_outcome(self.help.key(key, t), wall=wall)
        remaining = self.lockout.remaining(wall)
        if remaining > 0:
            return [Show(messages.locked_out(remaining), hold_s=3.0)]
        empty = key == "#" and self.entry.count == 0
        outcomes = self.entry.press(key, t)
        if empty and not outcomes:
            return self._run(self._enter_on_empty(t), t)
        out: list[BankAction] = []
        for outcome in outcomes:
            out += self._entry_outcome(outcome, t=t, wall=wall)
        return out

    def _enter_on_empty(self, t: float) -> list[Action]:
        """`#` with nothing typed: the guided retry of the door that jammed last while its
        window is open (PROTOCOL section 15); otherwise help starts (section 12)."""
        retry = self._retry_compartment()
        if retry is not None:
            return retry.guided_retry(t)
        if not self.help_rules.enabled:
            return []
        self.help = HelpFlow(self.help_rules, t=t)
        return [Show(self.help.start().message, hold_s=None)]

    def _retry_compartment(self) -> Compartment | None:
        """The compartment whose guided-retry window opened last (the customer most likely
        in front of the keypad), or None."""
        open_windows = [(w, c) for c in self.compartments.values()
                        if (w := c.retry_window) is not None]
        return max(open_windows, key=lambda pair: pair[0])[1] if open_windows else None

    # -- help at the bank (PROTOCOL section 12) ---------------------------------------------

    def _help_outcome(self, outcome: help_mod.HelpOutcome | None, *,
                      wall: float) -> list[BankAction]:
        match outcome:
            case help_mod.Prompt(message=message):
                return [Show(message, hold_s=None)]
            case help_mod.Ended(message=message):
                self.help = None
                return [Show(message, hold_s=5.0)]
            case help_mod.Ask(tracking=tracking, phone_last4=phone):
                if not self.help_limit.take(wall):
                    # Past the hourly limit only the counter keeps a trace (no event).
                    self.help = None
                    return [Save("help_limit"), Log("warning", "help request over the limit",
                                                    {"refused": self.help_limit.state.refused}),
                            Show(help_mod.limited(self.help_rules.support_text), hold_s=10.0)]
                return [Save("help_limit"), AskHelp(tracking, phone)]
        return []

    def help_sent(self, request: AskHelp, *, help_id: str, reference: str, online: bool,
                  t: float) -> list[BankAction]:
        """The executor named the request: it is recorded (durable before the screen says it
        was sent), then the customer waits for the reply, or is told it goes when online."""
        record = Record(EventType.HELP_REQUESTED, data={
            "help_id": help_id, "reference": reference, "tracking": request.tracking,
            "phone_last4": request.phone_last4}, help=HelpMark(help_id))
        if self.help is None:
            return [record]
        if not online:
            self.help = None
            return [record, Show(help_mod.offline(reference, self.help_rules.support_text),
                                 hold_s=15.0)]
        self.help.sent(help_id, reference, t)
        return [record, Show(help_mod.checking(reference), hold_s=None)]

    def help_reply(self, help_id: str, *, outcome: str, message: str) -> list[BankAction]:
        """A verified reply: recorded, and shown only to a customer still waiting for it."""
        out: list[BankAction] = [Record(EventType.HELP_ANSWERED, data={
            "help_id": help_id, "outcome": outcome}, help=HelpMark(help_id, answered=True))]
        flow = self.help
        if flow is not None and flow.help_id == help_id and flow.step is help_mod.Step.CHECKING:
            self.help = None
            out.append(Show(help_mod.answered(message), hold_s=15.0))
        return out

    def _entry_outcome(self, outcome: entry_mod.EntryOutcome, *, t: float,
                       wall: float) -> list[BankAction]:
        match outcome:
            case entry_mod.Submitted(code=code):
                return self.submit(code, source="keypad", t=t, wall=wall)
            case entry_mod.Typing(count=count):
                return [Show(messages.typing(count), hold_s=None)]
            case entry_mod.Cleared():
                return [Show(messages.cleared(), hold_s=3.0)]
            case entry_mod.TimedOut():
                return [Show(messages.timed_out(), hold_s=3.0)]
            case entry_mod.TooLong():
                return [Show(messages.too_long(), hold_s=3.0)]
            case entry_mod.StuckKey(key=stuck):
                return [
                    Log("warning", "keypad key seems stuck", {"key": stuck}),
                    Record(EventType.HARDWARE_FAULT,
                           data={"device": "keypad", "detail": f"key {stuck!r} seems stuck"}),
                    Show(messages.keypad_fault(), hold_s=10.0),
                ]
            case entry_mod.InvalidKey(key=bad):
                return [Log("warning", "keypad sent an unknown key; ignored", {"key": repr(bad)})]
        return []

    def scan(self, data: str, *, t: float, wall: float) -> list[BankAction]:
        text = data.strip()
        if self.session is not None:
            # In a deposit session the scanner reads parcel labels.
            return self._run(self.session.label(text, self.views(), t), t)
        if self.help is not None:
            return self._help_outcome(self.help.scan(text, t), wall=wall)
        if text.isascii() and text.isdigit() and len(text) <= MAX_SCAN_CODE_LENGTH:
            return self.submit(text, source="scanner", t=t, wall=wall)
        if is_qr_token(text):
            return [Resolve(text, "scanner", token=True)]
        return self.refuse(Refused(Reason.UNREADABLE), source="scanner", t=t, wall=wall)

    def submit(self, code: str, *, source: str, t: float, wall: float) -> list[BankAction]:
        """A code typed or scanned: refused while the keypad is locked out, else looked up."""
        remaining = self.lockout.remaining(wall)
        if remaining > 0:
            return self.refuse(Refused(Reason.LOCKED_OUT), source=source, t=t, wall=wall,
                               remaining_s=remaining)
        return [Resolve(code, source, token=False)]

    def decide(self, decision: CredentialDecision, *, source: str, t: float,
               wall: float) -> list[BankAction]:
        """What a looked-up credential does: a refusal, a door opened, a session started.
        No lockout reset here: nothing is consumed until a door has been seen open."""
        match decision:
            case Refused():
                return self.refuse(decision, source=source, t=t, wall=wall)
            case OpenPickup(compartment=cid, access=access):
                granted = Log("info", "access granted", {
                    "compartment": cid, "code_id": access.code_id, "kind": access.kind,
                    "source": source, **access.ref})
                return [granted, *self._run(self.compartments[cid].begin_access(access, t), t)]
            case StartSession(credential=credential):
                return self._start_session(credential, t)
        return []

    def _start_session(self, credential: SessionCredential, t: float) -> list[BankAction]:
        started = Log("info", "deposit session started", {
            "kind": credential.kind, "code_id": credential.code_id, "cti": credential.cti,
            "source": credential.source})
        # Digits typed before a scan started the session would time out over its prompt.
        self.entry.discard()
        self.session = DepositSession(credential, sizes=self.rules.sizes,
                                      idle_timeout_s=self.rules.session_idle_s, t=t)
        return [started, *self._run(self.session.start(self.views(), t), t)]

    def refuse(self, refused: Refused, *, source: str, t: float, wall: float,
               remaining_s: float = 0.0) -> list[BankAction]:
        """A refused credential: counted against the lockout when it was a guess, evented
        (rate-limited: a flood must not fill the outbox) and shown."""
        actions: list[BankAction] = []
        records: list[BankAction] = []
        if refused.reason.counts_as_guess:
            started = self.lockout.record_failure(wall)
            actions.append(Save("lockout"))
            if started is not None:
                remaining_s = started
                records.append(Record(EventType.KEYPAD_LOCKOUT, data={
                    "seconds": started, "lockouts": self.lockout.state.lockouts}))
        actions.append(Log("info", "access refused", {
            "reason": refused.reason.value, "compartment": refused.compartment,
            "code_id": refused.code_id, "source": source}))
        data = self.rejections.admit({"reason": refused.reason.value, "source": source,
                                      **refused.ref}, t)
        if data is not None:
            records.insert(0, Record(EventType.CODE_REJECTED, compartment=refused.compartment,
                                     code_id=refused.code_id, data=data))
        shown = remaining_s if remaining_s > 0 else 0.0
        records.append(Show(messages.refused(
            Reason.LOCKED_OUT if shown else refused.reason, remaining_s=shown), hold_s=5.0))
        return actions + records

    def door(self, cid: str, state: DoorState, *, t: float) -> list[BankAction]:
        comp = self.compartments.get(cid)
        if comp is None:
            return [Log("warning", "door change for an unknown compartment", {"compartment": cid})]
        if state is DoorState.UNKNOWN:
            return [Log("warning", "door sensor does not know the door state",
                        {"compartment": cid})]
        return self._run(comp.door_changed(state is DoorState.OPEN, t), t)

    def occupancy(self, cid: str, occupied: bool, *, t: float) -> list[BankAction]:
        comp = self.compartments.get(cid)
        if comp is None:
            return [Log("warning", "occupancy change for an unknown compartment",
                        {"compartment": cid})]
        return self._run(comp.occupancy_changed(occupied), t)

    def tick(self, t: float) -> list[BankAction]:
        out: list[BankAction] = []
        if self.entry.tick(t) is not None:
            out.append(Show(messages.timed_out(), hold_s=3.0))
        for comp in self.compartments.values():
            # Most ticks find nothing due: skip the routing of an empty list.
            if due := comp.tick(t):
                out += self._run(due, t)
        if self.session is not None and (due := self.session.tick(t)):
            out += self._run(due, t)
        if self.help is not None and (ended := self.help.tick(t)) is not None:
            self.help = None
            out.append(Show(ended.message, hold_s=15.0))
        return out

    # -- requests from commands and technicians --------------------------------------------

    def request_open(self, cid: str, *, kind: str, source: str, ref: Mapping[str, str],
                     t: float, wall: float, budgeted: bool = False,
                     override: bool = False) -> list[BankAction]:
        """Open a compartment for a command, a self-test or a technician, under the door
        rules of a code. Raises RequestRefused when it cannot be opened now, OpenBudgetSpent
        when a `budgeted` open is past the open budget and not an authorised `override`."""
        comp = self.compartments.get(cid)
        if comp is None:
            raise RequestRefused(f"no compartment {cid!r} in this bank")
        if not comp.in_service:
            raise RequestRefused(f"compartment {cid} is out of service "
                                 f"({comp.service_reason}); put it back in service first")
        if not comp.view().idle:
            raise RequestRefused(f"compartment {cid} is busy ({comp.phase.value})")
        out: list[BankAction] = []
        if budgeted:
            # Counted only now that the door will be pulsed: an open refused for any reason,
            # the budget included, does not count.
            ref = self._spend_budget(cid, source=source, ref=ref, override=override, wall=wall)
            out.append(Save("open_budget"))
        access = Access(code_id=None, digest=None, kind=kind, source=source, ref=ref)
        out.append(Log("info", "access granted", {
            "compartment": cid, "code_id": None, "kind": kind, "source": source, **ref}))
        return out + self._run(comp.begin_access(access, t), t)

    def _spend_budget(self, cid: str, *, source: str, ref: Mapping[str, str], override: bool,
                      wall: float) -> Mapping[str, str]:
        """Count one open against the budget (safety rule 8), or refuse it. The first refusal
        of an hour, remote or console alike, is evented as `security.open_budget`."""
        budget = self.open_budget
        within = budget.left(wall) > 0
        if budget.take(wall, override=override):
            # An override is named in every event of its open, so the backend sees it.
            return ref if within else {**ref, "open_budget": "override"}
        refusal: list[BankAction] = []
        if budget.report_due(wall):
            refusal.append(Record(EventType.SECURITY_OPEN_BUDGET, compartment=cid, data={
                "max_opens_per_hour": budget.per_hour, "source": source, **ref}))
        refusal += [Save("open_budget"), Log("warning", "open refused: open budget spent",
                                             {"compartment": cid, "source": source, **ref})]
        raise OpenBudgetSpent(
            f"the open budget is spent: {budget.used(wall)} remote and console opens in the "
            f"last hour, [commands] max_opens_per_hour is {budget.per_hour}", tuple(refusal))

    def set_service(self, cid: str, in_service: bool, reason: str, *,
                    t: float) -> list[BankAction]:
        """Take a compartment out of service or back in; no actions when nothing changed."""
        comp = self.compartments.get(cid)
        if comp is None:
            raise RequestRefused(f"no compartment {cid!r} in this bank")
        return self._run(comp.set_service(in_service, reason), t)

    def clear_lockout(self) -> list[BankAction]:
        self.lockout.clear()
        return [Save("lockout")]

    # -- the compartments and the session, talking -----------------------------------------

    def _run(self, actions: list[Action], t: float) -> list[BankAction]:
        """The actions of a compartment or the session, with what they set off: a session
        assigning a door begins its access, learns how its door went and is done when it
        ends; a use consumed for good forgives the keypad's failures (safety rule 6)."""
        out: list[BankAction] = []
        follow: list[Action] = []
        consumed = False
        for action in actions:
            if isinstance(action, Begin):
                out += self._run(self.compartments[action.compartment].begin_access(
                    action.access, t), t)
                continue
            out.append(action)
            if isinstance(action, Record):
                consumed = consumed or action.type in CONSUMED_USE_EVENTS
                if action.compartment is not None:
                    if (end := _SETTLES.get(action.type)) is not None:
                        out.append(Settled(action.compartment, end))
                    if self.session is not None:
                        follow += self._session_learns(action, t)
        if consumed and self.lockout.state != LockoutState():
            self.lockout.record_success()
            out.append(Save("lockout"))
        if follow:
            out += self._run(follow, t)
        if self.session is not None and self.session.ended:
            out.append(Log("info", "deposit session ended",
                           {"deposits": self.session.deposits}))
            self.session = None
        return out

    def _session_learns(self, record: Record, t: float) -> list[Action]:
        """The deposit session learns how the door it opened went."""
        session = self.session
        if session is None or record.compartment is None:
            return []
        match record.type:
            case EventType.DOOR_OPENED:
                session.door_opened(record.compartment)
                return []
            case EventType.DEPOSIT_CONFIRMED:
                return session.finished(record.compartment, "confirmed", t)
            case EventType.DEPOSIT_ABORTED:
                return session.finished(record.compartment, "aborted", t)
            case EventType.DOOR_JAMMED:
                return session.finished(record.compartment, "jammed", t)
        return []


# An open in progress ends when its door is seen open or is given up as jammed.
_SETTLES: dict[str, Literal["opened", "jammed"]] = {
    EventType.DOOR_OPENED: "opened", EventType.DOOR_JAMMED: "jammed"}
