"""Wire time format: RFC 3339 UTC strings with a Z suffix, to and from aware datetimes."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RFC3339_Z = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z", re.ASCII)


def parse_time(text: str) -> datetime:
    """Parse `2026-11-29T03:00:00Z` (fractions allowed); anything else raises ValueError.

    Built from the match groups rather than with strptime: bundles carry a time per code,
    and this is several times faster. fullmatch, so a trailing newline is refused too.
    """
    m = _RFC3339_Z.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not an RFC 3339 UTC time ending in Z: {text!r}")
    year, month, day, hour, minute, second, frac = m.groups()
    micro = int((frac + "000000")[:6]) if frac else 0
    # datetime() itself refuses month 13, day 32, hour 24 and the like with ValueError.
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                    micro, tzinfo=UTC)


def format_time(dt: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with a Z suffix, whole seconds."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime: lockerd only handles aware UTC times")
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> datetime:
    return datetime.now(UTC)
