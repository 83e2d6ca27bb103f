"""What the GPIO backends share: option schemas, pin checks, pure debounce logic, device logic."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Generic, Literal, TypeVar

import msgspec

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
from hal.errors import BackendError, HalError, HardwareFault

if TYPE_CHECKING:
    from hal.registry import HalContext

K = TypeVar("K")

Pin = Annotated[int, msgspec.Meta(ge=0, le=1023)]
"""A BCM GPIO number (rpigpio) or a line offset on the chip (gpiod)."""
DebounceMs = Annotated[int, msgspec.Meta(ge=0, le=1000)]
ChipPath = Annotated[str, msgspec.Meta(min_length=1)]
Pull = Literal["up", "down", "off"]

DEFAULT_CHIP: Final = "/dev/gpiochip0"
CLAIMS_KEY: Final = "hal.gpio.claims"

# What RPi.GPIO and gpiod raise for a pin they cannot use (no such line, busy, no permission,
# not a Raspberry Pi); the adapters turn these into hal errors that name the config key.
LIBRARY_ERRORS: Final = (RuntimeError, OSError, ValueError)


# -- option schemas ------------------------------------------------------------------------


class LockOptions(msgspec.Struct, forbid_unknown_fields=True):
    """`[hal.lock.options]` of the rpigpio backend."""

    pins: dict[str, Pin]
    """Compartment id -> the GPIO that drives its solenoid; every compartment needs one."""
    active_high: bool = True
    """True: the output is HIGH while the solenoid is energised (a MOSFET or transistor
    driver); false for the common active-low relay boards."""
    max_pulse_s: Annotated[float, msgspec.Meta(gt=0, le=10)] = 2.0
    """Hard cap on one pulse, whatever the caller asks for (a solenoid left on burns out)."""


class InputOptions(msgspec.Struct, forbid_unknown_fields=True):
    """`[hal.door_sensor.options]` / `[hal.occupancy.options]` of the rpigpio backend."""

    pins: dict[str, Pin]
    """Compartment id -> the GPIO of its switch."""
    active_low: bool = True
    """True: the pin reads LOW when the door is open / a parcel is seen (a contact that
    closes to ground then, with the internal pull-up)."""
    pull: Pull | None = None
    """Internal bias; by default "up" when active_low, else "down"."""
    debounce_ms: DebounceMs = 30
    """A change is reported only once the line has been quiet this long."""


class TamperOptions(msgspec.Struct, forbid_unknown_fields=True):
    """`[hal.tamper.options]` of the rpigpio backend."""

    pin: Pin
    active_low: bool = True
    """True: the pin reads LOW while the enclosure is open."""
    pull: Pull | None = None
    debounce_ms: DebounceMs = 30


class GpiodLockOptions(LockOptions):
    """`[hal.lock.options]` of the gpiod backend: the rpigpio ones plus the chip."""

    chip: ChipPath = DEFAULT_CHIP
    """The GPIO character device; /dev/gpiochip4 for the header of a Raspberry Pi 5 on older
    kernels (gpiochip0 on newer ones; `gpiodetect` shows which is "pinctrl-rp1")."""


class GpiodInputOptions(InputOptions):
    """`[hal.door_sensor.options]` / `[hal.occupancy.options]` of the gpiod backend."""

    chip: ChipPath = DEFAULT_CHIP


class GpiodTamperOptions(TamperOptions):
    """`[hal.tamper.options]` of the gpiod backend."""

    chip: ChipPath = DEFAULT_CHIP


def options_key(config_key: str) -> str:
    """Where a device's options table is, as `decode_options` takes it."""
    return f"{config_key}.options"


def table_name(where: str) -> str:
    """`where` as `decode_options` names it in its errors, so ours read the same:
    `lockerd.toml: [hal.lock].options` -> `lockerd.toml: [hal.lock.options]`."""
    if where.endswith("].options"):
        where = where[: -len("].options")] + ".options]"
    return where if "[" in where else f"[{where}]"


def effective_pull(pull: Pull | None, *, active_low: bool) -> Pull:
    """The bias to use: as configured, else the one that holds the switch inactive when open."""
    if pull is not None:
        return pull
    return "up" if active_low else "down"


def library_filter_ms(debounce_ms: int) -> int:
    """How long the library's own edge filter is: half our debounce window.

    RPi.GPIO's `bouncetime` drops every edge within that time of the previous one. Kept shorter
    than our window, the level we read when the window closes is read after the last dropped
    edge, and any later edge is delivered, so no final change can be lost.
    """
    return debounce_ms // 2


