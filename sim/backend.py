"""The "sim" hal backend: one class per device kind, all sharing one SimWorld."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec

from hal.base import (
    MAX_PULSE_S,
    Device,
    DeviceHealth,
    Display,
    DisplayMessage,
    DoorChanged,
    DoorSensor,
    DoorState,
    Emit,
    Keypad,
    KeyPressed,
    LockDriver,
    OccupancyChanged,
    OccupancySensor,
    Scanned,
    Scanner,
    Tamper,
    TamperChanged,
)
from hal.errors import BackendError, HardwareFault
from hal.registry import decode_options
from sim.control import serve_control
from sim.world import (
    STUCK_KEY_REPEAT_S,
    FaultChanged,
    SimError,
    SimWorld,
    check_sizes,
)

if TYPE_CHECKING:
    from hal.registry import HalContext

WORLD_KEY: Final = "sim.world"
CONTROL_SERVICE: Final = "sim.control"


class SimSettings(msgspec.Struct, forbid_unknown_fields=True):
    """The `[backends.sim]` table of the configuration."""

    socket: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """Unix socket of the control surface; relative paths are under the state directory."""
    spring_delay_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_PULSE_S)] = 0.05
    """How long a released door takes to spring open."""
    parcels: list[str] = []
    """Compartments that hold a parcel at start."""


class _NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Sim devices take no per-device options: everything is in `[backends.sim]`."""


def world_of(context: HalContext) -> SimWorld:
    """The world every sim device of this context shares, built on first use."""
    return context.shared(WORLD_KEY, lambda: _build_world(context))


def _build_world(context: HalContext) -> SimWorld:
    settings = context.settings("sim", SimSettings)
    for cid in settings.parcels:
        if cid not in context.compartments:
            raise BackendError(
                f"[backends.sim]: parcels names unknown compartment {cid!r} (key 'parcels')"
            )
    # Sizes come from the compartments of the config, not from [backends.sim]: say so.
    sizes = {
        cid: size
        for cid, size in context.compartment_sizes.items()
        if cid in context.compartments
    }
    try:
        check_sizes(context.compartments, sizes)
    except SimError as exc:
        raise BackendError(f"[[compartments]] size: {exc}") from exc
    try:
        world = SimWorld(
            context.compartments,
            spring_delay_s=settings.spring_delay_s,
            parcels=settings.parcels,
            sizes=sizes,
        )
    except SimError as exc:
        raise BackendError(f"[backends.sim]: {exc}") from exc
    if settings.socket is not None:
        path = Path(settings.socket)
        if not path.is_absolute():
            path = context.config_dir / path

        async def control() -> None:
            await serve_control(world, path)

        context.add_service(CONTROL_SERVICE, control)
    return world


class _SimDevice(Device):
    """Checks the (empty) options table and attaches the shared world."""

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        decode_options(options, _NoOptions, f"{config_key}.options")
        self.world = world_of(context)


class SimLockDriver(_SimDevice, LockDriver):
    """Locks whose pulses the world ends with a loop timer, at most MAX_PULSE_S long."""

    async def _pulse(self, compartment: str, duration_s: float) -> None:
        try:
            await self.world.release_lock(compartment, duration_s)
        except SimError as exc:
            raise HardwareFault(f"{self.config_key}: {exc}") from exc

    async def all_off(self) -> None:
        await self.world.all_off()

    async def show_service(self, compartment: str, in_service: bool) -> None:
        try:
            self.world.set_in_service(compartment, in_service)
        except SimError as exc:
            raise HardwareFault(f"{self.config_key}: {exc}") from exc

    async def health(self) -> DeviceHealth:
        jammed = [cid for cid in self.world.compartment_ids if self.world.compartment(cid).jammed]
        if jammed:
            return DeviceHealth(ok=False, detail="jammed: " + ", ".join(jammed))
        return DeviceHealth(ok=True)

    async def close(self) -> None:
        await self.world.all_off()


