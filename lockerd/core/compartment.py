"""Lifecycle of one compartment: locked, unlocking, open, jammed (with its guided retry); pickups
and deposits on top."""

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
    # A pickup's door did not open after two pulses: the customer may push the door and
    # press `#` for one more pulse before `jam_retry_s` runs out. Busy for every other
    # credential; the access is still this one's.
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class DoorTimings:
    open_timeout_s: float
    held_open_after_s: float
    show_result_s: float
    jam_retry_s: float = 0.0  # the guided retry's window after a pickup jam; 0: none


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

    @property
    def retry_window(self) -> float | None:
        """When the open guided-retry window ends, or None when none is open."""
        return self._deadline if self.phase is Phase.RETRY else None

    @property
    def restart_service_reason(self) -> str | None:
        """Why a restart must find this compartment out of service (None: in service). A
        guided-retry window, and its pulse, are memory only: a restart in them finds the
        compartment out of service as after any jam."""
        if not self.in_service:
            return self.service_reason
        guided = self.phase is Phase.RETRY or (
            self.phase is Phase.UNLOCKING and self.attempt > MAX_ATTEMPTS)
        return "jammed" if guided else None

    def deadline(self) -> float | None:
        """The next time `tick` has something to do, or None."""
        if self.phase in (Phase.UNLOCKING, Phase.RETRY):
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
            if self._offers_guided_retry():
                return self._jammed_retry_offered(t)
            return self._jammed()
        if self.phase is Phase.RETRY:
            return self._retry_window_ended()
        # OPEN past the held-open time: say so once per opening.
        self._held_reported = True
        return [
            self._record(EventType.DOOR_HELD_OPEN,
                         data={"after_s": self._timings.held_open_after_s}),
            Show(messages.close_door(self.id)),
        ]

    def guided_retry(self, t: float) -> list[Action]:
        """`#` in the guided-retry window: one more pulse under the same rules, for the same
        credential; nothing when no window is open."""
        if self.phase is not Phase.RETRY:
            return []
        self.phase = Phase.UNLOCKING
        return [*self._pulse(t, retry="guided"), Show(messages.opening(self.id))]

    def set_service(self, in_service: bool, reason: str) -> list[Action]:
        """A technician or the backend takes the compartment out of service or back in."""
        if in_service == self.in_service:
            return []
        if self.phase is Phase.RETRY:
            # Taken out of service in the guided-retry window: the window closes, nothing
            # more is pulsed for the jammed access.
            self.phase = Phase.LOCKED
            self.access = None
            self._deadline = None
        self.in_service = in_service
        self.service_reason = "" if in_service else reason
        kind = (EventType.COMPARTMENT_IN_SERVICE if in_service
                else EventType.COMPARTMENT_OUT_OF_SERVICE)
        return [self._record(kind, data={"reason": reason})]

    # -- transitions ------------------------------------------------------------------------

    def _pulse(self, t: float, *, retry: str | None = None) -> list[Action]:
        assert self.access is not None
        self.attempt += 1
        self._deadline = t + self._timings.open_timeout_s
        return [
            self._record(
                EventType.LOCK_PULSE,
                code_id=self.access.code_id,
                data={"attempt": self.attempt, "kind": self.access.kind,
                      "source": self.access.source, **self.access.ref,
                      **({"parcel_id": self.access.parcel_id} if self.access.parcel_id else {}),
                      **({"retry": retry} if retry else {})},
            ),
            Pulse(self.id),
        ]

    def _offers_guided_retry(self) -> bool:
        """A pickup's door gets one guided retry (PROTOCOL section 15): a customer stands at
        the bank. Opens for commands, tests, technicians and deposit sessions do not (a
        session picks another door), and the guided pulse itself gets no second one."""
        access = self.access
        return (self._timings.jam_retry_s > 0 and access is not None and access.is_pickup
                and self.in_service and self.attempt == MAX_ATTEMPTS)

    def _jam_data(self, access: Access) -> dict[str, object]:
        data: dict[str, object] = {"attempts": self.attempt, "kind": access.kind, **access.ref}
        if access.parcel_id is not None:
            data["parcel_id"] = access.parcel_id
        if access.is_pickup or access.is_deposit:
            data["code_still_valid"] = True
        return data

    def _jammed_retry_offered(self, t: float) -> list[Action]:
        """The door did not open: ask the customer to push it and press `#`. The compartment
        stays in service (and busy) with the access until the window ends; no use is taken."""
        access = self.access
        assert access is not None
        self.phase = Phase.RETRY
        self._deadline = t + self._timings.jam_retry_s
        data = {**self._jam_data(access), "guided_retry_s": self._timings.jam_retry_s}
        return [self._record(EventType.DOOR_JAMMED, code_id=access.code_id, data=data),
                Show(messages.jam_retry(self.id), hold_s=None)]

    def _retry_window_ended(self) -> list[Action]:
        """Nobody pressed `#` in time: out of service, as after any jam; the code stays valid."""
        self.phase = Phase.LOCKED
        self.access = None
        self._deadline = None
        return [*self.set_service(False, "jammed"),
                Show(messages.jammed(self.id), hold_s=self._timings.show_result_s)]

    def _jammed(self) -> list[Action]:
        access = self.access
        assert access is not None
        self.phase = Phase.LOCKED
        self.access = None
        self._deadline = None
        # The credential is NOT consumed: no Record here carries a use.
        data = self._jam_data(access)
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
        if self.phase in (Phase.UNLOCKING, Phase.RETRY) and self.access is not None:
            # In the guided-retry window too: the door was seen open for this access.
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
        if self.phase in (Phase.UNLOCKING, Phase.RETRY):
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
