"""The gpiod backend: GPIO lines through libgpiod v2 (also on a Pi 5), and the devices over them."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Final

from hal.errors import BackendError, HalError, HardwareFault
from hal.gpio.devices import devices_over
from hal.gpio.lines import LIBRARY_ERRORS, GpioLibrary, InputLines, OutputLines
from hal.gpio.options import (
    GpiodInputOptions,
    GpiodLockOptions,
    GpiodTamperOptions,
    InputOptions,
    LockOptions,
    Pull,
    TamperOptions,
)

# The registry imports this module only when the configuration names the backend, so the
# library is imported only then, and a missing one becomes the registry's BackendError.
# The gpiod bindings have no type hints: Any at this boundary.
gpiod: Any = importlib.import_module("gpiod")
if not hasattr(gpiod, "request_lines"):
    # Debian's python3-libgpiod is the v1 API, which this backend does not speak.
    raise ImportError("the installed gpiod module is the libgpiod v1 API; lockerd needs the v2 "
                      "bindings: pip install 'gpiod>=2'")

CONSUMER: Final = "lockerd"  # what `gpioinfo` shows as the user of our lines


class Gpiod(GpioLibrary):
    """libgpiod v2 on one chip, as the shared device logic uses it.

    Each device holds one line request; the kernel applies the active level (`active_low`), the
    bias and an edge filter, and queues edge events on the request's file descriptor.
    """

    lock_options = GpiodLockOptions
    input_options = GpiodInputOptions
    tamper_options = GpiodTamperOptions

    def __init__(self, chip: str) -> None:
        self._chip = chip

    @classmethod
    def for_options(cls, options: LockOptions | InputOptions | TamperOptions) -> GpioLibrary:
        # The devices decode their options with the schemas above, which all have the chip.
        if not isinstance(options, GpiodLockOptions | GpiodInputOptions | GpiodTamperOptions):
            raise TypeError(f"not gpiod options: {options!r}")
        return cls(options.chip)

    @property
    def claim_space(self) -> str:
        return self._chip

    def _request(self, pins: Sequence[int], settings: Any, label: str) -> Any:
        try:
            return gpiod.request_lines(self._chip, consumer=CONSUMER,
                                       config={tuple(pins): settings})
        except LIBRARY_ERRORS as exc:
            raise BackendError(
                f"{label}: cannot claim GPIO lines {list(pins)} on {self._chip}: {exc}") from exc

    def outputs(self, pins: Sequence[int], *, active_high: bool, label: str) -> OutputLines:
        line = gpiod.line
        settings = gpiod.LineSettings(
            direction=line.Direction.OUTPUT,
            drive=line.Drive.PUSH_PULL,
            active_low=not active_high,
            # Applied as the line becomes an output: it never glitches on.
            output_value=line.Value.INACTIVE,
        )
        return _Outputs(self._request(pins, settings, label), label=label)

    def open_drain(self, pins: Sequence[int], *, label: str) -> OutputLines:
        line = gpiod.line
        settings = gpiod.LineSettings(
            direction=line.Direction.OUTPUT,
            drive=line.Drive.OPEN_DRAIN,
            bias=line.Bias.PULL_UP,
            active_low=True,  # "on" pulls the line low
            output_value=line.Value.INACTIVE,
        )
        return _Outputs(self._request(pins, settings, label), label=label)

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
        line = gpiod.line
        bias = {"up": line.Bias.PULL_UP, "down": line.Bias.PULL_DOWN,
                "off": line.Bias.DISABLED}[pull]
        settings = gpiod.LineSettings(
            direction=line.Direction.INPUT,
            bias=bias,
            active_low=active_low,
            edge_detection=line.Edge.BOTH if edges else line.Edge.NONE,
            debounce_period=timedelta(milliseconds=filter_ms if edges else 0),
        )
        return _Inputs(self._request(pins, settings, label), label=label)


class _Outputs(OutputLines):
    def __init__(self, request: Any, *, label: str) -> None:
        self._request = request
        self._label = label

    def set(self, pin: int, on: bool) -> None:
        value = gpiod.line.Value.ACTIVE if on else gpiod.line.Value.INACTIVE
        try:
            self._request.set_value(pin, value)
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(
                f"{self._label}: GPIO {pin} could not be switched {'on' if on else 'off'}: {exc}"
            ) from exc

    def close(self) -> None:
        # Released after the caller switched everything off; the next start sets the lines up
        # at their inactive level again.
        try:
            self._request.release()
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(f"{self._label}: releasing the GPIO lines failed: {exc}") from exc


class _Inputs(InputLines):
    def __init__(self, request: Any, *, label: str) -> None:
        self._request = request
        self._label = label
        self._loop: asyncio.AbstractEventLoop | None = None

    def active(self, pin: int) -> bool:
        return self.active_many([pin])[0]

    def active_many(self, pins: Sequence[int]) -> list[bool]:
        try:
            values = self._request.get_values(list(pins))
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(f"{self._label}: reading GPIO {list(pins)} failed: {exc}") from exc
        # The kernel has applied active_low already: ACTIVE means "open / occupied / pressed".
        return [value == gpiod.line.Value.ACTIVE for value in values]

    def watch(
        self,
        loop: asyncio.AbstractEventLoop,
        on_edge: Callable[[int], None],
        on_error: Callable[[HalError], None],
    ) -> None:
        def ready() -> None:
            # The fd is readable: events are queued, so this read does not block.
            try:
                events = self._request.read_edge_events()
            except LIBRARY_ERRORS as exc:
                self.unwatch()
                on_error(HardwareFault(f"{self._label}: reading GPIO edge events failed: {exc}"))
                return
            for event in events:
                on_edge(event.line_offset)

        self.unwatch()
        loop.add_reader(self._request.fd, ready)
        self._loop = loop

    def unwatch(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._request.fd)
            self._loop = None

    def close(self) -> None:
        self.unwatch()
        try:
            self._request.release()
        except LIBRARY_ERRORS as exc:
            raise HardwareFault(f"{self._label}: releasing the GPIO lines failed: {exc}") from exc


# The devices of hal.gpio.devices over libgpiod, by the names the registry gives them.
GpiodLockDriver, GpiodDoorSensor, GpiodOccupancySensor, GpiodTamper = devices_over(
    Gpiod, "libgpiod")
