"""Deposits in the pure core: size assignment, the deposit session, and the compartment's
deposit path (confirmed only on a parcel seen, aborted when empty, a jam uses nothing)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockerd.core import messages
from lockerd.core.access import CompartmentView, Reason
from lockerd.core.actions import Action, Begin, ParcelIn, Pulse, Record, Show
from lockerd.core.compartment import Access, Compartment, DoorTimings
from lockerd.core.deposit import (
    DepositSession,
    SessionCredential,
    SessionPhase,
    assign,
    is_parcel_id,
)

pytestmark = pytest.mark.unit

SIZES = ("S", "M", "L")
TIMINGS = DoorTimings(open_timeout_s=5.0, held_open_after_s=60.0, show_result_s=4.0)


def free(size: str) -> CompartmentView:
    return CompartmentView(in_service=True, idle=True, occupied=False, size=size)


def records(actions: Sequence[Action], type_: str | None = None) -> list[Record]:
    return [a for a in actions if isinstance(a, Record) and (type_ is None or a.type == type_)]


# -- assignment -------------------------------------------------------------------------------

BANK = {
    "1": free("S"),
    "2": CompartmentView(in_service=True, idle=True, occupied=True, size="S"),
    "3": CompartmentView(in_service=False, idle=True, occupied=False, size="M"),
    "4": CompartmentView(in_service=True, idle=False, occupied=False, size="M"),
    "5": CompartmentView(in_service=True, idle=True, occupied=False, size="M", parcel_id="P"),
    "6": CompartmentView(in_service=True, idle=True, occupied=None, size="M"),
    "7": free("L"),
    "8": free("M"),
}


@pytest.mark.parametrize(
    ("size", "named", "expected"),
    [
        pytest.param("S", None, "1", id="smallest-free"),
        pytest.param("M", None, "8", id="skips-out-of-service-busy-on-record-unknown"),
        pytest.param("L", None, "7", id="large"),
        pytest.param(None, None, "1", id="any-size"),
        pytest.param(None, "7", "7", id="named"),
        pytest.param(None, "2", Reason.OCCUPIED, id="named-occupied"),
        pytest.param(None, "3", Reason.OUT_OF_SERVICE, id="named-out-of-service"),
        pytest.param(None, "4", Reason.BUSY, id="named-busy"),
        pytest.param(None, "5", Reason.OCCUPIED, id="named-parcel-on-record"),
        pytest.param(None, "6", Reason.OCCUPANCY_UNKNOWN, id="named-sensor-unknown"),
        pytest.param(None, "99", Reason.NO_COMPARTMENT, id="named-unknown"),
    ],
)
def test_assign(size: str | None, named: str | None, expected: object) -> None:
    assert assign(BANK, SIZES, size=size, named=named) == expected


def test_assign_says_no_free_compartment_when_nothing_fits() -> None:
    bank = {"1": free("S"), "2": free("M")}
    assert assign(bank, SIZES, size="L") is Reason.NO_FREE
    assert assign({}, SIZES, size="S") is Reason.NO_FREE


def test_assign_goes_up_a_size_when_the_chosen_one_is_full() -> None:
    bank = {"1": free("L"), "2": CompartmentView(True, True, True, size="M"), "3": free("S")}
    assert assign(bank, SIZES, size="M") == "1"


views_strategy = st.dictionaries(
    st.sampled_from([str(i) for i in range(1, 9)]),
    st.builds(CompartmentView, in_service=st.booleans(), idle=st.booleans(),
              occupied=st.one_of(st.none(), st.booleans()), size=st.sampled_from(SIZES),
              parcel_id=st.one_of(st.none(), st.just("P"))),
    max_size=8,
)


@given(views=views_strategy, size=st.sampled_from(SIZES))
def test_assign_never_picks_a_compartment_that_cannot_take_the_parcel(
    views: dict[str, CompartmentView], size: str,
) -> None:
    chosen = assign(views, SIZES, size=size)
    fitting = {c for c, v in views.items()
               if v.free and v.size is not None and SIZES.index(v.size) >= SIZES.index(size)}
    if isinstance(chosen, Reason):
        assert chosen is Reason.NO_FREE
        assert fitting == set()
        return
    assert chosen in fitting
    view = views[chosen]
    assert view.in_service and view.idle and view.occupied is False and view.parcel_id is None
    chosen_size = views[chosen].size
    assert chosen_size is not None
    # No smaller fitting compartment was passed over.
    assert all(SIZES.index(chosen_size) <= SIZES.index(views[c].size or "L") for c in fitting)


@pytest.mark.parametrize("text", ["PX-1", "a", "A" * 64, "00123", "x/y:z"])
def test_parcel_labels(text: str) -> None:
    assert is_parcel_id(text)


@pytest.mark.parametrize("text", ["", "A" * 65, "has space", "tab\t", "é", "\x00"])
def test_not_parcel_labels(text: str) -> None:
    assert not is_parcel_id(text)


# -- the session ------------------------------------------------------------------------------

COURIER = SessionCredential(kind="courier", source="keypad", code_id="c-1", digest="d1")
DROP = SessionCredential(kind="deposit", source="keypad", code_id="d-1", digest="d2")


def session(cred: SessionCredential = COURIER, **kw: float) -> DepositSession:
    return DepositSession(cred, sizes=SIZES, idle_timeout_s=kw.get("idle", 30.0), t=0.0)


def begun(actions: Sequence[Action]) -> Begin:
    found = [a for a in actions if isinstance(a, Begin)]
    assert len(found) == 1, actions
    return found[0]


def phase_of(s: DepositSession) -> SessionPhase:
    # Read through a call: mypy would keep `s.phase` narrowed by an earlier `is` assertion
    # even after a method has moved the session on.
    return s.phase


def test_courier_session_label_then_size_then_door() -> None:
    s = session()
    start = s.start(BANK, 0.0)
    assert records(start)[0].type == "session.started"
    assert Show(messages.scan_label(0)) in start
    assert phase_of(s) is SessionPhase.LABEL
    assert s.label("PX-1", BANK, 1.0) == [Show(messages.choose_size("PX-1", SIZES))]
    assert phase_of(s) is SessionPhase.SIZE
    b = begun(s.key("2", BANK, 2.0))
    assert b.compartment == "8"
    assert b.access.parcel_id == "PX-1"
    assert (b.access.kind, b.access.code_id, b.access.consumes) == ("courier", "c-1", True)
    assert b.access.returnable is False
    assert phase_of(s) is SessionPhase.DOOR
    # While the door is in progress keys and scans do nothing and no timeout runs.
    assert s.key("*", BANK, 3.0) == []
    assert s.label("PX-2", BANK, 3.0) == []
    assert s.deadline() is None
    s.door_opened("8")
    assert s.finished("8", "confirmed", 10.0) == []
    assert (s.phase, s.deposits, s.parcel_id) == (SessionPhase.LABEL, 1, None)
    s.label("PX-2", BANK, 11.0)
    second = begun(s.key("1", BANK, 12.0))
    assert second.access.consumes is False, "one use per session"
    assert s.key("*", BANK, 13.0) == [], "still at the door: * waits for it to close"
    s.finished(second.compartment, "aborted", 14.0)
    end = s.key("*", BANK, 15.0)
    rec = records(end, "session.ended")[0]
    assert rec.data["reason"] == "ended_by_user"
    assert rec.data["deposits"] == 1
    assert s.ended


def test_session_ends_after_idle_time_but_not_before() -> None:
    s = session(idle=30.0)
    s.start(BANK, 0.0)
    assert s.tick(29.9) == []
    s.label("PX-1", BANK, 20.0)  # any input restarts the clock
    assert s.tick(49.0) == []
    ended = records(s.tick(50.0), "session.ended")
    assert ended[0].data["reason"] == "timeout"
    assert ended[0].data["credential_used"] is False


def test_drop_off_code_with_parcel_and_compartment_opens_at_once_and_ends_after_one() -> None:
    s = session(SessionCredential(kind="deposit", source="scanner", cti="ab" * 8,
                                  cti_expires=99, parcel_id="PX-9", compartment="7"))
    b = begun(s.start(BANK, 0.0))
    assert (b.compartment, b.access.parcel_id, b.access.cti) == ("7", "PX-9", "ab" * 8)
    assert b.access.ref == {"cti": "ab" * 8}
    assert b.access.returnable is True
    out = s.finished("7", "confirmed", 1.0)
    assert records(out, "session.ended")[0].data["reason"] == "confirmed"
    assert not any(isinstance(a, Show) for a in out), "the compartment shows the result"


def test_drop_off_code_naming_a_full_compartment_ends_without_opening() -> None:
    s = session(SessionCredential(kind="deposit", source="keypad", code_id="d-1",
                                  parcel_id="PX-9", compartment="2"))
    out = s.start(BANK, 0.0)
    assert not any(isinstance(a, Begin) for a in out)
    assert records(out, "deposit.refused")[0].data["reason"] == "occupied"
    assert s.ended


def test_no_fit_keeps_the_session_and_asks_again() -> None:
    bank = {"1": free("S")}
    s = session()
    s.start(bank, 0.0)
    s.label("PX-1", bank, 0.0)
    out = s.key("3", bank, 1.0)
    assert records(out, "deposit.refused")[0].data == {
        "kind": "courier", "source": "keypad", "reason": "no_free_compartment",
        "parcel_id": "PX-1", "size": "L"}
    assert Show(messages.no_free_door("L"), hold_s=4.0) in out
    assert s.phase is SessionPhase.SIZE
    assert begun(s.key("1", bank, 2.0)).compartment == "1"


def test_a_jam_sends_the_courier_back_to_the_size_choice() -> None:
    s = session(DROP)
    s.start(BANK, 0.0)
    s.label("PX-1", BANK, 0.0)
    first = begun(s.key("1", BANK, 1.0))
    assert s.finished(first.compartment, "jammed", 2.0) == []
    assert s.phase is SessionPhase.SIZE and not s.ended
    again = begun(s.key("1", BANK, 3.0))
    assert again.access.consumes is True, "nothing was used by the jammed door"


def test_labels_refused_in_a_session() -> None:
    s = session()
    s.start(BANK, 0.0)
    bad = s.label("not a label", BANK, 1.0)
    assert bad == [Show(messages.label_refused(Reason.BAD_LABEL), hold_s=3.0)]
    token = s.label("LK1:ABC", BANK, 1.0)
    assert token == bad
    here = s.label("P", BANK, 1.0)  # compartment 5 holds parcel P
    assert records(here, "deposit.refused")[0].data["reason"] == "parcel_already_here"
    assert s.phase is SessionPhase.LABEL


def test_one_size_skips_the_size_prompt() -> None:
    s = DepositSession(COURIER, sizes=("M",), idle_timeout_s=5.0, t=0.0)
    s.start({"1": free("M")}, 0.0)
    assert begun(s.label("PX-1", {"1": free("M")}, 1.0)).compartment == "1"


# -- the compartment's deposit path ----------------------------------------------------------

DEPOSIT = Access(code_id="d-1", digest="dg", kind="deposit", source="keypad", parcel_id="PX-1")


def opened_for(access: Access, *, occupied: bool | None = False) -> tuple[Compartment, Record]:
    comp = Compartment("4", timings=TIMINGS, occupied=occupied, size="M")
    actions = comp.begin_access(access, 0.0)
    assert [a for a in actions if isinstance(a, Pulse)] == [Pulse("4")]
    assert records(actions)[0].use is None, "the pulse uses nothing"
    actions = comp.door_changed(True, 0.1)
    assert records(actions, "door.opened")[0].use is None, "door.opened is telemetry"
    opened = records(actions, "deposit.opened")[0]
    return comp, opened


def test_deposit_uses_the_code_when_the_door_is_seen_open() -> None:
    _, opened = opened_for(DEPOSIT)
    assert opened.use is not None
    assert (opened.use.delta, opened.use.code_id, opened.use.digest) == (1, "d-1", "dg")
    assert opened.data["parcel_id"] == "PX-1"


def test_deposit_confirmed_only_with_the_parcel_seen() -> None:
    comp, _ = opened_for(DEPOSIT)
    comp.occupancy_changed(True)
    closed = comp.door_changed(False, 1.0)
    confirmed = records(closed, "deposit.confirmed")[0]
    assert confirmed.parcel == ParcelIn("PX-1", "d-1")
    assert confirmed.use is None
    assert comp.parcel_id == "PX-1"
    assert not comp.view().free


def test_deposit_closed_empty_is_aborted_and_gives_the_use_back() -> None:
    comp, _ = opened_for(DEPOSIT)
    closed = comp.door_changed(False, 1.0)
    assert records(closed, "deposit.confirmed") == []
    aborted = records(closed, "deposit.aborted")[0]
    assert aborted.data["reason"] == "empty"
    assert aborted.use is not None and aborted.use.delta == -1
    assert comp.parcel_id is None and comp.view().free


def test_courier_door_closed_empty_keeps_the_session_use() -> None:
    access = Access(code_id="c-1", digest="dg", kind="courier", source="keypad",
                    parcel_id="PX-1", returnable=False)
    comp, _ = opened_for(access)
    aborted = records(comp.door_changed(False, 1.0), "deposit.aborted")[0]
    assert aborted.use is None
    assert aborted.data["use_returned"] is False


def test_deposit_with_occupancy_unknown_blocks_the_compartment() -> None:
    comp, _ = opened_for(DEPOSIT)
    comp.occupied = None  # the sensor stopped knowing while the door was open
    closed = comp.door_changed(False, 1.0)
    assert records(closed, "deposit.aborted")[0].data["reason"] == "occupancy_unknown"
    assert records(closed, "compartment.out_of_service")[0].data["reason"] == "occupancy_unknown"
    assert not comp.in_service


def test_later_doors_of_a_session_use_nothing() -> None:
    access = Access(code_id="c-1", digest="dg", kind="courier", source="keypad",
                    parcel_id="PX-2", consumes=False, returnable=False)
    _, opened = opened_for(access)
    assert opened.use is None


def test_qr_token_use_is_its_cti() -> None:
    access = Access(code_id=None, digest=None, kind="pickup", source="scanner",
                    ref={"cti": "00" * 8}, cti="00" * 8, cti_expires=1234)
    comp = Compartment("4", timings=TIMINGS, occupied=True)
    comp.begin_access(access, 0.0)
    opened = records(comp.door_changed(True, 0.1), "pickup.opened")[0]
    assert opened.use is not None
    assert (opened.use.cti, opened.use.expires, opened.use.delta) == ("00" * 8, 1234, 1)
    assert opened.data["cti"] == "00" * 8
    back = records(comp.door_changed(False, 1.0), "pickup.incomplete")[0]
    assert back.use is not None and back.use.delta == -1


def test_pickup_completed_takes_the_parcel_off_the_record() -> None:
    comp = Compartment("4", timings=TIMINGS, occupied=True, parcel_id="PX-1")
    access = Access(code_id="derived:PX-1", digest=None, kind="pickup", source="keypad",
                    parcel_id="PX-1")
    comp.begin_access(access, 0.0)
    opened = records(comp.door_changed(True, 0.1), "pickup.opened")[0]
    assert opened.use is None, "a derived code has no count: the parcel leaving ends it"
    comp.occupancy_changed(False)
    done = records(comp.door_changed(False, 1.0), "pickup.completed")[0]
    assert done.parcel is not None
    assert comp.parcel_id is None


def test_technician_emptying_a_compartment_removes_its_parcel() -> None:
    comp = Compartment("4", timings=TIMINGS, occupied=True, parcel_id="PX-1")
    comp.begin_access(Access(code_id=None, digest=None, kind="console", source="console",
                             ref={"tech_id": "t-1"}), 0.0)
    comp.door_changed(True, 0.1)
    comp.occupancy_changed(False)
    removed = records(comp.door_changed(False, 1.0), "parcel.removed")[0]
    assert removed.data == {"parcel_id": "PX-1", "kind": "console", "tech_id": "t-1"}
    assert comp.parcel_id is None
