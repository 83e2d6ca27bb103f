"""The kerong backend over a real pseudo-terminal, against the CU16 emulator on a SimWorld."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from waiting import until

from hal.base import (
    ArmedPulse,
    DoorChanged,
    DoorState,
    HealthChanged,
    InputEvent,
    OccupancyChanged,
)
from hal.errors import BackendError, HardwareFault
from hal.kerong.backend import (
    KerongDoorSensor,
    KerongLockDriver,
    KerongOccupancySensor,
)
from hal.kerong.driver import BUS_DEVICE
from hal.kerong.transport import KerongTransport
from hal.registry import HalContext, build_device
from sim.wire.kerong import KerongEmulator
from sim.wire.pty import open_pty
from sim.world import SimWorld

pytestmark = pytest.mark.e2e

COMPARTMENTS = ("1", "2", "3", "4")
# Board 0 is a revision whose latch bit is 1 when engaged; board 1 one whose bit is 0.
WIRING = {0: {0: "1", 1: "2"}, 1: {0: "3", 5: "4"}}
POLARITY = {0: 1, 1: 0}
SETTINGS: dict[str, Any] = {
    "boards": [{"address": 0, "engaged_bit": 1}, {"address": 1, "engaged_bit": 0}],
    "compartments": {"1": "0/0", "2": "0/1", "3": "1/0", "4": "1/5"},
    "poll_interval_s": 0.02,
    "reply_timeout_s": 0.05,
    "reopen_cooldown_s": 0.2,
}


@dataclass
class Cable:
    """The emulator's end of the line: a pty whose slave the `link` symlink names, the way
    udev names an adapter under /dev/serial/by-id."""

    link: Path
    emulator: KerongEmulator
    master: int | None = None
    task: asyncio.Task[None] | None = None

    def plug(self) -> None:
        self.master, slave = open_pty()
        tmp = self.link.with_suffix(".new")
        tmp.symlink_to(slave)
        tmp.replace(self.link)
        self.task = asyncio.create_task(self.emulator.run(self.master), name="kerong-emulator")

    async def pull(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        if self.master is not None:
            os.close(self.master)
            self.master = None
        self.link.unlink(missing_ok=True)


@dataclass
class Bank:
    world: SimWorld
    emulator: KerongEmulator
    cable: Cable
    context: HalContext
    lock: KerongLockDriver
    doors: KerongDoorSensor
    occupancy: KerongOccupancySensor
    events: list[InputEvent] = field(default_factory=list)

    def health_events(self) -> list[HealthChanged]:
        return [e for e in self.events if isinstance(e, HealthChanged)]

    def door_events(self, cid: str) -> list[DoorState]:
        return [e.state for e in self.events if isinstance(e, DoorChanged) and e.compartment == cid]

    def doors_now(self) -> dict[str, DoorState]:
        return self.doors.bus.doors()


def make_context(tmp_path: Path, port: str, **overrides: Any) -> HalContext:
    settings = {**SETTINGS, "port": port, **overrides}
    return HalContext(
        compartments=COMPARTMENTS, state_dir=tmp_path / "state", config_dir=tmp_path,
        backend_settings={"kerong": settings},
    )


def build(ctx: HalContext, kind: str, options: Mapping[str, Any] | None = None) -> Any:
    return build_device(kind, "kerong", options=options or {}, context=ctx,
                        config_key=f"[hal.{kind}] backend")


@contextlib.asynccontextmanager
async def bank(
    tmp_path: Path, *, plugged: bool = True, parcels: tuple[str, ...] = (),
    emulator_polarity: Mapping[int, int] | int = POLARITY, port: str | None = None,
    emulator_options: Mapping[str, Any] | None = None, **overrides: Any,
) -> AsyncIterator[Bank]:
    """A bank of four compartments on two boards, its daemon side running: devices started,
    the `kerong.poll` service and both sensors' `run` loops in tasks."""
    world = SimWorld(COMPARTMENTS, spring_delay_s=0.0, parcels=parcels)
    emulator = KerongEmulator(world, boards=WIRING, engaged_bit=emulator_polarity, pulse_s=0.3,
                              seed=7, **(emulator_options or {}))
    cable = Cable(tmp_path / "ttyKERONG", emulator)
    if plugged:
        cable.plug()
    ctx = make_context(tmp_path, port or str(cable.link), **overrides)
    b = Bank(world, emulator, cable, ctx, build(ctx, "lock"), build(ctx, "door_sensor"),
             build(ctx, "occupancy"))
    tasks: list[asyncio.Task[None]] = []
    try:
        for dev in (b.lock, b.doors, b.occupancy):
            await dev.start()
        await b.lock.all_off()
        # The daemon runs each registered service as a task; so does this bank.
        tasks = [asyncio.ensure_future(factory()) for factory in ctx.services.values()]
        tasks.append(asyncio.create_task(b.doors.run(b.events.append)))
        tasks.append(asyncio.create_task(b.occupancy.run(b.events.append)))
        yield b
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for dev in (b.occupancy, b.doors, b.lock):
            await dev.close()
        await cable.pull()
        world.end_all_pulses()


