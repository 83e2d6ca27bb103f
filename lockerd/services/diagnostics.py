"""Hardware diagnostics a technician runs: bus scan, pulse test, sensor read-out, input echo."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hal.base import DoorChanged, InputEvent, KeyPressed, OccupancyChanged, Scanned
from hal.errors import HalError
from lockerd.core.access import may_hold_parcel
from lockerd.services.controller import Controller, RequestRefused


@dataclass(frozen=True, slots=True)
class EchoLine:
    """One input seen during an echo test; a scan's text is shown only by its length."""

    device: str
    value: str


class Diagnostics:
    """The hooks the technician console calls. Each returns plain data for display or JSON."""

    def __init__(self, *, controller: Controller, devices: dict[str, Any]) -> None:
        self._controller = controller
        self._devices = devices

    async def bus_scan(self) -> dict[str, bool]:
        lock = self._devices.get("lock")
        return {} if lock is None else dict(await lock.bus_scan())

    async def sensors(self) -> dict[str, Any]:
        """Every sensor's current reading, and each device's health."""
        out: dict[str, Any] = {}
        for name in ("door_sensor", "occupancy", "tamper"):
            device = self._devices.get(name)
            if device is None:
                continue
            try:
                reading = await device.read()
            except HalError as exc:
                reading = f"error: {exc}"
            out[name] = ({k: getattr(v, "value", v) for k, v in reading.items()}
                         if isinstance(reading, dict) else reading)
        out["health"] = await self._controller.health(self._devices)
        return out

    async def pulse_test(self, compartment: str, *, tech_id: str,
                         force: bool = False) -> str:
        """Pulse one lock under the door rules (events, retry, jam); refuses a compartment that
        may hold a parcel unless forced. Returns "opened" or "jammed". A forced pulse can hand
        out a parcel, so it counts against the open budget like a console `open`."""
        comp = self._controller.compartments.get(compartment)
        if comp is None:
            raise RequestRefused(f"no compartment {compartment!r} in this bank")
        if may_hold_parcel(comp.view()) and not force:
            raise RequestRefused(f"compartment {compartment} may hold a parcel; force it with "
                                 "a reason to open it anyway")
        return await self._controller.open_for(compartment, kind="console", source="console",
                                               ref={"tech_id": tech_id}, budgeted=force)

    async def echo(self, device: str, seconds: float) -> list[EchoLine]:
        """What `device` ("keypad", "scanner" or "doors") sends for `seconds`."""
        if device not in ("keypad", "scanner", "doors"):
            raise RequestRefused(f"no echo test for {device!r}: keypad, scanner or doors")
        seen: list[EchoLine] = []

        def tap(event: InputEvent) -> None:
            line = _echo_line(event)
            if line is not None and line[0] == device:
                seen.append(line[1])

        remove = self._controller.add_tap(tap)
        try:
            await asyncio.sleep(seconds)
        finally:
            remove()
        return seen


def _echo_line(event: InputEvent) -> tuple[str, EchoLine] | None:
    match event:
        case KeyPressed(key=key):
            return "keypad", EchoLine("keypad", key)
        case Scanned(data=data):
            # A scan may be somebody's code: show its shape, never its content.
            return "scanner", EchoLine("scanner", f"{len(data)} characters")
        case DoorChanged(compartment=cid, state=state):
            return "doors", EchoLine(f"door {cid}", state.value)
        case OccupancyChanged(compartment=cid, occupied=occupied):
            return "doors", EchoLine(f"occupancy {cid}", "parcel" if occupied else "empty")
    return None
