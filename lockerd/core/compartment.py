"""Lifecycle of one compartment: locked, unlocking, open, jammed; the pickup flow on top of it."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from lockerd.core import messages
from lockerd.core.access import CompartmentView
from lockerd.core.actions import Action, Pulse, Record, Show

MAX_ATTEMPTS = 2  # the first pulse and one retry (safety rule 2)


class Phase(enum.Enum):
    LOCKED = "locked"  # door closed (or not known to be open), nothing pending
    UNLOCKING = "unlocking"  # pulse sent for a credential, waiting for the door sensor
    OPEN = "open"  # door seen open


@dataclass(frozen=True, slots=True)
class Access:
    """What a door is being opened for: a code (pickup), or a command, a self-test, a
    technician, named in `ref` (e.g. {"cmd_id": ...}) and carried into every event's data."""

    code_id: str | None
    digest: str | None
    kind: str  # pickup | command | selftest | console
    source: str  # keypad | scanner | mqtt | console
    ref: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_pickup(self) -> bool:
        return self.kind == "pickup" and self.code_id is not None and self.digest is not None


@dataclass(frozen=True, slots=True)
class DoorTimings:
    open_timeout_s: float
    held_open_after_s: float
    show_result_s: float


class Compartment:
    """One compartment's state machine. Time `t` is monotonic seconds.

    The rule it exists to keep: a code's use is consumed only on the transition from UNLOCKING
    to OPEN, that is only when the door sensor saw the door open after a pulse for that code.
    """

    def __init__(
        self,
        compartment_id: str,
        *,
        timings: DoorTimings,
        occupied: bool | None = None,
        in_service: bool = True,
    ) -> None:
        self.id = compartment_id
        self._timings = timings
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
            in_service=self.in_service, idle=self.phase is Phase.LOCKED, occupied=self.occupied
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
            self._record("door.held_open", data={"after_s": self._timings.held_open_after_s}),
            Show(messages.close_door(self.id)),
        ]

    def set_service(self, in_service: bool, reason: str) -> list[Action]:
        """A technician or the backend takes the compartment out of service or back in."""
        if in_service == self.in_service:
            return []
        self.in_service = in_service
        self.service_reason = "" if in_service else reason
        kind = "compartment.in_service" if in_service else "compartment.out_of_service"
        return [self._record(kind, data={"reason": reason})]

    # -- transitions ------------------------------------------------------------------------

    def _pulse(self, t: float) -> list[Action]:
        assert self.access is not None
        self.attempt += 1
        self._deadline = t + self._timings.open_timeout_s
        return [
            self._record(
                "lock.pulse",
                code_id=self.access.code_id,
                data={"attempt": self.attempt, "kind": self.access.kind,
                      "source": self.access.source, **self.access.ref},
            ),
            Pulse(self.id),
        ]

    def _jammed(self) -> list[Action]:
        access = self.access
        assert access is not None
        self.phase = Phase.LOCKED
        self.access = None
        self._deadline = None
        # The code is NOT consumed: no Record here carries a use_delta.
        data: dict[str, object] = {"attempts": self.attempt, "kind": access.kind, **access.ref}
        if access.is_pickup:
            data["code_still_valid"] = True
        actions: list[Action] = [self._record("door.jammed", code_id=access.code_id, data=data)]
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
            opened = self._record("door.opened", code_id=access.code_id,
                                  data={"kind": access.kind, **access.ref})
            if not access.is_pickup:
                return [opened, Show(messages.door_open(self.id))]
            return [
                opened,
                self._record(
                    "pickup.opened",
                    code_id=access.code_id,
                    data={"attempt": self.attempt, "source": access.source},
                    use_delta=1,
                    digest=access.digest,
                ),
                Show(messages.pickup_open(self.id)),
            ]
        # Seen open with no pulse pending: somebody forced it, or the latch failed.
        self.phase = Phase.OPEN
        return [
            self._record("door.opened"),
            self._record("door.forced", data={"in_service": self.in_service}),
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
            "door.closed", code_id=access.code_id if access else None,
            data=dict(access.ref) if access else {})]
        if access is None or not access.is_pickup:
            return actions
        if self.occupied:
            # The customer closed the door on their parcel: give the use back so the same
            # code opens the door again.
            actions += [
                self._record("pickup.incomplete", code_id=access.code_id,
                             data={"use_returned": True}, use_delta=-1, digest=access.digest),
                Show(messages.pickup_incomplete(self.id), hold_s=self._timings.show_result_s),
            ]
        else:
            actions += [
                self._record("pickup.completed", code_id=access.code_id,
                             data={"occupancy_known": self.occupied is not None}),
                Show(messages.pickup_done(self.id), hold_s=self._timings.show_result_s),
            ]
        return actions

    def _record(self, type_: str, **kwargs: object) -> Record:
        self.last_event = type_
        return Record(type_, compartment=self.id, **kwargs)  # type: ignore[arg-type]
