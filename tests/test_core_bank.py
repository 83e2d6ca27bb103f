"""The bank aggregate, pure: what each input sets off inside it (pickup, deposit session,
lockout, open budget, rejections), with no event loop and no database."""

from __future__ import annotations

import pytest

from hal.values import DoorState
from lockerd.core.access import Reason, Refused
from lockerd.core.actions import Pulse, Record, Show
from lockerd.core.bank import (
    Bank,
    BankAction,
    DepositRules,
    Log,
    OpenBudgetSpent,
    OpenPickup,
    RequestRefused,
    Resolve,
    Save,
    Settled,
    StartSession,
)
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.credential import Access
from lockerd.core.deposit import SessionCredential, SessionPhase
from lockerd.core.entry import CodeEntry
from lockerd.core.events import EventType, OutboxClass, outbox_class
from lockerd.core.lockout import Lockout, LockoutState, RateLimiter

pytestmark = pytest.mark.unit

T0 = 1000.0
WALL = 1_800_000_000.0
TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)


def _bank(*, parcels: dict[str, str] | None = None, per_hour: int = 10,
          rejections_per_minute: int = 100) -> Bank:
    parcels = parcels or {}
    comps = {cid: Compartment(cid, timings=TIMINGS, occupied=cid in parcels, size=size,
                              parcel_id=parcels.get(cid))
             for cid, size in (("1", "S"), ("2", "M"), ("3", "L"))}
    return Bank(
        compartments=comps,
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=3, base_s=30.0, max_s=3600.0),
        rejections=RateLimiter(per_minute=rejections_per_minute),
        open_budget=OpenBudget(per_hour=per_hour),
        rules=DepositRules(sizes=("S", "M", "L"), session_idle_s=30.0),
    )


def _types(actions: list[BankAction]) -> list[str]:
    return [a.type for a in actions if isinstance(a, Record)]


def _saves(actions: list[BankAction]) -> list[str]:
    return [a.what for a in actions if isinstance(a, Save)]


def _phase(bank: Bank) -> SessionPhase | None:
    return None if bank.session is None else bank.session.phase


def _pickup(bank: Bank, cid: str, parcel_id: str, code_id: str = "p-1") -> list[BankAction]:
    access = Access(code_id=code_id, digest="d" * 64, kind="pickup", source="keypad",
                    parcel_id=parcel_id)
    return bank.decide(OpenPickup(cid, access), source="keypad", t=T0, wall=WALL)


def _fail_once(bank: Bank) -> None:
    bank.decide(Refused(Reason.UNKNOWN), source="keypad", t=T0, wall=WALL)
    assert bank.lockout.state.failures == 1


# -- routing that used to be string matching in the controller ------------------------------


def test_a_pickup_reports_pulses_and_settles_on_the_door_sensor() -> None:
    bank = _bank(parcels={"2": "PX-2"})
    opened = _pickup(bank, "2", "PX-2")
    assert _types(opened) == [EventType.LOCK_PULSE]
    pulse_at = next(i for i, a in enumerate(opened) if isinstance(a, Pulse))
    record_at = next(i for i, a in enumerate(opened) if isinstance(a, Record))
    assert record_at < pulse_at  # reported before the pulse (safety rule 1)

    seen = bank.door("2", DoorState.OPEN, t=T0 + 0.5)
    assert _types(seen) == [EventType.DOOR_OPENED, EventType.PICKUP_OPENED]
    assert Settled("2", "opened") in seen
    bank.occupancy("2", False, t=T0 + 1)
    closed = bank.door("2", DoorState.CLOSED, t=T0 + 2)
    assert _types(closed) == [EventType.DOOR_CLOSED, EventType.PICKUP_COMPLETED]
    assert bank.compartments["2"].parcel_id is None