def compartment_pins(
    pins: Mapping[str, int], compartments: Sequence[str], where: str, *, require_all: bool
) -> dict[str, int]:
    """Check a `pins` table against the configured compartments; errors name the key."""
    table = table_name(where)
    unknown = sorted(cid for cid in pins if cid not in compartments)
    if unknown:
        names = ", ".join(repr(cid) for cid in unknown)
        raise BackendError(f"{table}: pins names unknown compartment(s) {names} (key 'pins')")
    if require_all:
        missing = [cid for cid in compartments if cid not in pins]
        if missing:
            names = ", ".join(repr(cid) for cid in missing)
            raise BackendError(
                f"{table}: pins has no entry for compartment(s) {names} (key 'pins')")
    if not pins:
        raise BackendError(f"{table}: pins is empty (key 'pins')")
    seen: dict[int, str] = {}
    for cid, pin in pins.items():
        if pin in seen:
            raise BackendError(
                f"{table}: GPIO {pin} is given to compartments {seen[pin]!r} and {cid!r} "
                "(key 'pins')")
        seen[pin] = cid
    # In the bank's compartment order, so outputs are set up and reported predictably.
    return {cid: pins[cid] for cid in compartments if cid in pins}


def claim_pins(
    context: HalContext, space: str, pins: Iterable[int], *, owner: str, where: str
) -> None:
    """Record that `owner` uses `pins`; a pin already used by another device is an error.

    Two devices on one pin would reconfigure each other (a lock output turned into an input, or
    a door switch driven as an output), so this is refused at startup.
    """
    claims: dict[tuple[str, int], str] = context.shared(CLAIMS_KEY, dict)
    for pin in pins:
        other = claims.get((space, pin))
        if other is not None and other != owner:
            raise BackendError(f"{table_name(where)}: GPIO {pin} is already used by {other}")
    for pin in pins:
        claims[(space, pin)] = owner


# -- pure debounce logic -------------------------------------------------------------------


class Debouncer(Generic[K]):
    """Debounce of edge-notified inputs, as pure state (no clock, no I/O).

    Every edge on an input gets a token and (re)starts a quiet window; the caller reads the
    level when that window closes and hands it in with the token. Only the sample of the latest
    edge counts, and it is reported only if it differs from the last reported state: a bounce
    shorter than the window reports nothing, a stable change is reported once.
    """

    def __init__(self, states: Mapping[K, bool]) -> None:
        self._states = dict(states)
        self._pending: dict[K, int] = {}
        self._next_token = 0

    def edge(self, key: K) -> int:
        """An edge on `key`: returns the token its sample must carry."""
        self._next_token += 1
        self._pending[key] = self._next_token
        return self._next_token

    def sample(self, key: K, token: int, level: bool) -> bool | None:
        """The level read when the window of edge `token` closed: the new state, or None."""
        if self._pending.get(key) != token:
            return None  # a later edge re-opened the window; its own sample decides
        del self._pending[key]
        if self._states.get(key) == level:
            return None
        self._states[key] = level
        return level

    def force(self, key: K, level: bool) -> None:
        """Take `level` as the reported state (a direct read while nobody watches edges)."""
        self._states[key] = level

    def state(self, key: K) -> bool:
        return self._states[key]

    def states(self) -> dict[K, bool]:
        return dict(self._states)


class ScanDebouncer(Generic[K]):
    """Debounce of a scanned key matrix, as pure state.

    A key counts as pressed after `scans` consecutive scans saw it down, and as released after
    as many saw it up. `update` reports each press once, however long the key is held.
    """

    def __init__(self, scans: int) -> None:
        if scans < 1:
            raise ValueError("scans must be at least 1")
        self._scans = scans
        self._held: dict[K, None] = {}  # a dict keeps the order keys were pressed in
        self._runs: dict[K, int] = {}  # consecutive scans that disagree with the held state

    def update(self, down: Collection[K]) -> tuple[list[K], list[K]]:
        """One scan saw `down`; returns (keys now pressed, keys now released)."""
        pressed: list[K] = []
        released: list[K] = []
        for key in list(dict.fromkeys([*down, *self._held, *self._runs])):
            is_down = key in down
            if is_down == (key in self._held):
                self._runs.pop(key, None)
                continue
            run = self._runs.get(key, 0) + 1
            if run < self._scans:
                self._runs[key] = run
                continue
            self._runs.pop(key, None)
            if is_down:
                self._held[key] = None
                pressed.append(key)
            else:
                del self._held[key]
                released.append(key)
        return pressed, released

    @property
    def held(self) -> list[K]:
        return list(self._held)


# -- the GPIO libraries as the device logic sees them -------------------------------------------


class OutputLines(ABC):
    """Output pins of one device, claimed from a GPIO library."""

    @abstractmethod
    def set(self, pin: int, on: bool) -> None:
        """Drive `pin` to its active (on) or inactive level. Raises HardwareFault."""

    @abstractmethod
    def close(self) -> None:
        """Give the pins back (outputs already switched off by the caller)."""


