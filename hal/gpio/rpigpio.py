"""The rpigpio backend: GPIO lines through RPi.GPIO (BCM numbering), and the devices over them."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hal.errors import BackendError, HalError, HardwareFault
from hal.gpio.devices import devices_over
from hal.gpio.lines import LIBRARY_ERRORS, GpioLibrary, InputLines, OutputLines
from hal.gpio.options import InputOptions, LockOptions, Pull, TamperOptions

# The registry imports this module only when the configuration names the backend, so the
# library is imported only then, and a missing one becomes the registry's BackendError.
# RPi.GPIO has no type hints: Any at this boundary.
try:
    GPIO: Any = importlib.import_module("RPi.GPIO")
except RuntimeError as exc:
    # RPi.GPIO refuses to import anywhere but on a Raspberry Pi; an ImportError is what the
    # registry reports as a library that cannot be used, naming the config key.
    raise ImportError(f"RPi.GPIO cannot be used here: {exc}") from exc

EDGE_HINT = ("RPi.GPIO 0.7 cannot detect edges on Linux 6.x kernels: install rpi-lgpio (it "
             "provides the same RPi.GPIO module) or use the gpiod backend")


class RpiGpio(GpioLibrary):
    """RPi.GPIO as the shared device logic uses it.

    RPi.GPIO's state is process-wide: every device uses BCM numbering, set here.
    """

    @classmethod
    def for_options(cls, options: LockOptions | InputOptions | TamperOptions) -> GpioLibrary:
        return cls()

    @property
    def claim_space(self) -> str:
        return "rpigpio"

    def _prepare(self, label: str) -> None:
        try:
            # A pin left configured by a previous run (a crash, a restart) is expected, not
            # worth RPi.GPIO's warning on stderr for every pin.
            GPIO.setwarnings(False)
            GPIO.setmode(GPIO.BCM)
        except LIBRARY_ERRORS as exc:
            raise BackendError(f"{label}: RPi.GPIO cannot start: {exc}") from exc

    def _setup(self, pin: int, label: str, *args: Any, **kwargs: Any) -> None:
        try:
            GPIO.setup(pin, *args, **kwargs)
        except LIBRARY_ERRORS as exc:
            raise BackendError(f"{label}: GPIO {pin} cannot be set up: {exc}") from exc

    def outputs(self, pins: Sequence[int], *, active_high: bool, label: str) -> OutputLines:
        self._prepare(label)
        on, off = (GPIO.HIGH, GPIO.LOW) if active_high else (GPIO.LOW, GPIO.HIGH)
        for pin in pins:
            # `initial` writes the level before the pin becomes an output: no glitch on.
            self._setup(pin, label, GPIO.OUT, initial=off)
        return _PushPull(pins, on=on, off=off, label=label)

    def open_drain(self, pins: Sequence[int], *, label: str) -> OutputLines:
        self._prepare(label)
        for pin in pins:
            self._setup(pin, label, GPIO.IN, pull_up_down=GPIO.PUD_UP)
        return _OpenDrain(pins, label=label)

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
        self._prepare(label)
        bias = {"up": GPIO.PUD_UP, "down": GPIO.PUD_DOWN, "off": GPIO.PUD_OFF}[pull]
        for pin in pins:
            self._setup(pin, label, GPIO.IN, pull_up_down=bias)
        return _Inputs(pins, active_low=active_low, filter_ms=filter_ms, label=label)


class _PushPull(OutputLines):
    def __init__(self, pins: Sequence[int], *, on: int, off: int, label: str) -> None:
        self._pins = list(pins)
        self._on = on
        self._off = off
        self._label = label

    def set(self, pin: int, on: bool) -> None:
        try:
            GPIO.output(pin, self._on if on else self._off)
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(
                f"{self._label}: GPIO {pin} could not be switched {'on' if on else 'off'}: {exc}"
            ) from exc

    def close(self) -> None:
        # No GPIO.cleanup here: it turns the pins into floating inputs, and a floating driver
        # input can energise a solenoid. They stay driven off until the next owner sets them up.
        pass


class _OpenDrain(OutputLines):
    """RPi.GPIO has no open-drain mode: "on" makes the pin an output at LOW, "off" an input."""

    def __init__(self, pins: Sequence[int], *, label: str) -> None:
        self._pins = list(pins)
        self._label = label

    def set(self, pin: int, on: bool) -> None:
        try:
            if on:
                GPIO.setup(pin, GPIO.OUT, initial=GPIO.LOW)
            else:
                GPIO.setup(pin, GPIO.IN, pull_up_down=GPIO.PUD_UP)
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(f"{self._label}: GPIO {pin}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(*LIBRARY_ERRORS):
            GPIO.cleanup(self._pins)


class _Inputs(InputLines):
    def __init__(
        self, pins: Sequence[int], *, active_low: bool, filter_ms: int, label: str
    ) -> None:
        self._pins = list(pins)
        self._active_low = active_low
        self._filter_ms = filter_ms
        self._label = label
        self._watched: list[int] = []

    def active(self, pin: int) -> bool:
        try:
            level = GPIO.input(pin)
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(f"{self._label}: reading GPIO {pin} failed: {exc}") from exc
        return bool(level) != self._active_low

    def watch(
        self,
        loop: asyncio.AbstractEventLoop,
        on_edge: Callable[[int], None],
        on_error: Callable[[HalError], None],
    ) -> None:
        def from_thread(channel: int) -> None:
            # RPi.GPIO calls this in its own thread: hand the edge to the loop and return.
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
                loop.call_soon_threadsafe(on_edge, channel)

        extra: Mapping[str, int] = {"bouncetime": self._filter_ms} if self._filter_ms else {}
        for pin in self._pins:
            try:
                GPIO.add_event_detect(pin, GPIO.BOTH, callback=from_thread, **extra)
            except LIBRARY_ERRORS as exc:
                self.unwatch()
                raise HardwareFault(
                    f"{self._label}: edge detection on GPIO {pin} failed ({exc}); {EDGE_HINT}"
                ) from exc
            self._watched.append(pin)

    def unwatch(self) -> None:
        for pin in self._watched:
            with contextlib.suppress(*LIBRARY_ERRORS):
                GPIO.remove_event_detect(pin)
        self._watched.clear()

    def close(self) -> None:
        self.unwatch()
        with contextlib.suppress(*LIBRARY_ERRORS):
            GPIO.cleanup(self._pins)


# The devices of hal.gpio.devices over RPi.GPIO, by the names the registry gives them.
RpiGpioLockDriver, RpiGpioDoorSensor, RpiGpioOccupancySensor, RpiGpioTamper = devices_over(
    RpiGpio, "RPi.GPIO")
