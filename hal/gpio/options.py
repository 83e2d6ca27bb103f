"""Options of the GPIO backends: the option schemas, and the checks of pins against the bank."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec

from hal.errors import BackendError

if TYPE_CHECKING:
    from hal.registry import HalContext

Pin = Annotated[int, msgspec.Meta(ge=0, le=1023)]
"""A BCM GPIO number (rpigpio) or a line offset on the chip (gpiod)."""
DebounceMs = Annotated[int, msgspec.Meta(ge=0, le=1000)]
ChipPath = Annotated[str, msgspec.Meta(min_length=1)]
Pull = Literal["up", "down", "off"]

DEFAULT_CHIP: Final = "/dev/gpiochip0"
CLAIMS_KEY: Final = "hal.gpio.claims"


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