class SimDoorSensor(_SimDevice, DoorSensor):
    """Door sensors that read the real door unless a stuck fault makes them lie."""

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        self._last = self.world.sensed_doors()

    async def read(self) -> dict[str, DoorState]:
        return self.world.sensed_doors()

    async def run(self, emit: Emit) -> None:
        with self.world.subscribe(DoorChanged) as sub:
            # Whatever changed before the loop started is reported first.
            for cid, state in self.world.sensed_doors().items():
                self._report(emit, DoorChanged(cid, state))
            while True:
                change = await sub.get()
                if isinstance(change, DoorChanged):
                    self._report(emit, change)

    def _report(self, emit: Emit, change: DoorChanged) -> None:
        if self._last.get(change.compartment) != change.state:
            self._last[change.compartment] = change.state
            emit(change)

    async def health(self) -> DeviceHealth:
        stuck = [
            f"{cid} stuck {view.sensor_stuck.value}"
            for cid in self.world.compartment_ids
            if (view := self.world.compartment(cid)).sensor_stuck is not None
        ]
        if stuck:
            return DeviceHealth(ok=False, detail="; ".join(stuck))
        return DeviceHealth(ok=True)


class SimOccupancySensor(_SimDevice, OccupancySensor):
    """Occupancy sensors that always see the parcels the world holds."""

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        self._last = self.world.occupancy()

    async def read(self) -> dict[str, bool]:
        return self.world.occupancy()

    async def run(self, emit: Emit) -> None:
        with self.world.subscribe(OccupancyChanged) as sub:
            for cid, occupied in self.world.occupancy().items():
                self._report(emit, OccupancyChanged(cid, occupied))
            while True:
                change = await sub.get()
                if isinstance(change, OccupancyChanged):
                    self._report(emit, change)

    def _report(self, emit: Emit, change: OccupancyChanged) -> None:
        if self._last.get(change.compartment) != change.occupied:
            self._last[change.compartment] = change.occupied
            emit(change)


class SimKeypad(_SimDevice, Keypad):
    """A keypad fed by `SimWorld.press`; a stuck key repeats every STUCK_KEY_REPEAT_S."""

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        with self.world.subscribe(KeyPressed, FaultChanged) as sub:
            next_repeat: float | None = None
            while True:
                key = self.world.stuck_key
                if key is None:
                    next_repeat = None
                    change = await sub.get()
                else:
                    now = loop.time()
                    if next_repeat is None or now >= next_repeat:
                        emit(KeyPressed(key))
                        next_repeat = now + STUCK_KEY_REPEAT_S
                    try:
                        async with asyncio.timeout_at(next_repeat):
                            change = await sub.get()
                    except TimeoutError:
                        continue
                if isinstance(change, KeyPressed):
                    emit(change)

    async def health(self) -> DeviceHealth:
        key = self.world.stuck_key
        if key is not None:
            return DeviceHealth(ok=False, detail=f"key {key!r} stuck")
        return DeviceHealth(ok=True)


class SimScanner(_SimDevice, Scanner):
    """A scanner fed by `SimWorld.scan`; the world applies the dead and garbage faults."""

    async def run(self, emit: Emit) -> None:
        with self.world.subscribe(Scanned) as sub:
            while True:
                change = await sub.get()
                if isinstance(change, Scanned):
                    emit(change)

    async def health(self) -> DeviceHealth:
        if self.world.scanner_dead:
            return DeviceHealth(ok=False, detail="scanner does not answer")
        if self.world.scanner_garbage:
            return DeviceHealth(ok=False, detail="scanner sends garbage")
        return DeviceHealth(ok=True)


class SimDisplay(_SimDevice, Display):
    """A display whose text the world records (`display`, `display_history`)."""

    async def show(self, message: DisplayMessage) -> None:
        try:
            self.world.set_display(message.lines, message.indicator)
        except SimError as exc:
            raise HardwareFault(f"{self.config_key}: {exc}") from exc


class SimTamper(_SimDevice, Tamper):
    """The enclosure switch, opened by the `tamper` fault."""

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        self._last = self.world.tamper_open

    async def read(self) -> bool:
        return self.world.tamper_open

    async def run(self, emit: Emit) -> None:
        with self.world.subscribe(TamperChanged) as sub:
            self._report(emit, self.world.tamper_open)
            while True:
                change = await sub.get()
                if isinstance(change, TamperChanged):
                    self._report(emit, change.open)

    def _report(self, emit: Emit, is_open: bool) -> None:
        if self._last != is_open:
            self._last = is_open
            emit(TamperChanged(is_open))
