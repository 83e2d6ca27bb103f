"""Support codes (PROTOCOL section 13) through the executor: a real SQLite database, the
simulator's lock, the bank and the credentials service, on a trusted clock whose system time
the test sets."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hal.base import DoorChanged, DoorState, KeyPressed, OccupancyChanged
from hal.registry import HalContext
from lockerd.core.access import Reason, Refused
from lockerd.core.bank import Bank, CredentialDecision, DepositRules, OpenPickup
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.entry import CodeEntry
from lockerd.core.lockout import Lockout, RateLimiter
from lockerd.services.clock import TrustedClock
from lockerd.services.controller import Controller, load_lockout_state
from lockerd.services.credentials import CredentialService
from lockerd.store.codes import CodeStore
from lockerd.store.db import Database, open_database
from lockerd.store.events import EventLog, StoredEvent
from lockerd.store.parcels import ParcelStore, SpentTokens
from lockerd.trust.bundle import CodeEntry as BundleCode
from lockerd.trust.bundle import CodesBundle
from lockerd.trust.digest import code_digest, support_code, support_window
from sim.backend import SimLockDriver
from sim.world import SimWorld

pytestmark = pytest.mark.unit

LOCKER = "L1"
CODE_KEY = bytes(range(32))
DIGITS = 8
TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)
# The start of a 10-minute window: 2026-12-01T10:00:00Z.
WINDOW_START = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
W = int(WINDOW_START.timestamp()) // 600


def independent_support_code(parcel_id: str, window: int, digits: int = DIGITS,
                             locker_id: str = LOCKER) -> str:
    """PROTOCOL section 13 written out again, without the daemon's function."""
    message = f"support\n{locker_id}\n{parcel_id}\n{window}".encode()
    number = int.from_bytes(hmac.new(CODE_KEY, message, hashlib.sha256).digest()[:8], "big")
    return f"{number % 10**digits:0{digits}d}"


class SetClock:
    """Monotonic time the test moves; wall time from a TrustedClock over a system time the
    test sets (never synchronised: the signed time floor applies)."""

    def __init__(self, db: Database) -> None:
        self.t = 1000.0
        self.system = WINDOW_START + timedelta(minutes=5)
        self.trusted = TrustedClock(db=db, mode="never", system=lambda: self.system)

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self.trusted.wall()


@dataclass
class Rig:
    ctl: Controller
    db: Database
    events: EventLog
    codes: CodeStore
    credentials: CredentialService
    world: SimWorld
    clock: SetClock

    def types(self) -> list[str]:
        return [e.type for e in self.events.recent(1000)]

    def last(self, type_: str) -> StoredEvent:
        return [e for e in self.events.recent(1000) if e.type == type_][-1]

    async def press(self, keys: str) -> None:
        for key in keys:
            await self.ctl.step(KeyPressed(key))

    def apply(self, *, codes: tuple[BundleCode, ...] = (), revoke: tuple[str, ...] = (),
              version: int = 1) -> None:
        self.codes.apply(CodesBundle(
            locker_id=LOCKER, version=version, base_version=None,
            issued_at=WINDOW_START, expires_at=WINDOW_START + timedelta(days=7),
            upsert=codes, revoke=revoke))


def pickup_code(code_id: str, code: str, parcel_id: str, compartment: str | None,
                max_uses: int = 1) -> BundleCode:
    return BundleCode(id=code_id, kind="pickup", digest=code_digest(CODE_KEY, LOCKER, code),
                      not_after=WINDOW_START + timedelta(days=2), compartment=compartment,
                      parcel_id=parcel_id, max_uses=max_uses)


def make_rig(tmp_path: Path, *, on_record: str | None = "PX200",
             support: bool = True) -> Rig:
    """Compartment 1 holds `on_record` (a deposit here), compartment 2 holds a parcel the
    occupancy sensor sees but that only a bundle code may name."""
    db = open_database(tmp_path / "lockerd.db")
    events, codes, parcels = EventLog(db), CodeStore(db), ParcelStore(db)
    if on_record is not None:
        with db.transaction() as conn:
            parcels.put(conn, "1", on_record, None, WINDOW_START)
    context = HalContext(compartments=("1", "2"), state_dir=tmp_path,
                         compartment_sizes={"1": "S", "2": "M"})
    lock = SimLockDriver(options={}, context=context, config_key="hal.lock")
    held = parcels.all()
    bank = Bank(
        compartments={cid: Compartment(cid, timings=TIMINGS, size=size, occupied=True,
                                       parcel_id=held[cid].parcel_id if cid in held else None)
                      for cid, size in (("1", "S"), ("2", "M"))},
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=3, base_s=30.0, max_s=600.0,
                        state=load_lockout_state(db)),
        rejections=RateLimiter(per_minute=20),
        open_budget=OpenBudget(per_hour=5),
        rules=DepositRules(sizes=("S", "M"), derived_digits=None),
    )
    tokens = SpentTokens(db)
    clock = SetClock(db)
    credentials = CredentialService(locker_id=LOCKER, codes=codes, code_key=CODE_KEY,
                                    tokens=tokens, support_digits=DIGITS if support else None)
    ctl = Controller(
        bank=bank, credentials=credentials, db=db, events=events, codes=codes, lock=lock,
        display=None, pulse_s=0.05, clock=clock, parcels=parcels, tokens=tokens,
    )
    return Rig(ctl, db, events, codes, credentials, lock.world, clock)


