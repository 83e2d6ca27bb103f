"""The texts of the customer display: what to do next, and why a code failed."""

from __future__ import annotations

from hal.base import DisplayMessage
from lockerd.core.access import Reason


def idle() -> DisplayMessage:
    return DisplayMessage(("Enter your code and press #", "or scan your QR code"), "idle")


def typing(count: int) -> DisplayMessage:
    return DisplayMessage(("Code: " + "*" * count, "# to enter, * to clear"), "busy")


def cleared() -> DisplayMessage:
    return DisplayMessage(("Cleared", "Enter your code and press #"), "idle")


def timed_out() -> DisplayMessage:
    return DisplayMessage(("Entry timed out", "Enter your code and press #"), "idle")


def too_long() -> DisplayMessage:
    return DisplayMessage(("Code too long", "Enter your code and press #"), "error")


def keypad_fault() -> DisplayMessage:
    return DisplayMessage(("Keypad fault", "Please scan your QR code"), "error")


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
        (f"Parcel still in door {compartment}", "Your code works again", "Enter it to reopen"),
        "error",
    )


def jammed(compartment: str) -> DisplayMessage:
    return DisplayMessage(
        (f"Door {compartment} did not open", "Your code is still valid", "Please call support"),
        "error",
    )


def close_door(compartment: str) -> DisplayMessage:
    return DisplayMessage((f"Please close door {compartment}",), "error")


def locked_out(seconds: float) -> DisplayMessage:
    return DisplayMessage(
        ("Too many wrong codes", f"Try again in {max(1, round(seconds))} s"), "error"
    )


_REFUSALS: dict[Reason, tuple[str, ...]] = {
    Reason.UNKNOWN: ("Code not recognised", "Check it and try again"),
    Reason.EXPIRED: ("This code has expired", "Please contact support"),
    Reason.NOT_YET_VALID: ("This code is not valid yet", "Please try again later"),
    Reason.USED: ("This code was already used",),
    Reason.OUT_OF_SERVICE: ("This door is out of service", "Please contact support"),
    Reason.BUSY: ("This door is in use", "Please wait and try again"),
    Reason.EMPTY: ("No parcel found for this code", "Please contact support"),
    Reason.NO_COMPARTMENT: ("This code has no door here", "Please contact support"),
    Reason.UNSUPPORTED: ("This code cannot be used", "at this locker yet"),
    Reason.UNREADABLE: ("Scan not recognised", "Please try again"),
}


def refused(reason: Reason, *, remaining_s: float = 0.0) -> DisplayMessage:
    if reason is Reason.LOCKED_OUT:
        return locked_out(remaining_s)
    return DisplayMessage(_REFUSALS[reason], "error")
