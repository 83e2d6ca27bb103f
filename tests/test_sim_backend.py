"""Tests of the "sim" hal backend: devices built through the registry, events, faults, health."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from waiting import until

from hal.base import (
    Device,
    DisplayMessage,
    DoorChanged,
    DoorSensor,
    DoorState,
    Emit,
    InputEvent,
    Keypad,
    KeyPressed,
    LockDriver,
    OccupancyChanged,
    OccupancySensor,
    Scanned,
    Scanner,
    Tamper,
    TamperChanged,
)
from hal.errors import BackendError, HardwareFault
from hal.registry import BACKENDS, HalContext, build_device
from sim import SimClient, world_of
from sim.backend import SimDisplay, SimSettings
from sim.world import SimWorld

pytestmark = pytest.mark.e2e

COMPARTMENTS = ("1", "2", "7")


def context(tmp_path: Path, **sim: Any) -> HalContext:
    settings = {"spring_delay_s": 0.0, **sim}
    return HalContext(
        compartments=COMPARTMENTS, state_dir=tmp_path / "state", config_dir=tmp_path,
        backend_settings={"sim": settings},
    )


def device(ctx: HalContext, kind: str, options: dict[str, Any] | None = None) -> Any:
    return build_device(kind, "sim", options=options or {}, context=ctx, config_key=f"hal.{kind}")


@contextlib.asynccontextmanager
async def running(dev: Any) -> AsyncIterator[list[InputEvent]]:
    """Run an input device's `run` in a task; yields the list its events land in."""
    events: list[InputEvent] = []
    emit: Emit = events.append
    task = asyncio.create_task(dev.run(emit))
    try:
        yield events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_every_kind_builds_through_the_registry_and_shares_one_world(
    tmp_path: Path, kind: str
) -> None:
    ctx = context(tmp_path)
    dev = device(ctx, kind)
    assert dev.world is world_of(ctx)
    assert isinstance(dev, Device)
    assert isinstance(world_of(ctx), SimWorld)
    assert world_of(ctx).compartment_ids == COMPARTMENTS


