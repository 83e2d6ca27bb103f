"""The rpigpio and gpiod backends over pytest-mock fakes of RPi.GPIO and gpiod."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import inspect
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import waiting
from pytest_mock import MockerFixture

from hal.base import (
    DoorChanged,
    DoorState,
    InputEvent,
    LockDriver,
    OccupancyChanged,
    TamperChanged,
)
from hal.errors import BackendError, HardwareFault
from hal.gpio.debounce import Debouncer, ScanDebouncer
from hal.gpio.devices import GpioDoorSensor, GpioLockDriver, GpioOccupancySensor, GpioTamper
from hal.registry import HalContext, build_device, load_backend_class

pytestmark = pytest.mark.unit

BACKEND_MODULES = ("hal.gpio.rpigpio", "hal.gpio.gpiod_backend", "hal.gpio.matrix")
LIBRARY_MODULES = ("RPi", "RPi.GPIO", "gpiod", "gpiod.line")
COMPARTMENTS = ("1", "2", "3")


# -- a fake board: pin levels that the code drives and the test drives -----------------------


class Board:
    """The pins of a pretend Raspberry Pi, shared by the fake libraries."""

    def __init__(self) -> None:
        self.mode: dict[int, str] = {}  # "in" | "out"
        self.out_level: dict[int, int] = {}
        self.pull: dict[int, str] = {}  # "up" | "down" | "off"
        self.external: dict[int, int] = {}  # what the wiring puts on an input
        self.history: list[tuple[float, int, int]] = []  # (monotonic time, pin, level) written
        self.drives: dict[int, int] = {}  # how often each pin was driven LOW
        self.listeners: list[Callable[[int], None]] = []  # the libraries' edge hooks
        # Lets a test model wiring between pins (the key matrix): a level, or None.
        self.resolver: Callable[[int], int | None] | None = None

    def level(self, pin: int) -> int:
        if self.mode.get(pin) == "out":
            return self.out_level.get(pin, 0)
        if self.resolver is not None and (wired := self.resolver(pin)) is not None:
            return wired
        if pin in self.external:
            return self.external[pin]
        return {"up": 1, "down": 0}.get(self.pull.get(pin, "off"), 0)

    def write(self, pin: int, level: int) -> None:
        self.mode[pin] = "out"
        self.out_level[pin] = level
        self.history.append((time.monotonic(), pin, level))
        if level == 0:
            self.drives[pin] = self.drives.get(pin, 0) + 1

    def drive(self, pin: int, level: int) -> None:
        """The test side: the switch on `pin` now holds it at `level`."""
        before = self.level(pin)
        self.external[pin] = level
        if self.level(pin) != before:
            for listener in list(self.listeners):
                listener(pin)

    def on_time(self, pin: int) -> float:
        """How long `pin` was last HIGH, from the written history."""
        rise = fall = None
        high = False
        for at, p, level in self.history:
            if p != pin:
                continue
            if level == 1 and not high:  # writing HIGH again does not start a new pulse
                rise, fall = at, None
            elif level == 0 and high:
                fall = at
            high = level == 1
        assert rise is not None and fall is not None, f"GPIO {pin} made no complete pulse"
        return fall - rise


# -- fake RPi.GPIO ------------------------------------------------------------------------


RPI_CONSTANTS = {"BCM": 11, "BOARD": 10, "OUT": 0, "IN": 1, "LOW": 0, "HIGH": 1, "PUD_OFF": 20,
                 "PUD_DOWN": 21, "PUD_UP": 22, "RISING": 31, "FALLING": 32, "BOTH": 33}
RPI_PULLS = {20: "off", 21: "down", 22: "up"}


class FakeRpiGpio:
    """What RPi.GPIO's functions do, over `board`, with RPi.GPIO's errors for misuse."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.callbacks: dict[int, Callable[[int], None]] = {}
        self.mode: int | None = None

    def setmode(self, mode: int) -> None:
        if self.mode not in (None, mode):
            raise ValueError("A different mode has already been set!")
        self.mode = mode

    def setup(self, pin: int, direction: int, pull_up_down: int = 20, initial: int = -1) -> None:
        if self.mode is None:
            raise RuntimeError("Please set pin numbering mode using GPIO.setmode")
        board = self.board
        if direction == 0:
            board.write(pin, initial if initial != -1 else board.out_level.get(pin, 0))
        else:
            board.mode[pin] = "in"
            board.pull[pin] = RPI_PULLS[pull_up_down]

    def output(self, pin: int, level: int) -> None:
        if self.board.mode.get(pin) != "out":
            raise RuntimeError("The GPIO channel has not been set up as an OUTPUT")
        self.board.write(pin, int(level))

    def input(self, pin: int) -> int:
        if pin not in self.board.mode:
            raise RuntimeError("You must setup() the GPIO channel first")
        return self.board.level(pin)

    def add_event_detect(self, pin: int, edge: int, callback: Callable[[int], None],
                         bouncetime: int | None = None) -> None:
        if pin in self.callbacks:
            raise RuntimeError("Conflicting edge detection already enabled for this GPIO channel")
        self.callbacks[pin] = callback

    def remove_event_detect(self, pin: int) -> None:
        self.callbacks.pop(pin, None)

    def cleanup(self, channels: Any = None) -> None:
        board = self.board
        for pin in ([channels] if isinstance(channels, int) else channels or list(board.mode)):
            board.mode[pin] = "in"
            board.pull[pin] = "off"

    def edge(self, pin: int) -> None:
        # RPi.GPIO runs callbacks in its own thread; so does the fake.
        callback = self.callbacks.get(pin)
        if callback is not None:
            thread = threading.Thread(target=callback, args=(pin,))
            thread.start()
            thread.join()