# -- building ---------------------------------------------------------------------------------


async def test_all_three_devices_share_one_bus_and_one_poll_service(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        assert b.lock.bus is b.doors.bus is b.occupancy.bus
        assert list(b.context.services) == ["kerong.poll"]
        assert isinstance(b.lock, KerongLockDriver)


async def test_startup_reads_the_truth_before_the_poll_loop_runs(tmp_path: Path) -> None:
    world = SimWorld(COMPARTMENTS, spring_delay_s=0.0, parcels=["3"])
    cable = Cable(tmp_path / "ttyKERONG", KerongEmulator(world, boards=WIRING,
                                                         engaged_bit=POLARITY))
    cable.plug()
    ctx = make_context(tmp_path, str(cable.link))
    doors, occupancy = build(ctx, "door_sensor"), build(ctx, "occupancy")
    try:
        await doors.start()
        await occupancy.start()
        # No service task runs here: start() polled once.
        assert await doors.read() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED)
        assert await occupancy.read() == {"1": False, "2": False, "3": True, "4": False}
    finally:
        await doors.close()
        await cable.pull()


# -- locks, doors and parcels ------------------------------------------------------------------


async def test_unlock_reaches_the_right_board_and_lock(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        await b.lock.pulse("4", 0.5)
        await until(lambda: (1, 5) in b.emulator.unlocks)
        assert list(b.emulator.unlocks) == [(1, 5)]
        # The simulated door springs open; the latch feedback reports it.
        await until(lambda: b.world.compartment("4").door_open)
        await until(lambda: DoorState.OPEN in b.door_events("4"))
        assert await b.doors.read() == {"1": DoorState.CLOSED, "2": DoorState.CLOSED,
                                        "3": DoorState.CLOSED, "4": DoorState.OPEN}
        b.world.close_door("4")
        await until(lambda: b.door_events("4") == [DoorState.OPEN, DoorState.CLOSED])
        assert b.world.pulses == ["4"]


# The bus polls every 20 ms for 0.3 s after a change or a pulse, and every 0.5 s otherwise.
ADAPTIVE: dict[str, Any] = {"idle_poll_interval_s": 0.5, "fast_poll_for_s": 0.3}


async def test_the_bus_polls_seldom_when_idle_and_fast_after_a_pulse(tmp_path: Path) -> None:
    async with bank(tmp_path, **ADAPTIVE) as b:
        loop = asyncio.get_running_loop()
        schedule = b.lock.bus.schedule
        await until(lambda: schedule.mode(loop.time()) == "idle", what="the idle rhythm")
        await b.lock.pulse("1", 0.5)
        assert schedule.mode(loop.time()) == "fast"
        # Fast rounds see the door spring open, and it stays fast while the door stands open.
        await until(lambda: DoorState.OPEN in b.door_events("1"), timeout=1.0)
        assert schedule.mode(loop.time() + 10) == "fast"
        b.world.close_door("1")
        await until(lambda: b.door_events("1") == [DoorState.OPEN, DoorState.CLOSED])
        await until(lambda: schedule.mode(loop.time()) == "idle", what="idle again")


async def test_a_door_forced_open_while_idle_is_reported(tmp_path: Path) -> None:
    async with bank(tmp_path, **ADAPTIVE) as b:
        loop = asyncio.get_running_loop()
        schedule = b.lock.bus.schedule
        await until(lambda: schedule.mode(loop.time()) == "idle", what="the idle rhythm")
        rounds = b.emulator.replies
        b.world.force_door("3")
        # Seen by the next (idle) round, within idle_poll_interval_s and a reply.
        await until(lambda: DoorState.OPEN in b.door_events("3"), timeout=3.0)
        assert b.emulator.replies - rounds <= 2 * 2, "found by the first idle round"
        assert schedule.mode(loop.time()) == "fast"


async def test_every_compartment_maps_to_its_own_lock(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        for cid, slot in (("1", (0, 0)), ("2", (0, 1)), ("3", (1, 0))):
            await b.lock.pulse(cid, 0.5)
            # The conditions are awaited within the iteration, so late binding is harmless.
            await until(lambda: list(b.emulator.unlocks)[-1:] == [slot])  # noqa: B023
            await until(lambda: b.doors_now()[cid] is DoorState.OPEN)  # noqa: B023
        assert b.world.pulses == ["1", "2", "3"]
        assert b.doors_now()["4"] is DoorState.CLOSED


async def test_infrared_bits_become_occupancy_events(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        b.world.set_parcel("2", True)
        await until(lambda: OccupancyChanged("2", True) in b.events)
        assert (await b.occupancy.read())["2"] is True
        b.world.set_parcel("2", False)
        await until(lambda: OccupancyChanged("2", False) in b.events)
        assert [e for e in b.events if isinstance(e, OccupancyChanged)] == [
            OccupancyChanged("2", True), OccupancyChanged("2", False)]


async def test_engaged_bit_polarity_is_per_board(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        # On the wire, board 0 says 1 for its engaged latches and board 1 says 0 ...
        assert b.emulator.status(0).lock_bits == 0xFFFF
        assert b.emulator.status(1).lock_bits == 0x0000
        # ... and both read as closed doors.
        assert b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED)
        await b.lock.pulse("3", 0.5)
        await until(lambda: b.doors_now()["3"] is DoorState.OPEN)
        assert b.emulator.status(1).lock_bits == 0x0001


async def test_a_wrong_polarity_setting_reads_every_door_of_that_board_open(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, emulator_polarity=1) as b:
        # The config says board 1 is engaged at 0, its boards say 1: its doors read open.
        assert b.doors_now() == {"1": DoorState.CLOSED, "2": DoorState.CLOSED,
                                 "3": DoorState.OPEN, "4": DoorState.OPEN}


# -- faults ------------------------------------------------------------------------------------


async def test_a_silent_board_is_a_fault_its_doors_unknown_and_it_recovers(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path) as b:
        b.world.set_fault("board:1", "offline", True)
        await until(lambda: any(e.device == "board:1" for e in b.health_events()))
        (fault,) = b.health_events()
        assert fault.ok is False and "no reply" in fault.detail
        assert b.doors_now() == {"1": DoorState.CLOSED, "2": DoorState.CLOSED,
                                 "3": DoorState.UNKNOWN, "4": DoorState.UNKNOWN}
        await until(lambda: DoorState.UNKNOWN in b.door_events("3"))
        assert DoorState.UNKNOWN in b.door_events("4")
        assert b.door_events("1") == []
        health = await b.lock.health()
        assert not health.ok and "board:1" in health.detail
        # The occupancy of a silent board is not guessed.
        assert set(await b.occupancy.read()) == {"1", "2"}

        b.world.set_fault("board:1", "offline", False)
        await until(lambda: HealthChanged("board:1", True, "answers again") in b.events)
        await until(lambda: b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED))
        await until(lambda: b.door_events("3") == [DoorState.UNKNOWN, DoorState.CLOSED])
        assert (await b.lock.health()).ok
        assert [e.ok for e in b.health_events()] == [False, True]


async def test_bad_checksums_are_discarded_and_counted(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        b.emulator.bad_checksums = 2
        await until(lambda: b.lock.bus.transport.decoder.bad_checksums == 2)
        replies = b.emulator.replies
        await until(lambda: b.emulator.replies > replies + 10)
        # Two lost replies are noise, not a dead board.
        assert b.health_events() == []
        health = await b.lock.health()
        assert health.ok and "2 replies with a bad checksum" in health.detail
        assert b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED)


async def test_garbage_on_the_line_is_survived(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        b.emulator.garbage = True
        replies = b.emulator.replies
        await until(lambda: b.emulator.replies > replies + 60)
        assert b.lock.bus.transport.decoder.discarded_bytes > 0
        assert b.health_events() == []
        assert b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED)
        # Commands and states still get through the noise.
        await b.lock.pulse("2", 0.5)
        await until(lambda: b.doors_now()["2"] is DoorState.OPEN)
        b.world.set_parcel("1", True)
        await until(lambda: OccupancyChanged("1", True) in b.events)
        assert b.health_events() == []


async def test_a_pulled_adapter_is_a_fault_and_recovers_after_the_cooldown(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path) as b:
        await b.cable.pull()
        await until(lambda: any(e.device == BUS_DEVICE for e in b.health_events()))
        (fault,) = b.health_events()
        assert fault.ok is False and str(b.cable.link) in fault.detail
        await until(lambda: b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.UNKNOWN))
        with pytest.raises(HardwareFault):
            await b.lock.pulse("1", 0.5)
        with pytest.raises(HardwareFault):
            await b.lock.bus_scan()
        health = await b.lock.health()
        assert not health.ok and BUS_DEVICE in health.detail
        # Reopen attempts fail (ENOENT) quietly until a new adapter appears.
        await until(lambda: b.lock.bus.transport.stats.failures >= 3)

        b.cable.plug()
        await until(lambda: HealthChanged(BUS_DEVICE, True, f"{b.cable.link}: open again")
                    in b.events)
        await until(lambda: b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED))
        await b.lock.pulse("1", 0.5)
        await until(lambda: b.world.compartment("1").door_open)
        assert (await b.lock.health()).ok
        assert [e.ok for e in b.health_events()] == [False, True]


