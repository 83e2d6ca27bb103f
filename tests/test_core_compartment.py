"""Compartment lifecycle and pickup flow: table tests of each path, and properties of the
safety rules (event before pulse; a use consumed only when the door was seen open; a jam never
consumes)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockerd.core import messages
from lockerd.core.actions import Action, Pulse, Record, Show
from lockerd.core.compartment import MAX_ATTEMPTS, Access, Compartment, DoorTimings, Phase

pytestmark = pytest.mark.unit

TIMINGS = DoorTimings(open_timeout_s=5.0, held_open_after_s=60.0, show_result_s=4.0)
ACCESS = Access(code_id="c-1", digest="d-1", kind="pickup", source="keypad")

PULSE = "PULSE"
SHOW = "SHOW"


def make(**kwargs: Any) -> Compartment:
    kwargs.setdefault("occupied", True)
    return Compartment("3", timings=TIMINGS, **kwargs)


def shape(actions: Sequence[Action]) -> list[str]:
    """The action list as record types, PULSE and SHOW, in order."""
    out: list[str] = []
    for a in actions:
        match a:
            case Record(type=t):
                out.append(t)
            case Pulse():
                out.append(PULSE)
            case Show():
                out.append(SHOW)
    return out


def delta(record: Record) -> int:
    """The use change a record commits with its event: +1 taken, -1 given back, 0 none."""
    return 0 if record.use is None else record.use.delta


def used_digest(record: Record) -> str | None:
    return None if record.use is None else record.use.digest


def records(actions: Sequence[Action], type_: str | None = None) -> list[Record]:
    return [a for a in actions if isinstance(a, Record) and (type_ is None or a.type == type_)]


def one(actions: Sequence[Action], type_: str) -> Record:
    found = records(actions, type_)
    assert len(found) == 1, shape(actions)
    return found[0]


def apply(comp: Compartment, step: tuple[Any, ...]) -> list[Action]:
    match step:
        case ("begin", t):
            return comp.begin_access(ACCESS, t)
        case ("open", t):
            return comp.door_changed(True, t)
        case ("close", t):
            return comp.door_changed(False, t)
        case ("occupied", value):
            return comp.occupancy_changed(value)
        case ("tick", t):
            return comp.tick(t)
        case ("service", value):
            return comp.set_service(value, "technician")
    raise AssertionError(f"unknown step {step!r}")


# -- table: each flow is a list of (input, expected action shape) -----------------------------

BEGIN = ["lock.pulse", PULSE, SHOW]
OPENED = ["door.opened", "pickup.opened", SHOW]
RETRY = ["lock.pulse", PULSE]
JAMMED = ["door.jammed", "compartment.out_of_service", SHOW]

FLOWS: dict[str, list[tuple[tuple[Any, ...], list[str]]]] = {
    "pickup-completed": [
        (("begin", 0.0), BEGIN),
        (("open", 1.0), OPENED),
        (("occupied", False), []),
        (("close", 20.0), ["door.closed", "pickup.completed", SHOW]),
    ],
    "pickup-completed-occupancy-unknown": [
        (("occupied", None), []),
        (("begin", 0.0), BEGIN),
        (("open", 1.0), OPENED),
        (("close", 20.0), ["door.closed", "pickup.completed", SHOW]),
    ],
    "parcel-left-inside": [
        (("begin", 0.0), BEGIN),
        (("open", 1.0), OPENED),
        (("close", 20.0), ["door.closed", "pickup.incomplete", SHOW]),
    ],
    "opens-after-retry": [
        (("begin", 0.0), BEGIN),
        (("tick", 4.99), []),
        (("tick", 5.0), RETRY),
        (("tick", 9.0), []),
        (("open", 9.5), OPENED),
        (("tick", 10.0), []),  # the second deadline has no meaning once open
        (("occupied", False), []),
        (("close", 30.0), ["door.closed", "pickup.completed", SHOW]),
    ],
    "jammed": [
        (("begin", 0.0), BEGIN),
        (("tick", 5.0), RETRY),
        (("tick", 9.99), []),
        (("tick", 10.0), JAMMED),
        (("tick", 100.0), []),
    ],
    "jammed-late-ticks": [
        (("begin", 0.0), BEGIN),
        (("tick", 50.0), RETRY),  # a late tick still retries once, with a fresh deadline
        (("tick", 54.0), []),
        (("tick", 55.0), JAMMED),
    ],
    "closed-reading-while-unlocking-is-ignored": [
        (("begin", 0.0), BEGIN),
        (("close", 1.0), []),
        (("open", 2.0), OPENED),
    ],
    "forced-open": [
        (("open", 3.0), ["door.opened", "door.forced"]),
        (("open", 4.0), []),
        (("close", 5.0), ["door.closed"]),
    ],
    "repeated-open-reading-is-one-opening": [
        (("begin", 0.0), BEGIN),
        (("open", 1.0), OPENED),
        (("open", 2.0), []),
        (("close", 3.0), ["door.closed", "pickup.incomplete", SHOW]),
        (("close", 4.0), []),
    ],
    "held-open-once": [
        (("begin", 0.0), BEGIN),
        (("open", 1.0), OPENED),
        (("tick", 60.9), []),
        (("tick", 61.0), ["door.held_open", SHOW]),
        (("tick", 62.0), []),
        (("tick", 500.0), []),
        (("occupied", False), []),
        (("close", 600.0), ["door.closed", "pickup.completed", SHOW]),
    ],
    "held-open-again-on-the-next-opening": [
        (("open", 0.0), ["door.opened", "door.forced"]),
        (("tick", 60.0), ["door.held_open", SHOW]),
        (("close", 70.0), ["door.closed"]),
        (("tick", 200.0), []),
        (("open", 300.0), ["door.opened", "door.forced"]),
        (("tick", 359.0), []),
        (("tick", 360.0), ["door.held_open", SHOW]),
        (("tick", 420.0), []),
    ],
    "second-pickup-after-incomplete": [
        (("begin", 0.0), BEGIN),
        (("open", 1.0), OPENED),
        (("close", 2.0), ["door.closed", "pickup.incomplete", SHOW]),
        (("begin", 10.0), BEGIN),
        (("open", 11.0), OPENED),
        (("occupied", False), []),
        (("close", 12.0), ["door.closed", "pickup.completed", SHOW]),
    ],
    "service-round-trip": [
        (("service", True), []),
        (("service", False), ["compartment.out_of_service"]),
        (("service", False), []),
        (("service", True), ["compartment.in_service"]),
        (("begin", 0.0), BEGIN),
    ],
    "back-in-service-after-jam": [
        (("begin", 0.0), BEGIN),
        (("tick", 5.0), RETRY),
        (("tick", 10.0), JAMMED),
        (("service", True), ["compartment.in_service"]),
        (("begin", 20.0), BEGIN),
        (("open", 21.0), OPENED),
    ],
}


@pytest.mark.parametrize("flow", list(FLOWS), ids=list(FLOWS))
def test_flow(flow: str) -> None:
    comp = make()
    for i, (step, expected) in enumerate(FLOWS[flow]):
        got = shape(apply(comp, step))
        assert got == expected, f"step {i} {step}"


# -- details of each transition ---------------------------------------------------------------


def test_begin_access_records_before_it_pulses() -> None:
    comp = make()
    actions = comp.begin_access(ACCESS, 0.0)
    assert isinstance(actions[0], Record)
    assert actions[0].type == "lock.pulse"
    assert actions[1] == Pulse("3")
    rec = actions[0]
    assert rec.compartment == "3"
    assert rec.code_id == "c-1"
    assert delta(rec) == 0
    assert rec.data == {"attempt": 1, "kind": "pickup", "source": "keypad"}
    assert actions[2] == Show(messages.opening("3"))
    assert comp.phase is Phase.UNLOCKING
    assert comp.access == ACCESS
    assert comp.deadline() == 5.0
    assert not comp.view().idle


def test_door_seen_open_consumes_one_use() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    actions = comp.door_changed(True, 2.0)
    opened = one(actions, "door.opened")
    pickup = one(actions, "pickup.opened")
    assert actions.index(opened) < actions.index(pickup)
    assert delta(opened) == 0
    assert opened.code_id == "c-1"
    assert delta(pickup) == 1
    assert used_digest(pickup) == "d-1"
    assert pickup.code_id == "c-1"
    assert pickup.data == {"attempt": 1, "source": "keypad"}
    assert Pulse("3") not in actions
    assert comp.phase is Phase.OPEN
    assert comp.door_open
    assert comp.deadline() == 2.0 + TIMINGS.held_open_after_s


def test_close_with_parcel_gone_completes_without_touching_the_use() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    comp.door_changed(True, 1.0)
    comp.occupancy_changed(False)
    actions = comp.door_changed(False, 9.0)
    assert one(actions, "door.closed").code_id == "c-1"
    done = one(actions, "pickup.completed")
    assert delta(done) == 0
    assert done.data == {"occupancy_known": True}
    assert Show(messages.pickup_done("3"), hold_s=TIMINGS.show_result_s) in actions
    assert comp.phase is Phase.LOCKED
    assert comp.access is None
    assert comp.view().idle


def test_close_with_parcel_inside_gives_the_use_back() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    comp.door_changed(True, 1.0)
    actions = comp.door_changed(False, 9.0)
    back = one(actions, "pickup.incomplete")
    assert delta(back) == -1
    assert used_digest(back) == "d-1"
    assert back.code_id == "c-1"
    assert records(actions, "pickup.completed") == []
    assert Show(messages.pickup_incomplete("3"), hold_s=TIMINGS.show_result_s) in actions
    assert comp.phase is Phase.LOCKED
    assert comp.access is None


def test_no_open_by_the_deadline_retries_once() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    actions = comp.tick(5.0)
    assert shape(actions) == ["lock.pulse", PULSE]
    assert one(actions, "lock.pulse").data["attempt"] == 2
    assert actions[1] == Pulse("3")
    assert comp.attempt == 2
    assert comp.phase is Phase.UNLOCKING
    assert comp.deadline() == 10.0


def test_no_open_by_the_second_deadline_is_a_jam_that_consumes_nothing() -> None:
    comp = make()
    log = comp.begin_access(ACCESS, 0.0)
    log += comp.tick(5.0)
    jam = comp.tick(10.0)
    log += jam
    assert shape(jam) == JAMMED
    jammed = one(jam, "door.jammed")
    assert jammed.code_id == "c-1"
    assert jammed.data == {"attempts": MAX_ATTEMPTS, "kind": "pickup", "code_still_valid": True}
    assert one(jam, "compartment.out_of_service").data == {"reason": "jammed"}
    assert Show(messages.jammed("3"), hold_s=TIMINGS.show_result_s) in jam
    assert [r for r in records(log) if delta(r) != 0] == []
    assert sum(isinstance(a, Pulse) for a in log) == MAX_ATTEMPTS == 2
    assert comp.in_service is False
    assert comp.service_reason == "jammed"
    assert comp.phase is Phase.LOCKED
    assert comp.access is None
    assert comp.deadline() is None
    assert not comp.view().in_service


def test_door_opened_without_an_access_is_forced() -> None:
    comp = make()
    actions = comp.door_changed(True, 1.0)
    assert shape(actions) == ["door.opened", "door.forced"]
    assert all(delta(r) == 0 and r.code_id is None for r in records(actions))
    assert one(actions, "door.forced").data == {"in_service": True}
    assert comp.phase is Phase.OPEN
    closed = comp.door_changed(False, 2.0)
    assert shape(closed) == ["door.closed"]
    assert one(closed, "door.closed").code_id is None


def test_door_opening_late_after_a_jam_is_forced_and_consumes_nothing() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    comp.tick(5.0)
    comp.tick(10.0)
    late = comp.door_changed(True, 11.0)
    assert shape(late) == ["door.opened", "door.forced"]
    assert one(late, "door.forced").data == {"in_service": False}
    closed = comp.door_changed(False, 12.0)
    assert shape(closed) == ["door.closed"]
    assert all(delta(r) == 0 for r in records(late + closed))


def test_held_open_is_reported_once_per_opening() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    comp.door_changed(True, 1.0)
    ticks = [comp.tick(float(t)) for t in range(2, 300)]
    held = [r for actions in ticks for r in records(actions, "door.held_open")]
    assert len(held) == 1
    assert held[0].data == {"after_s": TIMINGS.held_open_after_s}
    assert delta(held[0]) == 0
    assert comp.deadline() is None
    assert comp.phase is Phase.OPEN  # reporting it does not change the door's state


def test_set_service_round_trip() -> None:
    comp = make()
    out = comp.set_service(False, "maintenance")
    assert one(out, "compartment.out_of_service").data == {"reason": "maintenance"}
    assert comp.in_service is False
    assert comp.service_reason == "maintenance"
    assert not comp.view().in_service
    with pytest.raises(ValueError):
        comp.begin_access(ACCESS, 0.0)
    back = comp.set_service(True, "repaired")
    assert one(back, "compartment.in_service").data == {"reason": "repaired"}
    assert comp.in_service is True
    assert comp.service_reason == ""
    assert comp.set_service(True, "again") == []
    assert shape(comp.begin_access(ACCESS, 1.0)) == BEGIN


def test_configured_out_of_service() -> None:
    comp = make(in_service=False)
    assert comp.service_reason == "configured"
    with pytest.raises(ValueError):
        comp.begin_access(ACCESS, 0.0)


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param([("begin", 0.0)], id="unlocking"),
        pytest.param([("begin", 0.0), ("open", 1.0)], id="open-for-pickup"),
        pytest.param([("open", 1.0)], id="forced-open"),
        pytest.param([("service", False)], id="out-of-service"),
        pytest.param([("begin", 0.0), ("tick", 5.0), ("tick", 10.0)], id="jammed"),
    ],
)
def test_begin_access_refused_when_not_locked_or_out_of_service(
    setup: list[tuple[Any, ...]],
) -> None:
    comp = make()
    for step in setup:
        apply(comp, step)
    phase, access, attempt = comp.phase, comp.access, comp.attempt
    with pytest.raises(ValueError, match="3"):
        comp.begin_access(Access("c-2", "d-2", "pickup", "scanner"), 20.0)
    # A refused start changes nothing.
    assert (comp.phase, comp.access, comp.attempt) == (phase, access, attempt)


@pytest.mark.parametrize(
    ("door_open", "occupied", "phase"),
    [
        (True, True, Phase.OPEN),
        (True, None, Phase.OPEN),
        (False, False, Phase.LOCKED),
        (False, None, Phase.LOCKED),
    ],
)
def test_observe_initial(door_open: bool, occupied: bool | None, phase: Phase) -> None:
    comp = make(occupied=None)
    comp.observe_initial(door_open=door_open, occupied=occupied, t=100.0)
    assert comp.phase is phase
    assert comp.occupied is occupied
    assert comp.door_open is door_open
    if door_open:
        # A door found open at startup is a held-open door, reported once, not a forced one.
        assert comp.deadline() == 100.0 + TIMINGS.held_open_after_s
        assert shape(comp.tick(160.0)) == ["door.held_open", SHOW]
        assert shape(comp.door_changed(True, 161.0)) == []
        closed = comp.door_changed(False, 170.0)
        assert shape(closed) == ["door.closed"]
        assert one(closed, "door.closed").code_id is None
    else:
        assert comp.deadline() is None
        assert comp.tick(1000.0) == []
        assert shape(comp.begin_access(ACCESS, 1000.0)) == BEGIN


def test_observe_initial_closed_after_open() -> None:
    comp = make()
    comp.observe_initial(door_open=True, occupied=True, t=0.0)
    comp.observe_initial(door_open=False, occupied=False, t=1.0)
    assert comp.phase is Phase.LOCKED
    assert comp.deadline() is None
    assert comp.occupied is False


def test_records_name_their_compartment() -> None:
    comp = Compartment("B12", timings=TIMINGS, occupied=True)
    log = comp.begin_access(ACCESS, 0.0)
    log += comp.door_changed(True, 1.0)
    log += comp.tick(100.0)
    log += comp.door_changed(False, 101.0)
    assert records(log)
    assert all(r.compartment == "B12" for r in records(log))
    assert [a for a in log if isinstance(a, Pulse)] == [Pulse("B12")]
    assert comp.last_event == "pickup.incomplete"


# -- properties ------------------------------------------------------------------------------

_begin = st.tuples(st.just("begin"), st.floats(min_value=0.0, max_value=3.0))
_door = st.tuples(st.just("door"), st.booleans(), st.floats(min_value=0.0, max_value=3.0))
_occupied = st.tuples(st.just("occupied"), st.booleans())
_tick = st.tuples(st.just("tick"), st.one_of(st.sampled_from([0.0, 5.0, 60.0]),
                                              st.floats(min_value=0.0, max_value=70.0)))
_service = st.tuples(st.just("service"), st.booleans())
# begin and door steps weigh more, so that whole pickups (and their endings) come up often.
steps_st = st.lists(
    st.one_of(_begin, _begin, _door, _door, _door, _occupied, _tick, _tick, _service),
    max_size=60,
)


@dataclass
class Run:
    """One simulated run: every step's actions, and the bookkeeping the properties need."""

    comp: Compartment
    t: float = 0.0
    n: int = 0
    current: Access | None = None  # the access of the latest begin_access
    # Keyed by Access.digest, which is None for a derived code, a QR token or a command.
    net: Counter[str | None] = field(default_factory=Counter)  # use_delta per access digest
    pulses: Counter[str | None] = field(default_factory=Counter)  # Pulse actions per digest
    seen_open_for: set[str | None] = field(default_factory=set)  # digests seen with door open