def fake_rpi_gpio(board: Board, mocker: MockerFixture) -> tuple[types.ModuleType, Any]:
    """A fake RPi.GPIO whose functions are mocks over `board`; edges fire in another thread."""
    gpio = types.ModuleType("RPi.GPIO")
    for name, value in RPI_CONSTANTS.items():
        setattr(gpio, name, value)
    fake = FakeRpiGpio(board)
    for name, fn in {"setmode": fake.setmode, "setwarnings": lambda flag: None,
                     "setup": fake.setup, "output": fake.output, "input": fake.input,
                     "add_event_detect": fake.add_event_detect,
                     "remove_event_detect": fake.remove_event_detect,
                     "cleanup": fake.cleanup}.items():
        setattr(gpio, name, mocker.Mock(name=f"GPIO.{name}", side_effect=fn))
    board.listeners.append(fake.edge)
    gpio.callbacks = fake.callbacks  # type: ignore[attr-defined]
    package = types.ModuleType("RPi")
    package.GPIO = gpio  # type: ignore[attr-defined]
    return package, gpio


# -- fake gpiod (v2 API) ------------------------------------------------------------------


class Value(enum.Enum):
    INACTIVE = 0
    ACTIVE = 1


class Direction(enum.Enum):
    AS_IS = 1
    INPUT = 2
    OUTPUT = 3


class Bias(enum.Enum):
    AS_IS = 1
    UNKNOWN = 2
    DISABLED = 3
    PULL_UP = 4
    PULL_DOWN = 5


class Drive(enum.Enum):
    PUSH_PULL = 1
    OPEN_DRAIN = 2
    OPEN_SOURCE = 3


class Edge(enum.Enum):
    NONE = 1
    RISING = 2
    FALLING = 3
    BOTH = 4


@dataclass
class LineSettings:
    direction: Direction = Direction.AS_IS
    edge_detection: Edge = Edge.NONE
    bias: Bias = Bias.AS_IS
    drive: Drive = Drive.PUSH_PULL
    active_low: bool = False
    debounce_period: timedelta = timedelta()
    event_clock: Any = None
    output_value: Value = Value.INACTIVE


@dataclass
class EdgeEvent:
    line_offset: int