# -- the formula ---------------------------------------------------------------------------


def test_the_support_code_is_the_protocol_formula() -> None:
    for parcel_id, window, digits in (("PX200", W, 8), ("PX200", W + 1, 8), ("Ω-1", 0, 4),
                                      ("PX200", W, 12)):
        assert support_code(CODE_KEY, LOCKER, parcel_id, window, digits) == \
            independent_support_code(parcel_id, window, digits)
    # Each input matters: another window, parcel or locker gives another code.
    base = support_code(CODE_KEY, LOCKER, "PX200", W)
    assert base != support_code(CODE_KEY, LOCKER, "PX200", W + 1)
    assert base != support_code(CODE_KEY, LOCKER, "PX201", W)
    assert base != support_code(CODE_KEY, "L2", "PX200", W)
    with pytest.raises(ValueError, match="digits"):
        support_code(CODE_KEY, LOCKER, "PX200", W, 0)


def test_the_window_is_ten_minutes_of_unix_time() -> None:
    start = WINDOW_START.timestamp()
    assert support_window(start) == W
    assert support_window(start - 0.001) == W - 1
    assert support_window(start + 599.999) == W
    assert support_window(start + 600) == W + 1


# -- at the bank -------------------------------------------------------------------------


async def open_and_take(rig: Rig, cid: str) -> None:
    await rig.ctl.wait_pulses()
    rig.clock.t += 0.5
    await rig.ctl.step(DoorChanged(cid, DoorState.OPEN))
    await rig.ctl.step(OccupancyChanged(cid, False))
    await rig.ctl.step(DoorChanged(cid, DoorState.CLOSED))


