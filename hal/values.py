"""Value types the hal shares with lockerd's core: door states, input events, display messages.

Plain frozen dataclasses and enums on the standard library only, so lockerd.core can import
them without depending on the device ABCs of hal.base (which re-exports these): the device
surface changes with the backends, these values change only with the contract.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class DoorState(enum.Enum):
    """What a door sensor reports."""

    CLOSED = "closed"
    OPEN = "open"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class KeyPressed:
    """One key of the keypad: a digit, `*` (clear) or `#` (enter)."""

    key: str


@dataclass(frozen=True, slots=True)
class Scanned:
    """One string read by the QR/barcode scanner, already decoded to text."""

    data: str


@dataclass(frozen=True, slots=True)
class DoorChanged:
    """A compartment door changed state."""

    compartment: str
    state: DoorState


@dataclass(frozen=True, slots=True)
class OccupancyChanged:
    """A compartment's occupancy sensor now sees (or no longer sees) a parcel."""

    compartment: str
    occupied: bool


@dataclass(frozen=True, slots=True)
class TamperChanged:
    """The enclosure's tamper switch opened (True) or closed again (False)."""

    open: bool


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """A device became faulty (ok=False) or recovered (ok=True): a lock board that stopped
    answering, a scanner whose port vanished. The daemon records hardware.fault and
    hardware.recovered events from these."""

    device: str  # e.g. "board:0", "scanner", "keypad"
    ok: bool
    detail: str = ""


InputEvent = (
    KeyPressed | Scanned | DoorChanged | OccupancyChanged | TamperChanged | HealthChanged
)
Emit = Callable[[InputEvent], None]
"""Callback an input device calls for each event; it never blocks and never raises."""


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """Health of one device as the backend sees it."""

    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DisplayMessage:
    """What the customer display shows: up to four short lines and an indicator colour."""

    lines: tuple[str, ...]
    indicator: str = "idle"  # idle | busy | ok | error

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