@dataclass
class FakeRequest:
    """A line request whose edge events wake a real pipe, so loop.add_reader sees them."""

    board: Board
    chip: str
    settings: dict[int, LineSettings]
    released: bool = False
    events: list[EdgeEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        for offset, s in self.settings.items():
            if s.direction is Direction.OUTPUT:
                self.set_value(offset, s.output_value)
            else:
                self.board.mode[offset] = "in"
                self.board.pull[offset] = {Bias.PULL_UP: "up", Bias.PULL_DOWN: "down"}.get(
                    s.bias, "off")
        self.board.listeners.append(self._edge)

    @property
    def fd(self) -> int:
        self._check()
        return self._read_fd

    def _check(self) -> None:
        if self.released:
            raise RuntimeError("request released")

    def _edge(self, pin: int) -> None:
        s = self.settings.get(pin)
        if not self.released and s is not None and s.edge_detection is not Edge.NONE:
            self.events.append(EdgeEvent(pin))
            os.write(self._write_fd, b"e")

    def set_value(self, offset: int, value: Value) -> None:
        self._check()
        s = self.settings[offset]
        physical = int((value is Value.ACTIVE) != s.active_low)
        if s.drive is Drive.OPEN_DRAIN and physical:
            self.board.mode[offset] = "in"  # let go: the pull-up takes the line high
            self.board.pull[offset] = "up"
        else:
            self.board.write(offset, physical)

    def get_values(self, offsets: list[int]) -> list[Value]:
        self._check()
        return [Value.ACTIVE if bool(self.board.level(o)) != self.settings[o].active_low
                else Value.INACTIVE for o in offsets]

    def get_value(self, offset: int) -> Value:
        return self.get_values([offset])[0]

    def read_edge_events(self, max_events: int | None = None) -> list[EdgeEvent]:
        self._check()
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        events, self.events = self.events, []
        return events

    def release(self) -> None:
        self._check()
        self.released = True
        self.board.listeners.remove(self._edge)
        os.close(self._read_fd)
        os.close(self._write_fd)


def fake_gpiod(board: Board, mocker: MockerFixture) -> tuple[types.ModuleType, list[FakeRequest]]:
    """A fake gpiod package: request_lines is a mock returning FakeRequests over `board`."""
    module = types.ModuleType("gpiod")
    line = types.ModuleType("gpiod.line")
    for enum_type in (Value, Direction, Bias, Drive, Edge):
        setattr(line, enum_type.__name__, enum_type)
    requests: list[FakeRequest] = []
    claimed: set[tuple[str, int]] = set()

    def request_lines(path: str, config: dict[Any, LineSettings], consumer: str | None = None,
                      **_: Any) -> FakeRequest:
        settings: dict[int, LineSettings] = {}
        for key, s in config.items():
            for offset in key if isinstance(key, tuple) else (key,):
                if (path, offset) in claimed:
                    raise OSError(errno.EBUSY, "Device or resource busy")
                settings[offset] = s
        claimed.update((path, offset) for offset in settings)
        request = FakeRequest(board, path, settings)
        requests.append(request)
        return request

    module.line = line  # type: ignore[attr-defined]
    module.LineSettings = LineSettings  # type: ignore[attr-defined]
    module.request_lines = mocker.Mock(name="gpiod.request_lines",  # type: ignore[attr-defined]
                                       side_effect=request_lines)
    return module, requests


# -- installing the fakes -----------------------------------------------------------------


@dataclass
class GpioEnv:
    """One backend over its fake library, as a test sees it."""

    backend: str  # "rpigpio" | "gpiod"
    board: Board
    gpio: Any = None  # the fake RPi.GPIO module
    gpiod: Any = None  # the fake gpiod module
    requests: list[FakeRequest] = field(default_factory=list)
    chip_options: dict[str, Any] = field(default_factory=dict)

    def watching(self, pin: int) -> bool:
        if self.gpio is not None:
            return pin in self.gpio.callbacks
        return True  # gpiod queues edges on the request's fd from the start


def forget_backend_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    # Backend modules bind their library at import: import them afresh over each fake.
    for name in BACKEND_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)


def install_fakes(backend: str, monkeypatch: pytest.MonkeyPatch,
                  mocker: MockerFixture) -> GpioEnv:
    forget_backend_modules(monkeypatch)
    board = Board()
    if backend == "rpigpio":
        package, gpio = fake_rpi_gpio(board, mocker)
        monkeypatch.setitem(sys.modules, "RPi", package)
        monkeypatch.setitem(sys.modules, "RPi.GPIO", gpio)
        return GpioEnv(backend, board, gpio=gpio)
    module, requests = fake_gpiod(board, mocker)
    monkeypatch.setitem(sys.modules, "gpiod", module)
    monkeypatch.setitem(sys.modules, "gpiod.line", module.line)
    return GpioEnv(backend, board, gpiod=module, requests=requests,
                   chip_options={"chip": "/dev/gpiochip4"})


