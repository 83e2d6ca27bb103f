"""Deadlines that wait, on a real SQLite file: the heartbeat, the extension after downtime and
after out-of-service time (a real jam through the controller), the cap, clock jumps, and a
bundle replacing the extension. The clock is one the test moves."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hal.base import KeyPressed
from hal.registry import HalContext
from lockerd.core.bank import Bank, DepositRules
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.entry import CodeEntry
from lockerd.core.lockout import Lockout, RateLimiter
from lockerd.services.controller import Controller
from lockerd.services.credentials import CredentialService
from lockerd.services.deadlines import HEARTBEAT_META, DeadlineKeeper
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.events import EventLog, StoredEvent
from lockerd.store.parcels import ParcelStore, SpentTokens
from lockerd.trust.bundle import CodeEntry as BundleEntry
from lockerd.trust.bundle import CodesBundle
from lockerd.trust.digest import code_digest
from sim.backend import SimDisplay, SimLockDriver

pytestmark = pytest.mark.unit

LOCKER = "L1"
CODE_KEY = bytes(range(32))
TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DEADLINE = START + timedelta(days=2)
CAP = 259200
HOUR = 3600


def digest(code: str) -> str:
    return code_digest(CODE_KEY, LOCKER, code)


# Compartment 1 holds parcel PX-1 (on record), 2 is seen empty, 3 is not known either way.
CODES = {
    "p-1": ("11111111", "1", None),      # bound to compartment 1: extended
    "q-1": ("22222222", None, "PX-1"),   # bound to the parcel in 1: extended
    "p-2": ("33333333", "2", None),      # compartment 2 is seen empty: not extended
    "p-3": ("44444444", "3", None),      # compartment 3 may hold a parcel: extended
    "q-9": ("55555555", None, "PX-9"),   # a parcel that is not here: not extended
}


class ManualClock:
    """Monotonic and wall time the test moves, separately (a wall clock can jump)."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.now = START
        self.synced = True

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.now += timedelta(seconds=seconds)


def bundle(version: int, *, not_after: datetime = DEADLINE, base: int | None = None,
           ids: tuple[str, ...] = tuple(CODES), expired: bool = False) -> CodesBundle:
    entries = [BundleEntry(id=cid, kind="pickup", digest=digest(code), compartment=comp,
                           parcel_id=parcel, not_after=not_after, max_uses=1)
               for cid, (code, comp, parcel) in CODES.items() if cid in ids]
    if expired:
        entries.append(BundleEntry(id="old", kind="pickup", digest=digest("66666666"),
                                   compartment="1", not_after=START - timedelta(days=1)))
    entries.append(BundleEntry(id="d-1", kind="deposit", digest=digest("77777777"),
                               compartment="1", not_after=not_after))
    return CodesBundle(locker_id=LOCKER, version=version, base_version=base,
                       issued_at=START - timedelta(hours=1),
                       expires_at=START + timedelta(days=7), upsert=tuple(entries), revoke=())


@dataclass
class Rig:
    path: Path
    clock: ManualClock
    db: Database
    codes: CodeStore
    events: EventLog
    ctl: Controller
    keeper: DeadlineKeeper

    def extended(self) -> list[StoredEvent]:
        return [e for e in self.events.recent(1000) if e.type == "code.extended"]

    def not_after(self, code_id: str) -> datetime:
        record = self.codes.lookup(digest(CODES[code_id][0]))
        assert record is not None
        return record.not_after

    def restart(self, *, down_s: float, synced: bool = True) -> Rig:
        """The bank was off for `down_s` (monotonic time starts again elsewhere)."""
        self.db.close()
        clock = ManualClock()
        clock.now = self.clock.now + timedelta(seconds=down_s)
        clock.synced = synced
        return build(self.path, clock=clock, first=False)


