"""The guided retry after a jam (PROTOCOL section 15), in the pure bank: `#` on an empty entry
in the window pulses once more for the same credential; the window's end, or the guided pulse
failing too, puts the compartment out of service; no use without the door seen open."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hal.values import DoorState
from lockerd.core import messages
from lockerd.core.actions import Action, Pulse, Record, Show
from lockerd.core.bank import Bank, BankAction, OpenPickup, RequestRefused, Resolve, StartSession
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings, Phase
from lockerd.core.credential import Access
from lockerd.core.deposit import SessionCredential
from lockerd.core.entry import CodeEntry
from lockerd.core.events import EventType
from lockerd.core.lockout import Lockout, RateLimiter

pytestmark = pytest.mark.unit

T0 = 1000.0
WALL = 1_800_000_000.0
OPEN_TIMEOUT = 2.0
WINDOW = 30.0
JAMMED_AT = T0 + 2 * OPEN_TIMEOUT  # the first pulse at T0, the automatic retry, then jammed


def _bank(jam_retry_s: float = WINDOW) -> Bank:
    timings = DoorTimings(open_timeout_s=OPEN_TIMEOUT, held_open_after_s=60.0,
                          show_result_s=3.0, jam_retry_s=jam_retry_s)
    comps = {cid: Compartment(cid, timings=timings, occupied=True, size="M",
                              parcel_id=f"PX-{cid}")
             for cid in ("1", "2", "3")}
    return Bank(
        compartments=comps,
        entry=CodeEntry(timeout_s=10.0, max_digits=12, stuck_key_repeats=20),
        lockout=Lockout(free_attempts=3, base_s=30.0, max_s=3600.0),
        rejections=RateLimiter(per_minute=100),
        open_budget=OpenBudget(per_hour=10),
    )


def _types(actions: list[BankAction]) -> list[str]:
    return [a.type for a in actions if isinstance(a, Record)]


def _uses(actions: list[BankAction]) -> int:
    return sum(a.use.delta for a in actions if isinstance(a, Record) and a.use is not None)


def _jam(bank: Bank, cid: str = "2", *, at: float = T0) -> list[BankAction]:
    """A pickup granted at `at` whose door stays shut through both pulses."""
    access = Access(code_id=f"p-{cid}", digest="d" * 64, kind="pickup", source="keypad",
                    parcel_id=f"PX-{cid}")
    out = bank.decide(OpenPickup(cid, access), source="keypad", t=at, wall=WALL)
    out += bank.tick(at + OPEN_TIMEOUT)  # the automatic retry pulse
    out += bank.tick(at + 2 * OPEN_TIMEOUT)
    return out


def _press(bank: Bank, keys: str, t: float) -> list[BankAction]:
    out: list[BankAction] = []
    for key in keys:
        out += bank.key(key, t=t, wall=WALL)
    return out



def _starts_help(actions: list[BankAction]) -> None:
    """`#` on an empty entry with no guided-retry window open is no retry: it starts help
    (PROTOCOL section 12), which pulses nothing and records nothing."""
    assert not any(isinstance(a, Pulse | Record) for a in actions), actions
    assert [a.message.lines[0] for a in actions if isinstance(a, Show)] == ["Tracking number?"]


def test_a_pickup_jam_offers_the_guided_retry_and_keeps_the_compartment_in_service() -> None:
    bank = _bank()
    jammed = _jam(bank)
    assert _types(jammed) == [EventType.LOCK_PULSE, EventType.LOCK_PULSE, EventType.DOOR_JAMMED]
    record = next(a for a in jammed if isinstance(a, Record) and a.type == EventType.DOOR_JAMMED)
    assert record.data["guided_retry_s"] == WINDOW and record.data["code_still_valid"] is True
    assert Show(messages.jam_retry("2")) in jammed
    comp = bank.compartments["2"]
    assert comp.in_service and comp.phase is Phase.RETRY
    assert comp.retry_window == JAMMED_AT + WINDOW
    assert bank.idle_message() == messages.jam_retry("2")
    # Busy for everything else; a restart now would find it out of service (memory only).
    assert comp.view().idle is False
    assert comp.restart_service_reason == "jammed"
    assert bank.deadline() == JAMMED_AT + WINDOW
    assert _uses(jammed) == 0


def test_hash_in_the_window_pulses_once_more_and_the_door_seen_open_uses_the_code_once() -> None:
    bank = _bank()
    _jam(bank)
    retry = _press(bank, "#", JAMMED_AT + 5)
    assert _types(retry) == [EventType.LOCK_PULSE]
    pulse = next(a for a in retry if isinstance(a, Record))
    assert pulse.data["retry"] == "guided" and pulse.data["attempt"] == 3
    assert pulse.code_id == "p-2"
    assert [a.compartment for a in retry if isinstance(a, Pulse)] == ["2"]
    assert retry.index(pulse) < next(i for i, a in enumerate(retry) if isinstance(a, Pulse))
    assert bank.compartments["2"].restart_service_reason == "jammed"
    # A second `#` before the door reports does not pulse again.
    _starts_help(_press(bank, "#", JAMMED_AT + 5.5))
    opened = bank.door("2", DoorState.OPEN, t=JAMMED_AT + 6)
    assert _types(opened) == [EventType.DOOR_OPENED, EventType.PICKUP_OPENED]
    assert _uses(retry + opened) == 1
    comp = bank.compartments["2"]
    assert comp.in_service and comp.restart_service_reason is None
    assert EventType.COMPARTMENT_OUT_OF_SERVICE not in _types(opened)


def test_a_guided_pulse_that_fails_too_puts_the_compartment_out_of_service() -> None:
    bank = _bank()
    _jam(bank)
    _press(bank, "#", JAMMED_AT + 5)
    failed = bank.tick(JAMMED_AT + 5 + OPEN_TIMEOUT)
    assert _types(failed) == [EventType.DOOR_JAMMED, EventType.COMPARTMENT_OUT_OF_SERVICE]
    jam = next(a for a in failed if isinstance(a, Record))
    assert jam.data["attempts"] == 3 and "guided_retry_s" not in jam.data
    assert jam.data["code_still_valid"] is True
    assert Show(messages.jammed("2"), hold_s=3.0) in failed
    comp = bank.compartments["2"]
    assert not comp.in_service and comp.service_reason == "jammed"
    assert comp.retry_window is None
    assert _uses(failed) == 0
    # No third window: `#` does nothing now.
    _starts_help(_press(bank, "#", JAMMED_AT + 10))


def test_nobody_pressing_hash_in_time_puts_the_compartment_out_of_service() -> None:
    bank = _bank()
    _jam(bank)
    assert bank.tick(JAMMED_AT + WINDOW - 0.01) == []
    ended = bank.tick(JAMMED_AT + WINDOW)
    assert _types(ended) == [EventType.COMPARTMENT_OUT_OF_SERVICE]
    assert next(a for a in ended if isinstance(a, Record)).data == {"reason": "jammed"}
    assert not any(isinstance(a, Pulse) for a in ended)
    assert Show(messages.jammed("2"), hold_s=3.0) in ended
    assert bank.idle_message() == messages.idle()
    # `#` after the window does what `#` on an empty entry does otherwise: nothing here.
    _starts_help(_press(bank, "#", JAMMED_AT + WINDOW + 1))
    assert bank.compartments["2"].restart_service_reason == "jammed"


def test_the_door_opening_by_itself_in_the_window_completes_the_access() -> None:
    bank = _bank()
    _jam(bank)
    opened = bank.door("2", DoorState.OPEN, t=JAMMED_AT + 3)
    assert _types(opened) == [EventType.DOOR_OPENED, EventType.PICKUP_OPENED]
    assert _uses(opened) == 1
    bank.occupancy("2", False, t=JAMMED_AT + 4)
    closed = bank.door("2", DoorState.CLOSED, t=JAMMED_AT + 5)
    assert EventType.PICKUP_COMPLETED in _types(closed)
    assert bank.compartments["2"].in_service
    assert bank.tick(JAMMED_AT + WINDOW + 1) == []


def test_a_closed_reading_in_the_window_changes_nothing() -> None:
    bank = _bank()
    _jam(bank)
    assert bank.door("2", DoorState.CLOSED, t=JAMMED_AT + 1) == []
    assert bank.compartments["2"].phase is Phase.RETRY


def test_other_keys_in_the_window_type_and_submit_codes_as_usual() -> None:
    bank = _bank()
    _jam(bank)
    typed = _press(bank, "12", JAMMED_AT + 1)
    assert _types(typed) == [] and not any(isinstance(a, Pulse) for a in typed)
    # `#` after digits submits them: it is not the retry.
    assert _press(bank, "#", JAMMED_AT + 2) == [Resolve("12", "keypad", token=False)]
    assert _press(bank, "*", JAMMED_AT + 3) == [Show(messages.cleared(), hold_s=3.0)]
    # The window is still open, and `#` on the empty entry is the retry.
    assert _types(_press(bank, "#", JAMMED_AT + 4)) == [EventType.LOCK_PULSE]


def test_a_half_typed_code_that_timed_out_is_not_the_retry() -> None:
    bank = _bank()
    _jam(bank)
    _press(bank, "5", JAMMED_AT + 1)
    assert _press(bank, "#", JAMMED_AT + 12) == [Show(messages.timed_out(), hold_s=3.0)]
    assert bank.compartments["2"].phase is Phase.RETRY


def test_the_compartment_in_its_window_is_busy_for_requests() -> None:
    bank = _bank()
    _jam(bank)
    with pytest.raises(RequestRefused, match="busy"):
        bank.request_open("2", kind="command", source="mqtt", ref={}, t=JAMMED_AT + 1,
                          wall=WALL)


def test_taken_out_of_service_in_the_window_closes_it() -> None:
    bank = _bank()
    _jam(bank)
    out = bank.set_service("2", False, "technician", t=JAMMED_AT + 1)
    assert _types(out) == [EventType.COMPARTMENT_OUT_OF_SERVICE]
    assert bank.compartments["2"].retry_window is None
    _starts_help(_press(bank, "#", JAMMED_AT + 2))
    _press(bank, "*", JAMMED_AT + 2.5)  # the customer leaves help
    assert bank.tick(JAMMED_AT + WINDOW + 1) == []
    assert bank.compartments["2"].service_reason == "technician"


def test_hash_retries_the_door_that_jammed_last() -> None:
    bank = _bank()
    _jam(bank, "1", at=T0)
    _jam(bank, "3", at=T0 + 1)
    retry = _press(bank, "#", T0 + 10)
    assert [a.compartment for a in retry if isinstance(a, Pulse)] == ["3"]
    assert bank.compartments["1"].retry_window is not None
    assert _types(_press(bank, "#", T0 + 11)) == [EventType.LOCK_PULSE]
    assert bank.compartments["1"].retry_window is None


def test_zero_disables_the_guided_retry() -> None:
    bank = _bank(jam_retry_s=0)
    jammed = _jam(bank)
    assert _types(jammed)[-2:] == [EventType.DOOR_JAMMED, EventType.COMPARTMENT_OUT_OF_SERVICE]
    assert "guided_retry_s" not in next(
        a for a in jammed if isinstance(a, Record) and a.type == EventType.DOOR_JAMMED).data
    _starts_help(_press(bank, "#", JAMMED_AT + 1))


def test_a_deposit_door_that_jams_gets_no_guided_retry() -> None:
    bank = _bank()
    for comp in bank.compartments.values():
        comp.occupied, comp.parcel_id = False, None
    credential = SessionCredential(kind="courier", source="keypad", code_id="c-1",
                                   digest="c" * 64)
    bank.decide(StartSession(credential), source="keypad", t=T0, wall=WALL)
    bank.scan("PX-9", t=T0 + 1, wall=WALL)
    opened = bank.key("2", t=T0 + 2, wall=WALL)  # size M: door 1, the first free M
    cid = next(a.compartment for a in opened if isinstance(a, Pulse))
    bank.tick(T0 + 2 + OPEN_TIMEOUT)
    jammed = bank.tick(T0 + 2 + 2 * OPEN_TIMEOUT)
    assert EventType.COMPARTMENT_OUT_OF_SERVICE in _types(jammed)
    assert bank.compartments[cid].retry_window is None


def test_commands_get_no_guided_retry() -> None:
    bank = _bank()
    bank.request_open("2", kind="command", source="mqtt", ref={}, t=T0, wall=WALL)
    bank.tick(T0 + OPEN_TIMEOUT)
    jammed = bank.tick(T0 + 2 * OPEN_TIMEOUT)
    assert _types(jammed)[-2:] == [EventType.DOOR_JAMMED, EventType.COMPARTMENT_OUT_OF_SERVICE]


def test_the_retry_prompt_fits_a_4x20_display_and_reads_on_a_2x16_one() -> None:
    shown = messages.jam_retry("12")
    assert len(shown.lines) <= 4 and all(len(line) <= 20 for line in shown.lines)
    # The first two lines alone say what to do.
    assert all(len(line) <= 16 for line in shown.lines[:2])
    assert "#" in shown.lines[1]


# -- a property of one compartment with the guided retry ------------------------------------

_step = st.one_of(
    st.tuples(st.just("begin"), st.floats(min_value=0.0, max_value=3.0)),
    st.tuples(st.just("door"), st.booleans(), st.floats(min_value=0.0, max_value=3.0)),
    st.tuples(st.just("door"), st.booleans(), st.floats(min_value=0.0, max_value=3.0)),
    st.tuples(st.just("occupied"), st.booleans()),
    st.tuples(st.just("tick"), st.sampled_from([0.5, OPEN_TIMEOUT, WINDOW, 40.0])),
    st.tuples(st.just("tick"), st.sampled_from([0.5, OPEN_TIMEOUT, WINDOW, 40.0])),
    st.tuples(st.just("retry"), st.floats(min_value=0.0, max_value=3.0)),
    st.tuples(st.just("retry"), st.floats(min_value=0.0, max_value=3.0)),
    st.tuples(st.just("service"), st.booleans()),
    st.just(("jam",)),
    st.just(("jam",)),
)
# A pickup whose door stays shut through both pulses, so that windows come up often.
_JAM = [("begin", 0.0), ("tick", OPEN_TIMEOUT), ("tick", OPEN_TIMEOUT)]


def _apply(comp: Compartment, step: tuple[Any, ...], t: float, n: int) -> list[Action]:
    match step:
        case ("begin", _):
            if comp.phase is not Phase.LOCKED or not comp.in_service:
                return []
            return comp.begin_access(
                Access(f"c-{n}", f"d-{n}", "pickup", "keypad"), t)
        case ("door", is_open, _):
            return comp.door_changed(is_open, t)
        case ("occupied", value):
            return comp.occupancy_changed(value)
        case ("tick", _):
            return comp.tick(t)
        case ("retry", _):
            return comp.guided_retry(t)
        case ("service", value):
            return comp.set_service(value, "technician")
    raise AssertionError(step)


@settings(max_examples=300)
@given(st.lists(_step, max_size=50), st.one_of(st.none(), st.booleans()))
def test_no_use_without_the_door_seen_open_and_at_most_one_guided_pulse(
    steps: list[tuple[Any, ...]], occupied: bool | None,
) -> None:
    timings = DoorTimings(open_timeout_s=OPEN_TIMEOUT, held_open_after_s=60.0,
                          show_result_s=3.0, jam_retry_s=WINDOW)
    comp = Compartment("3", timings=timings, occupied=occupied)
    t, n = 0.0, 0
    net: Counter[str | None] = Counter()
    pulses: Counter[str | None] = Counter()
    guided: Counter[str | None] = Counter()
    played = [s for planned in steps for s in (_JAM if planned == ("jam",) else [planned])]
    for step in played:
        t += step[-1] if isinstance(step[-1], float) else 0.0
        n += step[0] == "begin"
        pending, phase_before = comp.access, comp.phase
        actions = _apply(comp, step, t, n)
        access = comp.access if step[0] == "begin" else pending
        for i, action in enumerate(actions):
            if isinstance(action, Pulse):
                report = actions[i - 1]
                assert isinstance(report, Record) and report.type == EventType.LOCK_PULSE
                assert access is not None and report.code_id == access.code_id
                pulses[access.digest] += 1
                if report.data.get("retry") == "guided":
                    # Only the customer's `#` in an open window sends the guided pulse.
                    assert step[0] == "retry" and phase_before is Phase.RETRY
                    guided[access.digest] += 1
                assert pulses[access.digest] <= 3 and guided[access.digest] <= 1
            if isinstance(action, Record) and action.use is not None and action.use.delta:
                if action.use.delta == 1:
                    assert step[:2] == ("door", True), (step, actions)
                    assert phase_before in (Phase.UNLOCKING, Phase.RETRY)
                    assert pending is not None and action.use.digest == pending.digest
                net[action.use.digest] += action.use.delta
                assert net[action.use.digest] in (0, 1)
        if comp.phase is Phase.RETRY:
            assert comp.in_service and comp.access is not None
            assert comp.restart_service_reason == "jammed"
            assert net[comp.access.digest] == 0
        for jam in (a for a in actions if isinstance(a, Record)
                    and a.type == EventType.DOOR_JAMMED):
            assert pending is not None and net[pending.digest] == 0
            assert ("guided_retry_s" in jam.data) == (comp.phase is Phase.RETRY)