def without_gpio_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without the libraries: their real import fails."""
    forget_backend_modules(monkeypatch)
    for name in LIBRARY_MODULES:
        # setitem, not delitem: the test's undo then removes whatever the test imported.
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]


@pytest.fixture(params=["rpigpio", "gpiod"])
def env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        mocker: MockerFixture) -> Iterator[GpioEnv]:
    yield install_fakes(request.param, monkeypatch, mocker)
    for name in BACKEND_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def ctx(tmp_path: Path) -> HalContext:
    return HalContext(compartments=COMPARTMENTS, state_dir=tmp_path)


def build(env: GpioEnv, ctx: HalContext, kind: str, **options: Any) -> Any:
    return build_device(kind, env.backend, options={**env.chip_options, **options}, context=ctx,
                        config_key=f"lockerd.toml: [hal.{kind}]")


# The matrix keypad tests (here and in test_matrix_keypad.py) press keys the moment a wait
# ends and expect the next sweep to see them in row order: they poll every 2 ms.
until = functools.partial(waiting.until, interval=0.002)


async def started(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Start `run(emit)` as a task and let it reach its first await.

    A run() sets up edge notification before it first awaits, and a new task runs before
    the one that created it resumes, so one yield is enough.
    """
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


LOCK_PINS = {"1": 17, "2": 27, "3": 22}


# -- one set of devices over each library -------------------------------------------------


@pytest.mark.parametrize(("kind", "device"), [
    ("lock", GpioLockDriver), ("door_sensor", GpioDoorSensor),
    ("occupancy", GpioOccupancySensor), ("tamper", GpioTamper),
])
def test_each_library_only_binds_the_shared_devices(env: GpioEnv, kind: str,
                                                    device: type[Any]) -> None:
    cls: Any = load_backend_class(kind, env.backend, config_key=f"lockerd.toml: [hal.{kind}]")
    assert cls.__bases__ == (device,)
    # The library's module gives the device its line access and nothing else: no logic.
    assert [name for name, value in vars(cls).items() if inspect.isfunction(value)] == []
    assert cls.line_access.__module__ == cls.__module__


# -- lock driver ---------------------------------------------------------------------------


@pytest.mark.parametrize("active_high", [True, False])
async def test_outputs_are_off_from_the_start(env: GpioEnv, ctx: HalContext,
                                              active_high: bool) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS, active_high=active_high)
    assert isinstance(lock, LockDriver)
    assert env.board.history == []  # nothing touched before start()
    await lock.start()
    off = 0 if active_high else 1
    assert {pin: env.board.level(pin) for pin in LOCK_PINS.values()} == dict.fromkeys(
        LOCK_PINS.values(), off)
    assert all(level == off for _, _, level in env.board.history), "an output glitched on"
    if env.gpio is not None:
        for pin in LOCK_PINS.values():
            env.gpio.setup.assert_any_call(pin, env.gpio.OUT, initial=off)
    else:
        settings = env.gpiod.request_lines.call_args.kwargs["config"]
        (offsets, s), = settings.items()
        assert offsets == tuple(LOCK_PINS.values())
        assert (s.direction, s.output_value, s.active_low) == (
            Direction.OUTPUT, Value.INACTIVE, not active_high)
        assert env.gpiod.request_lines.call_args.args[0] == "/dev/gpiochip4"
    await lock.close()


async def test_a_pulse_energises_for_its_duration(env: GpioEnv, ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS)
    await lock.start()
    await lock.pulse("2", 0.05)
    assert env.board.level(27) == 0
    assert 0.04 <= env.board.on_time(27) < 1.0
    assert env.board.level(17) == env.board.level(22) == 0
    await lock.close()


async def test_a_cancelled_caller_cannot_leave_the_solenoid_on(env: GpioEnv,
                                                                ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS, max_pulse_s=2.0)
    await lock.start()
    task = asyncio.create_task(lock.pulse("1", 0.3))
    await until(lambda: env.board.level(17) == 1)
    await stop(task)  # the task that asked for the pulse dies mid-pulse
    assert env.board.level(17) == 1, "the pulse is the driver's to end, at its bound"
    await until(lambda: env.board.level(17) == 0)
    assert 0.28 <= env.board.on_time(17) < 1.5
    await lock.close()