async def test_a_support_code_opens_a_parcel_on_record_once(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    code = independent_support_code("PX200", W)
    await rig.press(code + "#")
    await open_and_take(rig, "1")
    assert rig.types() == ["lock.pulse", "door.opened", "pickup.opened", "door.closed",
                           "pickup.completed"]
    opened = rig.last("pickup.opened")
    assert (opened.compartment, opened.code_id) == ("1", None)
    assert opened.data["via"] == "support" and opened.data["window"] == str(W)
    assert rig.last("pickup.completed").data["via"] == "support"
    assert rig.codes.support_used("PX200", W)
    assert ParcelStore(rig.db).all() == {}
    rig.db.close()


async def test_the_window_before_and_after_are_accepted_and_no_further(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    views = rig.ctl.bank.views()

    def decide(window: int, at: datetime) -> CredentialDecision:
        return rig.credentials.code(independent_support_code("PX200", window), source="keypad",
                                    views=views, now=at, derived_digits=None)

    first, last = WINDOW_START, WINDOW_START + timedelta(seconds=599.999)
    for at in (first, last):
        for window in (W - 1, W, W + 1):
            opened = decide(window, at)
            assert isinstance(opened, OpenPickup), (window, at)
            assert opened.access.support_window == window
        for window in (W - 2, W + 2):
            assert decide(window, at) == Refused(Reason.UNKNOWN), (window, at)
    # One instant later the window is W + 1: W - 1 is now two windows old.
    next_window = first + timedelta(seconds=600)
    assert decide(W - 1, next_window) == Refused(Reason.UNKNOWN)
    assert isinstance(decide(W + 2, next_window), OpenPickup)
    rig.db.close()


async def test_a_set_back_clock_does_not_revive_an_old_window(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    old = independent_support_code("PX200", W - 6)  # read out an hour ago
    # Signed time says it is W + 0:05 now; the system clock is then set back an hour.
    rig.clock.trusted.observe_signed_time(WINDOW_START + timedelta(minutes=5))
    rig.clock.system = WINDOW_START - timedelta(minutes=55)
    await rig.press(old + "#")
    assert rig.types() == ["code.rejected"]
    assert rig.last("code.rejected").data["reason"] == "unknown_code"
    assert rig.world.pulses == []
    await rig.press(independent_support_code("PX200", W) + "#")
    await rig.ctl.wait_pulses()
    assert rig.world.pulses == ["1"]
    rig.db.close()


async def test_a_used_support_code_is_refused_and_takes_the_parcels_code_use(
    tmp_path: Path,
) -> None:
    # Compartment 2's parcel is known only from its bundle code (two uses).
    rig = make_rig(tmp_path, on_record=None)
    rig.apply(codes=(pickup_code("p-300", "55554444", "PX300", "2", max_uses=2),))
    code = independent_support_code("PX300", W)
    await rig.press(code + "#")
    await open_and_take(rig, "2")
    opened = rig.last("pickup.opened")
    assert (opened.compartment, opened.code_id, opened.data["via"]) == ("2", "p-300", "support")
    record = rig.codes.lookup(code_digest(CODE_KEY, LOCKER, "55554444"))
    assert record is not None and record.uses == 1
    # The same support code again: used, not a guess, no pulse.
    pulses = list(rig.world.pulses)
    await rig.press(code + "#")
    refused = rig.last("code.rejected")
    assert (refused.data["reason"], refused.data["via"]) == ("used", "support")
    assert rig.world.pulses == pulses
    assert load_lockout_state(rig.db).failures == 0
    rig.db.close()


async def test_a_pickup_left_incomplete_gives_the_support_code_back(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    code = independent_support_code("PX200", W)
    await rig.press(code + "#")
    await rig.ctl.wait_pulses()
    await rig.ctl.step(DoorChanged("1", DoorState.OPEN))
    assert rig.codes.support_used("PX200", W)
    await rig.ctl.step(DoorChanged("1", DoorState.CLOSED))  # the parcel is still inside
    assert rig.last("pickup.incomplete").data["via"] == "support"
    assert not rig.codes.support_used("PX200", W)
    await rig.press(code + "#")
    await rig.ctl.wait_pulses()
    assert rig.world.pulses == ["1", "1"]
    rig.db.close()


async def test_a_jam_does_not_burn_the_support_code(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, on_record=None)
    rig.apply(codes=(pickup_code("p-300", "55554444", "PX300", "2"),))
    code = independent_support_code("PX300", W)
    await rig.press(code + "#")
    await rig.ctl.wait_pulses()
    for _ in range(2):  # the retry pulse, then the jam
        rig.clock.t += TIMINGS.open_timeout_s + 0.1
        await rig.ctl.step(None)
        await rig.ctl.wait_pulses()
    assert rig.types() == ["lock.pulse", "lock.pulse", "door.jammed",
                           "compartment.out_of_service"]
    assert rig.last("door.jammed").data["via"] == "support"
    assert not rig.codes.support_used("PX300", W)
    record = rig.codes.lookup(code_digest(CODE_KEY, LOCKER, "55554444"))
    assert record is not None and record.uses == 0
    # Fixed and back in service, the same code opens the door.
    await rig.ctl.set_service("2", True, "repaired")
    await rig.press(code + "#")
    await open_and_take(rig, "2")
    assert rig.last("pickup.opened").code_id == "p-300"
    assert rig.codes.support_used("PX300", W)
    rig.db.close()


async def test_revoking_the_derived_code_disables_support_codes(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    rig.apply(revoke=("derived:PX200",))
    await rig.press(independent_support_code("PX200", W) + "#")
    refused = rig.last("code.rejected")
    assert (refused.data["reason"], refused.code_id) == ("revoked", "derived:PX200")
    assert refused.data["via"] == "support"
    assert rig.world.pulses == []
    rig.db.close()


async def test_a_parcel_that_is_not_here_gets_nothing(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    # Named by a used-up code, or by nothing at all: the same as a wrong guess.
    rig.apply(codes=(pickup_code("p-300", "55554444", "PX300", "2"),))
    with rig.db.transaction() as conn:
        rig.codes.change_uses(conn, "p-300", code_digest(CODE_KEY, LOCKER, "55554444"), 1)
    for parcel in ("PX300", "PX-ELSEWHERE"):
        await rig.press(independent_support_code(parcel, W) + "#")
    assert [e.data["reason"] for e in rig.events.recent(10)] == ["unknown_code"] * 2
    assert load_lockout_state(rig.db).failures == 2
    assert rig.world.pulses == []
    # Another locker's support code for a parcel that is here is no code here either.
    await rig.press(independent_support_code("PX200", W, locker_id="L2") + "#")
    assert rig.last("code.rejected").data["reason"] == "unknown_code"
    rig.db.close()


async def test_support_codes_are_refused_unless_enabled(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, support=False)
    await rig.press(independent_support_code("PX200", W) + "#")
    assert rig.types() == ["code.rejected"]
    assert rig.last("code.rejected").data["reason"] == "unknown_code"
    assert rig.world.pulses == []
    rig.db.close()


async def test_a_parcel_whose_code_is_withdrawn_or_used_up_is_no_longer_a_candidate(
    tmp_path: Path,
) -> None:
    rig = make_rig(tmp_path, on_record=None)
    views = rig.ctl.bank.views()
    code = independent_support_code("PX300", W)
    now = WINDOW_START + timedelta(minutes=5)

    def decide() -> CredentialDecision:
        return rig.credentials.code(code, source="keypad", views=views, now=now,
                                    derived_digits=None)

    rig.apply(codes=(pickup_code("p-300", "55554444", "PX300", "2"),))
    assert isinstance(decide(), OpenPickup)
    rig.apply(codes=(), version=2)  # a snapshot without it
    assert decide() == Refused(Reason.UNKNOWN)
    rig.apply(codes=(pickup_code("p-300", "55554444", "PX300", "2"),), version=3)
    assert isinstance(decide(), OpenPickup)
    with rig.db.transaction() as conn:  # its one use taken, as a pickup with it would
        rig.codes.change_uses(conn, "p-300", code_digest(CODE_KEY, LOCKER, "55554444"), 1)
    assert decide() == Refused(Reason.UNKNOWN)
    rig.db.close()
