"""Lifecycle of one compartment: locked, unlocking, open, jammed; pickups and deposits on top."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lockerd.core import messages
from lockerd.core.access import CompartmentView
from lockerd.core.actions import Action, ParcelIn, ParcelOut, Pulse, Record, Show
from lockerd.core.credential import Access
from lockerd.core.events import EventType

__all__ = ["MAX_ATTEMPTS", "Access", "Compartment", "DoorTimings", "Phase"]

MAX_ATTEMPTS = 2  # the first pulse and one retry (safety rule 2)


class Phase(enum.Enum):
    LOCKED = "locked"  # door closed (or not known to be open), nothing pending
    UNLOCKING = "unlocking"  # pulse sent for a credential, waiting for the door sensor
    OPEN = "open"  # door seen open


@dataclass(frozen=True, slots=True)
class DoorTimings:
    open_timeout_s: float
    held_open_after_s: float
    show_result_s: float


class Compartment:
    """One compartment's state machine. Time `t` is monotonic seconds.

    The rule it exists to keep: a code's use is consumed only on the transition from UNLOCKING
    to OPEN, that is only when the door sensor saw the door open after a pulse for that code.
    A deposit is confirmed only when the door closes on a parcel the occupancy sensor sees.
    """

    def __init__(
        self,
        compartment_id: str,
        *,
        timings: DoorTimings,
        occupied: bool | None = None,
        in_service: bool = True,
        size: str | None = None,
        parcel_id: str | None = None,
    ) -> None:
        self.id = compartment_id
        self._timings = timings
        self.size = size
        self.parcel_id = parcel_id  # the deposited parcel on record, until it is picked up
        self.phase = Phase.LOCKED
        self.occupied = occupied
        self.in_service = in_service
        self.service_reason = "" if in_service else "configured"
        self.access: Access | None = None
        self.attempt = 0
        self._deadline: float | None = None
        self._opened_at: float | None = None
        self._held_reported = False
        self.last_event = ""

    # -- views ------------------------------------------------------------------------------

    def view(self) -> CompartmentView:
        return CompartmentView(
            in_service=self.in_service, idle=self.phase is Phase.LOCKED, occupied=self.occupied,
            size=self.size, parcel_id=self.parcel_id,
        )

    @property
    def door_open(self) -> bool:
        return self.phase is Phase.OPEN

    def deadline(self) -> float | None:
        """The next time `tick` has something to do, or None."""
        if self.phase is Phase.UNLOCKING:
            return self._deadline
        if self.phase is Phase.OPEN and not self._held_reported and self._opened_at is not None:
            return self._opened_at + self._timings.held_open_after_s
        return None

    def observe_initial(self, *, door_open: bool, occupied: bool | None, t: float) -> None:
        """Take the sensors' word at startup, without events: nothing is pending yet."""
        self.occupied = occupied
        if door_open:
            self.phase = Phase.OPEN
            self._opened_at = t
            self._held_reported = False
        else:
            self.phase = Phase.LOCKED
            self._opened_at = None

    # -- inputs -----------------------------------------------------------------------------

    def begin_access(self, access: Access, t: float) -> list[Action]:
        """A credential was granted for this compartment: report, then pulse."""
        if self.phase is not Phase.LOCKED or not self.in_service:
            raise ValueError(f"compartment {self.id} cannot start an access in {self.phase}")
        self.phase = Phase.UNLOCKING
        self.access = access
        self.attempt = 0
        return [*self._pulse(t), Show(messages.opening(self.id))]

    def door_changed(self, door_open: bool, t: float) -> list[Action]:
        if door_open:
            return self._door_opened(t)
        return self._door_closed()

    def occupancy_changed(self, occupied: bool) -> list[Action]:
        self.occupied = occupied
        return []

    def tick(self, t: float) -> list[Action]:
        deadline = self.deadline()
        if deadline is None or t < deadline:
            return []
        if self.phase is Phase.UNLOCKING:
            if self.attempt < MAX_ATTEMPTS:
                return self._pulse(t)
            return self._jammed()
        # OPEN past the held-open time: say so once per opening.
        self._held_reported = True
        return [
            self._record(EventType.DOOR_HELD_OPEN,
                         data={"after_s": self._timings.held_open_after_s}),
            Show(messages.close_door(self.id)),
        ]

    def set_service(self, in_service: bool, reason: str) -> list[Action]:
        """A technician or the backend takes the compartment out of service or back in."""
        if in_service == self.in_service:
            return []
        self.in_service = in_service
        self.service_reason = "" if in_service else reason
        kind = (EventType.COMPARTMENT_IN_SERVICE if in_service
                else EventType.COMPARTMENT_OUT_OF_SERVICE)
        return [self._record(kind, data={"reason": reason})]

    # -- transitions ------------------------------------------------------------------------

    def _pulse(self, t: float) -> list[Action]:
        assert self.access is not None
        self.attempt += 1
        self._deadline = t + self._timings.open_timeout_s
        return [
            self._record(
                EventType.LOCK_PULSE,
                code_id=self.access.code_id,
                data={"attempt": self.attempt, "kind": self.access.kind,
                      "source": self.access.source, **self.access.ref,
                      **({"parcel_id": self.access.parcel_id} if self.access.parcel_id else {})},
            ),
            Pulse(self.id),
        ]

    def _jammed(self) -> list[Action]:
        access = self.access
        assert access is not None
        self.phase = Phase.LOCKED
        self.access = None
        self._deadline = None
        # The credential is NOT consumed: no Record here carries a use.
        data: dict[str, object] = {"attempts": self.attempt, "kind": access.kind, **access.ref}
        if access.parcel_id is not None:
            data["parcel_id"] = access.parcel_id
        if access.is_pickup or access.is_deposit:
            data["code_still_valid"] = True
        actions: list[Action] = [
            self._record(EventType.DOOR_JAMMED, code_id=access.code_id, data=data)]
        # Taken out of service already (by a technician, mid-unlock): keep that reason.
        actions += self.set_service(False, "jammed")
        actions.append(Show(messages.jammed(self.id), hold_s=self._timings.show_result_s))
        return actions

    def _door_opened(self, t: float) -> list[Action]:
        if self.phase is Phase.OPEN:
            return []
        self._opened_at = t
        self._held_reported = False
        if self.phase is Phase.UNLOCKING and self.access is not None:
            access = self.access
            self.phase = Phase.OPEN
            self._deadline = None
            data: dict[str, object] = {"kind": access.kind, **access.ref}
            if access.is_deposit:
                # The deposit or courier credential is used now that a door it opened is open,
                # reported by an access event (door.opened is telemetry and may be shed).
                data.update(parcel_id=access.parcel_id, source=access.source)
                return [
                    self._record(EventType.DOOR_OPENED, code_id=access.code_id, data=data),
                    self._record(EventType.DEPOSIT_OPENED, code_id=access.code_id,
                                 data={"attempt": self.attempt, **data}, use=access.use(+1)),
                    Show(messages.deposit_open(self.id)),
                ]
            opened = self._record(EventType.DOOR_OPENED, code_id=access.code_id, data=data)
            if not access.is_pickup:
                return [opened, Show(messages.door_open(self.id))]
            pickup_data: dict[str, object] = {
                "attempt": self.attempt, "source": access.source, **access.ref}
            if access.parcel_id is not None:
                pickup_data["parcel_id"] = access.parcel_id
            return [
                opened,
                self._record(EventType.PICKUP_OPENED, code_id=access.code_id, data=pickup_data,
                             use=access.use(+1)),
                Show(messages.pickup_open(self.id)),
            ]
        # Seen open with no pulse pending: somebody forced it, or the latch failed.
        self.phase = Phase.OPEN
        return [
            self._record(EventType.DOOR_OPENED),
            self._record(EventType.DOOR_FORCED, data={"in_service": self.in_service}),
        ]

    def _door_closed(self) -> list[Action]:
        if self.phase is Phase.UNLOCKING:
            # A closed reading while we wait for the door is the state we already assumed.
            return []
        if self.phase is not Phase.OPEN:
            return []
        access = self.access
        self.phase = Phase.LOCKED
        self.access = None
        self._opened_at = None
        actions: list[Action] = [self._record(
            EventType.DOOR_CLOSED, code_id=access.code_id if access else None,
            data=dict(access.ref) if access else {})]
        if access is not None and access.is_deposit:
            return actions + self._deposit_closed(access)
        if access is None or not access.is_pickup:
            if self.parcel_id is not None and self.occupied is False:
                # Opened by a technician or a command and emptied: the parcel is gone.
                actions.append(self._parcel_removed(access))
            return actions
        ref = dict(access.ref)
        if access.parcel_id is not None:
            ref["parcel_id"] = access.parcel_id
        if self.occupied:
            # The customer closed the door on their parcel: give the use back so the same
            # code opens the door again.
            actions += [
                self._record(EventType.PICKUP_INCOMPLETE, code_id=access.code_id,
                             data={"use_returned": True, **ref}, use=access.given_back()),
                Show(messages.pickup_incomplete(self.id), hold_s=self._timings.show_result_s),
            ]
        else:
            self.parcel_id = None
            actions += [
                self._record(EventType.PICKUP_COMPLETED, code_id=access.code_id,
                             data={"occupancy_known": self.occupied is not None, **ref},
                             parcel=ParcelOut()),
                Show(messages.pickup_done(self.id), hold_s=self._timings.show_result_s),
            ]
        return actions

    def _deposit_closed(self, access: Access) -> list[Action]:
        data: dict[str, object] = {"parcel_id": access.parcel_id, "kind": access.kind,
                                   "source": access.source, **access.ref}
        hold = self._timings.show_result_s
        if self.occupied is True and access.parcel_id is not None:
            # Only the occupancy sensor's word confirms a deposit: the backend issues the
            # customer's pickup code on this event.
            self.parcel_id = access.parcel_id
            return [
                self._record(EventType.DEPOSIT_CONFIRMED, code_id=access.code_id, data=data,
                             parcel=ParcelIn(access.parcel_id, access.code_id)),
                Show(messages.deposit_done(self.id), hold_s=hold),
            ]
        if self.occupied is None:
            # The sensor does not know: the parcel may be inside. Nobody may be assigned this
            # compartment until a technician has looked.
            return [
                self._record(EventType.DEPOSIT_ABORTED, code_id=access.code_id,
                             data={**data, "reason": "occupancy_unknown"}),
                *self.set_service(False, "occupancy_unknown"),
                Show(messages.deposit_unconfirmed(self.id), hold_s=hold),
            ]
        use = access.given_back()
        return [
            self._record(EventType.DEPOSIT_ABORTED, code_id=access.code_id,
                         data={**data, "reason": "empty", "use_returned": use is not None},
                         use=use),
            Show(messages.deposit_aborted(self.id), hold_s=hold),
        ]

    def _parcel_removed(self, access: Access | None) -> Record:
        parcel_id, self.parcel_id = self.parcel_id, None
        data: dict[str, object] = {"parcel_id": parcel_id}
        if access is not None:
            data.update(kind=access.kind, **access.ref)
        return self._record(EventType.PARCEL_REMOVED, data=data, parcel=ParcelOut())

    def _record(self, type_: EventType, **kwargs: object) -> Record:
        self.last_event = type_
        return Record(type_, compartment=self.id, **kwargs)  # type: ignore[arg-type]