async def test_max_pulse_s_caps_any_request(env: GpioEnv, ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS, max_pulse_s=0.1)
    await lock.start()
    started_at = time.monotonic()
    await lock.pulse("3", 5.0)
    assert time.monotonic() - started_at < 2.0
    assert env.board.level(22) == 0
    assert 0.09 <= env.board.on_time(22) < 1.0
    await lock.close()


async def test_all_off_ends_every_pulse_now(env: GpioEnv, ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS, max_pulse_s=10.0)
    await lock.start()
    pulses = [asyncio.create_task(lock.pulse(cid, 10.0)) for cid in ("1", "3")]
    await until(lambda: env.board.level(17) == env.board.level(22) == 1)
    await lock.all_off()
    assert [env.board.level(p) for p in LOCK_PINS.values()] == [0, 0, 0]
    await asyncio.wait_for(asyncio.gather(*pulses), 1.0)  # their callers are released too
    await lock.close()


async def test_close_switches_every_output_off(env: GpioEnv, ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS, max_pulse_s=10.0)
    await lock.start()
    task = asyncio.create_task(lock.pulse("2", 10.0))
    await until(lambda: env.board.level(27) == 1)
    await lock.close()
    assert env.board.level(27) == 0
    await asyncio.wait_for(task, 1.0)
    if env.gpio is not None:
        env.gpio.cleanup.assert_not_called()  # cleanup would leave the driver inputs floating
    else:
        assert env.requests[0].released


async def test_overlapping_pulses_never_exceed_max_pulse_s(env: GpioEnv,
                                                           ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS, max_pulse_s=0.4)
    await lock.start()
    first = asyncio.create_task(lock.pulse("1", 0.35))
    await until(lambda: env.board.level(17) == 1)
    await asyncio.sleep(0.3)  # time passes with the lock released
    second = asyncio.create_task(lock.pulse("1", 5.0))  # may lengthen it, up to the cap only
    await asyncio.wait_for(asyncio.gather(first, second), 2.0)  # both callers are released
    assert env.board.level(17) == 0
    assert [level for _, pin, level in env.board.history if pin == 17][-2:] == [1, 0]
    assert 0.38 <= env.board.on_time(17) < 0.6  # capped from when it went on, not restarted
    await lock.close()


async def test_pulse_errors_are_hardware_faults(env: GpioEnv, ctx: HalContext) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS)
    await lock.start()
    with pytest.raises(HardwareFault, match="no lock output for compartment '9'"):
        await lock.pulse("9", 0.1)
    with pytest.raises(HardwareFault, match="must be positive"):
        await lock.pulse("1", float("nan"))
    await lock.close()


async def test_a_failing_output_is_reported_in_health(env: GpioEnv, ctx: HalContext,
                                                      mocker: MockerFixture) -> None:
    lock = build(env, ctx, "lock", pins=LOCK_PINS)
    await lock.start()
    if env.gpio is not None:
        env.gpio.output.side_effect = RuntimeError("I/O gone")
    else:
        mocker.patch.object(env.requests[0], "set_value", side_effect=OSError(errno.EIO, "EIO"))
    with pytest.raises(HardwareFault, match=r"lockerd\.toml: \[hal\.lock\]: GPIO 17"):
        await lock.pulse("1", 0.05)
    health = await lock.health()
    assert not health.ok and "GPIO 17" in health.detail


# -- options -------------------------------------------------------------------------------


def test_every_compartment_needs_a_lock_pin(env: GpioEnv, ctx: HalContext) -> None:
    with pytest.raises(BackendError) as info:
        build(env, ctx, "lock", pins={"1": 17, "2": 27})
    assert str(info.value) == ("lockerd.toml: [hal.lock.options]: pins has no entry for "
                               "compartment(s) '3' (key 'pins')")
    with pytest.raises(BackendError, match=r"unknown compartment\(s\) '9' \(key 'pins'\)"):
        build(env, ctx, "lock", pins={**LOCK_PINS, "9": 5})
    with pytest.raises(BackendError, match="GPIO 17 is given to compartments '1' and '2'"):
        build(env, ctx, "lock", pins={"1": 17, "2": 17, "3": 22})


