"""Abstract bases of every device kind; each backend implements one narrow surface."""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from hal.errors import HardwareFault
from hal.values import (
    DeviceHealth,
    DisplayMessage,
    DoorChanged,
    DoorState,
    Emit,
    HealthChanged,
    InputEvent,
    KeyPressed,
    OccupancyChanged,
    Scanned,
    TamperChanged,
)

if TYPE_CHECKING:
    from hal.registry import HalContext

# The value types live in hal.values (the core imports them from there); re-exported here so
# backends and the daemon keep importing everything of the hal from one place.
__all__ = [
    "ArmedPulse",
    "Device",
    "DeviceHealth",
    "Display",
    "DisplayMessage",
    "DoorChanged",
    "DoorSensor",
    "DoorState",
    "Emit",
    "HealthChanged",
    "InputEvent",
    "KeyPressed",
    "Keypad",
    "LockDriver",
    "OccupancyChanged",
    "OccupancySensor",
    "Scanned",
    "Scanner",
    "Tamper",
    "TamperChanged",
]


class DeviceKind(enum.StrEnum):
    """The kinds of device a bank has: the one list of them. Each value names the device's
    `[hal.<kind>]` table of the configuration; the order is the one devices are built in."""

    LOCK = "lock"
    DOOR_SENSOR = "door_sensor"
    OCCUPANCY = "occupancy"
    KEYPAD = "keypad"
    SCANNER = "scanner"
    DISPLAY = "display"
    TAMPER = "tamper"


class Device(ABC):  # noqa: B024 - every hook is optional; subclasses add the abstract ones
    """Common surface of every device: start, health, close.

    Input devices also implement `run(emit)`, a long-running coroutine that calls `emit` for
    every change and returns only when cancelled. It must wait on the hardware (edge events,
    a serial read, a queue) and never busy-poll.

    Every backend is constructed with the same keywords: its `[hal.<kind>.options]` table, the
    shared HalContext, and the config key to name in error messages.
    """

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        self.options = options
        self.context = context
        self.config_key = config_key

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Bring the device up; outputs are left off."""

    async def health(self) -> DeviceHealth:
        return DeviceHealth(ok=True)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device; outputs are switched off."""


MAX_PULSE_S: Final = 10.0
"""No backend energises a lock for longer than this in one pulse, whatever it is asked."""


class ArmedPulse(ABC):
    """A pulse made ready by `LockDriver.arm_pulse`: its output is reserved for it until
    `finish` or `release`.

    `fire` may be called from any thread, once the commit that reports the pulse is on the
    disk; it starts the output and never raises. Then, on the event loop, exactly one of:
    `finish` once the commit is known to have succeeded (completes the pulse, starts it now
    if `fire` did not run, raises HardwareFault when the output failed), or `release` when
    it failed or nobody waits for it any more (frees the output; a `fire` after it does
    nothing, one before it has sent its pulse). `release` may come again, or after `finish`:
    it then does nothing."""

    @abstractmethod
    def fire(self) -> None: ...

    @abstractmethod
    async def finish(self) -> None: ...

    @abstractmethod
    def release(self) -> None: ...


class LockDriver(Device):
    """Drives the door locks of the compartments.

    Contract: `pulse` releases the lock of one compartment for at most `duration_s` seconds.
    The driver (or the board) bounds the pulse, never the caller: if the awaiting task is
    cancelled mid-pulse the output still goes off. `all_off` switches every output off and is
    called at startup and shutdown. A pulse sent is not a door opened: only the door sensor says
    that.

    `pulse` is a template: it checks the compartment and the duration and bounds the duration
    to `max_pulse_s` here, once for every backend; a backend implements only `_pulse`.
    """

    max_pulse_s: float = MAX_PULSE_S
    """The longest pulse this driver gives; a backend with a configured cap sets its own (an
    instance attribute), never above MAX_PULSE_S."""

    async def pulse(self, compartment: str, duration_s: float) -> None:
        """Release the lock of `compartment` for a bounded time. Raises HardwareFault for an
        unknown compartment, a duration that is not a positive number, or a failed output."""
        if compartment not in self.context.compartments:
            raise HardwareFault(f"{self.config_key}: unknown compartment {compartment!r} "
                                f"(no lock output for compartment {compartment!r})")
        if isinstance(duration_s, bool) or not (
            isinstance(duration_s, int | float) and math.isfinite(duration_s) and duration_s > 0
        ):
            raise HardwareFault(f"{self.config_key}: pulse duration must be positive (a finite "
                                f"number of seconds), not {duration_s!r}")
        await self._pulse(compartment, min(float(duration_s), self.max_pulse_s, MAX_PULSE_S))

    async def arm_pulse(self, compartment: str) -> ArmedPulse | None:
        """Make ready, on the event loop, a pulse of `compartment` that another thread can
        start the instant its commit is on the disk (safety rule 1 still holds: the thread
        fires only after that). None when this driver cannot (the default), or cannot now:
        the caller then pulses through `pulse` as always. Only a driver whose pulse has a
        length of its own (a board-timed one) arms: it takes no duration."""
        if compartment not in self.context.compartments:
            return None
        return await self._arm_pulse(compartment)

    async def _arm_pulse(self, compartment: str) -> ArmedPulse | None:
        """A backend whose output can be started from any thread overrides this."""
        return None

    @abstractmethod
    async def _pulse(self, compartment: str, duration_s: float) -> None:
        """Release the lock of `compartment`, a configured one, for `duration_s` seconds, already
        bounded to (0, max_pulse_s]. Raises HardwareFault when the output fails."""

    @abstractmethod
    async def all_off(self) -> None:
        """Switch every lock output off."""

    async def bus_scan(self) -> dict[str, bool]:
        """Diagnostics: which lock controllers answer (e.g. {"board:0": True}); {} when the
        driver has no bus (GPIO solenoids)."""
        return {}

    async def show_service(self, compartment: str, in_service: bool) -> None:
        """Tell the hardware a compartment went out of (or back into) service.

        Optional: a bank with a per-door indicator lights it; the simulator records it.
        """


class DoorSensor(Device):
    """Reports whether each compartment door is open."""

    @abstractmethod
    async def read(self) -> dict[str, DoorState]:
        """Current state of every door this sensor covers."""

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Emit a DoorChanged for every change until cancelled."""


class OccupancySensor(Device):
    """Reports whether each compartment holds a parcel."""

    @abstractmethod
    async def read(self) -> dict[str, bool]:
        """Current occupancy of every compartment this sensor covers."""

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Emit an OccupancyChanged for every change until cancelled."""


class Keypad(Device):
    """The customer keypad: digits, `*` and `#`."""

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Emit a KeyPressed for every key until cancelled."""


class Scanner(Device):
    """The QR/barcode scanner."""

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Emit a Scanned for every read until cancelled."""


class Display(Device):
    """The customer display."""

    @abstractmethod
    async def show(self, message: DisplayMessage) -> None:
        """Replace what the display shows."""


class Tamper(Device):
    """The enclosure tamper switch."""

    @abstractmethod
    async def read(self) -> bool:
        """True when the enclosure is open."""

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Emit a TamperChanged for every change until cancelled."""
