"""The texts of the customer display: what to do next, and why a code failed.

Every line fits a 20-column character LCD (an HD44780 20x4), compartment ids up to 2
characters included.
"""

from __future__ import annotations

from hal.values import DisplayMessage
from lockerd.core.access import Reason

MAX_COLUMNS = 20


def idle(*, help_at_bank: bool = True) -> DisplayMessage:
    if not help_at_bank:
        return DisplayMessage(("Enter code, press #", "or scan QR code"), "idle")
    return DisplayMessage(("Enter code, press #", "No code? Press #", "or scan QR code"), "idle")


def typing(count: int) -> DisplayMessage:
    return DisplayMessage(("Code: " + "*" * min(count, MAX_COLUMNS - 6), "#=enter  *=clear"),
                          "busy")


def cleared() -> DisplayMessage:
    return DisplayMessage(("Cleared", "Enter code, press #"), "idle")


def timed_out() -> DisplayMessage:
    return DisplayMessage(("Entry timed out", "Enter code, press #"), "idle")


def too_long() -> DisplayMessage:
    return DisplayMessage(("Code too long", "Enter code, press #"), "error")


def keypad_fault() -> DisplayMessage:
    return DisplayMessage(("Keypad fault", "Please scan QR code"), "error")


def opening(compartment: str) -> DisplayMessage:
    return DisplayMessage((f"Door {compartment} is opening", "Please wait"), "busy")


def pickup_open(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        (f"Door {compartment} is open", "Take your parcel", "and close the door"), "ok"
    )


def door_open(compartment: str) -> DisplayMessage:
    return DisplayMessage((f"Door {compartment} is open",), "ok")


def pickup_done(compartment: str) -> DisplayMessage:
    return DisplayMessage(("Thank you!", f"Door {compartment} is closed"), "ok")


def pickup_incomplete(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        ("Parcel still inside", f"door {compartment}: your code", "works again"),
        "error",
    )


def jammed(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        (f"Door {compartment} did not open", "Code still valid", "Please call support"),
        "error",
    )


def jam_retry(compartment: str) -> DisplayMessage:
    """The guided retry after a jam; its first two lines say it all on a 16x2 display."""
    return DisplayMessage(
        (f"Door {compartment} stuck", "Push it, press #", "Code still valid"), "error"
    )


def close_door(compartment: str) -> DisplayMessage:
    return DisplayMessage((f"Please close door {compartment}",), "error")


def deposit_open(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        (f"Door {compartment} is open", "Put the parcel in", "and close the door"), "ok"
    )


def deposit_done(compartment: str) -> DisplayMessage:
    return DisplayMessage(("Deposit confirmed", f"Door {compartment}. Thank you"), "ok")


def deposit_aborted(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        (f"Door {compartment} closed empty", "Deposit cancelled"), "error"
    )


def deposit_unconfirmed(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        ("Parcel not confirmed", f"Door {compartment} blocked", "Please call support"), "error"
    )


def _clip(text: str, width: int = MAX_COLUMNS) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def scan_label(deposits: int) -> DisplayMessage:
    first = "Courier: scan label" if deposits == 0 else f"{deposits} deposited. Next?"
    return DisplayMessage((_clip(first), "Scan parcel label", "*=end session"), "busy")


def choose_size(parcel_id: str, sizes: tuple[str, ...]) -> DisplayMessage:
    """`sizes` in key order: key 1 chooses sizes[0]. Wrapped over as many lines as it takes."""
    lines = [_clip(f"Parcel {parcel_id}"), "Size? *=end"]
    line = ""
    for number, size in enumerate(sizes, start=1):
        item = _clip(f"{number}={size}", 9)
        candidate = f"{line} {item}".strip()
        if len(candidate) > MAX_COLUMNS:
            lines.append(line)
            candidate = item
        line = candidate
    if line:
        lines.append(line)
    return DisplayMessage(tuple(lines), "busy")


def no_free_door(size: str | None) -> DisplayMessage:
    what = "No free door" if size is None else _clip(f"No free door size {size}")
    return DisplayMessage((what, "Choose another size", "or * to end"), "error")


def session_ended(deposits: int) -> DisplayMessage:
    what = "1 parcel deposited" if deposits == 1 else f"{deposits} parcels deposited"
    return DisplayMessage(("Session ended", _clip(what)), "idle")


def label_refused(reason: Reason) -> DisplayMessage:
    return DisplayMessage(_LABEL_REFUSALS.get(reason, ("Label not accepted",)), "error")


def locked_out(seconds: float) -> DisplayMessage:
    return DisplayMessage(
        ("Too many wrong codes", f"Try again in {max(1, round(seconds))} s"), "error"
    )


_REFUSALS: dict[Reason, tuple[str, ...]] = {
    Reason.UNKNOWN: ("Code not recognised", "Check, try again"),
    Reason.EXPIRED: ("Code has expired", "Call support"),
    Reason.NOT_YET_VALID: ("Code not valid yet", "Try again later"),
    Reason.USED: ("Code already used",),
    Reason.OUT_OF_SERVICE: ("Door out of service", "Call support"),
    Reason.BUSY: ("Door in use", "Wait, try again"),
    Reason.EMPTY: ("No parcel for code", "Call support"),
    Reason.NO_COMPARTMENT: ("No door for code", "Call support"),
    Reason.UNSUPPORTED: ("Code not usable", "Call support"),
    Reason.UNREADABLE: ("Scan not recognised", "Please try again"),
    Reason.REVOKED: ("Code withdrawn", "Call support"),
    Reason.NO_FREE: ("No free door", "Call support"),
    Reason.OCCUPIED: ("Door already in use", "Call support"),
    Reason.OCCUPANCY_UNKNOWN: ("Door not available", "Call support"),
    Reason.BAD_LABEL: ("Label not readable", "Scan it again"),
    Reason.PARCEL_HERE: ("Parcel already here",),
    Reason.TOO_LARGE: ("QR code too large", "Not a locker code"),
    Reason.NOT_BASE45: ("QR code damaged", "Try again"),
    Reason.MALFORMED: ("QR code not valid", "Not a locker code"),
    Reason.UNKNOWN_KEY: ("QR code not valid", "Unknown issuer"),
    Reason.SIGNATURE: ("QR code not valid", "Signature wrong"),
    Reason.WRONG_LOCKER: ("QR code is for", "another locker"),
    Reason.KEYRING_EXPIRED: ("QR codes paused", "Locker not synced"),
    Reason.NO_KEYRING: ("QR codes paused", "Locker not set up"),
}

_LABEL_REFUSALS: dict[Reason, tuple[str, ...]] = {
    Reason.BAD_LABEL: ("Label not readable", "Scan it again"),
    Reason.PARCEL_HERE: ("Parcel already in", "this locker"),
    Reason.UNREADABLE: ("That is not a label", "Scan parcel label"),
}


def refused(reason: Reason, *, remaining_s: float = 0.0) -> DisplayMessage:
    if reason is Reason.LOCKED_OUT:
        return locked_out(remaining_s)
    return DisplayMessage(_REFUSALS[reason], "error")