def test_options_are_validated_with_the_key_named(env: GpioEnv, ctx: HalContext) -> None:
    with pytest.raises(BackendError, match=r"key 'max_pulse_s'"):
        build(env, ctx, "lock", pins=LOCK_PINS, max_pulse_s=60.0)
    with pytest.raises(BackendError, match=r"unknown field `pulse_s`"):
        build(env, ctx, "lock", pins=LOCK_PINS, pulse_s=1.0)
    with pytest.raises(BackendError, match=r"key 'debounce_ms'"):
        build(env, ctx, "door_sensor", pins=LOCK_PINS, debounce_ms=-1)
    with pytest.raises(BackendError, match=r"key 'pull'"):
        build(env, ctx, "tamper", pin=4, pull="sideways")


def test_chip_is_a_gpiod_option_only(monkeypatch: pytest.MonkeyPatch, mocker: MockerFixture,
                                     ctx: HalContext) -> None:
    env = install_fakes("rpigpio", monkeypatch, mocker)
    with pytest.raises(BackendError, match="unknown field `chip`"):
        build(env, ctx, "lock", pins=LOCK_PINS, chip="/dev/gpiochip0")


def test_one_pin_cannot_serve_two_devices(env: GpioEnv, ctx: HalContext) -> None:
    build(env, ctx, "lock", pins=LOCK_PINS)
    with pytest.raises(BackendError) as info:
        build(env, ctx, "door_sensor", pins={"1": 5, "2": 27, "3": 6})
    assert str(info.value) == ("lockerd.toml: [hal.door_sensor.options]: GPIO 27 is already "
                               "used by lockerd.toml: [hal.lock]")


# -- inputs --------------------------------------------------------------------------------

DOOR_PINS = {"1": 5, "2": 6, "3": 13}


def wire_closed_switches(board: Board, pins: dict[str, int], level: int) -> None:
    for pin in pins.values():
        board.external[pin] = level


async def test_door_edges_reach_emit_once_per_change(env: GpioEnv, ctx: HalContext) -> None:
    wire_closed_switches(env.board, DOOR_PINS, 1)  # active low: HIGH is a closed door
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS, debounce_ms=20)
    await door.start()
    assert await door.read() == dict.fromkeys(DOOR_PINS, DoorState.CLOSED)
    events: list[InputEvent] = []
    task = await started(door.run(events.append))
    assert env.watching(6)
    env.board.drive(6, 0)
    await until(lambda: events == [DoorChanged("2", DoorState.OPEN)])
    assert (await door.read())["2"] is DoorState.OPEN
    env.board.drive(6, 1)
    await until(lambda: len(events) == 2)
    assert events[1] == DoorChanged("2", DoorState.CLOSED)
    await stop(task)
    await door.close()


async def chatter(board: Board, pin: int, *, times: int, settle_at: int) -> None:
    """A contact bouncing: `times` short swings, spread over a few loop turns so that each
    edge reaches the backend while the line is still swung, ending at `settle_at`."""
    for _ in range(times):
        board.drive(pin, 1 - settle_at)
        await asyncio.sleep(0.002)  # a bounce lasts milliseconds; far inside the window
        board.drive(pin, settle_at)
        await asyncio.sleep(0.002)


async def test_a_bounce_shorter_than_debounce_emits_nothing(env: GpioEnv,
                                                            ctx: HalContext) -> None:
    wire_closed_switches(env.board, DOOR_PINS, 1)
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS, debounce_ms=200)
    await door.start()
    await door.read()
    events: list[InputEvent] = []
    task = await started(door.run(events.append))
    # Door 1's contact chatters and settles back where it was...
    await chatter(env.board, 5, times=3, settle_at=1)
    env.board.drive(13, 0)  # ...then door 3 really opens: its window closes after door 1's
    await until(lambda: len(events) >= 1)
    assert events == [DoorChanged("3", DoorState.OPEN)]
    # A stable change of door 1, bouncing on the way, is reported once.
    env.board.drive(5, 0)
    await chatter(env.board, 5, times=2, settle_at=0)
    env.board.drive(13, 1)
    await until(lambda: len(events) >= 3)
    assert events[1:] == [DoorChanged("1", DoorState.OPEN), DoorChanged("3", DoorState.CLOSED)]
    await stop(task)
    await door.close()


