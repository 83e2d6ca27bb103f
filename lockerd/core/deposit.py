"""Deposits: compartment assignment by size, and the session a deposit or courier code starts."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hal.values import DisplayMessage
from lockerd.core import messages
from lockerd.core.access import CompartmentView, Reason, door_unavailable
from lockerd.core.actions import Action, Begin, Record, Show
from lockerd.core.credential import Access
from lockerd.core.events import EventType
from lockerd.ids import is_parcel_label, is_qr_token

SESSION_ENDED_HOLD_S = 4.0


def is_parcel_id(text: str) -> bool:
    """A parcel label's text is the parcel id (the rule is lockerd.ids.is_parcel_label)."""
    return is_parcel_label(text)


def assign(
    views: Mapping[str, CompartmentView],
    sizes: tuple[str, ...],
    *,
    size: str | None = None,
    named: str | None = None,
) -> str | Reason:
    """The compartment a deposit goes into, or why there is none.

    `named`: that compartment, if it can take a parcel now. Otherwise the smallest free
    compartment whose size is `size` or larger (`sizes` lists the sizes smallest first); ties go
    to the first in configuration order. Never an occupied, busy, out-of-service or unknown
    one: a compartment is free only when the occupancy sensor has seen it empty.
    """
    if named is not None:
        view = views.get(named)
        unavailable = door_unavailable(view)
        if unavailable is not None:
            return unavailable
        assert view is not None
        if view.occupied is None and view.parcel_id is None:
            return Reason.OCCUPANCY_UNKNOWN
        if not view.free:
            return Reason.OCCUPIED
        return named
    smallest = 0 if size is None else sizes.index(size)
    best: tuple[int, str] | None = None
    for cid, view in views.items():
        if not view.free or view.size not in sizes:
            continue
        rank = sizes.index(view.size)
        if rank >= smallest and (best is None or rank < best[0]):
            best = (rank, cid)
    return Reason.NO_FREE if best is None else best[1]


@dataclass(frozen=True, slots=True)
class SessionCredential:
    """The deposit or courier credential a session runs under."""

    kind: str  # deposit | courier
    source: str
    code_id: str | None = None  # a code, or None for a QR token
    digest: str | None = None
    cti: str | None = None
    cti_expires: int | None = None
    parcel_id: str | None = None  # named by the credential: no label to scan
    compartment: str | None = None  # named by the credential: no size to choose

    @property
    def ref(self) -> dict[str, str]:
        return {} if self.cti is None else {"cti": self.cti}


class SessionPhase(enum.Enum):
    LABEL = "label"  # waiting for a parcel label
    SIZE = "size"  # waiting for a size key
    DOOR = "door"  # a compartment is opening, open, or closing for this parcel
    ENDED = "ended"


