"""When the Kerong bus is polled next: often while a door may move, seldom while all is still."""

from __future__ import annotations

from typing import Final, Literal

Mode = Literal["fast", "idle"]

FAST: Final = "fast"
IDLE: Final = "idle"


class PollSchedule:
    """The polling rhythm of one bus, as pure logic over times the caller passes in.

    A door is expected to move after an unlock (it springs open, or a customer pulls it) and
    while it stands open (it will be shut); a change seen on the bus (a door, a parcel, a board
    that went silent or came back) often comes with another. So the bus is polled every
    `fast_s` while a door reads open and for `linger_s` after a pulse or a change, and every
    `idle_s` otherwise. A door forced open while the bus is idle is still seen, within `idle_s`
    (plus one round of replies); from then on the bus is fast again.
    """

    def __init__(self, *, fast_s: float, idle_s: float, linger_s: float, now: float) -> None:
        if not 0 < fast_s <= idle_s:
            raise ValueError("need 0 < fast_s <= idle_s")
        if linger_s < 0:
            raise ValueError("linger_s must not be negative")
        self.fast_s = fast_s
        self.idle_s = idle_s
        self.linger_s = linger_s
        # A start is a change: what the first rounds find is what a door may be doing now.
        self._fast_until = now + linger_s
        self._door_open = False

    def mode(self, now: float) -> Mode:
        """"fast" while a door reads open or a pulse or change is recent, else "idle"."""
        return FAST if self._door_open or now < self._fast_until else IDLE

    def interval(self, now: float) -> float:
        """The pause after a round that ends at `now`."""
        return self.fast_s if self.mode(now) == FAST else self.idle_s

    def next_round_at(self, polled_at: float, now: float) -> float:
        """When the round after the one that ended at `polled_at` is due, as decided at
        `now` (a pulse or change since then can bring it forward, never back before
        `polled_at + fast_s`)."""
        return polled_at + self.interval(now)

    def pulse_sent(self, now: float) -> None:
        """An unlock frame went out: its door should move soon."""
        self._fast_until = max(self._fast_until, now + self.linger_s)

    def changed(self, now: float) -> None:
        """A round (or an unlock reply) found something different from the last one."""
        self._fast_until = max(self._fast_until, now + self.linger_s)

    def doors_open(self, any_open: bool) -> None:
        """Whether a door reads open after the latest round."""
        self._door_open = any_open