@pytest.mark.parametrize(
    ("occupied_after", "final", "resets"),
    [
        (False, EventType.PICKUP_COMPLETED, True),  # the parcel left: a use consumed for good
        (True, EventType.PICKUP_INCOMPLETE, False),  # closed on the parcel: the code works again
    ],
)
def test_the_lockout_is_reset_only_by_a_consumed_pickup(
    occupied_after: bool, final: EventType, resets: bool,
) -> None:
    bank = _bank(parcels={"1": "PX-1"})
    _fail_once(bank)
    assert "lockout" not in _saves(_pickup(bank, "1", "PX-1"))
    assert "lockout" not in _saves(bank.door("1", DoorState.OPEN, t=T0 + 0.5))
    bank.occupancy("1", occupied_after, t=T0 + 1)
    closed = bank.door("1", DoorState.CLOSED, t=T0 + 2)
    assert final in _types(closed)
    assert ("lockout" in _saves(closed)) is resets
    assert (bank.lockout.state == LockoutState()) is resets


def _courier(bank: Bank, *, kind: str = "courier") -> list[BankAction]:
    credential = SessionCredential(kind=kind, source="keypad", code_id="c-1", digest="c" * 64)
    return bank.decide(StartSession(credential), source="keypad", t=T0, wall=WALL)


def test_a_deposit_session_opens_its_door_inside_the_bank_and_learns_how_it_went() -> None:
    bank = _bank()
    _fail_once(bank)
    started = _courier(bank)
    assert _types(started) == [EventType.SESSION_STARTED]
    session = bank.session
    assert session is not None and session.phase is SessionPhase.LABEL
    assert _types(bank.scan("PX-A", t=T0 + 1, wall=WALL)) == []
    assert _phase(bank) is SessionPhase.SIZE
    door = bank.key("2", t=T0 + 2, wall=WALL)  # size M
    # The session's Begin is carried out inside the bank: the executor sees report and pulse.
    assert _types(door) == [EventType.LOCK_PULSE]
    assert Pulse("2") in door
    assert _phase(bank) is SessionPhase.DOOR
    assert bank.key("*", t=T0 + 2.5, wall=WALL) == []  # keys wait for the door meanwhile

    opened = bank.door("2", DoorState.OPEN, t=T0 + 3)
    assert _types(opened) == [EventType.DOOR_OPENED, EventType.DEPOSIT_OPENED]
    assert session.consumed  # the credential's one use is taken now, and only now
    bank.occupancy("2", True, t=T0 + 4)
    closed = bank.door("2", DoorState.CLOSED, t=T0 + 5)
    assert _types(closed) == [EventType.DOOR_CLOSED, EventType.DEPOSIT_CONFIRMED]
    assert "lockout" in _saves(closed)
    assert bank.lockout.state == LockoutState()
    assert _phase(bank) is SessionPhase.LABEL and session.deposits == 1

    ended = bank.key("*", t=T0 + 6, wall=WALL)
    assert _types(ended) == [EventType.SESSION_ENDED]
    record = next(a for a in ended if isinstance(a, Record))
    assert record.data["credential_used"] is True and record.data["deposits"] == 1
    assert bank.session is None
    assert any(isinstance(a, Log) and a.message == "deposit session ended" for a in ended)


def test_a_jammed_deposit_door_sends_the_session_back_to_the_sizes() -> None:
    bank = _bank()
    _courier(bank, kind="deposit")
    bank.scan("PX-J", t=T0 + 1, wall=WALL)
    bank.key("1", t=T0 + 2, wall=WALL)
    retried = bank.tick(T0 + 2 + TIMINGS.open_timeout_s)
    assert _types(retried) == [EventType.LOCK_PULSE]
    jammed = bank.tick(T0 + 2 + 2 * TIMINGS.open_timeout_s)
    assert EventType.DOOR_JAMMED in _types(jammed)
    assert Settled("1", "jammed") in jammed
    assert bank.session is not None and bank.session.phase is SessionPhase.SIZE
    assert not bank.compartments["1"].in_service