class InputLines(ABC):
    """Input pins of one device, claimed from a GPIO library."""

    @abstractmethod
    def active(self, pin: int) -> bool:
        """Whether `pin` is at its active level now. Raises HardwareFault."""

    def active_many(self, pins: Sequence[int]) -> list[bool]:
        """Several pins at once (one system call where the library allows it)."""
        return [self.active(pin) for pin in pins]

    @abstractmethod
    def watch(
        self,
        loop: asyncio.AbstractEventLoop,
        on_edge: Callable[[int], None],
        on_error: Callable[[HalError], None],
    ) -> None:
        """Call `on_edge(pin)` on the loop's thread for every edge, until `unwatch`."""

    @abstractmethod
    def unwatch(self) -> None:
        """Stop edge notification (no-op if not watching)."""

    @abstractmethod
    def close(self) -> None:
        """Give the pins back."""


class GpioLibrary(ABC):
    """One GPIO library (RPi.GPIO or gpiod) as the shared device logic uses it.

    Setting pins up raises BackendError naming `label` (the config key); later I/O raises
    HardwareFault.
    """

    @property
    @abstractmethod
    def claim_space(self) -> str:
        """Pins with the same number in the same space are the same physical pin."""

    @abstractmethod
    def outputs(self, pins: Sequence[int], *, active_high: bool, label: str) -> OutputLines:
        """Push-pull outputs, set up at their inactive level (no glitch on)."""

    @abstractmethod
    def open_drain(self, pins: Sequence[int], *, label: str) -> OutputLines:
        """Outputs that pull LOW when on and let go (high impedance) when off."""

    @abstractmethod
    def inputs(
        self,
        pins: Sequence[int],
        *,
        active_low: bool,
        pull: Pull,
        filter_ms: int,
        edges: bool,
        label: str,
    ) -> InputLines:
        """Inputs with a bias; with `edges`, both edges can be watched, the library's own
        filter set to `filter_ms` (0: none)."""


def load_library(name: Literal["rpigpio", "gpiod"], *, chip: str, backend: str,
                 config_key: str) -> GpioLibrary:
    """Import one GPIO library on demand; a missing one gives the registry's error."""
    try:
        if name == "rpigpio":
            from hal.gpio.rpigpio import RpiGpio

            return RpiGpio()
        from hal.gpio.gpiod_backend import Gpiod

        return Gpiod(chip)
    except ImportError as exc:
        raise BackendError(
            f"{config_key}: backend {backend!r} needs a library that is not installed ({exc})"
        ) from exc


# -- lock driver ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Pulse:
    """A pulse in progress on one compartment: its off timer and who waits for it."""

    handle: asyncio.TimerHandle
    done: asyncio.Future[None]
    started: float  # loop time the output went on
    ends: float  # loop time of the off timer
    error: HardwareFault | None = None


class GpioLockDriver(LockDriver):
    """Solenoid locks on GPIO outputs; the backends supply the schema and the library.

    The off of every pulse is a loop timer scheduled before anything is awaited, so it happens
    at min(duration, max_pulse_s) even if the task that asked for the pulse is cancelled; an
    output is never on for longer than max_pulse_s in one go.
    """

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts, self._library = self._configure(options, where)
        self._pins = compartment_pins(opts.pins, context.compartments, where, require_all=True)
        claim_pins(context, self._library.claim_space, self._pins.values(), owner=config_key,
                   where=where)
        self._active_high = opts.active_high
        self.max_pulse_s = opts.max_pulse_s
        self._outputs: OutputLines | None = None
        self._pulses: dict[str, _Pulse] = {}
        self._fault: str | None = None

    @abstractmethod
    def _configure(
        self, options: Mapping[str, Any], where: str
    ) -> tuple[LockOptions, GpioLibrary]:
        """Validate the options with the backend's schema and pick its library."""

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


# -- inputs --------------------------------------------------------------------------------