async def test_a_port_that_will_not_open_at_startup_is_a_fault_not_a_crash(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, plugged=False) as b:
        assert b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.UNKNOWN)
        await until(lambda: bool(b.health_events()))
        assert b.health_events()[0].device == BUS_DEVICE
        assert not b.health_events()[0].ok
        assert "No such file" in b.health_events()[0].detail
        b.cable.plug()
        await until(lambda: b.doors_now() == dict.fromkeys(COMPARTMENTS, DoorState.CLOSED))
        assert [e.ok for e in b.health_events()] == [False, True]


def test_a_port_url_scheme_pyserial_does_not_know_is_refused_at_startup(
    tmp_path: Path,
) -> None:
    # A mistyped scheme never works, unlike a device that is not plugged in yet: refused when
    # the backend is built (as `check-config` builds it), naming the key; nothing is opened.
    ctx = make_context(tmp_path, "nosuchproto://x")
    with pytest.raises(BackendError) as info:
        build(ctx, "lock")
    assert str(info.value) == ("[backends.kerong]: port 'nosuchproto://x': pyserial has no "
                               "handler for nosuchproto:// (key 'port')")
    # A known scheme whose device is missing passes the check: that is a run-time fault.
    assert isinstance(build(make_context(tmp_path, "spy:///dev/nonexistent"), "lock"),
                      KerongLockDriver)