def check_step(run: Run, step: tuple[Any, ...], actions: list[Action],
               pending: Access | None, phase_before: Phase) -> None:
    # (3) every Pulse is immediately preceded by the lock.pulse Record reporting it.
    for i, a in enumerate(actions):
        if isinstance(a, Pulse):
            assert i > 0, actions
            prev = actions[i - 1]
            assert isinstance(prev, Record), actions
            assert prev.type == "lock.pulse"
            assert prev.compartment == a.compartment
            assert pending is not None or step[0] == "begin"
            access = pending if step[0] != "begin" else run.current
            assert access is not None
            assert prev.code_id == access.code_id
            run.pulses[access.digest] += 1
            # (5) at most two pulses per access.
            assert run.pulses[access.digest] <= MAX_ATTEMPTS

    door_opened_at = [i for i, a in enumerate(actions)
                      if isinstance(a, Record) and a.type == "door.opened"]
    for i, a in enumerate(actions):
        if not isinstance(a, Record) or delta(a) == 0:
            continue
        assert delta(a) in (1, -1), a
        assert used_digest(a) is not None
        if delta(a) == 1:
            # (2) consumed only on a door-open input while an access was pending, after the
            # door.opened record of the same step, for that access.
            assert step[0] == "door" and step[1] is True, (step, actions)
            assert phase_before is Phase.UNLOCKING
            assert pending is not None
            assert used_digest(a) == pending.digest
            assert a.code_id == pending.code_id
            assert any(j < i for j in door_opened_at), actions
            run.seen_open_for.add(used_digest(a))
        else:
            # A use is only given back on a door closing after that very access consumed it.
            assert step[0] == "door" and step[1] is False, (step, actions)
            assert pending is not None and used_digest(a) == pending.digest
            assert used_digest(a) in run.seen_open_for
        run.net[used_digest(a)] += delta(a)
        # (1) per access the net use is 0 or 1, never negative.
        assert run.net[used_digest(a)] in (0, 1), run.net

    for a in records(actions, "door.jammed"):
        # (4) a jam never consumes: the jammed access's net use is 0.
        assert pending is not None and a.code_id == pending.code_id
        assert run.net[pending.digest] == 0
        assert pending.digest not in run.seen_open_for
        assert run.pulses[pending.digest] == MAX_ATTEMPTS
        assert not run.comp.in_service


