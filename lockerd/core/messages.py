"""The texts of the customer display: what to do next, and why a code failed.

Every line fits a 20-column character LCD (an HD44780 20x4), compartment ids up to 2
characters included.
"""

from __future__ import annotations

from hal.base import DisplayMessage
from lockerd.core.access import Reason

MAX_COLUMNS = 20


def idle() -> DisplayMessage:
    return DisplayMessage(("Enter code, press #", "or scan QR code"), "idle")


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


def close_door(compartment: str) -> DisplayMessage:
    return DisplayMessage((f"Please close door {compartment}",), "error")


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
    Reason.UNSUPPORTED: ("Code not usable", "here yet"),
    Reason.UNREADABLE: ("Scan not recognised", "Please try again"),
}


def refused(reason: Reason, *, remaining_s: float = 0.0) -> DisplayMessage:
    if reason is Reason.LOCKED_OUT:
        return locked_out(remaining_s)
    return DisplayMessage(_REFUSALS[reason], "error")
