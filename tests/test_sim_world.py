"""Tests of the simulator's world model: latches, springing doors, faults, inputs, observers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from waiting import until

from hal.base import (
    DisplayMessage,
    DoorChanged,
    DoorState,
    KeyPressed,
    OccupancyChanged,
    Scanned,
    TamperChanged,
)
from sim.world import (
    HISTORY_LIMIT,
    DisplayChanged,
    FaultChanged,
    LockChanged,
    ServiceChanged,
    SimError,
    SimWorld,
    WorldChange,
)

pytestmark = pytest.mark.unit


def drain(sub_get_nowait: Callable[[], WorldChange]) -> list[WorldChange]:
    out: list[WorldChange] = []
    while True:
        try:
            out.append(sub_get_nowait())
        except asyncio.QueueEmpty:
            return out


def make(**kwargs: object) -> SimWorld:
    return SimWorld(["1", "2", "7"], **kwargs)  # type: ignore[arg-type]


def test_initial_state() -> None:
    world = make(parcels=["7"])
    assert world.state() == {
        "compartments": {
            "1": {"locked": True, "door_open": False, "occupied": False, "in_service": True,
                  "size": None},
            "2": {"locked": True, "door_open": False, "occupied": False, "in_service": True,
                  "size": None},
            "7": {"locked": True, "door_open": False, "occupied": True, "in_service": True,
                  "size": None},
        },
        "display": "",
        "faults": [],
    }
    assert world.sensed_doors() == {
        "1": DoorState.CLOSED,
        "2": DoorState.CLOSED,
        "7": DoorState.CLOSED,
    }


@pytest.mark.parametrize(
    ("ids", "kwargs"),
    [
        ([], {}),
        (["1", "1"], {}),
        (["bad id"], {}),
        (["x" * 17], {}),
        (["1"], {"spring_delay_s": -1}),
        (["1"], {"spring_delay_s": float("nan")}),
        (["1"], {"parcels": ["9"]}),
    ],
)
def test_constructor_refuses_bad_layouts(ids: list[str], kwargs: dict[str, object]) -> None:
    with pytest.raises(SimError):
        SimWorld(ids, **kwargs)  # type: ignore[arg-type]


def test_sizes_show_in_the_view_and_the_state() -> None:
    world = make(sizes={"1": "S", "7": "XL"})
    assert world.compartment("1").size == "S"
    assert world.compartment("2").size is None  # not configured: unknown
    assert world.compartment("7").size == "XL"
    sizes = {cid: c["size"] for cid, c in world.state()["compartments"].items()}
    assert sizes == {"1": "S", "2": None, "7": "XL"}
    assert make(sizes={"2": "abc12345"}).compartment("2").size == "abc12345"  # 8 is the limit


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"9": "M"}, "unknown compartment '9'"),
        ({7: "M"}, "unknown compartment 7"),
        ({"7": ""}, "bad size '' of compartment '7'"),
        ({"7": "X L"}, "bad size 'X L'"),
        ({"7": "M\n"}, "bad size"),
        ({"7": "XXXXXXXXL"}, "bad size 'XXXXXXXXL'"),
        ({"7": "Gr\u00f6\u00df"}, "bad size"),
        ({"7": 3}, "bad size 3"),
        ({"1": "S", "7": None}, "bad size None of compartment '7'"),
        (["7"], "sizes must map"),
    ],
)
def test_bad_sizes_are_refused_with_a_clear_message(sizes: object, message: str) -> None:
    with pytest.raises(SimError, match=message):
        make(sizes=sizes)


def test_sim_error_is_a_value_error() -> None:
    assert issubclass(SimError, ValueError)


async def test_released_door_springs_open_after_the_delay() -> None:
    world = make(spring_delay_s=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    task = asyncio.create_task(world.release_lock("7", 0.3))
    await asyncio.sleep(0)  # one step: the task has released the lock
    assert not world.compartment("7").locked
    assert not world.compartment("7").door_open  # the spring takes its time
    await until(lambda: world.compartment("7").door_open)
    assert loop.time() - start >= 0.05
    await task
    # The pulse is over, but an open door stays open and unlatched.
    view = world.compartment("7")
    assert view.door_open and not view.locked and not view.released
    assert world.pulses == ["7"]
    world.close_door("7")
    view = world.compartment("7")
    assert view.locked and not view.door_open


async def test_zero_spring_delay_opens_at_once() -> None:
    world = make(spring_delay_s=0)
    task = asyncio.create_task(world.release_lock("1", 0.1))
    await asyncio.sleep(0)
    assert world.compartment("1").door_open
    await task


async def test_jam_holds_the_door_shut() -> None:
    world = make(spring_delay_s=0)
    world.set_fault("lock:7", "jam", True)
    with world.subscribe() as sub:
        await world.release_lock("7", 0.05)
        changes = drain(sub.get_nowait)
    view = world.compartment("7")
    assert view.locked and not view.door_open and not view.released
    assert world.pulses == ["7"]  # the pulse was sent all the same
    assert not [c for c in changes if isinstance(c, LockChanged | DoorChanged)]


async def test_jam_injected_before_the_spring_keeps_the_door_shut() -> None:
    world = make(spring_delay_s=0.05)
    task = asyncio.create_task(world.release_lock("7", 0.1))
    await asyncio.sleep(0)  # one step: released, the spring not yet due
    assert world.compartment("7").released
    world.set_fault("lock:7", "jam", True)
    await task
    view = world.compartment("7")
    assert view.locked and not view.door_open


async def test_pulse_shorter_than_the_spring_delay_lets_the_latch_catch() -> None:
    world = make(spring_delay_s=0.05)
    await world.release_lock("2", 0.01)
    assert world.compartment("2").locked
    # Proving that something does NOT happen takes waiting past its moment.
    await asyncio.sleep(0.1)
    assert not world.compartment("2").door_open


async def test_pulse_is_bounded_even_when_the_caller_is_cancelled() -> None:
    world = make(spring_delay_s=5.0)
    task = asyncio.create_task(world.release_lock("1", 0.3))
    await asyncio.sleep(0)  # one step: the pulse has begun
    assert world.compartment("1").released
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert world.compartment("1").released  # cancelling the caller does not end the pulse
    await until(lambda: not world.compartment("1").released)
    assert world.compartment("1").locked and not world.compartment("1").door_open


async def test_overlapping_pulses_extend_to_the_later_end() -> None:
    world = make(spring_delay_s=5.0)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(world.release_lock("1", 0.05))
    await asyncio.sleep(0)
    start = loop.time()
    await world.release_lock("1", 0.2)
    await first
    await until(lambda: not world.compartment("1").released)
    assert loop.time() - start >= 0.19
    assert world.pulses == ["1", "1"]


@pytest.mark.parametrize("duration", [0, -1, float("inf"), float("nan"), 10.5, True])
async def test_bad_pulse_durations_are_refused(duration: float) -> None:
    world = make()
    with pytest.raises(SimError):
        await world.release_lock("1", duration)
    assert world.pulses == []


async def test_pulse_of_unknown_compartment_is_refused() -> None:
    with pytest.raises(SimError, match="unknown compartment '9'"):
        await make().release_lock("9", 0.1)


async def test_all_off_reengages_every_latch_at_once() -> None:
    world = make(spring_delay_s=5.0)
    tasks = [asyncio.create_task(world.release_lock(c, 5.0)) for c in ("1", "2")]
    await until(lambda: world.compartment("2").released)
    await world.all_off()
    for cid in ("1", "2"):
        view = world.compartment(cid)
        assert view.locked and not view.released and not view.door_open
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_a_person_cannot_open_a_locked_door_but_can_force_it() -> None:
    world = make()
    with pytest.raises(SimError, match="locked"):
        world.open_door("1")
    assert not world.compartment("1").door_open
    world.set_fault("lock:1", "jam", True)
    world.force_door("1")
    view = world.compartment("1")
    assert view.door_open and not view.locked
    world.force_door("1")  # already open: nothing to do
    world.close_door("1")
    assert world.compartment("1").locked


async def test_door_closed_during_the_pulse_latches_when_the_pulse_ends() -> None:
    world = make(spring_delay_s=0)
    task = asyncio.create_task(world.release_lock("1", 0.1))
    await asyncio.sleep(0)  # one step: released and, with no delay, sprung open
    assert world.compartment("1").door_open
    world.close_door("1")
    view = world.compartment("1")
    assert not view.door_open and not view.locked  # held shut, not yet latched
    world.open_door("1")  # still unlatched: a person may open it again
    world.close_door("1")
    assert not world.compartment("1").locked
    await task
    await until(lambda: not world.compartment("1").released)
    assert world.compartment("1").locked


def test_open_and_close_are_idempotent() -> None:
    world = make()
    world.close_door("2")
    assert world.compartment("2").locked
    world.force_door("2")
    world.open_door("2")
    assert world.compartment("2").door_open


def test_stuck_sensor_lies_and_reports_only_sensed_changes() -> None:
    world = make()
    with world.subscribe(DoorChanged) as sub:
        world.set_fault("door_sensor:2", "stuck_open", True)
        assert world.sensed_doors()["2"] is DoorState.OPEN
        assert world.compartment("2").door_open is False
        world.force_door("2")  # the real door now agrees: no sensed change
        world.set_fault("door_sensor:2", "stuck_closed", True)  # replaces stuck_open
        assert world.sensed_doors()["2"] is DoorState.CLOSED
        assert world.faults() == [{"target": "door_sensor:2", "kind": "stuck_closed"}]
        world.set_fault("door_sensor:2", "stuck_open", False)  # not the active one: no-op
        assert world.sensed_doors()["2"] is DoorState.CLOSED
        world.set_fault("door_sensor:2", "stuck_closed", False)
        assert world.sensed_doors()["2"] is DoorState.OPEN
        assert drain(sub.get_nowait) == [
            DoorChanged("2", DoorState.OPEN),
            DoorChanged("2", DoorState.CLOSED),
            DoorChanged("2", DoorState.OPEN),
        ]


def test_parcels_and_occupancy_events() -> None:
    world = make()
    with world.subscribe(OccupancyChanged) as sub:
        world.set_parcel("1", True)
        world.set_parcel("1", True)
        world.set_parcel("1", False)
        assert drain(sub.get_nowait) == [OccupancyChanged("1", True), OccupancyChanged("1", False)]
    with pytest.raises(SimError):
        world.set_parcel("1", 1)  # type: ignore[arg-type]


def test_press_delivers_each_key_and_validates() -> None:
    world = make()
    with world.subscribe(KeyPressed) as sub:
        world.press("12*#")
        assert drain(sub.get_nowait) == [KeyPressed(k) for k in "12*#"]
    for bad in ["", "12a", "1" * 257]:
        with pytest.raises(SimError):
            world.press(bad)


def test_keys_pressed_before_anyone_listens_are_kept() -> None:
    world = make()
    world.press("42")
    world.scan("hello")
    with world.subscribe(KeyPressed) as keys:
        assert drain(keys.get_nowait) == [KeyPressed("4"), KeyPressed("2")]
    with world.subscribe(KeyPressed) as again:
        assert drain(again.get_nowait) == []  # handed over once
    with world.subscribe(Scanned) as scans:
        assert drain(scans.get_nowait) == [Scanned("hello")]


def test_scanner_faults() -> None:
    world = make(seed=1)
    with world.subscribe(Scanned) as sub:
        world.scan("123456")
        world.set_fault("scanner", "dead", True)
        world.scan("swallowed")
        world.set_fault("scanner", "dead", False)
        world.set_fault("scanner", "garbage", True)
        world.scan("LK1:ABC")
        changes = drain(sub.get_nowait)
    assert changes[0] == Scanned("123456")
    assert len(changes) == 2
    junk = changes[1]
    assert isinstance(junk, Scanned)
    assert junk.data and not any(ch.isprintable() for ch in junk.data)
    assert world.scans == ["123456", "swallowed", "LK1:ABC"]
    for bad in ["", "x" * 4097]:
        with pytest.raises(SimError):
            world.scan(bad)


def test_scan_label_presents_the_parcel_id_to_the_scanner() -> None:
    world = make()
    with world.subscribe(Scanned) as sub:
        world.scan_label("PX123")
        world.scan_label("PX-9/A.b_c")
        assert drain(sub.get_nowait) == [Scanned("PX123"), Scanned("PX-9/A.b_c")]
    assert world.labels == ["PX123", "PX-9/A.b_c"]
    assert world.scans == ["PX123", "PX-9/A.b_c"]  # it went through the scanner


def test_a_label_scanned_before_anyone_listens_is_kept() -> None:
    world = make()
    world.scan_label("PX7")
    with world.subscribe(Scanned) as sub:
        assert drain(sub.get_nowait) == [Scanned("PX7")]


def test_longest_parcel_id_is_accepted() -> None:
    world = make()
    world.scan_label("P" * 64)
    assert world.labels == ["P" * 64]


@pytest.mark.parametrize(
    "parcel_id", ["", "PX 123", " PX1", "PX1\t", "PX1\n", "P" * 65, "PX\u00e9", "\u00a0", 123, None]
)
def test_scan_label_refuses_bad_parcel_ids(parcel_id: object) -> None:
    world = make()
    with world.subscribe() as sub:
        with pytest.raises(SimError, match="bad parcel id"):
            world.scan_label(parcel_id)  # type: ignore[arg-type]
        assert drain(sub.get_nowait) == []
    assert world.labels == [] and world.scans == []


def test_scanner_faults_apply_to_labels() -> None:
    world = make(seed=3)
    with world.subscribe(Scanned) as sub:
        world.set_fault("scanner", "dead", True)
        world.scan_label("PX1")
        assert drain(sub.get_nowait) == []  # swallowed
        world.set_fault("scanner", "dead", False)
        world.set_fault("scanner", "garbage", True)
        world.scan_label("PX2")
        [junk] = drain(sub.get_nowait)
    assert isinstance(junk, Scanned) and junk.data != "PX2"
    assert not any(ch.isprintable() for ch in junk.data)
    assert world.labels == ["PX1", "PX2"]  # the courier did scan both


def test_label_history_is_bounded() -> None:
    world = make()
    with world.subscribe(Scanned):  # claims the scans: no backlog to fill
        for n in range(HISTORY_LIMIT + 5):
            world.scan_label(f"PX{n}")
    assert len(world.labels) == HISTORY_LIMIT
    assert world.labels[0] == "PX5" and world.labels[-1] == f"PX{HISTORY_LIMIT + 4}"


def test_display_is_recorded() -> None:
    world = make()
    with world.subscribe(DisplayChanged) as sub:
        world.set_display(["Enter code", "then #"], "busy")
        msg = DisplayMessage(lines=("Enter code", "then #"), indicator="busy")
        assert drain(sub.get_nowait) == [DisplayChanged(msg)]
    assert world.display == msg
    assert world.state()["display"] == "Enter code\nthen #"
    world.set_display([], "idle")
    assert world.display_history == [msg, DisplayMessage(lines=(), indicator="idle")]
    with pytest.raises(SimError):
        world.set_display("not a list")


def test_in_service_is_the_daemons_to_set() -> None:
    world = make()
    with world.subscribe(ServiceChanged) as sub:
        world.set_in_service("7", False)
        world.set_in_service("7", False)
        assert drain(sub.get_nowait) == [ServiceChanged("7", False)]
    assert world.state()["compartments"]["7"]["in_service"] is False


def test_faults_are_listed_in_injection_order() -> None:
    world = make()
    world.set_fault("tamper", "open", True)
    world.set_fault("lock:7", "jam", True)
    world.set_fault("keypad", "stuck_key", True, key="5")
    world.set_fault("keypad", "stuck_key", True, key="#")
    world.set_fault("scanner", "garbage", True)
    world.set_fault("board:03", "offline", True)
    world.set_fault("door_sensor:1", "stuck_open", True)
    assert world.faults() == [
        {"target": "tamper", "kind": "open"},
        {"target": "lock:7", "kind": "jam"},
        {"target": "keypad", "kind": "stuck_key", "key": "#"},
        {"target": "scanner", "kind": "garbage"},
        {"target": "board:3", "kind": "offline"},
        {"target": "door_sensor:1", "kind": "stuck_open"},
    ]
    assert world.tamper_open and world.stuck_key == "#" and world.boards_offline == {3}
    for target, kind in [
        ("tamper", "open"),
        ("lock:7", "jam"),
        ("keypad", "stuck_key"),
        ("scanner", "garbage"),
        ("board:3", "offline"),
        ("door_sensor:1", "stuck_open"),
    ]:
        world.set_fault(target, kind, False)
    assert world.faults() == []
    assert world.state()["faults"] == []
    assert not world.tamper_open and world.stuck_key is None and world.boards_offline == set()


def test_fault_changes_are_published() -> None:
    world = make()
    with world.subscribe(FaultChanged, TamperChanged) as sub:
        world.set_fault("tamper", "open", True)
        world.set_fault("keypad", "stuck_key", True, key="1")
        assert drain(sub.get_nowait) == [
            TamperChanged(True),
            FaultChanged("tamper", "open", True),
            FaultChanged("keypad", "stuck_key", True, "1"),
        ]


@pytest.mark.parametrize(
    ("target", "kind", "on", "key", "message"),
    [
        ("lock:9", "jam", True, None, "unknown compartment '9'"),
        ("lock", "jam", True, None, "needs an id"),
        ("lock:", "jam", True, None, "needs an id"),
        ("lock:7", "stuck_open", True, None, "has no fault 'stuck_open'"),
        ("door_sensor:7", "jam", True, None, "has no fault 'jam'"),
        ("keypad:1", "stuck_key", True, "1", "takes no id"),
        ("keypad", "stuck_key", True, None, "needs a 'key'"),
        ("keypad", "stuck_key", True, "A", "needs a 'key'"),
        ("keypad", "stuck_key", True, "12", "needs a 'key'"),
        ("scanner", "jam", True, None, "has no fault"),
        ("scanner", "dead", True, "1", "only stuck_key takes a key"),
        ("board:16", "offline", True, None, "bad board number"),
        ("board:x", "offline", True, None, "bad board number"),
        ("board:\u00b2", "offline", True, None, "bad board number"),
        ("tamper", "closed", True, None, "has no fault"),
        ("door", "open", True, None, "unknown fault target"),
        ("lock:7", "jam", 1, None, "must be true or false"),
    ],
)
def test_bad_faults_are_refused(
    target: str, kind: str, on: bool, key: str | None, message: str
) -> None:
    world = make()
    with pytest.raises(SimError, match=message):
        world.set_fault(target, kind, on, key)
    assert world.faults() == []


@pytest.mark.parametrize("cid", ["9", "", 7])
def test_unknown_compartments_are_refused(cid: str) -> None:
    world = make()
    for action in (world.open_door, world.close_door, world.force_door, world.compartment):
        with pytest.raises(SimError):
            action(cid)
    with pytest.raises(SimError):
        world.set_parcel(cid, True)
    with pytest.raises(SimError):
        world.set_in_service(cid, False)


def test_subscriptions_filter_and_close() -> None:
    world = make()
    everything = world.subscribe()
    only_locks = world.subscribe(LockChanged)
    world.force_door("1")
    world.set_parcel("1", True)
    assert [type(c).__name__ for c in drain(everything.get_nowait)] == [
        "LockChanged",
        "DoorMoved",
        "DoorChanged",
        "OccupancyChanged",
    ]
    assert drain(only_locks.get_nowait) == [LockChanged("1", False)]
    everything.close()
    only_locks.close()
    world.close_door("1")
    assert drain(everything.get_nowait) == []


async def test_a_new_pulse_springs_a_door_shut_during_the_last_one() -> None:
    world = make(spring_delay_s=0)
    first = asyncio.create_task(world.release_lock("1", 0.3))
    await until(lambda: world.compartment("1").door_open)
    world.close_door("1")  # shut while still released: the latch has not caught it
    assert not world.compartment("1").door_open
    await world.release_lock("1", 0.05)  # the daemon pulses again (a retry, a new code)
    await until(lambda: world.compartment("1").door_open)
    await first