# -- boards that answer an unlock --------------------------------------------------------------

# The poll loop polls once when it starts and then not for a minute: whatever the driver knows
# after an unlock comes from the unlock's own reply.
QUIET_POLL: dict[str, Any] = {"poll_interval_s": 60.0, "reply_timeout_s": 1.0}
ANSWERING = {"unlock_reply": True, "unlock_reply_s": 0.2}


async def _polled_twice(b: Bank) -> None:
    # start() and the poll loop's first round, both boards each: the bus is quiet from now on.
    await until(lambda: b.emulator.replies >= 4)


@pytest.mark.parametrize("mode", ["auto", "status"])
async def test_an_unlock_reply_is_waited_for_and_its_latch_state_used(
    tmp_path: Path, mode: str
) -> None:
    async with bank(tmp_path, emulator_options=ANSWERING, unlock_reply=mode,
                    **QUIET_POLL) as b:
        await _polled_twice(b)
        assert b.doors_now()["1"] is DoorState.CLOSED
        await b.lock.pulse("1", 0.5)
        # The reply came while the bus was held, and its released latch is the door state
        # now, before any poll.
        assert b.emulator.unlock_replies == 1
        assert b.doors_now()["1"] is DoorState.OPEN
        assert b.lock.bus.unlock_reply_of(0) == "status"
        # A status query right after the unlock gets its own board's reply: no collision.
        reply = await b.lock.bus.transport.query_status(1)
        assert reply is not None and reply.board == 1
        assert b.emulator.collisions == 0
        assert b.lock.bus.transport.decoder.bad_checksums == 0
        await until(lambda: DoorState.OPEN in b.door_events("1"))
        # A second unlock of the same board waits for its reply again.
        await b.lock.pulse("2", 0.5)
        assert b.emulator.unlock_replies == 2 and b.doors_now()["2"] is DoorState.OPEN
        assert b.emulator.collisions == 0


