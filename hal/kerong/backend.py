"""The "kerong" hal backend: lock driver, door sensor and occupancy sensor on one shared bus."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from hal.base import (
    ArmedPulse,
    Device,
    DeviceHealth,
    DoorChanged,
    DoorSensor,
    DoorState,
    Emit,
    HealthChanged,
    LockDriver,
    OccupancyChanged,
    OccupancySensor,
)
from hal.errors import BackendError
from hal.kerong.driver import KerongBus

if TYPE_CHECKING:
    from hal.registry import HalContext

BUS_KEY: Final = "kerong.bus"
POLL_SERVICE: Final = "kerong.poll"


def bus_of(context: HalContext) -> KerongBus:
    """The one bus every kerong device of this context shares; its polling loop is registered
    as the `kerong.poll` service when the bus is first built."""

    def build() -> KerongBus:
        bus = KerongBus.from_context(context)
        context.add_service(POLL_SERVICE, bus.run)
        return bus

    return context.shared(BUS_KEY, build)


class _KerongDevice(Device):
    """Checks that the device's options table is empty and attaches the shared bus."""

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        if options:
            keys = ", ".join(sorted(map(str, options)))
            raise BackendError(
                f"{config_key}: kerong devices take no options (found: {keys}); "
                "the bus is configured in [backends.kerong]"
            )
        self.bus = bus_of(context)

    async def start(self) -> None:
        await self.bus.start()

    async def health(self) -> DeviceHealth:
        return self.bus.health()

    async def close(self) -> None:
        await self.bus.close()


class KerongLockDriver(_KerongDevice, LockDriver):
    """Locks on CU16 boards. The board times every pulse itself, so nothing here can leave a
    lock energised: a cancelled or crashed task cannot stretch a pulse (safety rule 3)."""

    async def _pulse(self, compartment: str, duration_s: float) -> None:
        """Send the unlock frame of `compartment` and return.

        The pulse is timed by the board (its own fixed length): `duration_s`, checked and
        bounded by LockDriver.pulse, cannot lengthen or shorten it. The frame is sent even if the
        latch already reads released. Raises HardwareFault when the frame could not be sent.
        """
        await self.bus.unlock(compartment)

    async def _arm_pulse(self, compartment: str) -> ArmedPulse | None:
        """The unlock frame, written by the database writer's thread right after the commit
        that reports it: the customer does not wait for the event loop to wake up first."""
        return await self.bus.arm_unlock(compartment)

    async def all_off(self) -> None:
        """Nothing to switch off: every pulse is board-timed and ends by itself."""

    async def bus_scan(self) -> dict[str, bool]:
        """Which of the addresses 0-15 answer a status query: {"board:<n>": answered}."""
        return await self.bus.scan()


class KerongDoorSensor(_KerongDevice, DoorSensor):
    """Door states from the boards' latch feedback: engaged is closed, released is open.

    `run` also reports the bus's health: a HealthChanged when a board stops answering (its
    doors then read UNKNOWN) or the serial port fails, and another when it recovers.
    """

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        self._last: dict[str, DoorState] = {}
        self._health: dict[str, bool] = {}

    async def start(self) -> None:
        await super().start()
        # What `read` tells the daemon at startup is the baseline `run` reports changes from.
        self._last = self.bus.doors()

    async def read(self) -> dict[str, DoorState]:
        return self.bus.doors()

    async def run(self, emit: Emit) -> None:
        with self.bus.listen() as events:
            # Whatever happened before this loop (a restart of it, or before the first start)
            # is reported first, once.
            for fault in self.bus.faults():
                self._report_health(emit, fault)
            for cid, state in self.bus.doors().items():
                self._report_door(emit, DoorChanged(cid, state))
            while True:
                event = await events.get()
                if isinstance(event, DoorChanged):
                    self._report_door(emit, event)
                elif isinstance(event, HealthChanged):
                    self._report_health(emit, event)

    def _report_door(self, emit: Emit, change: DoorChanged) -> None:
        if self._last.get(change.compartment) is not change.state:
            self._last[change.compartment] = change.state
            emit(change)

    def _report_health(self, emit: Emit, change: HealthChanged) -> None:
        # A device never reported is healthy: only a fault, or the end of one, is news.
        if self._health.get(change.device, True) != change.ok:
            self._health[change.device] = change.ok
            emit(change)


class KerongOccupancySensor(_KerongDevice, OccupancySensor):
    """Parcel presence from the boards' infrared bits (bit set: a parcel is seen).

    `read` leaves out compartments whose board has not answered: unknown is not "empty".
    """

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        self._last: dict[str, bool] = {}

    async def start(self) -> None:
        await super().start()
        self._last = self.bus.occupancy()

    async def read(self) -> dict[str, bool]:
        return self.bus.occupancy()

    async def run(self, emit: Emit) -> None:
        with self.bus.listen() as events:
            for cid, occupied in self.bus.occupancy().items():
                self._report(emit, OccupancyChanged(cid, occupied))
            while True:
                event = await events.get()
                if isinstance(event, OccupancyChanged):
                    self._report(emit, event)

    def _report(self, emit: Emit, change: OccupancyChanged) -> None:
        if self._last.get(change.compartment) != change.occupied:
            self._last[change.compartment] = change.occupied
            emit(change)
