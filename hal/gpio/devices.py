"""The GPIO devices, written once over a GpioLibrary: solenoid locks, door, parcel, tamper."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, NamedTuple, TypeVar, cast

from hal.base import (
    Device,
    DeviceHealth,
    DoorChanged,
    DoorSensor,
    DoorState,
    Emit,
    LockDriver,
    OccupancyChanged,
    OccupancySensor,
    Tamper,
    TamperChanged,
)
from hal.errors import HardwareFault
from hal.gpio.debounce import EdgeInputs
from hal.gpio.lines import GpioLibrary, OutputLines
from hal.gpio.options import claim_pins, compartment_pins, options_key
from hal.registry import decode_options

if TYPE_CHECKING:
    from hal.registry import HalContext

D = TypeVar("D", bound=Device)


@dataclass(eq=False)
class _Pulse:
    """A pulse in progress on one compartment: its off timer and who waits for it."""

    handle: asyncio.TimerHandle
    done: asyncio.Future[None]
    started: float  # loop time the output went on
    ends: float  # loop time of the off timer
    error: HardwareFault | None = None


class GpioLockDriver(LockDriver):
    """Solenoid locks on GPIO outputs, over the GPIO library of `line_access` (set by
    `devices_over`; the registry builds the bound classes, never this one).

    The off of every pulse is a loop timer scheduled before anything is awaited, so it happens
    at min(duration, max_pulse_s) even if the task that asked for the pulse is cancelled; an
    output is never on for longer than max_pulse_s in one go.
    """

    line_access: ClassVar[type[GpioLibrary]]

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts = decode_options(options, self.line_access.lock_options, where)
        self._library = self.line_access.for_options(opts)
        self._pins = compartment_pins(opts.pins, context.compartments, where, require_all=True)
        claim_pins(context, self._library.claim_space, self._pins.values(), owner=config_key,
                   where=where)
        self._active_high = opts.active_high
        self.max_pulse_s = opts.max_pulse_s
        self._outputs: OutputLines | None = None
        self._pulses: dict[str, _Pulse] = {}
        self._fault: str | None = None

    def _open(self) -> OutputLines:
        if self._outputs is None:
            self._outputs = self._library.outputs(
                list(self._pins.values()), active_high=self._active_high, label=self.config_key)
        return self._outputs

    async def start(self) -> None:
        # Set up at the inactive level, then switched off once more: whatever a crashed run
        # left on is off before the daemon does anything else.
        self._open()
        await self.all_off()

    async def _pulse(self, compartment: str, duration_s: float) -> None:
        # Every compartment has a pin (checked at construction); LockDriver.pulse has checked
        # the compartment and bounded the duration to max_pulse_s.
        pin = self._pins[compartment]
        outputs = self._open()
        loop = asyncio.get_running_loop()
        now = loop.time()
        pulse = self._pulses.get(compartment)
        if pulse is None:
            ends = now + duration_s
            # The off is scheduled before the output goes on and before anything is awaited:
            # from here on the loop, not the calling task, ends the pulse.
            handle = loop.call_at(ends, self._end_pulse, compartment, outputs)
            pulse = _Pulse(handle, loop.create_future(), started=now, ends=ends)
            self._pulses[compartment] = pulse
        else:
            # A second pulse while one runs may lengthen it, but the output is never on for
            # longer than max_pulse_s in one go, however many callers ask.
            ends = min(now + duration_s, pulse.started + self.max_pulse_s)
            if ends > pulse.ends:
                pulse.handle.cancel()
                pulse.handle = loop.call_at(ends, self._end_pulse, compartment, outputs)
                pulse.ends = ends
        try:
            outputs.set(pin, True)
        except HardwareFault:
            self._end_pulse(compartment, outputs)
            raise
        # Shielded: a cancelled caller stops waiting, but the pulse (and its other waiters)
        # carry on to the timer.
        await asyncio.shield(pulse.done)
        if pulse.error is not None:
            raise pulse.error

    def _end_pulse(self, compartment: str, outputs: OutputLines) -> None:
        # Runs as a loop callback: it must not raise.
        pulse = self._pulses.pop(compartment, None)
        if pulse is None:
            return
        pulse.handle.cancel()
        try:
            outputs.set(self._pins[compartment], False)
        except HardwareFault as exc:
            pulse.error = exc
            self._fault = str(exc)
        if not pulse.done.done():
            pulse.done.set_result(None)

    async def all_off(self) -> None:
        outputs = self._open()
        pulses = dict(self._pulses)
        self._pulses.clear()
        for pulse in pulses.values():
            pulse.handle.cancel()
        errors: dict[str, HardwareFault] = {}
        for cid, pin in self._pins.items():
            try:
                outputs.set(pin, False)
            except HardwareFault as exc:
                errors[cid] = exc
        for cid, pulse in pulses.items():
            pulse.error = errors.get(cid)
            if not pulse.done.done():
                pulse.done.set_result(None)
        if errors:
            self._fault = "; ".join(str(exc) for exc in errors.values())
            raise HardwareFault(self._fault)
        self._fault = None

    async def health(self) -> DeviceHealth:
        if self._fault is not None:
            return DeviceHealth(ok=False, detail=self._fault)
        return DeviceHealth(ok=True)

    async def close(self) -> None:
        if self._outputs is None:
            return
        try:
            await self.all_off()
        finally:
            self._outputs.close()
            self._outputs = None


class _GpioInputs(Device):
    """What door and occupancy sensors on GPIO share: options, pins, debounced edge inputs,
    over the GPIO library of `line_access`."""

    line_access: ClassVar[type[GpioLibrary]]

    # Door switches must cover every compartment; parcel sensors may cover only some.
    _require_all: bool = True

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts = decode_options(options, self.line_access.input_options, where)
        library = self.line_access.for_options(opts)
        pins = compartment_pins(opts.pins, context.compartments, where,
                                require_all=self._require_all)
        claim_pins(context, library.claim_space, pins.values(), owner=config_key, where=where)
        self._inputs = EdgeInputs(pins=pins, library=library, active_low=opts.active_low,
                                  pull=opts.pull, debounce_ms=opts.debounce_ms, label=config_key)

    async def start(self) -> None:
        self._inputs.start()

    async def close(self) -> None:
        self._inputs.close()


class GpioDoorSensor(_GpioInputs, DoorSensor):
    """Door switches on GPIO inputs, one per compartment."""

    async def read(self) -> dict[str, DoorState]:
        return {cid: _door(active) for cid, active in self._inputs.read().items()}

    async def run(self, emit: Emit) -> None:
        await self._inputs.run(lambda cid, active: emit(DoorChanged(cid, _door(active))))


def _door(active: bool) -> DoorState:
    return DoorState.OPEN if active else DoorState.CLOSED


class GpioOccupancySensor(_GpioInputs, OccupancySensor):
    """Parcel sensors on GPIO inputs; compartments without one are simply not reported."""

    _require_all = False

    async def read(self) -> dict[str, bool]:
        return self._inputs.read()

    async def run(self, emit: Emit) -> None:
        await self._inputs.run(lambda cid, active: emit(OccupancyChanged(cid, active)))


class GpioTamper(Tamper):
    """The enclosure switch on one GPIO input.

    Its baseline is "closed", so an enclosure already open when the daemon starts (opened
    while the power was off) is reported as soon as `run` starts.
    """

    KEY: Final = "tamper"
    line_access: ClassVar[type[GpioLibrary]]

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts = decode_options(options, self.line_access.tamper_options, where)
        library = self.line_access.for_options(opts)
        claim_pins(context, library.claim_space, [opts.pin], owner=config_key, where=where)
        self._inputs = EdgeInputs(pins={self.KEY: opts.pin}, library=library,
                                  active_low=opts.active_low, pull=opts.pull,
                                  debounce_ms=opts.debounce_ms, label=config_key,
                                  baseline={self.KEY: False})

    async def start(self) -> None:
        self._inputs.start()

    async def read(self) -> bool:
        return self._inputs.read()[self.KEY]

    async def run(self, emit: Emit) -> None:
        await self._inputs.run(lambda _key, active: emit(TamperChanged(active)))

    async def close(self) -> None:
        self._inputs.close()


class GpioDevices(NamedTuple):
    """The GPIO devices bound to one library: what the registry names for that backend."""

    lock: type[GpioLockDriver]
    door_sensor: type[GpioDoorSensor]
    occupancy: type[GpioOccupancySensor]
    tamper: type[GpioTamper]


def devices_over(library: type[GpioLibrary], title: str) -> GpioDevices:
    """The devices above bound to `library` (its line access and option schemas), named after
    it in the library's module: `RpiGpio` -> `RpiGpioLockDriver`, ... They add nothing but
    `line_access`: every line of device logic is the one written here. `title` names the
    library in their docstrings."""

    def bind(device: type[D]) -> type[D]:
        name = library.__name__ + device.__name__.removeprefix("Gpio")
        namespace = {
            "line_access": library,
            "__module__": library.__module__,
            "__qualname__": name,
            "__doc__": f"{device.__name__} of hal.gpio.devices through {title}.",
        }
        return cast("type[D]", type(name, (device,), namespace))

    return GpioDevices(bind(GpioLockDriver), bind(GpioDoorSensor), bind(GpioOccupancySensor),
                       bind(GpioTamper))