def test_a_deposit_closed_empty_gives_nothing_back_to_the_lockout() -> None:
    bank = _bank()
    _fail_once(bank)
    _courier(bank, kind="deposit")
    bank.scan("PX-E", t=T0 + 1, wall=WALL)
    bank.key("3", t=T0 + 2, wall=WALL)
    bank.door("3", DoorState.OPEN, t=T0 + 3)
    bank.occupancy("3", False, t=T0 + 4)
    closed = bank.door("3", DoorState.CLOSED, t=T0 + 5)
    assert EventType.DEPOSIT_ABORTED in _types(closed)
    assert "lockout" not in _saves(closed)
    assert bank.lockout.state.failures == 1
    assert bank.session is None  # a deposit code's session ends with its one door


# -- inputs, refusals and the lockout -------------------------------------------------------


@pytest.mark.parametrize(
    ("scanned", "expected"),
    [
        ("123456", Resolve("123456", "scanner", token=False)),
        ("  123456\n", Resolve("123456", "scanner", token=False)),
        ("LK1:ABCDEF", Resolve("LK1:ABCDEF", "scanner", token=True)),
    ],
)
def test_a_scan_is_resolved_as_a_code_or_a_token(scanned: str, expected: Resolve) -> None:
    assert _bank().scan(scanned, t=T0, wall=WALL) == [expected]


@pytest.mark.parametrize("scanned", ["https://example.com", "1" * 65, "lk1:abc", "١٢٣"])
def test_a_scan_that_is_no_credential_is_refused_and_not_counted(scanned: str) -> None:
    bank = _bank()
    refused = bank.scan(scanned, t=T0, wall=WALL)
    record = next(a for a in refused if isinstance(a, Record))
    assert record.type == EventType.CODE_REJECTED
    assert record.data == {"reason": "unreadable_scan", "source": "scanner"}
    assert not any(isinstance(a, Resolve) for a in refused)
    assert bank.lockout.state == LockoutState()


def test_typed_code_is_resolved_on_hash() -> None:
    bank = _bank()
    for key in "4242":
        bank.key(key, t=T0, wall=WALL)
    assert bank.key("#", t=T0, wall=WALL) == [Resolve("4242", "keypad", token=False)]


def test_wrong_codes_lock_the_keypad_and_it_is_refused_while_locked() -> None:
    bank = _bank()
    for _ in range(2):
        failed = bank.decide(Refused(Reason.UNKNOWN), source="keypad", t=T0, wall=WALL)
        assert _saves(failed) == ["lockout"]
    third = bank.decide(Refused(Reason.UNKNOWN), source="keypad", t=T0, wall=WALL)
    assert _types(third) == [EventType.CODE_REJECTED, EventType.KEYPAD_LOCKOUT]
    # The failure is persisted before its events (it must survive a crash in between).
    assert isinstance(third[0], Save)
    shown = bank.key("1", t=T0 + 1, wall=WALL + 1)
    assert len(shown) == 1 and isinstance(shown[0], Show)
    assert "Too many wrong codes" in shown[0].message.text
    refused = bank.submit("1234", source="scanner", t=T0 + 1, wall=WALL + 1)
    assert not any(isinstance(a, Resolve) for a in refused)
    record = next(a for a in refused if isinstance(a, Record))
    assert record.data["reason"] == "locked_out"
    assert bank.clear_lockout() == [Save("lockout")]
    assert bank.submit("1234", source="scanner", t=T0 + 1, wall=WALL + 1) == [
        Resolve("1234", "scanner", token=False)]


def test_a_used_credential_is_refused_without_counting_as_a_guess() -> None:
    bank = _bank()
    used = bank.decide(Refused(Reason.USED, code_id="p-9"), source="keypad", t=T0, wall=WALL)
    assert _saves(used) == []
    assert _types(used) == [EventType.CODE_REJECTED]
    assert bank.lockout.state == LockoutState()


def test_rejections_are_rate_limited_on_the_time_passed_in() -> None:
    bank = _bank(rejections_per_minute=1)
    first = bank.decide(Refused(Reason.USED), source="keypad", t=T0, wall=WALL)
    held = bank.decide(Refused(Reason.USED), source="keypad", t=T0 + 1, wall=WALL)
    later = bank.decide(Refused(Reason.USED), source="keypad", t=T0 + 61, wall=WALL)
    assert _types(first) == [EventType.CODE_REJECTED]
    assert _types(held) == []
    assert any(isinstance(a, Show) for a in held)  # the customer is still told
    record = next(a for a in later if isinstance(a, Record))
    assert record.data["suppressed"] == 1


