"""Backend registry: device kind and backend name to a lazily imported "module:Class"."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from hal.base import (
    Device,
    DeviceKind,
    Display,
    DoorSensor,
    Keypad,
    LockDriver,
    OccupancySensor,
    Scanner,
    Tamper,
)
from hal.errors import BackendError

# Keyed by DeviceKind; typed by str, as a kind is also found by its plain name ("lock").
DEVICE_KINDS: Mapping[str, type[Device]] = {
    DeviceKind.LOCK: LockDriver,
    DeviceKind.DOOR_SENSOR: DoorSensor,
    DeviceKind.OCCUPANCY: OccupancySensor,
    DeviceKind.KEYPAD: Keypad,
    DeviceKind.SCANNER: Scanner,
    DeviceKind.DISPLAY: Display,
    DeviceKind.TAMPER: Tamper,
}
"""The abstract base of each device kind."""

# Backends are named by strings so that a library (RPi.GPIO, gpiod, pyserial) is imported only
# when the configuration asks for that backend.
BACKENDS: Mapping[str, Mapping[str, str]] = {
    DeviceKind.LOCK: {
        "sim": "sim.backend:SimLockDriver",
        "kerong": "hal.kerong.backend:KerongLockDriver",
        "rpigpio": "hal.gpio.rpigpio:RpiGpioLockDriver",
        "gpiod": "hal.gpio.gpiod_backend:GpiodLockDriver",
    },
    DeviceKind.DOOR_SENSOR: {
        "sim": "sim.backend:SimDoorSensor",
        "kerong": "hal.kerong.backend:KerongDoorSensor",
        "rpigpio": "hal.gpio.rpigpio:RpiGpioDoorSensor",
        "gpiod": "hal.gpio.gpiod_backend:GpiodDoorSensor",
    },
    DeviceKind.OCCUPANCY: {
        "sim": "sim.backend:SimOccupancySensor",
        "kerong": "hal.kerong.backend:KerongOccupancySensor",
        "rpigpio": "hal.gpio.rpigpio:RpiGpioOccupancySensor",
        "gpiod": "hal.gpio.gpiod_backend:GpiodOccupancySensor",
    },
    DeviceKind.KEYPAD: {
        "sim": "sim.backend:SimKeypad",
        "serial": "hal.serial_input:SerialKeypad",
        "matrix": "hal.gpio.matrix:MatrixKeypad",
    },
    DeviceKind.SCANNER: {
        "sim": "sim.backend:SimScanner",
        "serial": "hal.serial_input:SerialScanner",
    },
    DeviceKind.DISPLAY: {
        "sim": "sim.backend:SimDisplay",
        "hd44780": "hal.hd44780:Hd44780Display",
    },
    DeviceKind.TAMPER: {
        "sim": "sim.backend:SimTamper",
        "rpigpio": "hal.gpio.rpigpio:RpiGpioTamper",
        "gpiod": "hal.gpio.gpiod_backend:GpiodTamper",
    },
}

T = TypeVar("T")
ServiceFactory = Callable[[], Awaitable[None]]


@dataclass
class HalContext:
    """What every backend is built with: the bank's layout, shared resources, background services.

    A backend that needs something shared with other devices (the simulator's world, one RS-485
    bus for several boards) gets it through `shared`, so two devices configured with the same
    backend see the same object and nothing lives in module-level state.
    """

    compartments: tuple[str, ...]
    state_dir: Path
    # Relative paths in backend settings are taken from here: the config file's directory.
    config_dir: Path = field(default_factory=Path.cwd)
    backend_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Size label ("S", "M", "L") of each compartment id, from `[[compartments]] size`; an id
    # missing here (or an empty mapping) means the size is unknown. The simulator's world takes
    # them; hardware backends have no use for them.
    compartment_sizes: Mapping[str, str] = field(default_factory=dict)
    _shared: dict[str, object] = field(default_factory=dict)
    _services: dict[str, ServiceFactory] = field(default_factory=dict)

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """The resource under `key`, created by `factory` on first use."""
        if key not in self._shared:
            self._shared[key] = factory()
        return self._shared[key]  # type: ignore[return-value]

    def add_service(self, name: str, factory: ServiceFactory) -> None:
        """Ask the daemon to run `factory()` as a supervised background task named `name`."""
        if name in self._services:
            return
        self._services[name] = factory

    @property
    def services(self) -> Mapping[str, ServiceFactory]:
        return dict(self._services)

    def settings(self, backend: str, schema: type[T]) -> T:
        """The `[backends.<backend>]` table of the configuration, validated into `schema`."""
        raw = self.backend_settings.get(backend, {})
        return decode_options(raw, schema, f"backends.{backend}")


def decode_options(raw: Mapping[str, Any], schema: type[T], where: str) -> T:
    """Validate a table of backend options, naming the config key on error."""
    try:
        return msgspec.convert(dict(raw), schema, strict=True)
    except msgspec.ValidationError as exc:
        raise BackendError(f"{_table_name(where)}: {_describe(exc)}") from exc


def _table_name(where: str) -> str:
    """`backends.sim` -> `[backends.sim]`; a config key that already names its file and table
    (`lockerd.toml: [hal.scanner]`, + `.options`) -> `lockerd.toml: [hal.scanner.options]`."""
    if where.endswith("].options"):
        where = where[: -len("].options")] + ".options]"
    return where if "[" in where else f"[{where}]"


def _describe(exc: msgspec.ValidationError) -> str:
    msg = str(exc)
    # msgspec says "... - at `$.port`"; turn the path into a key name.
    text, _, path = msg.partition(" - at `$")
    path = path.rstrip("`").lstrip(".")
    # msgspec calls a missing key a "field" of an "Object": say which key the table needs.
    missing = "Object missing required field `"
    if text.startswith(missing):
        key = text[len(missing):].rstrip("`")
        return f"missing required key '{f'{path}.{key}' if path else key}'"
    return f"{text} (key '{path}')" if path else text


def load_backend_class(kind: str, name: str, *, config_key: str) -> type[Device]:
    """Import the class of backend `name` for device `kind`; errors name the config key."""
    if kind not in DEVICE_KINDS:
        raise BackendError(f"{config_key}: unknown device kind {kind!r}")
    table = BACKENDS[kind]
    if name not in table:
        known = ", ".join(sorted(table))
        raise BackendError(
            f"{config_key}: unknown {kind} backend {name!r}; known backends: {known}"
        )
    module_name, _, class_name = table[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(
            f"{config_key}: backend {name!r} needs a library that is not installed ({exc})"
        ) from exc
    cls = getattr(module, class_name, None)
    base = DEVICE_KINDS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise BackendError(f"{config_key}: {table[name]} is not a {base.__name__}")
    return cls


def build_device(
    kind: str, name: str, *, options: Mapping[str, Any], context: HalContext, config_key: str
) -> Device:
    """Load and construct one device. Every backend's constructor takes exactly these keywords."""
    cls = load_backend_class(kind, name, config_key=config_key)
    try:
        return cls(options=options, context=context, config_key=config_key)
    except BackendError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        raise BackendError(f"{config_key}: backend {name!r} cannot start: {exc}") from exc
