"""Code entry on the keypad: digit buffer, `*` clears, `#` enters, timeout, stuck-key detection."""

from __future__ import annotations

from dataclasses import dataclass

DIGITS = frozenset("0123456789")
KEYS = DIGITS | {"*", "#"}


@dataclass(frozen=True, slots=True)
class Submitted:
    """`#` was pressed after some digits: this code goes to validation."""

    code: str


@dataclass(frozen=True, slots=True)
class Typing:
    """A digit was added; `count` digits are in the buffer now."""

    count: int


@dataclass(frozen=True, slots=True)
class Cleared:
    """`*` emptied the buffer."""


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The customer stopped typing mid-code; the buffer was emptied."""


@dataclass(frozen=True, slots=True)
class TooLong:
    """More digits than any code has; the buffer was emptied."""


@dataclass(frozen=True, slots=True)
class StuckKey:
    """The same key arrived so many times in a row that the keypad is likely faulty."""

    key: str


@dataclass(frozen=True, slots=True)
class InvalidKey:
    """A key that is not a digit, `*` or `#` (a keypad backend glitch); ignored."""

    key: str


EntryOutcome = Submitted | Typing | Cleared | TimedOut | TooLong | StuckKey | InvalidKey


class CodeEntry:
    """The keypad buffer. Time is a monotonic float in seconds."""

    def __init__(self, *, timeout_s: float, max_digits: int, stuck_key_repeats: int) -> None:
        self._timeout_s = timeout_s
        self._max_digits = max_digits
        self._stuck_repeats = stuck_key_repeats
        self._buffer = ""
        self._last_key_at: float | None = None
        self._run_key = ""
        self._run_length = 0
        self._stuck_reported = False

    @property
    def count(self) -> int:
        return len(self._buffer)

    @property
    def typed(self) -> str:
        """The digits typed so far: what `#` would submit now ("" when nothing is)."""
        return self._buffer

    def deadline(self) -> float | None:
        """When the half-typed code times out, or None when nothing is typed."""
        if not self._buffer or self._last_key_at is None:
            return None
        return self._last_key_at + self._timeout_s

    def discard(self) -> None:
        """Forget a half-typed code without a message (the keypad is taken over)."""
        self._buffer = ""

    def tick(self, now: float) -> TimedOut | None:
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            self._buffer = ""
            return TimedOut()
        return None

    def press(self, key: str, now: float) -> list[EntryOutcome]:
        """Feed one key; returns what happened (usually one outcome, two on a stuck key)."""
        if key not in KEYS:
            return [InvalidKey(key)]
        outcomes: list[EntryOutcome] = []
        expired = self.tick(now)
        if expired is not None:
            outcomes.append(expired)
        stuck = self._track_run(key)
        if stuck is not None:
            # A stuck key floods the buffer; refuse its input until another key is pressed.
            self._buffer = ""
            outcomes.append(stuck)
            return outcomes
        if self._stuck_reported:
            return outcomes
        self._last_key_at = now
        if key == "*":
            self._buffer = ""
            outcomes.append(Cleared())
        elif key == "#":
            if self._buffer:
                code, self._buffer = self._buffer, ""
                outcomes.append(Submitted(code))
        elif len(self._buffer) >= self._max_digits:
            self._buffer = ""
            outcomes.append(TooLong())
        else:
            self._buffer += key
            outcomes.append(Typing(len(self._buffer)))
        return outcomes

    def _track_run(self, key: str) -> StuckKey | None:
        if key == self._run_key:
            self._run_length += 1
        else:
            self._run_key, self._run_length = key, 1
            self._stuck_reported = False
        if self._run_length >= self._stuck_repeats and not self._stuck_reported:
            self._stuck_reported = True
            return StuckKey(key)
        return None
