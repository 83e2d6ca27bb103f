"""Every event type lockerd writes (its wire name, docs/events.md) and its outbox class."""

from __future__ import annotations

import enum


class OutboxClass(enum.StrEnum):
    """How a full outbox treats an event: only telemetry is ever shed; access and fault
    records are kept until the backend acknowledges them."""

    ACCESS = "access"  # a decision about a credential, a door or a command
    FAULT = "fault"  # something is wrong with the bank or the daemon
    TELEMETRY = "telemetry"  # door movements and bookkeeping another event also carries

    @property
    def sheddable(self) -> bool:
        return self is OutboxClass.TELEMETRY


class EventType(enum.StrEnum):
    """An event type; the value is the `type` on the wire. A StrEnum, so it compares equal
    to (and is stored as) that string."""

    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPING = "daemon.stopping"
    DAEMON_TASK_FAILED = "daemon.task_failed"
    COMMAND_STARTED = "command.started"
    COMMAND_RESULT = "command.result"
    SECURITY_OPEN_BUDGET = "security.open_budget"
    OUTBOX_SHED = "outbox.shed"
    LOCK_PULSE = "lock.pulse"
    DOOR_OPENED = "door.opened"
    PICKUP_OPENED = "pickup.opened"
    DOOR_CLOSED = "door.closed"
    PICKUP_COMPLETED = "pickup.completed"
    PICKUP_INCOMPLETE = "pickup.incomplete"
    DOOR_JAMMED = "door.jammed"
    SESSION_STARTED = "session.started"
    DEPOSIT_OPENED = "deposit.opened"
    DEPOSIT_CONFIRMED = "deposit.confirmed"
    DEPOSIT_ABORTED = "deposit.aborted"
    DEPOSIT_REFUSED = "deposit.refused"
    SESSION_ENDED = "session.ended"
    PARCEL_REMOVED = "parcel.removed"
    COMPARTMENT_OUT_OF_SERVICE = "compartment.out_of_service"
    COMPARTMENT_IN_SERVICE = "compartment.in_service"
    DOOR_FORCED = "door.forced"
    DOOR_HELD_OPEN = "door.held_open"
    CODE_REJECTED = "code.rejected"
    CODE_EXTENDED = "code.extended"
    KEYPAD_LOCKOUT = "keypad.lockout"
    TAMPER = "tamper"
    HARDWARE_FAULT = "hardware.fault"
    HARDWARE_RECOVERED = "hardware.recovered"
    KEYRING_UPDATED = "keyring.updated"
    CACHE_UPDATED = "cache.updated"
    CODES_FLOOR_RESET = "codes.floor_reset"
    CACHE_REJECTED = "cache.rejected"
    CONSOLE_LOGIN = "console.login"
    CONSOLE_LOGOUT = "console.logout"
    CONSOLE_ACTION = "console.action"
    TELEMETRY = "telemetry"
    HELP_REQUESTED = "help.requested"
    HELP_ANSWERED = "help.answered"
    HELP_REPLY_REJECTED = "help.reply_rejected"

    @property
    def outbox_class(self) -> OutboxClass:
        return _CLASSES.get(self, OutboxClass.ACCESS)

    @property
    def consumes_use(self) -> bool:
        """Reports a use consumed for good (a parcel taken out by its customer, a parcel
        confirmed in by the occupancy sensor): only these reset the keypad lockout."""
        return self in (EventType.PICKUP_COMPLETED, EventType.DEPOSIT_CONFIRMED)


# Only telemetry may ever be shed by a full outbox: physical door movements and daemon
# bookkeeping, whose meaning is also carried by an access or fault event.
_CLASSES: dict[EventType, OutboxClass] = {
    EventType.DOOR_OPENED: OutboxClass.TELEMETRY,
    EventType.DOOR_CLOSED: OutboxClass.TELEMETRY,
    EventType.DAEMON_STARTED: OutboxClass.TELEMETRY,
    EventType.DAEMON_STOPPING: OutboxClass.TELEMETRY,
    EventType.CACHE_UPDATED: OutboxClass.TELEMETRY,
    EventType.KEYRING_UPDATED: OutboxClass.TELEMETRY,
    EventType.HARDWARE_RECOVERED: OutboxClass.TELEMETRY,
    EventType.COMPARTMENT_IN_SERVICE: OutboxClass.TELEMETRY,
    EventType.TELEMETRY: OutboxClass.TELEMETRY,
    EventType.HARDWARE_FAULT: OutboxClass.FAULT,
    EventType.DAEMON_TASK_FAILED: OutboxClass.FAULT,
    EventType.OUTBOX_SHED: OutboxClass.FAULT,
    EventType.TAMPER: OutboxClass.FAULT,
    EventType.DOOR_JAMMED: OutboxClass.FAULT,
    EventType.DOOR_FORCED: OutboxClass.FAULT,
    EventType.DOOR_HELD_OPEN: OutboxClass.FAULT,
}


def outbox_class(type_: str) -> OutboxClass:
    """The class of a type given as a string; one this daemon does not know is kept like an
    access record (never shed)."""
    return _CLASS_OF_NAME.get(type_, OutboxClass.ACCESS)


# Looked up on every event appended: a dict by wire name, not an enum lookup by value.
_CLASS_OF_NAME: dict[str, OutboxClass] = {t.value: t.outbox_class for t in EventType}


TELEMETRY_TYPES = frozenset(t for t in EventType if t.outbox_class.sheddable)
CONSUMED_USE_EVENTS = frozenset(t for t in EventType if t.consumes_use)