async def test_inputs_use_pull_ups_and_library_filters(env: GpioEnv, ctx: HalContext,
                                                       mocker: MockerFixture) -> None:
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS, debounce_ms=30)
    await door.start()
    task = await started(door.run(lambda event: None))
    if env.gpio is not None:
        for pin in DOOR_PINS.values():
            env.gpio.setup.assert_any_call(pin, env.gpio.IN, pull_up_down=env.gpio.PUD_UP)
            env.gpio.add_event_detect.assert_any_call(
                pin, env.gpio.BOTH, callback=mocker.ANY, bouncetime=15)
    else:
        (offsets, s), = env.gpiod.request_lines.call_args.kwargs["config"].items()
        assert offsets == tuple(DOOR_PINS.values())
        assert (s.direction, s.bias, s.active_low, s.edge_detection, s.debounce_period) == (
            Direction.INPUT, Bias.PULL_UP, True, Edge.BOTH, timedelta(milliseconds=15))
    await stop(task)
    if env.gpio is not None:
        assert env.gpio.callbacks == {}  # edge detection removed when run() ends
    await door.close()


async def test_active_high_wiring_reads_high_as_open(env: GpioEnv, ctx: HalContext) -> None:
    env.board.external.update({5: 1, 6: 0, 13: 0})
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS, active_low=False)
    await door.start()
    assert await door.read() == {"1": DoorState.OPEN, "2": DoorState.CLOSED,
                                 "3": DoorState.CLOSED}
    assert env.board.pull[5] == "down"  # a switch to 3V3 needs the pull-down


async def test_an_explicit_pull_overrides_the_default(env: GpioEnv, ctx: HalContext) -> None:
    # A reed contact to ground that opens with the door: HIGH (pulled up) means open.
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS, active_low=False, pull="up")
    await door.start()
    assert env.board.pull[5] == "up"
    assert set((await door.read()).values()) == {DoorState.OPEN}


async def test_occupancy_active_low_reads_low_as_occupied(env: GpioEnv,
                                                          ctx: HalContext) -> None:
    env.board.external.update({19: 0, 26: 1})
    occupancy = build(env, ctx, "occupancy", pins={"1": 19, "3": 26}, debounce_ms=10)
    await occupancy.start()
    assert await occupancy.read() == {"1": True, "3": False}  # compartment 2 has no sensor
    events: list[InputEvent] = []
    task = await started(occupancy.run(events.append))
    env.board.drive(26, 0)
    await until(lambda: events == [OccupancyChanged("3", True)])
    await stop(task)
    await occupancy.close()


async def test_tamper_open_at_startup_is_reported(env: GpioEnv, ctx: HalContext) -> None:
    env.board.external[4] = 0  # active low: the enclosure is already open
    tamper = build(env, ctx, "tamper", pin=4, debounce_ms=10)
    await tamper.start()
    events: list[InputEvent] = []
    task = await started(tamper.run(events.append))
    await until(lambda: events == [TamperChanged(True)])
    assert await tamper.read() is True
    env.board.drive(4, 1)
    await until(lambda: events[-1:] == [TamperChanged(False)])
    await stop(task)
    await tamper.close()


async def test_a_change_while_run_was_down_is_reported_on_restart(env: GpioEnv,
                                                                  ctx: HalContext) -> None:
    wire_closed_switches(env.board, DOOR_PINS, 1)
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS, debounce_ms=10)
    await door.start()
    await door.read()
    events: list[InputEvent] = []
    task = await started(door.run(events.append))
    await stop(task)  # as if it crashed and waits for the supervisor
    env.board.drive(13, 0)
    task = await started(door.run(events.append))
    await until(lambda: events == [DoorChanged("3", DoorState.OPEN)])
    await stop(task)
    await door.close()


async def test_gpiod_edge_read_failure_ends_run(monkeypatch: pytest.MonkeyPatch,
                                                mocker: MockerFixture, ctx: HalContext) -> None:
    env = install_fakes("gpiod", monkeypatch, mocker)
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS)
    await door.start()
    mocker.patch.object(env.requests[0], "read_edge_events",
                        side_effect=OSError(errno.EIO, "EIO"))
    task = await started(door.run(lambda event: None))
    env.board.drive(5, 0)
    with pytest.raises(HardwareFault, match="reading GPIO edge events failed"):
        await asyncio.wait_for(task, 2.0)
    await door.close()