async def test_an_unlock_reply_not_waited_for_collides_with_the_next_query(
    tmp_path: Path,
) -> None:
    # What "none" means on a board that does answer: the next frame lands on its reply.
    async with bank(tmp_path, emulator_options=ANSWERING, unlock_reply="none",
                    **QUIET_POLL) as b:
        await _polled_twice(b)
        await b.lock.pulse("1", 0.5)
        assert b.doors_now()["1"] is DoorState.CLOSED, "nothing was read after the unlock"
        assert await b.lock.bus.transport.query_status(1) is None
        assert b.emulator.collisions == 1
        await until(lambda: b.lock.bus.transport.decoder.bad_checksums == 1)


async def test_auto_stops_waiting_for_a_board_that_never_answers_an_unlock(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, poll_interval_s=60.0) as b:
        await _polled_twice(b)
        assert b.lock.bus.unlock_reply_of(0) == "auto"
        await b.lock.pulse("1", 0.5)
        # One reply window of silence: board 0 is not waited for any more; board 1, never
        # unlocked yet, still is.
        assert b.lock.bus.unlock_reply_of(0) == "none"
        assert b.lock.bus.unlock_reply_of(1) == "auto"
        await b.lock.pulse("2", 0.5)
        assert b.lock.bus.transport.stats.unlocks == 2
        assert b.lock.bus.transport.stats.unlock_replies == 0
        await until(lambda: len(b.emulator.unlocks) == 2)
        assert list(b.emulator.unlocks) == [(0, 0), (0, 1)] and b.emulator.unlock_replies == 0


async def test_auto_learns_nothing_from_a_board_that_is_silent_altogether(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, poll_interval_s=60.0) as b:
        await _polled_twice(b)
        b.world.set_fault("board:0", "offline", True)
        for _ in range(3):
            await b.lock.bus.poll_once()
        assert [e.device for e in b.health_events()] == ["board:0"]
        await b.lock.pulse("1", 0.5)
        assert b.lock.bus.unlock_reply_of(0) == "auto"


def test_unlock_reply_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unlock_reply"):
        build(make_context(tmp_path, "/dev/null", unlock_reply="sometimes"), "lock")
    boards = [{"address": 0, "engaged_bit": 1, "unlock_reply": "status"},
              {"address": 1, "engaged_bit": 0}]
    lock = build(make_context(tmp_path, "/dev/null", unlock_reply="none", boards=boards), "lock")
    assert lock.bus.unlock_reply_of(0) == "status" and lock.bus.unlock_reply_of(1) == "none"


# -- diagnostics and the cut-cable case -------------------------------------------------------


async def test_bus_scan_lists_the_answering_boards(tmp_path: Path) -> None:
    async with bank(tmp_path, reply_timeout_s=0.03) as b:
        found = await b.lock.bus_scan()
        assert found == {f"board:{n}": n in (0, 1) for n in range(16)}
        b.world.set_fault("board:1", "offline", True)
        found = await b.lock.bus_scan()
        assert [name for name, answered in found.items() if answered] == ["board:0"]


