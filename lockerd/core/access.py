"""Code validation rules: from a looked-up code and the compartments' state to grant or refusal."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


class Reason(enum.Enum):
    """Why a credential was refused; the value is the word in `code.rejected` events."""

    UNKNOWN = "unknown_code"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    USED = "used"
    OUT_OF_SERVICE = "out_of_service"
    BUSY = "busy"
    EMPTY = "empty"
    NO_COMPARTMENT = "no_compartment"
    UNSUPPORTED = "unsupported_kind"
    LOCKED_OUT = "locked_out"
    UNREADABLE = "unreadable_scan"

    @property
    def counts_as_guess(self) -> bool:
        """Only a code nobody issued feeds the brute-force lockout; a real but used or expired
        code tells an attacker nothing new and would lock out its honest owner."""
        return self is Reason.UNKNOWN


@dataclass(frozen=True, slots=True)
class CodeRecord:
    """One code of the local cache as the validator needs it (never the code itself)."""

    id: str
    kind: str
    digest: str
    compartment: str | None
    parcel_id: str | None
    not_before: datetime | None
    not_after: datetime
    max_uses: int
    uses: int


@dataclass(frozen=True, slots=True)
class CompartmentView:
    """What validation needs to know of a compartment right now."""

    in_service: bool
    idle: bool
    occupied: bool | None  # None: no occupancy sensor, or it does not know


@dataclass(frozen=True, slots=True)
class Granted:
    compartment: str
    code_id: str
    digest: str
    kind: str


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Reason
    code_id: str | None = None
    compartment: str | None = None


Decision = Granted | Refused


def evaluate_code(
    record: CodeRecord | None,
    *,
    now: datetime,
    compartments: Mapping[str, CompartmentView],
) -> Decision:
    """Decide on one entered code. Pure: the caller has already looked it up and counts uses."""
    if record is None:
        return Refused(Reason.UNKNOWN)
    refused = _refusal(record, now=now, compartments=compartments)
    if refused is not None:
        return Refused(refused, code_id=record.id, compartment=record.compartment)
    assert record.compartment is not None
    return Granted(
        compartment=record.compartment, code_id=record.id, digest=record.digest, kind=record.kind
    )


def _refusal(
    record: CodeRecord, *, now: datetime, compartments: Mapping[str, CompartmentView]
) -> Reason | None:
    if now >= record.not_after:
        return Reason.EXPIRED
    if record.not_before is not None and now < record.not_before:
        return Reason.NOT_YET_VALID
    if record.uses >= record.max_uses:
        return Reason.USED
    if record.kind != "pickup":
        return Reason.UNSUPPORTED
    view = compartments.get(record.compartment or "")
    if view is None:
        return Reason.NO_COMPARTMENT
    if not view.in_service:
        return Reason.OUT_OF_SERVICE
    if not view.idle:
        return Reason.BUSY
    if view.occupied is False:
        # The occupancy sensor sees no parcel: opening would burn the code for nothing.
        return Reason.EMPTY
    return None
