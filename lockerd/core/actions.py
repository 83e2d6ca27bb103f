"""What the pure state machines ask the controller to do, in the order it must be done."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hal.base import DisplayMessage


@dataclass(frozen=True, slots=True)
class Record:
    """Commit an event (and, in the same transaction, a change to a code's use count)."""

    type: str
    compartment: str | None = None
    code_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    use_delta: int = 0  # +1 consumes one use of `digest`, -1 gives one back
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Pulse:
    """Release a lock. Always preceded by a Record that reports it (safety rule 1)."""

    compartment: str


@dataclass(frozen=True, slots=True)
class Show:
    """Put a message on the customer display; back to the idle screen after `hold_s`."""

    message: DisplayMessage
    hold_s: float | None = None


Action = Record | Pulse | Show