async def test_rpigpio_without_edge_support_names_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                          mocker: MockerFixture,
                                                          ctx: HalContext) -> None:
    env = install_fakes("rpigpio", monkeypatch, mocker)
    env.gpio.add_event_detect.side_effect = RuntimeError("Failed to add edge detection")
    door = build(env, ctx, "door_sensor", pins=DOOR_PINS)
    await door.start()
    with pytest.raises(HardwareFault, match="install rpi-lgpio"):
        await door.run(lambda event: None)


# -- missing libraries ---------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "backend", "missing"), [
    ("lock", "rpigpio", "RPi"), ("door_sensor", "rpigpio", "RPi"),
    ("tamper", "gpiod", "gpiod"), ("occupancy", "gpiod", "gpiod"),
])
def test_a_missing_library_is_the_registrys_error(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                  backend: str, missing: str) -> None:
    without_gpio_libraries(monkeypatch)
    with pytest.raises(BackendError) as info:
        load_backend_class(kind, backend, config_key=f"lockerd.toml: [hal.{kind}]")
    assert str(info.value).startswith(
        f"lockerd.toml: [hal.{kind}]: backend {backend!r} needs a library that is not "
        f"installed (No module named '{missing}'")


def test_rpigpio_off_a_raspberry_pi_is_the_registrys_error(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    # The real RPi.GPIO raises RuntimeError on import anywhere but on a Pi.
    (tmp_path / "RPi").mkdir()
    (tmp_path / "RPi" / "__init__.py").write_text("")
    (tmp_path / "RPi" / "GPIO.py").write_text(
        "raise RuntimeError('This module can only be run on a Raspberry Pi!')\n")
    without_gpio_libraries(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendError) as info:
        load_backend_class("lock", "rpigpio", config_key="lockerd.toml: [hal.lock]")
    assert "lockerd.toml: [hal.lock]: backend 'rpigpio'" in str(info.value)
    assert "can only be run on a Raspberry Pi" in str(info.value)


def test_the_gpiod_v1_bindings_are_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    (tmp_path / "gpiod.py").write_text("class Chip:\n    pass\n")  # v1: no request_lines
    without_gpio_libraries(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendError, match=r"libgpiod v1 API; lockerd needs the v2 bindings"):
        load_backend_class("door_sensor", "gpiod", config_key="lockerd.toml: [hal.door_sensor]")


# -- pure debounce logic -------------------------------------------------------------------


def test_debouncer_reports_a_settled_change_once() -> None:
    d = Debouncer({"a": False, "b": False})
    token = d.edge("a")
    assert d.sample("a", token, True) is True
    assert d.state("a") is True
    assert d.sample("a", token, True) is None  # the same sample twice changes nothing
    assert d.states() == {"a": True, "b": False}


def test_debouncer_ignores_a_bounce_and_stale_samples() -> None:
    d = Debouncer({"a": False})
    first = d.edge("a")
    second = d.edge("a")  # another edge inside the window
    assert d.sample("a", first, True) is None  # superseded: the later window decides
    assert d.sample("a", second, False) is None  # settled where it was: nothing to report
    assert d.state("a") is False


def test_debouncer_force_sets_the_reported_state() -> None:
    d = Debouncer({"a": False})
    token = d.edge("a")
    d.force("a", True)
    assert d.sample("a", token, True) is None


def test_scan_debouncer_one_press_per_hold() -> None:
    d: ScanDebouncer[str] = ScanDebouncer(2)
    assert d.update(["5"]) == ([], [])
    assert d.update(["5"]) == (["5"], [])
    for _ in range(5):
        assert d.update(["5"]) == ([], [])
    assert d.update([]) == ([], [])
    assert d.update([]) == ([], ["5"])
    assert d.update(["5"]) == ([], [])
    assert d.update(["5"]) == (["5"], [])


def test_scan_debouncer_filters_a_one_scan_blip_and_keeps_keys_apart() -> None:
    d: ScanDebouncer[str] = ScanDebouncer(2)
    assert d.update(["1"]) == ([], [])
    assert d.update([]) == ([], [])
    assert d.update(["1", "9"]) == ([], [])
    assert d.update(["1", "9"]) == (["1", "9"], [])
    assert d.held == ["1", "9"]
    assert d.update(["9"]) == ([], [])
    assert d.update(["9", "1"]) == ([], [])  # "1" bounced up for one scan: still held
    assert d.held == ["1", "9"]
    with pytest.raises(ValueError):
        ScanDebouncer(0)
