"""Wire time format: RFC 3339 UTC strings with a Z suffix, to and from aware datetimes."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


def parse_time(text: str) -> datetime:
    """Parse `2026-11-29T03:00:00Z` (fractions allowed); anything else raises ValueError."""
    if not isinstance(text, str) or not _RFC3339_Z.match(text):
        raise ValueError(f"not an RFC 3339 UTC time ending in Z: {text!r}")
    main, _, frac = text[:-1].partition(".")
    dt = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    if frac:
        dt = dt.replace(microsecond=int((frac + "000000")[:6]))
    return dt


def format_time(dt: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with a Z suffix, whole seconds."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime: lockerd only handles aware UTC times")
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> datetime:
    return datetime.now(UTC)