async def test_unlock_is_sent_even_when_the_latch_already_reads_released(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path) as b:
        # A cut feedback wire: the latch reads released although the door is shut and locked.
        b.world.set_fault("door_sensor:1", "stuck_open", True)
        await until(lambda: b.doors_now()["1"] is DoorState.OPEN)
        assert b.world.compartment("1").locked
        await b.lock.pulse("1", 0.5)
        await until(lambda: (0, 0) in b.emulator.unlocks)
        await until(lambda: b.world.compartment("1").door_open)  # the board obeyed
        health = await b.lock.health()
        assert not health.ok and "compartment 1" in health.detail
        # Once the feedback works again the suspicion is gone.
        b.world.set_fault("door_sensor:1", "stuck_open", False)
        b.world.close_door("1")
        await until(lambda: b.doors_now()["1"] is DoorState.CLOSED)
        assert (await b.lock.health()).ok


async def test_spy_url_records_the_traffic(tmp_path: Path) -> None:
    capture = tmp_path / "bus.txt"
    async with bank(tmp_path, port=f"spy://{tmp_path / 'ttyKERONG'}?file={capture}") as b:
        await b.lock.pulse("4", 0.5)
        await until(lambda: b.world.compartment("4").door_open)
    text = capture.read_text()
    assert "02 00 30 03 35" in text  # status query of board 0
    assert "02 15 31 03 4B" in text  # unlock of board 1, lock 5


