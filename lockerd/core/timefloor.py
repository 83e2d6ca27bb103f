"""Trusted time (safety rule 7): the system clock when it is synchronised, else never earlier
than the latest signed `issued_at` seen."""

from __future__ import annotations

from datetime import datetime


def trusted_now(system_now: datetime, *, synchronised: bool, floor: datetime | None) -> datetime:
    """The time expiry checks use. A clock that is not synchronised (no NTP yet, a dead RTC
    battery that booted in 1970) may be far behind; a signed document issued later proves the
    time is at least its `issued_at`, so an expired code cannot come back to life."""
    if synchronised or floor is None:
        return system_now
    return max(system_now, floor)


def raised_floor(floor: datetime | None, issued_at: datetime) -> datetime:
    """The floor after a verified document issued at `issued_at` was accepted."""
    return issued_at if floor is None or issued_at > floor else floor
