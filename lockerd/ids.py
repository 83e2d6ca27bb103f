"""Identifier rules of the wire contract (PROTOCOL section 1): one pattern and wording each."""

from __future__ import annotations

import re
from typing import Final

LOCKER_ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
LOCKER_ID_RULE: Final = "1-64 characters of A-Z a-z 0-9 _ -"
COMPARTMENT_ID_PATTERN: Final = r"[A-Za-z0-9-]{1,16}"
COMPARTMENT_ID_RULE: Final = "1-16 characters of A-Z a-z 0-9 -"


def anchored(pattern: str) -> str:
    """`pattern` for msgspec's `Meta(pattern=...)`, which applies it with re.search: anchored
    with `\\Z`, because `$` would also accept a trailing newline ("L1\\n")."""
    return rf"^(?:{pattern})\Z"

# PROTOCOL section 9: a signed QR token is scanned as text that starts with this prefix.
QR_TOKEN_PREFIX: Final = "LK1:"

# A parcel label's text is the parcel id: printable ASCII, no spaces, as the backend writes it.
PARCEL_LABEL_PATTERN: Final = r"[\x21-\x7e]{1,64}"
_PARCEL_LABEL = re.compile(PARCEL_LABEL_PATTERN)


def is_qr_token(text: str) -> bool:
    """True for scanned text that claims to be a signed token (starts with `LK1:`)."""
    return text.startswith(QR_TOKEN_PREFIX)


def is_parcel_label(text: str) -> bool:
    """True for text a parcel label may carry as its parcel id."""
    return _PARCEL_LABEL.fullmatch(text) is not None