def test_devices_of_one_context_share_the_world_and_others_do_not(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    lock, door = device(ctx, "lock"), device(ctx, "door_sensor")
    assert lock.world is door.world
    assert device(context(tmp_path), "lock").world is not lock.world


def test_settings_defaults() -> None:
    assert SimSettings() == SimSettings(socket=None, spring_delay_s=0.05, parcels=[])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sokcet": "x"}, "sokcet"),
        ({"spring_delay_s": -0.1}, "spring_delay_s"),
        ({"spring_delay_s": "fast"}, "spring_delay_s"),
        ({"parcels": ["9"]}, "parcels"),
        ({"parcels": "7"}, "parcels"),
        ({"socket": ""}, "socket"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    ctx = HalContext(
        compartments=COMPARTMENTS, state_dir=tmp_path, backend_settings={"sim": settings}
    )
    with pytest.raises(BackendError, match=r"backends\.sim") as info:
        device(ctx, "lock")
    assert message in str(info.value)


def test_world_takes_the_compartment_sizes_of_the_context(tmp_path: Path) -> None:
    ctx = HalContext(
        compartments=COMPARTMENTS, state_dir=tmp_path, backend_settings={"sim": {}},
        # "9" is not a compartment of this bank: the backend leaves it out.
        compartment_sizes={"1": "S", "7": "L", "9": "M"},
    )
    world = device(ctx, "lock").world
    assert [world.compartment(cid).size for cid in COMPARTMENTS] == ["S", None, "L"]
    sizes = {cid: c["size"] for cid, c in world.state()["compartments"].items()}
    assert sizes == {"1": "S", "2": None, "7": "L"}


def test_without_sizes_every_size_is_unknown(tmp_path: Path) -> None:
    world = world_of(context(tmp_path))
    assert [world.compartment(cid).size for cid in COMPARTMENTS] == [None, None, None]


def test_a_bad_compartment_size_names_the_compartments_table(tmp_path: Path) -> None:
    ctx = HalContext(
        compartments=COMPARTMENTS, state_dir=tmp_path, compartment_sizes={"7": "extra large"}
    )
    with pytest.raises(BackendError, match=r"\[\[compartments\]\] size: bad size 'extra large'"):
        device(ctx, "lock")


def test_sim_devices_take_no_options(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"hal\.keypad\.options"):
        device(context(tmp_path), "keypad", {"pin": 4})


def test_parcels_setting_fills_compartments(tmp_path: Path) -> None:
    ctx = context(tmp_path, parcels=["2"])
    assert world_of(ctx).occupancy() == {"1": False, "2": True, "7": False}


async def test_socket_setting_registers_the_control_service_once(tmp_path: Path) -> None:
    ctx = context(tmp_path, socket="run/sim.sock")
    world = device(ctx, "lock").world
    device(ctx, "keypad")
    assert list(ctx.services) == ["sim.control"]
    path = tmp_path / "run" / "sim.sock"  # relative paths are taken from the config's directory
    service = asyncio.ensure_future(ctx.services["sim.control"]())
    try:
        await until(path.exists)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        async with SimClient(path) as client:
            await client.parcel("7", True)
        assert world.compartment("7").occupied
    finally:
        service.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await service
    assert not path.exists()


def test_no_socket_no_service(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    device(ctx, "lock")
    assert dict(ctx.services) == {}


async def test_pulse_opens_the_door_and_the_sensor_says_so(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    lock: LockDriver = device(ctx, "lock")
    doors: DoorSensor = device(ctx, "door_sensor")
    world = world_of(ctx)
    async with running(doors) as events:
        await lock.pulse("7", 0.05)
        await until(lambda: events == [DoorChanged("7", DoorState.OPEN)])
        assert (await doors.read())["7"] is DoorState.OPEN
        world.close_door("7")
        await until(lambda: events[-1] == DoorChanged("7", DoorState.CLOSED))
    assert world.pulses == ["7"]
    assert world.compartment("7").locked


async def test_pulse_is_bounded_when_the_pulsing_task_dies(tmp_path: Path) -> None:
    ctx = context(tmp_path, spring_delay_s=5.0)
    lock: LockDriver = device(ctx, "lock")
    world = world_of(ctx)
    task = asyncio.create_task(lock.pulse("2", 0.1))
    await asyncio.sleep(0)  # one step: the pulse has begun
    assert world.compartment("2").released
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await until(lambda: not world.compartment("2").released)
    assert world.compartment("2").locked


async def test_pulse_failures_are_hardware_faults(tmp_path: Path) -> None:
    lock: LockDriver = device(context(tmp_path), "lock")
    with pytest.raises(HardwareFault, match=r"hal\.lock: unknown compartment '9'"):
        await lock.pulse("9", 0.1)
    with pytest.raises(HardwareFault):
        await lock.pulse("1", 0)


async def test_all_off_and_close_reengage_latches(tmp_path: Path) -> None:
    ctx = context(tmp_path, spring_delay_s=5.0)
    lock: LockDriver = device(ctx, "lock")
    world = world_of(ctx)
    for closer in (lock.all_off, lock.close):
        task = asyncio.create_task(lock.pulse("1", 5.0))
        await until(lambda: world.compartment("1").released)
        await closer()
        assert world.compartment("1").locked and not world.compartment("1").released
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_show_service_is_recorded_in_the_world(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    lock: LockDriver = device(ctx, "lock")
    world = world_of(ctx)
    await lock.show_service("2", False)
    assert world.state()["compartments"]["2"]["in_service"] is False
    await lock.show_service("2", True)
    assert world.compartment("2").in_service
    with pytest.raises(HardwareFault, match="unknown compartment"):
        await lock.show_service("9", False)


async def test_jam_shows_in_lock_health_and_keeps_the_door_shut(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    lock: LockDriver = device(ctx, "lock")
    doors: DoorSensor = device(ctx, "door_sensor")
    world = world_of(ctx)
    assert (await lock.health()).ok
    world.set_fault("lock:7", "jam", True)
    health = await lock.health()
    assert not health.ok and "7" in health.detail
    async with running(doors) as events:
        await lock.pulse("7", 0.02)  # with no spring delay, a free door would be open now
        await asyncio.sleep(0)
        assert events == []
    assert (await doors.read())["7"] is DoorState.CLOSED


async def test_stuck_sensor_emits_sensed_changes_only(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    doors: DoorSensor = device(ctx, "door_sensor")
    world = world_of(ctx)
    async with running(doors) as events:
        world.set_fault("door_sensor:1", "stuck_closed", True)
        world.force_door("1")  # really open, sensed closed: nothing to report
        world.set_fault("door_sensor:2", "stuck_open", True)
        await until(lambda: events == [DoorChanged("2", DoorState.OPEN)])
        world.set_fault("door_sensor:1", "stuck_closed", False)
        await until(lambda: events[-1] == DoorChanged("1", DoorState.OPEN))
    assert len(events) == 2
    health = await doors.health()
    assert not health.ok and "2 stuck open" in health.detail


async def test_door_sensor_reports_changes_made_before_it_ran(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    doors: DoorSensor = device(ctx, "door_sensor")
    world_of(ctx).force_door("2")
    async with running(doors) as events:
        await until(lambda: events == [DoorChanged("2", DoorState.OPEN)])


async def test_quick_open_and_close_are_both_reported(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    doors: DoorSensor = device(ctx, "door_sensor")
    world = world_of(ctx)
    async with running(doors) as events:
        await asyncio.sleep(0)  # let the sensor subscribe
        world.force_door("1")
        world.close_door("1")
        await until(lambda: len(events) == 2)
    assert events == [DoorChanged("1", DoorState.OPEN), DoorChanged("1", DoorState.CLOSED)]


async def test_occupancy_events(tmp_path: Path) -> None:
    ctx = context(tmp_path, parcels=["7"])
    occupancy: OccupancySensor = device(ctx, "occupancy")
    world = world_of(ctx)
    assert await occupancy.read() == {"1": False, "2": False, "7": True}
    async with running(occupancy) as events:
        await asyncio.sleep(0)  # let the sensor subscribe, so that order is the world's
        world.set_parcel("7", False)
        world.set_parcel("1", True)
        await until(lambda: len(events) == 2)
    assert events == [OccupancyChanged("7", False), OccupancyChanged("1", True)]
    assert (await occupancy.health()).ok


async def test_keypad_emits_each_key_even_pressed_before_it_ran(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    keypad: Keypad = device(ctx, "keypad")
    world = world_of(ctx)
    world.press("12")
    async with running(keypad) as events:
        world.press("3#")
        await until(lambda: len(events) == 4)
    assert events == [KeyPressed(k) for k in "123#"]


async def test_stuck_key_repeats_until_cleared(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    keypad: Keypad = device(ctx, "keypad")
    world = world_of(ctx)
    loop = asyncio.get_running_loop()
    async with running(keypad) as events:
        start = loop.time()
        world.set_fault("keypad", "stuck_key", True, key="5")
        await until(lambda: len(events) >= 3)
        assert loop.time() - start >= 0.19  # one at once, then one every 0.1 s
        health = await keypad.health()
        assert not health.ok and "'5'" in health.detail
        world.press("9")  # real presses still get through
        await until(lambda: KeyPressed("9") in events)
        world.set_fault("keypad", "stuck_key", False)
        world.press("#")
        await until(lambda: events[-1] == KeyPressed("#"))
        count = len(events)
        # Proving the repeat stopped takes waiting past its next moment.
        await asyncio.sleep(0.25)
        assert len(events) == count
    assert set(events) == {KeyPressed("5"), KeyPressed("9"), KeyPressed("#")}
    assert (await keypad.health()).ok


async def test_scanner_events_and_faults(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    scanner: Scanner = device(ctx, "scanner")
    world = world_of(ctx)
    async with running(scanner) as events:
        world.scan("12345678")
        await until(lambda: events == [Scanned("12345678")])
        world.set_fault("scanner", "dead", True)
        assert not (await scanner.health()).ok
        world.scan("lost")
        world.set_fault("scanner", "dead", False)
        world.set_fault("scanner", "garbage", True)
        health = await scanner.health()
        assert not health.ok and "garbage" in health.detail
        world.scan("LK1:TOKEN")
        await until(lambda: len(events) == 2)
        world.set_fault("scanner", "garbage", False)
        world.scan("after")
        await until(lambda: len(events) == 3)
    junk = events[1]
    assert isinstance(junk, Scanned) and not any(ch.isprintable() for ch in junk.data)
    assert events[2] == Scanned("after")
    assert (await scanner.health()).ok


async def test_scanner_emits_a_scanned_label(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    scanner: Scanner = device(ctx, "scanner")
    world = world_of(ctx)
    async with running(scanner) as events:
        world.scan_label("PX123")
        await until(lambda: events == [Scanned("PX123")])
    assert world.labels == ["PX123"]


async def test_display_show_records_to_the_world(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    display: SimDisplay = device(ctx, "display")
    message = DisplayMessage(lines=("Door 7 is open", "Take your parcel"), indicator="ok")
    await display.show(message)
    world = world_of(ctx)
    assert world.display == message
    assert world.display_history == [message]
    assert world.state()["display"] == "Door 7 is open\nTake your parcel"
    assert (await display.health()).ok


async def test_tamper_events(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    tamper: Tamper = device(ctx, "tamper")
    world = world_of(ctx)
    assert await tamper.read() is False
    async with running(tamper) as events:
        world.set_fault("tamper", "open", True)
        await until(lambda: events == [TamperChanged(True)])
        assert await tamper.read() is True
        world.set_fault("tamper", "open", False)
        await until(lambda: events[-1] == TamperChanged(False))
    assert len(events) == 2
