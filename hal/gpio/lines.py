"""GPIO lines as the devices see them: what every GPIO library must offer, and how one is loaded."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Final, Literal

from hal.errors import BackendError, HalError
from hal.gpio.options import InputOptions, LockOptions, Pull, TamperOptions

# What RPi.GPIO and gpiod raise for a pin they cannot use (no such line, busy, no permission,
# not a Raspberry Pi); the adapters turn these into hal errors that name the config key.
LIBRARY_ERRORS: Final = (RuntimeError, OSError, ValueError)


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
    """One GPIO library (RPi.GPIO or gpiod) as the devices use it: how to claim lines as
    outputs or inputs, and through OutputLines/InputLines how to write, read and watch them.

    Setting pins up raises BackendError naming `label` (the config key); later I/O raises
    HardwareFault. The class also says which option schemas its devices take (gpiod adds
    `chip`), and `for_options` sets the library up from a device's validated options.
    """

    lock_options: ClassVar[type[LockOptions]] = LockOptions
    input_options: ClassVar[type[InputOptions]] = InputOptions
    tamper_options: ClassVar[type[TamperOptions]] = TamperOptions

    @classmethod
    @abstractmethod
    def for_options(cls, options: LockOptions | InputOptions | TamperOptions) -> GpioLibrary:
        """The library as one device configured with `options` uses it."""

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