async def test_all_off_sends_nothing(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        heard = len(b.emulator.requests)
        await b.lock.all_off()
        # Polls go on, but no unlock: every pulse is board-timed.
        await until(lambda: len(b.emulator.requests) > heard + 4)
        assert list(b.emulator.unlocks) == []


# -- armed unlocks: the frame written from the database writer's thread -----------------------


async def _armed(b: Bank, cid: str) -> ArmedPulse:
    """The unlock of `cid` armed on a bus gone quiet (polled twice, the next poll a minute
    away with QUIET_POLL)."""
    await _polled_twice(b)
    armed = await b.lock.arm_pulse(cid)
    assert armed is not None
    return armed


async def test_an_armed_unlock_holds_the_bus_goes_out_from_another_thread_and_finishes(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, **QUIET_POLL) as b:
        transport = b.lock.bus.transport
        armed = await _armed(b, "4")
        # The bus is the armed frame's: a status query waits for it (on a free bus it would
        # have counted and written its frame in its first step).
        queries = transport.stats.queries
        query = asyncio.create_task(transport.query_status(0))
        await asyncio.sleep(0)
        assert not query.done() and transport.stats.queries == queries
        await asyncio.to_thread(armed.fire)
        # On the wire before the loop has finished anything.
        await until(lambda: (1, 5) in b.emulator.unlocks)
        assert transport.stats.unlocks == 0
        await armed.finish()
        assert transport.stats.unlocks == 1
        reply = await query
        assert reply is not None and reply.board == 0
        await until(lambda: b.world.compartment("4").door_open)
        assert list(b.emulator.unlocks) == [(1, 5)] and b.emulator.collisions == 0
        assert b.world.pulses == ["4"]


async def test_an_armed_unlock_released_sends_nothing_and_frees_the_bus(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, **QUIET_POLL) as b:
        armed = await _armed(b, "1")
        armed.release()
        await asyncio.to_thread(armed.fire)  # a writer that fires after all: nothing
        assert await b.lock.bus.transport.query_status(0) is not None
        assert list(b.emulator.unlocks) == [] and b.world.pulses == []
        # The bus works as before: a later pulse goes out the usual way.
        await b.lock.pulse("1", 0.5)
        await until(lambda: b.world.compartment("1").door_open)


async def test_an_armed_unlock_is_suspect_only_once_it_went_out(tmp_path: Path) -> None:
    async with bank(tmp_path) as b:
        b.world.set_fault("door_sensor:1", "stuck_open", True)  # the latch reads released
        await until(lambda: b.doors_now()["1"] is DoorState.OPEN)
        armed = await b.lock.arm_pulse("1")
        assert armed is not None
        armed.release()  # its commit failed: no unlock, nothing to suspect
        assert (await b.lock.health()).ok
        armed = await b.lock.arm_pulse("1")
        assert armed is not None
        await asyncio.to_thread(armed.fire)
        await armed.finish()
        await until(lambda: (0, 0) in b.emulator.unlocks)
        health = await b.lock.health()
        assert not health.ok and "compartment 1: latch read released" in health.detail


async def test_nothing_is_armed_on_a_busy_bus_a_closed_port_or_for_no_compartment(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, **QUIET_POLL) as b:
        await _polled_twice(b)
        transport = b.lock.bus.transport
        # A query to a board that never answers holds the bus for its whole timeout.
        query = asyncio.create_task(transport.query_status(9))
        await asyncio.sleep(0)
        assert await b.lock.arm_pulse("1") is None
        assert await query is None
        assert await b.lock.arm_pulse("nope") is None
        await b.cable.pull()
        await until(lambda: not transport.is_open)
        assert await b.lock.arm_pulse("1") is None
        assert list(b.emulator.unlocks) == []


async def test_an_armed_unlock_on_a_port_lost_before_it_fired_is_a_fault_not_a_write(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, **QUIET_POLL) as b:
        armed = await _armed(b, "1")
        await b.cable.pull()
        await until(lambda: not b.lock.bus.transport.is_open)
        armed.fire()  # the port is closed (its descriptor may be reused): nothing written
        with pytest.raises(HardwareFault, match="unlock of compartment 1 not sent"):
            await armed.finish()
        assert list(b.emulator.unlocks) == []
        await until(lambda: any(e.device == BUS_DEVICE and not e.ok
                                for e in b.health_events()))


async def test_an_armed_unlock_that_went_out_before_its_port_was_lost_is_no_fault(
    tmp_path: Path,
) -> None:
    # A board that answers unlocks: its reply is waited for, unless the port is gone.
    async with bank(tmp_path, emulator_options=ANSWERING, unlock_reply="status",
                    **QUIET_POLL) as b:
        transport = b.lock.bus.transport
        armed = await _armed(b, "1")
        await asyncio.to_thread(armed.fire)
        await until(lambda: (0, 0) in b.emulator.unlocks)
        await b.cable.pull()
        await until(lambda: not transport.is_open)
        await armed.finish()  # sent: not reported as an unlock that was not sent
        assert transport.stats.unlocks == 1 and transport.stats.failures == 1


async def test_an_armed_unlock_whose_write_fails_is_a_fault_and_the_port_is_reopened(
    tmp_path: Path,
) -> None:
    async with bank(tmp_path, **QUIET_POLL) as b:
        transport = b.lock.bus.transport
        armed = await _armed(b, "1")
        # The adapter vanishes, and the write comes before the loop could notice.
        assert b.cable.master is not None
        os.close(b.cable.master)
        b.cable.master = None
        armed.fire()
        with pytest.raises(HardwareFault, match="write failed"):
            await armed.finish()
        assert transport.stats.failures == 1 and not transport.is_open
        await b.cable.pull()
        b.cable.plug()
        await until(lambda: transport.retry_in() == 0)
        await b.lock.pulse("1", 0.5)  # reopened after the cooldown: the usual path again
        await until(lambda: b.world.compartment("1").door_open)



async def test_a_failed_write_through_pyserial_says_write_failed_once(tmp_path: Path) -> None:
    # spy:// is written through pyserial's own write, whose error already begins with
    # "write failed: ".
    capture = tmp_path / "bus.txt"
    async with bank(tmp_path, port=f"spy://{tmp_path / 'ttyKERONG'}?file={capture}",
                    **QUIET_POLL) as b:
        armed = await _armed(b, "1")
        assert b.cable.master is not None
        os.close(b.cable.master)
        b.cable.master = None
        armed.fire()
        with pytest.raises(HardwareFault, match="write failed") as caught:
            await armed.finish()
        assert str(caught.value).count("write failed") == 1, str(caught.value)
        assert b.lock.bus.transport.error.count("write failed") == 1

# -- the transport without a file descriptor ---------------------------------------------------


async def test_a_port_without_a_descriptor_is_read_in_a_thread(tmp_path: Path) -> None:
    transport = KerongTransport("loop://", reply_timeout_s=0.1)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    try:
        # The loop device echoes our query; the decoder skips it and the wait times out
        # while the event loop keeps running.
        assert await transport.query_status(0) is None
        assert ticks >= 5
        await transport.send_unlock(0, 5)
        assert transport.stats.timeouts == 1 and transport.stats.unlocks == 1
        # Waiting for an unlock's reply reads in the thread too; silence is not a timeout.
        assert await transport.send_unlock(0, 5, reply_window_s=0.05) is None
        assert transport.stats.timeouts == 1 and transport.stats.unlocks == 2
        assert transport.stats.unlock_replies == 0
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await transport.close()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compartments": {"1": "0/0", "2": "0/1", "3": "1/0"}},
         r"\[backends\.kerong\] compartments: compartment '4' is not mapped"),
        ({"compartments": {**SETTINGS["compartments"], "9": "0/2"}},
         r"\[backends\.kerong\] compartments: '9' is not a compartment"),
        ({"compartments": {**SETTINGS["compartments"], "4": "1-5"}},
         r"\[backends\.kerong\] compartments: '4' = '1-5' is not \"board/lock\""),
        ({"compartments": {**SETTINGS["compartments"], "4": "2/5"}},
         r"on board 2, which is not in"),
        ({"compartments": {**SETTINGS["compartments"], "4": "1/16"}}, r"locks are 0-15"),
        ({"compartments": {**SETTINGS["compartments"], "4": "0/0"}},
         r"both wired to 0/0"),
        ({"boards": [{"address": 0, "engaged_bit": 1}, {"address": 0, "engaged_bit": 0}]},
         r"\[backends\.kerong\] boards: address 0 is listed twice"),
        ({"boards": [{"address": 16, "engaged_bit": 1}]}, r"key 'boards\[0\]\.address'"),
        ({"boards": [{"address": 0, "engaged_bit": 2}]}, r"key 'boards\[0\]\.engaged_bit'"),
        ({"boards": [{"address": 0}]}, r"engaged_bit"),
        ({"bogus": 1}, r"\[backends\.kerong\].*bogus"),
        ({"reply_timeout_s": 0}, r"reply_timeout_s"),
        ({"idle_poll_interval_s": 0.01},
         r"\[backends\.kerong\] idle_poll_interval_s = 0\.01 is shorter than "
         r"poll_interval_s = 0\.02"),
        ({"idle_poll_interval_s": 0}, r"idle_poll_interval_s"),
        ({"fast_poll_for_s": -1}, r"fast_poll_for_s"),
        ({"port": ""}, r"port"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    change = dict(change)
    ctx = make_context(tmp_path, change.pop("port", "/dev/null"), **change)
    with pytest.raises(BackendError, match=message):
        build(ctx, "lock")


def test_the_port_setting_is_required(tmp_path: Path) -> None:
    ctx = HalContext(compartments=COMPARTMENTS, state_dir=tmp_path, config_dir=tmp_path,
                     backend_settings={"kerong": dict(SETTINGS)})
    with pytest.raises(BackendError, match=r"\[backends\.kerong\].*port"):
        build(ctx, "door_sensor")


@pytest.mark.parametrize("kind", ["lock", "door_sensor", "occupancy"])
def test_device_options_must_be_empty(tmp_path: Path, kind: str) -> None:
    ctx = make_context(tmp_path, "/dev/null")
    with pytest.raises(BackendError, match=rf"\[hal\.{kind}\] backend: kerong devices take no"):
        build(ctx, kind, {"port": "/dev/ttyUSB0"})


def test_a_relative_port_is_taken_from_the_config_directory(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, "ttyKERONG")
    lock = build(ctx, "lock")
    assert lock.bus.transport.url == str(tmp_path / "ttyKERONG")
    ctx = make_context(tmp_path, "spy://ttyKERONG")
    assert build(ctx, "lock").bus.transport.url == "spy://ttyKERONG"