def do(run: Run, step: tuple[Any, ...]) -> None:
    comp = run.comp
    pending, phase_before = comp.access, comp.phase
    match step:
        case ("begin", dt):
            run.t += dt
            if comp.phase is Phase.LOCKED and comp.in_service:
                run.n += 1
                run.current = Access(f"c-{run.n}", f"d-{run.n}", "pickup", "keypad")
                actions = comp.begin_access(run.current, run.t)
                assert not comp.view().idle
                assert comp.access == run.current
            else:
                with pytest.raises(ValueError):
                    comp.begin_access(Access("x", "dx", "pickup", "keypad"), run.t)
                assert (comp.phase, comp.access) == (phase_before, pending)
                return
        case ("door", is_open, dt):
            run.t += dt
            actions = comp.door_changed(is_open, run.t)
        case ("occupied", value):
            actions = comp.occupancy_changed(value)
        case ("tick", dt):
            run.t += dt
            actions = comp.tick(run.t)
        case ("service", value):
            actions = comp.set_service(value, "technician")
        case _:
            raise AssertionError(step)
    check_step(run, step, actions, pending, phase_before)
    # Overall, the uses consumed are never negative.
    assert sum(run.net.values()) >= 0


@settings(max_examples=400)
@given(steps_st, st.one_of(st.none(), st.booleans()))
def test_pickup_safety_properties(steps: list[tuple[Any, ...]], occupied: bool | None) -> None:
    run = Run(Compartment("3", timings=TIMINGS, occupied=occupied))
    for step in steps:
        do(run, step)
    # Every consumed use belongs to an access whose door was seen open.
    assert {d for d, n in run.net.items() if n} <= run.seen_open_for


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=30))
def test_ticks_alone_never_consume_and_never_pulse_more_than_twice(gaps: list[float]) -> None:
    comp = make()
    log = comp.begin_access(ACCESS, 0.0)
    t = 0.0
    for gap in gaps:
        t += gap
        log += comp.tick(t)
    assert sum(isinstance(a, Pulse) for a in log) <= MAX_ATTEMPTS
    assert all(delta(r) == 0 for r in records(log))
    assert records(log, "pickup.opened") == []
    jams = records(log, "door.jammed")
    assert len(jams) <= 1
    if jams:
        assert sum(isinstance(a, Pulse) for a in log) == MAX_ATTEMPTS
        assert comp.in_service is False