class EdgeInputs:
    """Debounced, edge-notified switch inputs by name: what door, occupancy and tamper share.

    No polling: `run` sleeps until the library reports an edge, then reads the level once the
    line has been quiet for `debounce_ms` and reports it if it changed.
    """

    def __init__(
        self,
        *,
        pins: Mapping[str, int],
        library: GpioLibrary,
        active_low: bool,
        pull: Pull | None,
        debounce_ms: int,
        label: str,
        baseline: Mapping[str, bool] | None = None,
    ) -> None:
        self._pins = dict(pins)
        self._keys = {pin: key for key, pin in self._pins.items()}
        self._library = library
        self._active_low = active_low
        self._pull = effective_pull(pull, active_low=active_low)
        self._debounce_ms = debounce_ms
        self._label = label
        self._baseline = baseline
        self._lines: InputLines | None = None
        self._debouncer: Debouncer[str] | None = None
        self._watching = False

    def _open(self) -> tuple[InputLines, Debouncer[str]]:
        if self._lines is None:
            self._lines = self._library.inputs(
                list(self._pins.values()), active_low=self._active_low, pull=self._pull,
                filter_ms=library_filter_ms(self._debounce_ms), edges=True, label=self._label)
        if self._debouncer is None:
            # Kept when the lines are closed and opened again: what was reported stays known.
            if self._baseline is not None:
                states = {key: self._baseline[key] for key in self._pins}
            else:
                pins = list(self._pins.values())
                states = dict(zip(self._pins, self._lines.active_many(pins), strict=True))
            self._debouncer = Debouncer(states)
        return self._lines, self._debouncer

    def start(self) -> None:
        self._open()

    def read(self) -> dict[str, bool]:
        """The state as reported (debounced) while `run` watches; otherwise the level now."""
        lines, debouncer = self._open()
        if not self._watching:
            # Nobody watches edges now, so the level itself is the news; a level caught
            # mid-bounce is corrected by `run`, which confirms every input when it starts.
            for key, active in zip(self._pins, lines.active_many(list(self._pins.values())),
                                   strict=True):
                debouncer.force(key, active)
        return debouncer.states()

    async def run(self, on_change: Callable[[str, bool], None]) -> None:
        """Call `on_change(key, active)` for every debounced change until cancelled."""
        lines, debouncer = self._open()
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        timers: dict[str, asyncio.TimerHandle] = {}
        window_s = self._debounce_ms / 1000

        def fail(exc: HalError) -> None:
            if not failed.done():
                failed.set_exception(exc)

        def sample(key: str, token: int) -> None:
            timers.pop(key, None)
            try:
                active = lines.active(self._pins[key])
            except HardwareFault as exc:
                fail(exc)
                return
            changed = debouncer.sample(key, token, active)
            if changed is not None:
                on_change(key, changed)

        def edge(pin: int) -> None:
            key = self._keys.get(pin)
            if key is None or failed.done():
                return
            token = debouncer.edge(key)
            old = timers.pop(key, None)
            if old is not None:
                old.cancel()
            timers[key] = loop.call_later(window_s, sample, key, token)

        lines.watch(loop, edge, fail)
        self._watching = True
        try:
            # Whatever changed while nobody watched (before the first run, or while a crashed
            # run waited to be restarted) is confirmed and reported like an edge.
            for pin in self._pins.values():
                edge(pin)
            await failed
        finally:
            self._watching = False
            lines.unwatch()
            for handle in timers.values():
                handle.cancel()

    def close(self) -> None:
        if self._lines is not None:
            self._lines.close()
            self._lines = None


class _GpioInputs(Device):
    """What door and occupancy sensors on GPIO share: options, pins, debounced edge inputs.
    The backends supply the schema and the library through `_configure`."""

    # Door switches must cover every compartment; parcel sensors may cover only some.
    _require_all: bool = True

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts, library = self._configure(options, where)
        pins = compartment_pins(opts.pins, context.compartments, where,
                                require_all=self._require_all)
        claim_pins(context, library.claim_space, pins.values(), owner=config_key, where=where)
        self._inputs = EdgeInputs(pins=pins, library=library, active_low=opts.active_low,
                                  pull=opts.pull, debounce_ms=opts.debounce_ms, label=config_key)

    @abstractmethod
    def _configure(
        self, options: Mapping[str, Any], where: str
    ) -> tuple[InputOptions, GpioLibrary]:
        """Validate the options with the backend's schema and pick its library."""

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

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts, library = self._configure(options, where)
        claim_pins(context, library.claim_space, [opts.pin], owner=config_key, where=where)
        self._inputs = EdgeInputs(pins={self.KEY: opts.pin}, library=library,
                                  active_low=opts.active_low, pull=opts.pull,
                                  debounce_ms=opts.debounce_ms, label=config_key,
                                  baseline={self.KEY: False})

    @abstractmethod
    def _configure(
        self, options: Mapping[str, Any], where: str
    ) -> tuple[TamperOptions, GpioLibrary]:
        """Validate the options with the backend's schema and pick its library."""

    async def start(self) -> None:
        self._inputs.start()

    async def read(self) -> bool:
        return self._inputs.read()[self.KEY]

    async def run(self, emit: Emit) -> None:
        await self._inputs.run(lambda _key, active: emit(TamperChanged(active)))

    async def close(self) -> None:
        self._inputs.close()

