"""Help at the bank (PROTOCOL section 12): the steps of a help request, and its hourly limit.

Pure: time comes in, screens and requests go out. The help flow never opens a door and
never says whether a parcel is in this bank; only the backend's signed message does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from hal.values import DisplayMessage
from lockerd.core.entry import DIGITS

MAX_TRACKING = 64
PHONE_DIGITS = 4
WINDOW_S = 3600.0
COLUMNS = 20
# The reference a customer reads out to support: no look-alike characters (0/O, 1/I, 5/S...).
REFERENCE_ALPHABET = "ACDEFGHJKLMNPQRTUVWXY3479"
REFERENCE_LENGTH = 6


def is_tracking(text: str) -> bool:
    """1-64 printable ASCII characters, as a label or a customer gives a tracking number."""
    return 0 < len(text) <= MAX_TRACKING and all(" " <= c <= "~" for c in text)


def is_reference(text: str) -> bool:
    return len(text) == REFERENCE_LENGTH and all(c in REFERENCE_ALPHABET for c in text)


@dataclass(frozen=True, slots=True)
class HelpRules:
    """[help] as the bank needs it, with `[entry] timeout_s` for an idle step."""

    support_text: str = "Call support"
    reply_timeout_s: float = 20.0
    max_per_hour: int = 6
    step_timeout_s: float = 20.0
    enabled: bool = True  # [help] enabled: off, `#` on an empty entry starts nothing


class Step(enum.Enum):
    TRACKING = "tracking"
    PHONE = "phone"
    CHECKING = "checking"


@dataclass(frozen=True, slots=True)
class Ask:
    """The customer has given both answers: record a request (the executor names it)."""

    tracking: str
    phone_last4: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The flow is over; show this and go back to the idle screen."""

    message: DisplayMessage


@dataclass(frozen=True, slots=True)
class Prompt:
    """The flow goes on; show this until the next input."""

    message: DisplayMessage


HelpOutcome = Ask | Ended | Prompt


class HelpFlow:
    """One customer's help request, from `#` on an empty entry to the answer or the timeout.

    Steps: tracking number (digits then `#`, or one scan), phone's last 4 digits, then
    checking until `answered` or `reply_timeout_s`. `*` leaves at any step; a step without
    input for `step_timeout_s` ends the flow."""

    def __init__(self, rules: HelpRules, *, t: float) -> None:
        self.rules = rules
        self.step = Step.TRACKING
        self.tracking = ""
        self.phone = ""
        self.help_id: str | None = None
        self.reference: str | None = None
        self._since = t

    def start(self) -> Prompt:
        return Prompt(ask_tracking(""))

    def prompt(self) -> DisplayMessage:
        """The screen of the current step, to come back to after another message."""
        if self.step is Step.TRACKING:
            return ask_tracking(self.tracking)
        if self.step is Step.PHONE:
            return ask_phone(len(self.phone))
        return checking(self.reference or "")

    def deadline(self) -> float:
        wait = self.rules.reply_timeout_s if self.step is Step.CHECKING \
            else self.rules.step_timeout_s
        return self._since + wait

    def key(self, key: str, t: float) -> HelpOutcome | None:
        if key == "*":
            return Ended(cancelled())
        if self.step is Step.CHECKING:
            return None  # only `*` does anything while the reply is awaited
        self._since = t
        if self.step is Step.TRACKING:
            return self._tracking_key(key)
        return self._phone_key(key)

    def _tracking_key(self, key: str) -> HelpOutcome | None:
        if key == "#":
            if not self.tracking:
                return None
            self.step = Step.PHONE
            return Prompt(ask_phone(0))
        if key in DIGITS and len(self.tracking) < MAX_TRACKING:
            self.tracking += key
            return Prompt(ask_tracking(self.tracking))
        return None

    def _phone_key(self, key: str) -> HelpOutcome | None:
        if key == "#" or key not in DIGITS:
            return None
        self.phone += key
        if len(self.phone) < PHONE_DIGITS:
            return Prompt(ask_phone(len(self.phone)))
        return Ask(self.tracking, self.phone)

    def scan(self, text: str, t: float) -> HelpOutcome | None:
        """Any barcode is a tracking number at the first step; elsewhere it is ignored."""
        if self.step is not Step.TRACKING or not is_tracking(text):
            return None
        self._since = t
        self.tracking = text
        self.step = Step.PHONE
        return Prompt(ask_phone(0))

    def sent(self, help_id: str, reference: str, t: float) -> None:
        """The request is durable; the reply is awaited from now."""
        self.help_id, self.reference = help_id, reference
        self.step = Step.CHECKING
        self._since = t

    def tick(self, t: float) -> Ended | None:
        if t < self.deadline():
            return None
        if self.step is Step.CHECKING and self.reference is not None:
            return Ended(no_reply(self.reference, self.rules.support_text))
        return Ended(help_timed_out())


