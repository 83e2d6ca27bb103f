"""What the pure state machines ask the controller to do, in the order it must be done."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hal.values import DisplayMessage

if TYPE_CHECKING:
    from lockerd.core.credential import Access


@dataclass(frozen=True, slots=True)
class UseChange:
    """One use of a credential taken (+1) or given back (-1).

    A bundle code is counted per (code_id, digest); a QR token is spent by its cti (kept until
    `expires`, epoch seconds, after which it is refused as expired anyway). A derived pickup
    code has no count: the parcel leaving the compartment ends it. A support code is marked
    used for its (parcel_id, window) in `support`, beside the use of the parcel's own code.
    """

    delta: int
    code_id: str | None = None
    digest: str | None = None
    cti: str | None = None
    expires: int | None = None
    support: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ParcelIn:
    """A deposit confirmed: the compartment now holds this parcel."""

    parcel_id: str
    code_id: str | None = None


@dataclass(frozen=True, slots=True)
class ParcelOut:
    """The compartment's parcel was taken out."""


@dataclass(frozen=True, slots=True)
class HelpMark:
    """A help request recorded (`answered` False) or answered: kept so a reply can be checked."""

    help_id: str
    answered: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """Commit an event and, in the same transaction, the state changes it reports."""

    type: str
    compartment: str | None = None
    code_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    use: UseChange | None = None
    parcel: ParcelIn | ParcelOut | None = None
    help: HelpMark | None = None


@dataclass(frozen=True, slots=True)
class Pulse:
    """Release a lock. Always preceded by a Record that reports it (safety rule 1)."""

    compartment: str


@dataclass(frozen=True, slots=True)
class Show:
    """Put a message on the customer display; back to the idle screen after `hold_s`."""

    message: DisplayMessage
    hold_s: float | None = None


@dataclass(frozen=True, slots=True)
class Begin:
    """Start opening a compartment for a deposit a session has assigned (the compartment's own
    state machine then reports and pulses)."""

    compartment: str
    access: Access


Action = Record | Pulse | Show | Begin