# -- requests and the open budget -----------------------------------------------------------


def test_the_open_budget_counts_opens_and_reports_its_first_refusal_of_the_hour() -> None:
    bank = _bank(per_hour=1)
    ref = {"cmd_id": "c1"}
    granted = bank.request_open("1", kind="command", source="mqtt", ref=ref, budgeted=True,
                                t=T0, wall=WALL)
    assert _saves(granted) == ["open_budget"]
    assert _types(granted) == [EventType.LOCK_PULSE]
    bank.door("1", DoorState.OPEN, t=T0 + 0.5)
    bank.door("1", DoorState.CLOSED, t=T0 + 1)

    with pytest.raises(OpenBudgetSpent) as first:
        bank.request_open("2", kind="command", source="mqtt", ref=ref, budgeted=True,
                          t=T0 + 2, wall=WALL + 2)
    assert _types(list(first.value.actions)) == [EventType.SECURITY_OPEN_BUDGET]
    assert _saves(list(first.value.actions)) == ["open_budget"]
    with pytest.raises(OpenBudgetSpent) as second:
        bank.request_open("2", kind="command", source="mqtt", ref=ref, budgeted=True,
                          t=T0 + 3, wall=WALL + 3)
    assert _types(list(second.value.actions)) == []  # one report an hour
    assert bank.open_budget.used(WALL + 3) == 1  # refusals are not counted

    override = bank.request_open("2", kind="command", source="mqtt", ref=ref, budgeted=True,
                                 override=True, t=T0 + 4, wall=WALL + 4)
    pulse = next(a for a in override if isinstance(a, Record))
    assert pulse.data["open_budget"] == "override"
    assert bank.open_budget.used(WALL + 4) == 2


@pytest.mark.parametrize(
    ("cid", "prepare", "message"),
    [
        ("9", None, "no compartment '9'"),
        ("1", "out", "out of service"),
        ("1", "busy", "busy"),
    ],
)
def test_a_request_the_bank_cannot_do_now_is_refused(cid: str, prepare: str | None,
                                                     message: str) -> None:
    bank = _bank(per_hour=5)
    if prepare == "out":
        bank.set_service("1", False, "broken", t=T0)
    elif prepare == "busy":
        bank.request_open("1", kind="console", source="console", ref={}, t=T0, wall=WALL)
    used = bank.open_budget.used(WALL)
    with pytest.raises(RequestRefused, match=message):
        bank.request_open(cid, kind="console", source="console", ref={}, budgeted=True,
                          t=T0, wall=WALL)
    assert bank.open_budget.used(WALL) == used


def test_door_and_sensor_reports_for_unknown_compartments_change_nothing() -> None:
    bank = _bank()
    for actions in (bank.door("9", DoorState.OPEN, t=T0), bank.occupancy("9", True, t=T0),
                    bank.door("1", DoorState.UNKNOWN, t=T0)):
        assert all(isinstance(a, Log) for a in actions)
    assert all(c.view().idle for c in bank.compartments.values())


# -- the event types ------------------------------------------------------------------------


def test_event_types_are_their_wire_names_with_an_outbox_class() -> None:
    assert str(EventType.PICKUP_OPENED) == "pickup.opened"
    assert "pickup.opened" in {EventType.PICKUP_OPENED}  # equal to, and hashed as, its name
    assert outbox_class("door.opened") is OutboxClass.TELEMETRY
    assert outbox_class("hardware.fault") is OutboxClass.FAULT
    assert outbox_class("pickup.completed") is OutboxClass.ACCESS
    # A type this daemon does not know is never shed.
    assert outbox_class("something.new") is OutboxClass.ACCESS
    assert {t for t in EventType if t.consumes_use} == {
        EventType.PICKUP_COMPLETED, EventType.DEPOSIT_CONFIRMED}