def build(path: Path, *, clock: ManualClock | None = None, first: bool = True) -> Rig:
    clock = clock or ManualClock()
    db = open_database(path / "lockerd.db")
    events, codes, parcels = EventLog(db), CodeStore(db), ParcelStore(db)
    if first:
        codes.apply(bundle(1, expired=True))
        with db.transaction() as conn:
            parcels.put(conn, "1", "PX-1", None, START)
    out_of_service = db.get_meta("out_of_service") or {}
    occupied = {"1": True, "2": False, "3": None}
    comps = {}
    for cid, occ in occupied.items():
        comps[cid] = Compartment(cid, timings=TIMINGS, size="M", occupied=occ,
                                 in_service=cid not in out_of_service,
                                 parcel_id="PX-1" if cid == "1" else None)
    bank = Bank(
        compartments=comps,
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=5, base_s=30.0, max_s=600.0),
        rejections=RateLimiter(per_minute=20), open_budget=OpenBudget(per_hour=5),
        rules=DepositRules(sizes=("M",)),
    )
    context = HalContext(compartments=tuple(comps), state_dir=path,
                         compartment_sizes=dict.fromkeys(comps, "M"))
    tokens = SpentTokens(db)
    ctl = Controller(
        bank=bank, db=db, events=events, codes=codes,
        credentials=CredentialService(locker_id=LOCKER, codes=codes, code_key=CODE_KEY,
                                      tokens=tokens),
        lock=SimLockDriver(options={}, context=context, config_key="hal.lock"),
        display=SimDisplay(options={}, context=context, config_key="hal.display"),
        pulse_s=0.05, clock=clock, parcels=parcels, tokens=tokens)
    keeper = DeadlineKeeper(db=db, codes=codes, events=events, clock=clock,
                            synchronised=lambda: clock.synced,
                            compartments=lambda: ctl.compartments, cap_s=CAP)
    ctl.service_listeners.append(keeper.service_changed)
    return Rig(path, clock, db, codes, events, ctl, keeper)


async def test_downtime_extends_the_pickup_codes_of_the_parcels_that_waited(tmp_path: Path) -> None:
    rig = build(tmp_path)
    assert await rig.keeper.tick() == []  # the first heartbeat: nothing to measure
    rig.clock.advance(120)
    await rig.keeper.tick()
    rig = rig.restart(down_s=5 * HOUR)
    stored = await rig.keeper.tick()
    assert sorted((e.code_id, e.compartment) for e in stored) == [
        ("p-1", "1"), ("p-3", "3"), ("q-1", "1")]
    for event in stored:
        assert event.data == {"extended_by_s": 5 * HOUR, "reason": "downtime",
                              "not_after": "2026-12-03T17:00:00Z"}
    assert rig.not_after("p-1") == DEADLINE + timedelta(hours=5)
    assert rig.not_after("p-2") == DEADLINE  # seen empty
    assert rig.not_after("q-9") == DEADLINE  # its parcel is not here
    assert {e.code_id for e in rig.extended()} == {"p-1", "q-1", "p-3"}  # not "old", "d-1"
    rig.db.close()