class DepositSession:
    """One courier's (or one drop-off's) time at the keypad. Pure; `t` is monotonic seconds.

    A courier code runs until `*` or `idle_timeout_s` without a key or scan; a deposit code
    ends after its one deposit. The credential's one use is taken by the first door that is
    seen open (by the compartment, in the same transaction as the event), never before.
    """

    def __init__(
        self,
        credential: SessionCredential,
        *,
        sizes: tuple[str, ...],
        idle_timeout_s: float,
        t: float,
    ) -> None:
        if not sizes:
            raise ValueError("a deposit session needs at least one compartment size")
        self.credential = credential
        self.sizes = sizes
        self.idle_timeout_s = idle_timeout_s
        self.phase = SessionPhase.LABEL
        self.parcel_id: str | None = credential.parcel_id
        self.compartment: str | None = None  # the door of the deposit in progress
        self.deposits = 0
        self.consumed = False
        self._last_input = t

    @property
    def courier(self) -> bool:
        return self.credential.kind == "courier"

    @property
    def ended(self) -> bool:
        return self.phase is SessionPhase.ENDED

    def deadline(self) -> float | None:
        if self.phase in (SessionPhase.LABEL, SessionPhase.SIZE):
            return self._last_input + self.idle_timeout_s
        return None

    def prompt(self) -> DisplayMessage | None:
        """What the display shows while the session waits for the courier."""
        if self.phase is SessionPhase.LABEL:
            return messages.scan_label(self.deposits)
        if self.phase is SessionPhase.SIZE and self.parcel_id is not None:
            return messages.choose_size(self.parcel_id, self.sizes)
        return None

    # -- inputs -----------------------------------------------------------------------------

    def start(self, views: Mapping[str, CompartmentView], t: float) -> list[Action]:
        self._last_input = t
        started = self._record(EventType.SESSION_STARTED, {})
        return [started, *self._next(views)]

    def key(self, key: str, views: Mapping[str, CompartmentView], t: float) -> list[Action]:
        if self.ended:
            return []
        if self.phase is SessionPhase.DOOR:
            # The door in progress must be closed first; keys do nothing meanwhile.
            return []
        self._last_input = t
        if key == "*":
            return self.end("ended_by_user")
        if self.phase is SessionPhase.SIZE and key.isdigit() and 1 <= int(key) <= len(self.sizes):
            return self._open(views, size=self.sizes[int(key) - 1])
        return self._show_prompt()

    def label(self, text: str, views: Mapping[str, CompartmentView], t: float) -> list[Action]:
        """A scan while the session waits: the parcel label (a new one replaces the last)."""
        if self.ended or self.phase is SessionPhase.DOOR:
            return []
        self._last_input = t
        if self.credential.parcel_id is not None:
            # The credential names its parcel; a stray scan must not swap it for another.
            return [Show(messages.label_refused(Reason.UNREADABLE), hold_s=3.0)]
        parcel_id = text.strip()
        if not is_parcel_id(parcel_id) or is_qr_token(parcel_id):
            return [Show(messages.label_refused(Reason.BAD_LABEL), hold_s=3.0)]
        if any(v.parcel_id == parcel_id for v in views.values()):
            return [
                self._record(EventType.DEPOSIT_REFUSED,
                             {"reason": Reason.PARCEL_HERE.value, "parcel_id": parcel_id}),
                Show(messages.label_refused(Reason.PARCEL_HERE), hold_s=3.0),
            ]
        self.parcel_id = parcel_id
        return self._next(views)

    def door_opened(self, compartment: str) -> None:
        """The compartment reported its door open: the credential's use is taken now."""
        if compartment == self.compartment:
            self.consumed = True

    def finished(self, compartment: str, outcome: str, t: float) -> list[Action]:
        """The door of the deposit in progress closed ("confirmed", "aborted") or stayed shut
        ("jammed"). The compartment has shown the result; the session's prompt comes next."""
        if compartment != self.compartment or self.phase is not SessionPhase.DOOR:
            return []
        self.compartment = None
        self._last_input = t
        if outcome == "confirmed":
            self.deposits += 1
        if not self.courier:
            if outcome == "jammed" and self.credential.compartment is None:
                self.phase = SessionPhase.SIZE  # try another size; the jammed door is out
                return []
            return self.end(outcome, show=False)
        if outcome == "jammed":
            self.phase = SessionPhase.SIZE
            return []
        self.parcel_id = None
        self.phase = SessionPhase.LABEL
        return []

    def tick(self, t: float) -> list[Action]:
        deadline = self.deadline()
        if deadline is None or t < deadline:
            return []
        return self.end("timeout")

    def end(self, reason: str, *, show: bool = True) -> list[Action]:
        if self.ended:
            return []
        self.phase = SessionPhase.ENDED
        actions: list[Action] = [self._record(
            EventType.SESSION_ENDED, {"reason": reason, "deposits": self.deposits,
                              "credential_used": self.consumed})]
        if show:
            actions.append(Show(messages.session_ended(self.deposits),
                                hold_s=SESSION_ENDED_HOLD_S))
        return actions

    # -- steps ------------------------------------------------------------------------------

    def _next(self, views: Mapping[str, CompartmentView]) -> list[Action]:
        if self.parcel_id is None:
            self.phase = SessionPhase.LABEL
            return self._show_prompt()
        if self.credential.compartment is not None:
            return self._open(views, named=self.credential.compartment)
        if len(self.sizes) == 1:
            return self._open(views, size=self.sizes[0])
        self.phase = SessionPhase.SIZE
        return self._show_prompt()

    def _open(
        self, views: Mapping[str, CompartmentView], *, size: str | None = None,
        named: str | None = None,
    ) -> list[Action]:
        assert self.parcel_id is not None
        target = assign(views, self.sizes, size=size, named=named)
        if isinstance(target, Reason):
            refused = self._record(EventType.DEPOSIT_REFUSED, {
                "reason": target.value, "parcel_id": self.parcel_id,
                **({"size": size} if size is not None else {}),
                **({"compartment": named} if named is not None else {})})
            if named is not None:
                # The credential allows this one compartment only: nothing else to offer.
                return [refused, Show(messages.refused(target), hold_s=5.0),
                        *self.end(target.value, show=False)]
            self.phase = SessionPhase.SIZE
            return [refused, Show(messages.no_free_door(size), hold_s=4.0)]
        self.phase = SessionPhase.DOOR
        self.compartment = target
        cred = self.credential
        access = Access(
            code_id=cred.code_id, digest=cred.digest, kind=cred.kind, source=cred.source,
            ref=cred.ref, parcel_id=self.parcel_id, cti=cred.cti, cti_expires=cred.cti_expires,
            # One use per session: later doors of a courier session take nothing.
            consumes=not self.consumed,
            # A drop-off closed empty gives its code back; a courier session was used anyway.
            returnable=not self.courier,
        )
        return [Begin(target, access)]

    def _show_prompt(self) -> list[Action]:
        prompt = self.prompt()
        return [] if prompt is None else [Show(prompt)]

    def _record(self, type_: EventType, data: Mapping[str, object]) -> Record:
        cred = self.credential
        return Record(type_, compartment=self.compartment, code_id=cred.code_id,
                      data={"kind": cred.kind, "source": cred.source, **cred.ref, **data})
