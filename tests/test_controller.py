"""The executor built directly, as the composition root builds it: a real SQLite database, the
simulator's lock and display, the bank and the credentials service, a clock the test moves."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import threading
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
from conftest import wait_until

from hal.base import ArmedPulse, DoorChanged, DoorState, KeyPressed, OccupancyChanged, Scanned
from hal.registry import HalContext
from lockerd.core import messages
from lockerd.core.bank import Bank, DepositRules, RequestRefused
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.entry import CodeEntry
from lockerd.core.lockout import Lockout, RateLimiter
from lockerd.logs import configure_logging
from lockerd.services.controller import ACCESS_COMMIT_HOLD_S, Controller, load_lockout_state
from lockerd.services.credentials import CredentialService
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.events import EventLog
from lockerd.store.parcels import ParcelStore, SpentTokens
from lockerd.store.writer import DbWriter
from lockerd.timeutil import utcnow
from lockerd.trust.digest import derived_pickup_code
from sim.backend import SimDisplay, SimLockDriver
from sim.world import SimWorld

pytestmark = pytest.mark.unit

LOCKER = "L1"
CODE_KEY = bytes(range(32))
DIGITS = 8
TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)


class ManualClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self._base = utcnow()

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self._base + timedelta(seconds=self.t - 1000.0)


@dataclass
class Rig:
    ctl: Controller
    db: Database
    events: EventLog
    world: SimWorld
    clock: ManualClock

    def types(self) -> list[str]:
        return [e.type for e in self.events.recent(1000)]


def _rig(tmp_path: Path, *, parcel: str | None = "PX-1",
         lock_class: type[SimLockDriver] = SimLockDriver, writer: DbWriter | None = None,
         commit_hold_s: float = ACCESS_COMMIT_HOLD_S) -> Rig:
    db = open_database(tmp_path / "lockerd.db")
    events, codes, parcels = EventLog(db), CodeStore(db), ParcelStore(db)
    if parcel is not None:
        with db.transaction() as conn:
            parcels.put(conn, "1", parcel, None, utcnow())
    context = HalContext(compartments=("1", "2"), state_dir=tmp_path,
                         compartment_sizes={"1": "S", "2": "M"})
    lock = lock_class(options={}, context=context, config_key="hal.lock")
    display = SimDisplay(options={}, context=context, config_key="hal.display")
    held = parcels.all()
    bank = Bank(
        compartments={cid: Compartment(cid, timings=TIMINGS, size=size, occupied=cid in held,
                                       parcel_id=held[cid].parcel_id if cid in held else None)
                      for cid, size in (("1", "S"), ("2", "M"))},
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=2, base_s=30.0, max_s=600.0,
                        state=load_lockout_state(db)),
        rejections=RateLimiter(per_minute=20),
        open_budget=OpenBudget(per_hour=5),
        rules=DepositRules(sizes=("S", "M"), derived_digits=DIGITS),
    )
    tokens = SpentTokens(db)
    clock = ManualClock()
    ctl = Controller(
        bank=bank,
        credentials=CredentialService(locker_id=LOCKER, codes=codes, code_key=CODE_KEY,
                                      tokens=tokens),
        db=db, events=events, codes=codes, lock=lock, display=display, pulse_s=0.05,
        clock=clock, parcels=parcels, tokens=tokens, writer=writer,
        commit_hold_s=commit_hold_s,
    )
    return Rig(ctl, db, events, lock.world, clock)


async def _press(rig: Rig, keys: str) -> None:
    for key in keys:
        await rig.ctl.step(KeyPressed(key))


@contextlib.asynccontextmanager
async def controller_running(ctl: Controller) -> AsyncIterator[None]:
    """`ctl.run()` in a task for the block, as the daemon runs it; then cancelled, and its
    pulses awaited."""
    task = asyncio.create_task(ctl.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ctl.wait_pulses()


@contextlib.asynccontextmanager
async def writer_rig(tmp_path: Path, *, lock_class: type[SimLockDriver] = SimLockDriver,
                     refuse_pulses: bool = False,
                     commit_hold_s: float = ACCESS_COMMIT_HOLD_S,
                     ) -> AsyncIterator[tuple[Rig, DbWriter]]:
    """A rig whose controller writes through the daemon's writer thread; with
    `refuse_pulses`, the database refuses every `lock.pulse` event (a commit that fails)."""
    open_database(tmp_path / "lockerd.db").close()
    writer = DbWriter(tmp_path / "lockerd.db")
    writer.start()
    rig = _rig(tmp_path, lock_class=lock_class, writer=writer, commit_hold_s=commit_hold_s)
    if refuse_pulses:
        rig.db.conn.execute(
            "CREATE TRIGGER no_pulse BEFORE INSERT ON events WHEN NEW.type = 'lock.pulse'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    try:
        yield rig, writer
    finally:
        await asyncio.to_thread(writer.close)
        rig.db.close()


async def test_a_derived_code_opens_its_door_and_completes_the_pickup(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
    await rig.ctl.wait_pulses()
    assert rig.world.pulses == ["1"]
    assert rig.types() == ["lock.pulse"]  # committed before the pulse went out
    assert rig.ctl.last_message is not None and "opening" in rig.ctl.last_message.text
    rig.clock.t += 0.5
    await rig.ctl.step(DoorChanged("1", DoorState.OPEN))
    await rig.ctl.step(OccupancyChanged("1", False))
    await rig.ctl.step(DoorChanged("1", DoorState.CLOSED))
    assert rig.types() == ["lock.pulse", "door.opened", "pickup.opened", "door.closed",
                           "pickup.completed"]
    assert ParcelStore(rig.db).all() == {}
    rig.db.close()


async def test_a_burst_of_queued_keys_is_drawn_once_and_its_door_still_opens(
    tmp_path: Path,
) -> None:
    rig = _rig(tmp_path)
    code = derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS)
    try:
        async with controller_running(rig.ctl):
            await wait_until(lambda: len(rig.world.display_history) == 1, what="the idle screen")
            # Half the code in one read of the keypad: four keys queued at once.
            for key in code[:4]:
                rig.ctl.emit(KeyPressed(key))
            await wait_until(lambda: len(rig.world.display_history) == 2, what="the typed digits")
            # Four keys, one redraw, after the last: the display shows where the burst left the
            # entry (the burst is handled without a pause, so nothing can come after it).
            assert [m.text for m in rig.world.display_history[1:]] == [messages.typing(4).text]
            for key in code[4:] + "#":
                rig.ctl.emit(KeyPressed(key))
            await wait_until(lambda: rig.world.pulses == ["1"], what="the pulse")
            assert rig.types() == ["lock.pulse"]
            await wait_until(lambda: "opening" in rig.world.display_history[-1].text,
                             what="the opening screen")
            # The second burst was drawn once too: its digits never reached the display.
            assert len(rig.world.display_history) == 3
    finally:
        rig.db.close()


async def test_the_first_digit_after_a_commit_warms_the_lookup_and_a_burst_does_not(
    tmp_path: Path,
) -> None:
    rig = _rig(tmp_path)
    warmed: list[str] = []
    rig.db.conn.set_trace_callback(
        lambda sql: warmed.append(sql) if "c.digest = ''" in sql else None)
    code = derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS)
    # Typed key by key (nothing else queued): the first digit reads the lookup's way once.
    await _press(rig, code[:3])
    assert len(warmed) == 1
    await _press(rig, code[3:] + "#")
    await rig.ctl.wait_pulses()
    assert rig.world.pulses == ["1"] and len(warmed) == 1
    # The pulse's commit came after: the next code typed warms again, once.
    await _press(rig, "12")
    assert len(warmed) == 2
    await _press(rig, "*")
    rig.clock.t += 0.5
    await rig.ctl.step(DoorChanged("1", DoorState.OPEN))
    # A burst (keys queued together) goes straight to its '#': nothing read before it.
    try:
        async with controller_running(rig.ctl):
            for key in "98765432#":
                rig.ctl.emit(KeyPressed(key))
            await wait_until(lambda: "code.rejected" in rig.types(),
                             what="the wrong code's rejection")
            assert len(warmed) == 2
    finally:
        rig.db.conn.set_trace_callback(None)
        rig.db.close()


async def test_wrong_codes_lock_the_keypad_persistently(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    await _press(rig, "11111111#")
    await _press(rig, "22222222#")
    assert rig.types() == ["code.rejected", "code.rejected", "keypad.lockout"]
    assert load_lockout_state(rig.db).lockouts == 1
    await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
    assert rig.world.pulses == []
    await rig.ctl.clear_lockout()
    assert load_lockout_state(rig.db).failures == 0
    rig.db.close()


async def test_bad_input_is_refused_and_the_controller_carries_on(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    await rig.ctl.step(Scanned("\x00not a code\xff"))
    await rig.ctl.step(DoorChanged("9", DoorState.OPEN))
    await rig.ctl.step(OccupancyChanged("9", True))
    await rig.ctl.step(Scanned("LK1:" + "?" * 20))
    rejected = [e for e in rig.events.recent(100) if e.type == "code.rejected"]
    assert [e.data["reason"] for e in rejected] == ["unreadable_scan", "no_keyring"]
    assert rig.world.pulses == []
    assert all(c.view().idle for c in rig.ctl.compartments.values())
    rig.db.close()


async def test_open_for_waits_for_the_door_sensor(tmp_path: Path) -> None:
    rig = _rig(tmp_path, parcel=None)
    opening = asyncio.create_task(rig.ctl.open_for("2", kind="console", source="console",
                                                   ref={"tech_id": "t1"}, budgeted=True))
    await wait_until(lambda: rig.world.pulses == ["2"], what="the pulse")
    assert not opening.done()
    await rig.ctl.step(DoorChanged("2", DoorState.OPEN))
    assert await opening == "opened"
    assert rig.ctl.open_budget.used(rig.clock.wall().timestamp()) == 1
    with pytest.raises(RequestRefused, match="busy"):
        await rig.ctl.open_for("2", kind="console", source="console", ref={})
    # Nobody opens the door: one retry, then jammed, the compartment out of service.
    await rig.ctl.step(DoorChanged("2", DoorState.CLOSED))
    jam = asyncio.create_task(rig.ctl.open_for("2", kind="console", source="console", ref={}))
    await wait_until(lambda: len(rig.world.pulses) == 2, what="the second open's pulse")
    for _ in range(2):
        rig.clock.t += TIMINGS.open_timeout_s
        await rig.ctl.step(None)
    assert await jam == "jammed"
    assert not rig.ctl.compartments["2"].in_service
    assert rig.db.get_meta("out_of_service") == {"2": "jammed"}
    await rig.ctl.wait_pulses()
    rig.db.close()


class WitnessLock(SimLockDriver):
    """The simulator's lock, which reads the database from a connection of its own at every
    pulse: what another process (or a power cut) would find there at that moment."""

    seen: ClassVar[list[list[str]]] = []

    async def _pulse(self, compartment: str, duration_s: float) -> None:
        conn = sqlite3.connect(self.context.state_dir / "lockerd.db")
        try:
            self.seen.append([r[0] for r in conn.execute("SELECT type FROM events ORDER BY seq")])
        finally:
            conn.close()
        await super()._pulse(compartment, duration_s)


async def test_through_the_writer_thread_the_event_is_committed_before_the_pulse(
        tmp_path: Path) -> None:
    WitnessLock.seen = []
    async with writer_rig(tmp_path, lock_class=WitnessLock) as (rig, writer):
        await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
        await rig.ctl.wait_pulses()
        assert WitnessLock.seen == [["lock.pulse"]]
        rig.clock.t += 0.5
        await rig.ctl.step(DoorChanged("1", DoorState.OPEN))
        # Committed (the loop's connection reads it at once), flushed by the writer after.
        assert rig.types() == ["lock.pulse", "door.opened", "pickup.opened"]
        await writer.flush()


class ArmingLock(SimLockDriver):
    """The simulator's lock with a pulse that can be armed, as the Kerong driver's: it
    records on which thread `fire` ran and what the database held at that moment."""

    calls: ClassVar[list[str]] = []
    fired: ClassVar[list[tuple[int, list[str]]]] = []
    armed: ClassVar[asyncio.Event | None] = None

    @classmethod
    def reset(cls, *, armed: asyncio.Event | None = None) -> None:
        cls.calls, cls.fired, cls.armed = [], [], armed

    async def _arm_pulse(self, compartment: str) -> ArmedPulse | None:
        ArmingLock.calls.append(f"arm {compartment}")
        if ArmingLock.armed is not None:
            ArmingLock.armed.set()
        return WitnessArmed(self, compartment)


class WitnessArmed(ArmedPulse):
    def __init__(self, lock: ArmingLock, compartment: str) -> None:
        self._lock = lock
        self._compartment = compartment

    def fire(self) -> None:
        conn = sqlite3.connect(self._lock.context.state_dir / "lockerd.db")
        try:
            types = [r[0] for r in conn.execute("SELECT type FROM events ORDER BY seq")]
        finally:
            conn.close()
        ArmingLock.calls.append("fire")
        ArmingLock.fired.append((threading.get_ident(), types))

    async def finish(self) -> None:
        ArmingLock.calls.append(f"finish {self._compartment}")
        self._lock.world.pulses.append(self._compartment)

    def release(self) -> None:
        ArmingLock.calls.append(f"release {self._compartment}")


async def test_through_the_writer_thread_an_armed_pulse_fires_there_after_the_commit(
        tmp_path: Path) -> None:
    ArmingLock.reset()
    async with writer_rig(tmp_path, lock_class=ArmingLock) as (rig, _writer):
        await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
        await rig.ctl.wait_pulses()
        # (The release after the finish is the pulse task's end: it then does nothing.)
        assert ArmingLock.calls == ["arm 1", "fire", "finish 1", "release 1"]
        ((thread, on_disk),) = ArmingLock.fired
        # Sent from the writer's thread, with the event already readable by another
        # connection (on the disk: the commit ran at synchronous=FULL before it).
        assert thread != threading.get_ident()
        assert on_disk == ["lock.pulse"]
        assert rig.world.pulses == ["1"]


async def test_the_loop_waits_for_the_commit_before_a_pulse_and_its_frame_before_going_on(
        tmp_path: Path) -> None:
    # Held in `submit` (hold_s): the loop runs nothing else until the writer's thread has
    # committed and fired, so that thread runs alone; the callback queued before the '#'
    # runs at the key's first wait, after the fire. Unheld, it would run first. (A hold
    # far longer than the daemon's, which a slow test machine's fsync may outlast.)
    ArmingLock.reset()
    async with writer_rig(tmp_path, lock_class=ArmingLock, commit_hold_s=10.0) as (rig, _):
        await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS))
        asyncio.get_running_loop().call_soon(ArmingLock.calls.append, "loop went on")
        await rig.ctl.step(KeyPressed("#"))
        await rig.ctl.wait_pulses()
        assert ArmingLock.calls == ["arm 1", "fire", "loop went on", "finish 1", "release 1"]


async def test_an_armed_pulse_whose_commit_fails_is_released_never_fired(
        tmp_path: Path) -> None:
    ArmingLock.reset()
    async with writer_rig(tmp_path, lock_class=ArmingLock, refuse_pulses=True) as (rig, _writer):
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
        await rig.ctl.wait_pulses()
        assert ArmingLock.calls == ["arm 1", "release 1"] and ArmingLock.fired == []
        assert rig.world.pulses == [] and rig.types() == []


async def test_an_armed_pulse_is_released_when_the_controller_stops_waiting_for_it(
        tmp_path: Path) -> None:
    # The daemon stops while the commit is on its way: the writer still commits and fires
    # (the frame follows a durable event), and the output is freed all the same.
    armed = asyncio.Event()
    ArmingLock.reset(armed=armed)
    async with writer_rig(tmp_path, lock_class=ArmingLock) as (rig, _writer):
        await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS))
        step = asyncio.create_task(rig.ctl.step(KeyPressed("#")))
        # Woken once the controller waits for the commit (armed, then the job submitted).
        await armed.wait()
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        await rig.ctl.wait_pulses()
        assert ArmingLock.calls == ["arm 1", "fire", "release 1"]
        assert ArmingLock.fired[0][1] == ["lock.pulse"]


async def test_the_event_line_of_the_commit_before_a_pulse_follows_the_pulse(
        tmp_path: Path) -> None:
    logged: list[MutableMapping[str, Any]] = []
    at_pulse: list[list[object]] = []

    class LogWitnessLock(SimLockDriver):
        async def _pulse(self, compartment: str, duration_s: float) -> None:
            at_pulse.append([line.get("type") for line in logged if line["event"] == "event"])
            await super()._pulse(compartment, duration_s)

    rig = _rig(tmp_path, lock_class=LogWitnessLock)
    configure_logging("info", "json", stream=io.StringIO())  # the next test's fixture resets it
    try:
        with structlog.testing.capture_logs() as captured:
            logged = captured
            await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
            await rig.ctl.wait_pulses()
        # Committed before the pulse (rule 1), its log line written once the frame is out.
        assert rig.types() == ["lock.pulse"]
        assert at_pulse == [[]]
        events = [line for line in logged if line["event"] == "event"]
        assert [(e["type"], e["compartment"]) for e in events] == [("lock.pulse", "1")]
        granted = next(i for i, line in enumerate(logged) if line["event"] == "access granted")
        assert logged.index(events[0]) < granted
    finally:
        rig.db.close()


async def test_the_event_line_of_a_pulse_is_written_while_the_pulse_is_on(
        tmp_path: Path) -> None:
    # A lock whose pulse lasts until the test ends it: the line must not wait for its end.
    release = asyncio.Event()
    logged: list[MutableMapping[str, Any]] = []

    class HeldLock(SimLockDriver):
        async def _pulse(self, compartment: str, duration_s: float) -> None:
            self.world.pulses.append(compartment)
            await release.wait()

    rig = _rig(tmp_path, lock_class=HeldLock)
    configure_logging("info", "json", stream=io.StringIO())  # the next test's fixture resets it
    try:
        with structlog.testing.capture_logs() as captured:
            logged = captured
            await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
            assert rig.world.pulses == ["1"]
            lines = [line.get("type") for line in logged if line["event"] == "event"]
            assert lines == ["lock.pulse"]  # the pulse still on
            release.set()
            await rig.ctl.wait_pulses()
    finally:
        rig.db.close()


async def test_every_event_line_is_written_once(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    configure_logging("info", "json", stream=io.StringIO())  # the next test's fixture resets it
    try:
        with structlog.testing.capture_logs() as logged:
            await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
            await rig.ctl.wait_pulses()
            rig.clock.t += 0.5
            await rig.ctl.step(DoorChanged("1", DoorState.OPEN))
            await rig.ctl.step(OccupancyChanged("1", False))
            await rig.ctl.step(DoorChanged("1", DoorState.CLOSED))
        lines = [line["seq"] for line in logged if line["event"] == "event"]
        assert len(lines) == len(set(lines)) == len(rig.types()) == 5
    finally:
        rig.db.close()


async def test_through_the_writer_thread_a_commit_that_fails_sends_no_pulse(
        tmp_path: Path) -> None:
    async with writer_rig(tmp_path, refuse_pulses=True) as (rig, _writer):
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            await _press(rig, derived_pickup_code(CODE_KEY, LOCKER, "PX-1", DIGITS) + "#")
        await rig.ctl.wait_pulses()
        assert rig.world.pulses == []
        assert rig.types() == []