async def test_extensions_add_up_to_the_cap_and_no_further(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.keeper.tick()
    for _ in range(2):
        rig = rig.restart(down_s=40 * HOUR)
        await rig.keeper.tick()
    assert rig.not_after("p-1") == DEADLINE + timedelta(seconds=CAP)
    last = [e for e in rig.extended() if e.code_id == "p-1"][-1]
    assert last.data["extended_by_s"] == CAP - 40 * HOUR
    rig = rig.restart(down_s=10 * HOUR)
    assert await rig.keeper.tick() == []
    assert rig.not_after("p-1") == DEADLINE + timedelta(seconds=CAP)
    rig.db.close()


async def test_a_clock_set_forward_while_not_synchronised_extends_nothing(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.keeper.tick()
    rig = rig.restart(down_s=2 * 86400, synced=False)
    assert await rig.keeper.tick() == []
    assert rig.not_after("p-1") == DEADLINE
    # The clock jumps back to the truth (an hour after the last heartbeat, of which the
    # daemon ran 10 minutes) and is synchronised: only the real downtime counts.
    rig.clock.t += 600
    rig.clock.now = START + timedelta(hours=1)
    rig.clock.synced = True
    stored = await rig.keeper.tick()
    assert {e.data["extended_by_s"] for e in stored} == {HOUR - 600}
    rig.db.close()


async def test_a_clock_that_jumps_while_running_extends_nothing(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.keeper.tick()
    rig.clock.t += 60
    rig.clock.now += timedelta(days=3)
    assert await rig.keeper.tick() == []
    rig = rig.restart(down_s=0)
    assert await rig.keeper.tick() == []
    rig = rig.restart(down_s=30)  # a quick restart: under a heartbeat, nothing
    assert await rig.keeper.tick() == []
    rig = rig.restart(down_s=-5 * HOUR)  # set back: shortens nothing
    assert await rig.keeper.tick() == []
    assert rig.not_after("p-1") == DEADLINE
    rig.db.close()


async def test_a_bundle_with_another_not_after_replaces_the_extension(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.keeper.tick()
    rig = rig.restart(down_s=40 * HOUR)
    await rig.keeper.tick()
    # A delta repeating the same not_after keeps the extension; a snapshot too.
    rig.codes.apply(bundle(2, base=1, ids=("p-1",)))
    rig.codes.apply(bundle(3, ids=("p-1", "q-1", "p-3")))
    assert rig.not_after("p-1") == DEADLINE + timedelta(hours=40)
    # Revoked and re-issued in one delta, same not_after: the extension is put back once.
    rig.codes.apply(replace(bundle(4, base=3, ids=("p-1",)), revoke=("p-1",)))
    assert rig.not_after("p-1") == DEADLINE + timedelta(hours=40)
    later = DEADLINE + timedelta(days=1)
    rig.codes.apply(bundle(5, base=4, ids=("p-1",), not_after=later))
    assert rig.not_after("p-1") == later
    assert rig.not_after("q-1") == DEADLINE + timedelta(hours=40)
    # The total starts again: the next outage may extend p-1 by the whole cap.
    rig = rig.restart(down_s=CAP + HOUR)
    by = {e.code_id: e.data["extended_by_s"] for e in await rig.keeper.tick()}
    assert by == {"p-1": CAP, "q-1": CAP - 40 * HOUR, "p-3": CAP - 40 * HOUR}
    rig.db.close()


async def test_the_heartbeat_is_written_at_most_once_a_minute(tmp_path: Path) -> None:
    rig = build(tmp_path)
    writes: list[str] = []
    rig.db.conn.set_trace_callback(
        lambda sql: writes.append(sql) if "INSERT INTO meta" in sql else None)
    for step in (0, 10, 20, 29, 1, 0.5, 0.5, 60, 0.1, 59.8, 0.1):
        rig.clock.advance(step)
        await rig.keeper.tick()
    # At 0, 61 and 121.0 seconds: one small write each.
    assert len(writes) == 3
    assert all(HEARTBEAT_META in sql for sql in writes)
    rig.db.close()


async def test_out_of_service_time_after_a_jam_extends_the_code(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.keeper.tick()
    for key in CODES["p-1"][0] + "#":
        await rig.ctl.step(KeyPressed(key))
    # Nobody opens the door: it jams and the compartment goes out of service.
    for _ in range(20):
        if not rig.ctl.compartments["1"].in_service:
            break
        rig.clock.advance(TIMINGS.open_timeout_s)
        await rig.ctl.step(None)
    assert rig.db.get_meta("out_of_service") == {"1": "jammed"}
    # Two hours out of service, across a restart of the daemon (not counted twice: the
    # restart's own downtime, 1 h, is extended as downtime).
    rig.clock.advance(HOUR)
    await rig.keeper.tick()
    rig = rig.restart(down_s=HOUR)
    await rig.keeper.tick()
    rig.clock.advance(HOUR)
    await rig.keeper.tick()
    assert sorted(str(e.code_id) for e in rig.extended()) == ["p-1", "p-3", "q-1"]
    await rig.ctl.set_service("1", True, "repaired")
    await rig.keeper.settled()
    extended = [e for e in rig.extended() if e.data["reason"] == "out_of_service"]
    assert sorted(str(e.code_id) for e in extended) == ["p-1", "q-1"]
    assert {e.compartment for e in extended} == {"1"}
    # Out of service 1 h before the restart and 1 h after, counted on the monotonic clock.
    assert {e.data["extended_by_s"] for e in extended} == {2 * HOUR}
    by = 2 * HOUR
    assert rig.not_after("p-1") == DEADLINE + timedelta(seconds=HOUR + by)
    assert "code.extended" in [e.type for e in rig.events.recent(5)]
    rig.db.close()


async def test_an_unreadable_heartbeat_measures_nothing_and_is_written_anew(tmp_path: Path) -> None:
    rig = build(tmp_path)
    rig.db.set_meta(HEARTBEAT_META, {"at": "yesterday", "run_s": [1]})
    rig = rig.restart(down_s=5 * HOUR)
    assert await rig.keeper.tick() == []
    assert rig.not_after("p-1") == DEADLINE
    assert rig.db.get_meta(HEARTBEAT_META)["at"] == rig.clock.now.timestamp()
    rig.db.close()


def test_an_extension_read_before_a_bundle_changed_the_code_is_dropped(tmp_path: Path) -> None:
    rig = build(tmp_path)
    seen = {c.id: c for c in rig.codes.pickup_codes(compartments={"1"}, parcels={"PX-1"})}
    assert set(seen) == {"p-1", "q-1", "old"}
    later = DEADLINE + timedelta(days=1)
    rig.codes.apply(bundle(2, base=1, ids=("p-1",), not_after=later))
    with rig.db.transaction() as conn:
        assert not rig.codes.set_extension(conn, seen["p-1"], HOUR)
        assert rig.codes.set_extension(conn, seen["q-1"], HOUR)
    assert rig.not_after("p-1") == later
    assert rig.not_after("q-1") == DEADLINE + timedelta(hours=1)
    rig.db.close()