def test_out_of_service_during_unlock_then_jam_keeps_the_technicians_reason() -> None:
    comp = make()
    comp.begin_access(ACCESS, 0.0)
    first = comp.set_service(False, "ticket 81")
    assert shape(first) == ["compartment.out_of_service"]
    actions = comp.tick(TIMINGS.open_timeout_s) + comp.tick(2 * TIMINGS.open_timeout_s)
    assert "door.jammed" in shape(actions)
    assert "compartment.out_of_service" not in shape(actions)
    assert comp.service_reason == "ticket 81"
    assert all(delta(r) == 0 for r in records(actions))


def test_an_open_for_a_command_consumes_nothing_and_names_the_command() -> None:
    comp = make()
    cmd = Access(code_id=None, digest=None, kind="command", source="mqtt",
                 ref={"cmd_id": "c-9"})
    actions = comp.begin_access(cmd, 0.0)
    assert shape(actions)[:2] == ["lock.pulse", PULSE]
    assert one(actions, "lock.pulse").data["cmd_id"] == "c-9"
    opened = comp.door_changed(True, 1.0)
    assert "pickup.opened" not in shape(opened)
    assert one(opened, "door.opened").data == {"kind": "command", "cmd_id": "c-9"}
    closed = comp.door_changed(False, 2.0)
    assert shape(closed) == ["door.closed"]
    assert all(delta(r) == 0 for r in records(actions + opened + closed))


def test_a_jammed_command_open_says_nothing_about_codes() -> None:
    comp = make()
    comp.begin_access(Access(None, None, "selftest", "mqtt", {"cmd_id": "c-1"}), 0.0)
    actions = comp.tick(TIMINGS.open_timeout_s) + comp.tick(2 * TIMINGS.open_timeout_s)
    jam = one(actions, "door.jammed")
    assert "code_still_valid" not in jam.data and jam.data["cmd_id"] == "c-1"
