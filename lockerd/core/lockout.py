"""Brute-force throttle: wrong codes lead to a lockout that grows and is persisted by the caller."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

# The events that report a use consumed for good (EventType.consumes_use): a parcel taken out
# by its customer, a parcel confirmed in by the occupancy sensor. Only these reset the lockout.
# A granted credential does not: a courier or deposit code, a deposit token or a pickup closed
# on its parcel can be presented again, and resetting on them would give a guesser a fresh set
# of free attempts after every few wrong codes (safety rule 6).
from lockerd.core.events import CONSUMED_USE_EVENTS as CONSUMED_USE_EVENTS


@dataclass(frozen=True, slots=True)
class LockoutState:
    """What survives a restart. Times are wall-clock seconds since the epoch."""

    failures: int = 0
    lockouts: int = 0
    locked_until: float = 0.0
    last_failure_at: float = 0.0


class Lockout:
    """The `free_attempts`-th wrong code in a row locks the keypad for base_s seconds, and each
    further wrong code locks it again for twice as long as the last (capped at max_s). A use
    consumed for good (CONSUMED_USE_EVENTS), a technician's or the backend's clear, or a long
    quiet spell (`forget_after_s`) resets it; nothing else does."""

    def __init__(
        self,
        *,
        free_attempts: int,
        base_s: float,
        max_s: float,
        forget_after_s: float = 86400.0,
        state: LockoutState | None = None,
    ) -> None:
        self._free = free_attempts
        self._base = base_s
        self._max = max_s
        self._forget = forget_after_s
        self.state = state or LockoutState()

    def remaining(self, now: float) -> float:
        """Seconds the keypad stays locked; 0 when open. A clock set back cannot stretch it."""
        left = self.state.locked_until - now
        length = self._length(self.state.lockouts - 1) if self.state.lockouts else 0.0
        if left > length:
            # More left than the lockout ever lasted: the wall clock was set back. Count the
            # lockout again from now rather than keep an honest customer out until the clock
            # catches up.
            self.state = replace(self.state, locked_until=now + length)
            left = length
        return max(0.0, left)

    def _length(self, n: int) -> float:
        return float(min(self._max, self._base * 2.0 ** min(n, 30)))

    def record_failure(self, now: float) -> float | None:
        """Count a wrong code; returns the new lockout's length when one starts."""
        st = self.state
        if st.last_failure_at and now - st.last_failure_at > self._forget:
            st = LockoutState()
        st = replace(st, failures=st.failures + 1, last_failure_at=now)
        started: float | None = None
        if st.failures >= self._free:
            started = self._length(st.lockouts)
            st = replace(st, lockouts=st.lockouts + 1, locked_until=now + started)
        self.state = st
        return started

    def record_success(self) -> None:
        self.state = LockoutState()

    def clear(self) -> None:
        self.state = LockoutState()


class RateLimiter:
    """At most `per_minute` items a minute (token bucket); counts what it held back."""

    def __init__(self, *, per_minute: int) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._tokens = float(per_minute)
        self._at: float | None = None
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def admit(self, data: Mapping[str, object], now: float) -> dict[str, object] | None:
        """The data of a rejection event that may be recorded at `now`, with `suppressed`
        (how many were held back since the last one) when any were; None when this one is
        held back."""
        if not self.allow(now):
            return None
        held = self.take_suppressed()
        return {**data, "suppressed": held} if held else dict(data)

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
