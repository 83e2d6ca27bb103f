"""Code validation rules: from a looked-up code and the compartments' state to grant or refusal."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    REVOKED = "revoked"
    # Deposits: no compartment can take the parcel, or the named one cannot.
    NO_FREE = "no_free_compartment"
    OCCUPIED = "occupied"
    OCCUPANCY_UNKNOWN = "occupancy_unknown"
    BAD_LABEL = "bad_label"
    PARCEL_HERE = "parcel_already_here"
    # QR tokens (lockerd.trust.qrtoken refusal reasons).
    TOO_LARGE = "too_large"
    NOT_BASE45 = "not_base45"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    SIGNATURE = "signature"
    WRONG_LOCKER = "wrong_locker"
    KEYRING_EXPIRED = "keyring_expired"
    NO_KEYRING = "no_keyring"

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
    size: str | None = None
    parcel_id: str | None = None  # the parcel a confirmed deposit left here, not yet picked up

    @property
    def free(self) -> bool:
        """May take a deposit: in service, closed and idle, seen empty, no parcel on record."""
        return self.in_service and self.idle and self.occupied is False and self.parcel_id is None


@dataclass(frozen=True, slots=True)
class Granted:
    """A valid credential. For a pickup `compartment` is the door to open; a deposit or courier
    credential starts a session that assigns the compartment (None unless one is named)."""

    compartment: str | None
    code_id: str | None  # None for a QR token (named by its cti)
    digest: str | None
    kind: str
    parcel_id: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Reason
    code_id: str | None = None
    compartment: str | None = None
    ref: Mapping[str, str] = field(default_factory=dict)  # e.g. {"cti": ...} of a QR token


Decision = Granted | Refused


KINDS = ("pickup", "deposit", "courier")


def evaluate_code(
    record: CodeRecord | None,
    *,
    now: datetime,
    compartments: Mapping[str, CompartmentView],
) -> Decision:
    """Decide on one entered code. Pure: the caller has already looked it up and counts uses."""
    if record is None:
        return Refused(Reason.UNKNOWN)
    refused = _validity(record, now=now)
    if refused is not None:
        return Refused(refused, code_id=record.id, compartment=record.compartment)
    if record.kind != "pickup":
        return Granted(compartment=record.compartment, code_id=record.id, digest=record.digest,
                       kind=record.kind, parcel_id=record.parcel_id)
    return pickup_target(record.id, compartment=record.compartment, parcel_id=record.parcel_id,
                         digest=record.digest, compartments=compartments)


def pickup_target(
    code_id: str | None,
    *,
    compartment: str | None,
    parcel_id: str | None,
    compartments: Mapping[str, CompartmentView],
    digest: str | None = None,
    ref: Mapping[str, str] | None = None,
) -> Decision:
    """The door a valid pickup credential opens: the one it names, else the one holding its
    parcel; refused when that door cannot be opened for a pickup now."""
    cid = compartment
    if cid is None and parcel_id is not None:
        cid = next((c for c, v in compartments.items() if v.parcel_id == parcel_id), None)
    view = compartments.get(cid or "")
    reason = _pickup_refusal(view)
    if reason is not None or cid is None:
        return Refused(reason or Reason.NO_COMPARTMENT, code_id=code_id, compartment=cid,
                       ref=dict(ref or {}))
    return Granted(compartment=cid, code_id=code_id, digest=digest, kind="pickup",
                   parcel_id=parcel_id)


def _validity(record: CodeRecord, *, now: datetime) -> Reason | None:
    if now >= record.not_after:
        return Reason.EXPIRED
    if record.not_before is not None and now < record.not_before:
        return Reason.NOT_YET_VALID
    if record.uses >= record.max_uses:
        return Reason.USED
    if record.kind not in KINDS:
        return Reason.UNSUPPORTED
    return None


def may_hold_parcel(view: CompartmentView) -> bool:
    """Whether a parcel may be inside: only a compartment the occupancy sensor has seen empty
    is known not to hold one. Pulsing any other for a test or a technician would hand its
    parcel to whoever stands at the bank."""
    return view.occupied is not False


def door_unavailable(view: CompartmentView | None) -> Reason | None:
    """Why no credential may open this compartment now (missing, out of service, busy)."""
    if view is None:
        return Reason.NO_COMPARTMENT
    if not view.in_service:
        return Reason.OUT_OF_SERVICE
    if not view.idle:
        return Reason.BUSY
    return None


def _pickup_refusal(view: CompartmentView | None) -> Reason | None:
    unavailable = door_unavailable(view)
    if unavailable is not None:
        return unavailable
    assert view is not None
    if view.occupied is False:
        # The occupancy sensor sees no parcel: opening would burn the code for nothing.
        return Reason.EMPTY
    return None
