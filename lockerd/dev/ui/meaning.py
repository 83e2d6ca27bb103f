"""Each event the daemon records, with its meaning in words (docs/events.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of the bank's events table, as the UI reads it."""

    seq: int
    type: str
    compartment: str | None = None
    code_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


def _get(event: EventRow, key: str, default: str = "?") -> str:
    value = event.data.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 60.0 s reads as 60 s
    return default if value is None else str(value)


def _count(event: EventRow, key: str, noun: str) -> str:
    n = event.data.get(key, 0)
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _credential(event: EventRow) -> str:
    """The credential in words: a code id, a QR token's id, a support code."""
    if event.data.get("via") == "support":
        return f"support code for parcel {_get(event, 'parcel_id')}"
    if event.code_id:
        return f"code {event.code_id}"
    cti = event.data.get("cti")
    if isinstance(cti, str):
        return f"QR token {cti[:8]}"
    return "no credential"


def _parcel(event: EventRow) -> str:
    parcel = event.data.get("parcel_id")
    return f"parcel {parcel}" if isinstance(parcel, str) else "the parcel"


def _door(event: EventRow) -> str:
    return f"door {event.compartment}" if event.compartment else "a door"


def _pulse(e: EventRow) -> str:
    attempt = e.data.get("attempt", 1)
    retry = {2: " (retry)", 3: " (guided retry after a jam)"}.get(
        attempt if isinstance(attempt, int) else 1, "")
    return f"the lock of {e.compartment} is released for {_get(e, 'kind')}{retry}"


def _jammed(e: EventRow) -> str:
    if e.data.get("guided_retry_s"):
        return (f"{_door(e)} did not open after two pulses; {_credential(e)} is still valid: "
                f"the customer may push the door and press # within "
                f"{_get(e, 'guided_retry_s')} s")
    return f"{_door(e)} did not open; {_credential(e)} is still valid"


def _rejected(e: EventRow) -> str:
    held = e.data.get("suppressed")
    extra = f" ({held} more held back)" if isinstance(held, int) and held else ""
    via = f" from the {_get(e, 'source')}" if e.data.get("source") else ""
    return f"a code{via} was refused: {_get(e, 'reason').replace('_', ' ')}{extra}"


def _refused(e: EventRow) -> str:
    size = f" of size {e.data['size']} or larger" if e.data.get("size") else ""
    return (f"no door opened for {_parcel(e)}{size}: "
            f"{_get(e, 'reason').replace('_', ' ')}")


def _command(e: EventRow) -> str:
    detail = e.data.get("detail")
    tail = f" ({detail})" if isinstance(detail, str) and detail else ""
    return f"remote command {_get(e, 'action')}: {_get(e, 'status')}{tail}"


_Describe = Callable[[EventRow], str]

MEANINGS: dict[str, _Describe] = {
    "daemon.started": lambda e: f"the daemon is up, codes version {_get(e, 'codes_version')}",
    "daemon.stopping": lambda e: "the daemon is stopping",
    "daemon.task_failed": lambda e: f"task {_get(e, 'task')} crashed: {_get(e, 'error')}",
    "command.started": lambda e: f"remote command {_get(e, 'action')} is running",
    "command.result": _command,
    "security.open_budget": lambda e: "an open was refused: the open budget of the hour is spent",
    "outbox.shed": lambda e: f"{_get(e, 'count')} telemetry events dropped: the outbox was full",
    "lock.pulse": _pulse,
    "door.opened": lambda e: f"{_door(e)} opened",
    "door.closed": lambda e: f"{_door(e)} closed",
    "pickup.opened": lambda e: f"{_door(e)} opened for a pickup: one use of {_credential(e)} "
                               "consumed",
    "pickup.completed": lambda e: f"{_parcel(e)} taken from {e.compartment}, door closed",
    "pickup.incomplete": lambda e: f"{_door(e)} closed with the parcel still inside: the use "
                                   f"of {_credential(e)} is given back",
    "door.jammed": _jammed,
    "session.started": lambda e: f"a {_get(e, 'kind')} session started with {_credential(e)}",
    "deposit.opened": lambda e: f"{_door(e)} opened for the courier's {_parcel(e)}",
    "deposit.confirmed": lambda e: f"{_parcel(e)} deposited in {e.compartment}: the backend "
                                   "can send its pickup code",
    "deposit.aborted": lambda e: f"{_door(e)} closed without a parcel in it "
                                 f"({_get(e, 'reason').replace('_', ' ')})",
    "deposit.refused": _refused,
    "session.ended": lambda e: f"the courier session ended ({_get(e, 'reason').replace('_', ' ')}"
                               f", {_count(e, 'deposits', 'deposit')})",
    "parcel.removed": lambda e: f"{_parcel(e)} removed from {e.compartment} by a technician",
    "compartment.out_of_service": lambda e: f"compartment {e.compartment} is out of service "
                                            f"({_get(e, 'reason').replace('_', ' ')})",
    "compartment.in_service": lambda e: f"compartment {e.compartment} is back in service",
    "door.forced": lambda e: f"{_door(e)} was forced open: no pulse was pending",
    "door.held_open": lambda e: f"{_door(e)} has been open for {_get(e, 'after_s')} s",
    "code.rejected": _rejected,
    "code.extended": lambda e: f"{_credential(e)} extended by {_get(e, 'extended_by_s')} s",
    "keypad.lockout": lambda e: f"too many wrong codes: keypad and scanner locked for "
                                f"{_get(e, 'seconds')} s",
    "hardware.fault": lambda e: f"hardware fault on {_get(e, 'device')}: {_get(e, 'detail')}",
    "hardware.recovered": lambda e: f"{_get(e, 'device')} works again",
    "tamper": lambda e: "the enclosure was opened" if e.data.get("open")
                        else "the enclosure was closed",
    "keyring.updated": lambda e: f"keyring version {_get(e, 'version')} accepted",
    "cache.updated": lambda e: f"codes bundle version {_get(e, 'version')} applied "
                               f"({_get(e, 'upserted', '0')} codes)",
    "codes.floor_reset": lambda e: "new codes keys: the next full bundle is accepted",
    "cache.rejected": lambda e: f"a {_get(e, 'what')} was refused: {_get(e, 'reason')}",
    "console.login": lambda e: f"technician {_get(e, 'tech_id')} logged in at the console",
    "console.logout": lambda e: f"technician {_get(e, 'tech_id')} logged out",
    "console.action": lambda e: f"console: {_get(e, 'action')}",
    "telemetry": lambda e: "a telemetry report",
    "help.requested": lambda e: f"a customer asked for help, reference H-{_get(e, 'reference')} "
                                f"(parcel {_get(e, 'tracking')})",
    "help.answered": lambda e: f"the backend answered the help request: {_get(e, 'outcome')}",
    "help.reply_rejected": lambda e: f"a help reply was refused: {_get(e, 'reason')}",
}


def describe(event: EventRow) -> str:
    """`pickup.completed — parcel PX101 taken from 3, door closed`."""
    meaning = MEANINGS.get(event.type)
    if meaning is None:
        return event.type
    return f"{event.type} — {meaning(event)}"