@dataclass(frozen=True, slots=True)
class HelpLimitState:
    """What survives a restart. Times are wall-clock seconds since the epoch."""

    requests: tuple[float, ...] = ()  # when each request of the last hour was recorded
    refused: int = 0  # requests turned away by the limit, ever (the only trace they leave)


class HelpLimit:
    """At most `per_hour` help requests per bank in any rolling hour. A clock set back
    cannot stretch the window: a request recorded later than now counts as made now."""

    def __init__(self, *, per_hour: int, state: HelpLimitState | None = None,
                 window_s: float = WINDOW_S) -> None:
        self.per_hour = per_hour
        self._window = window_s
        self.state = state or HelpLimitState()

    def take(self, now: float) -> bool:
        current = tuple(min(at, now) for at in self.state.requests
                        if now - min(at, now) < self._window)
        if len(current) >= self.per_hour:
            self.state = replace(self.state, requests=current, refused=self.state.refused + 1)
            return False
        self.state = replace(self.state, requests=(*current, now))
        return True


# -- the screens: every line fits 20 columns; the first two carry the gist on a 2x16 -------


def _wrap(text: str, width: int = COLUMNS, lines: int = 4) -> tuple[str, ...]:
    """Words over lines of `width`; a word longer than a line is cut."""
    out: list[str] = []
    line = ""
    for word in text.split():
        while len(word) > width:
            if line:
                out.append(line)
                line = ""
            out.append(word[:width])
            word = word[width:]
        candidate = f"{line} {word}".strip()
        if len(candidate) > width:
            out.append(line)
            candidate = word
        line = candidate
    if line:
        out.append(line)
    return tuple(out[:lines]) or ("",)


def ask_tracking(typed: str) -> DisplayMessage:
    shown = typed if len(typed) <= 16 else "~" + typed[-15:]
    return DisplayMessage(("Tracking number?", shown or "Type it or scan", "#=next *=cancel"),
                          "busy")


def ask_phone(count: int) -> DisplayMessage:
    return DisplayMessage(("Phone, last 4?", "Digits: " + "*" * count + "_" * (4 - count),
                           "*=cancel"), "busy")


def checking(reference: str) -> DisplayMessage:
    return DisplayMessage(("Checking...", f"Ref H-{reference}", "Please wait"), "busy")


def answered(message: str) -> DisplayMessage:
    return DisplayMessage(_wrap(message), "ok")


def no_reply(reference: str, support_text: str) -> DisplayMessage:
    return DisplayMessage(("No reply yet", f"Ref H-{reference}", *_wrap(support_text, lines=1),
                           "Request will be sent"), "error")


def offline(reference: str, support_text: str) -> DisplayMessage:
    return DisplayMessage(("Offline: saved", f"Ref H-{reference}", *_wrap(support_text, lines=1),
                           "Sent when online"), "error")


def limited(support_text: str) -> DisplayMessage:
    return DisplayMessage(("Help is busy", *_wrap(support_text, lines=3)), "error")


def cancelled() -> DisplayMessage:
    return DisplayMessage(("Help cancelled", "Enter code, press #"), "idle")


def help_timed_out() -> DisplayMessage:
    return DisplayMessage(("Help timed out", "Enter code, press #"), "idle")
