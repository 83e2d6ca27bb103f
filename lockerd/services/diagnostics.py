"""Hardware diagnostics: the one selftest, bus scan, pulse test, sensor read-out, input echo,
and the console commands that run them."""

from __future__ import annotations

import asyncio
from collections.abc import Container, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from hal.base import DoorChanged, InputEvent, KeyPressed, OccupancyChanged, Scanned
from hal.errors import HalError
from lockerd.core.access import may_hold_parcel
from lockerd.core.console import Args, Caller, Level, Registry, Reply
from lockerd.services.controller import Controller, OpenBudgetSpent, RequestRefused
from lockerd.services.controller_console import compartment_arg, no_override

C = TypeVar("C", bound=Caller)
MAX_ECHO_S = 60
# What a selftest reports for a compartment it did not pulse.
NOT_PULSED = "skipped: not known to be empty"


@dataclass(frozen=True, slots=True)
class EchoLine:
    """One input seen during an echo test; a scan's text is shown only by its length."""

    device: str
    value: str


@dataclass(frozen=True, slots=True)
class SelftestResult:
    """One selftest: every device's health, the lock boards that answer (when the bus was
    scanned) and, for a compartment, what its lock did."""

    health: dict[str, dict[str, Any]]
    bus: dict[str, bool] = field(default_factory=dict)
    compartment: str | None = None
    lock: str | None = None

    @property
    def faults(self) -> list[str]:
        return [f"{name}: {h['detail'] or 'fault'}" for name, h in self.health.items()
                if not h["ok"]]

    @property
    def ok(self) -> bool:
        return (all(bool(h["ok"]) for h in self.health.values()) and all(self.bus.values())
                and self.lock != "jammed")

    def console_reply(self) -> Reply:
        """The console's `selftest`: PASS/FAIL, one line per device and per board."""
        text = [f"selftest: {'PASS' if self.ok else 'FAIL'}"]
        text += [f"  {n:<12} {'ok' if h['ok'] else 'FAULT'}  {h['detail']}"
                 for n, h in self.health.items()]
        text += [f"  board {b:<6} {'answers' if up else 'NO ANSWER'}"
                 for b, up in self.bus.items()]
        return Reply(text, {"ok": self.ok, "health": self.health, "bus": self.bus})

    def command_result(self) -> tuple[str, str, dict[str, Any]]:
        """The remote `selftest` command's status, detail and result data."""
        faults = self.faults
        data: dict[str, Any] = {"devices": self.health}
        parts = [f"{len(self.health) - len(faults)}/{len(self.health)} devices ok", *faults]
        if self.compartment is not None:
            data["lock"] = self.lock
            parts.append(f"lock {self.compartment}: {self.lock}")
        return ("ok" if self.ok else "error"), "; ".join(parts), data


class Diagnostics:
    """The hardware checks the console and the remote `selftest` command run. Each returns
    plain data for display or JSON."""

    def __init__(self, *, controller: Controller, devices: Mapping[str, Any]) -> None:
        self._controller = controller
        self._devices = devices

    async def selftest(self, *, scan_bus: bool, compartment: str | None = None,
                       source: str = "mqtt", ref: dict[str, Any] | None = None) -> SelftestResult:
        """Every device's health; with `scan_bus` the lock-bus scan too; with a compartment
        known to be empty, a pulse of its lock (kind `selftest`). One that may hold a parcel
        is not pulsed: that would hand the parcel to whoever stands at the bank."""
        health = await self._controller.health(self._devices)
        bus = await self.bus_scan() if scan_bus else {}
        lock: str | None = None
        if compartment is not None:
            comp = self._controller.compartments.get(compartment)
            if comp is None:
                raise RequestRefused(f"no compartment {compartment!r} in this bank")
            if may_hold_parcel(comp.view()):
                lock = NOT_PULSED
            else:
                lock = await self._controller.open_for(compartment, kind="selftest",
                                                       source=source, ref=ref or {})
        return SelftestResult(health=health, bus=bus, compartment=compartment, lock=lock)

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


def register_diagnostic_commands(registry: Registry[C], *, diagnostics: Diagnostics,
                                 compartments: Container[str], opens_per_hour: int) -> None:
    """selftest, pulse, bus scan, sensors and the keypad and scanner echo tests."""

    async def pulse(s: Caller, a: Args) -> Reply:
        cid = compartment_arg(a, "pulse ID [--force REASON]", compartments)
        assert s.tech_id is not None
        try:
            outcome = await diagnostics.pulse_test(cid, tech_id=s.tech_id,
                                                   force=a.force is not None)
        except OpenBudgetSpent as exc:
            raise no_override(opens_per_hour) from exc
        return Reply([f"compartment {cid}: {outcome}"], {"compartment": cid, "result": outcome})

    async def selftest(s: Caller, a: Args) -> Reply:
        if a.get(0) is not None:
            if s.level < Level.OPERATOR:
                raise PermissionError("selftest of a compartment pulses its lock: operator only")
            return await pulse(s, a)
        result = await diagnostics.selftest(scan_bus=True)
        return result.console_reply()

    async def bus_scan(s: Caller, a: Args) -> Reply:
        bus = await diagnostics.bus_scan()
        text = [f"{b:<8} {'answers' if up else 'NO ANSWER'}" for b, up in bus.items()]
        return Reply(text or ["no lock bus on this bank"], {"bus": bus})

    async def sensors(s: Caller, a: Args) -> Reply:
        data = await diagnostics.sensors()
        return Reply(_sensor_lines(data), data)

    async def echo(device: str, s: Caller, a: Args) -> Reply:
        seconds = a.int_at(0, default=10, lo=1, hi=MAX_ECHO_S, what="seconds")
        await s.write(f"{device} test: listening for {seconds} s\r\n".encode())
        seen = await diagnostics.echo(device, seconds)
        text = [f"{e.device}: {e.value}" for e in seen] or [f"nothing from the {device}"]
        return Reply(text, {"device": device, "seconds": seconds,
                            "seen": [asdict(e) for e in seen]})

    async def keypad_test(s: Caller, a: Args) -> Reply:
        return await echo("keypad", s, a)

    async def scanner_test(s: Caller, a: Args) -> Reply:
        return await echo("scanner", s, a)

    V, OP = Level.VIEWER, Level.OPERATOR
    registry.register_command("pulse", pulse, "pulse-test a lock", level=OP,
                              usage="pulse ID [--force R]")
    # With an ID it pulses a lock: that run is an action, evented like `pulse`.
    registry.register_command("selftest", selftest, "hardware check; with ID pulses it",
                              level=V, usage="selftest [ID]", audited=lambda a: bool(a.words))
    registry.register_command("bus scan", bus_scan, "which lock boards answer", level=V)
    registry.register_command("sensors", sensors, "sensor readings, device health", level=V)
    registry.register_command("keypad test", keypad_test, "echo keys for S seconds", level=V,
                              usage="keypad test [S]")
    registry.register_command("scanner test", scanner_test, "echo scans for S seconds",
                              level=V, usage="scanner test [S]")


def _sensor_lines(data: dict[str, Any]) -> list[str]:
    """The `sensors` answer: one line per reading, then one per device's health."""
    text = []
    for name, value in data.items():
        if name == "health":
            continue
        if isinstance(value, dict):
            text.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            text.append(f"{name}: {value}")
    text += [f"health {n}: {'ok' if h['ok'] else 'FAULT'} {h['detail']}"
             for n, h in data.get("health", {}).items()]
    return text


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
