"""Identifier rules of the wire contract (PROTOCOL section 1): one pattern and wording each."""

from __future__ import annotations

from typing import Final

LOCKER_ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
LOCKER_ID_RULE: Final = "1-64 characters of A-Z a-z 0-9 _ -"
COMPARTMENT_ID_PATTERN: Final = r"[A-Za-z0-9-]{1,16}"
COMPARTMENT_ID_RULE: Final = "1-16 characters of A-Z a-z 0-9 -"


def anchored(pattern: str) -> str:
    """`pattern` for msgspec's `Meta(pattern=...)`, which applies it with re.search: anchored
    with `\\Z`, because `$` would also accept a trailing newline ("L1\\n")."""
    return rf"^(?:{pattern})\Z"
