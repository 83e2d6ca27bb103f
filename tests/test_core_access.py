"""Code validation rules: every refusal reason, the grant, and the display text of each reason."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lockerd.core import messages
from lockerd.core.access import (
    CodeRecord,
    CompartmentView,
    Granted,
    Reason,
    Refused,
    evaluate_code,
    may_hold_parcel,
)

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

RECORD = CodeRecord(
    id="c-1",
    kind="pickup",
    digest="d" * 64,
    compartment="3",
    parcel_id="p-1",
    not_before=NOW - timedelta(days=1),
    not_after=NOW + timedelta(days=7),
    max_uses=1,
    uses=0,
)

READY = CompartmentView(in_service=True, idle=True, occupied=True)


def evaluate(
    record: CodeRecord | None,
    view: CompartmentView | None = READY,
    *,
    now: datetime = NOW,
) -> object:
    compartments = {"3": view} if view is not None else {}
    compartments["7"] = READY  # another compartment, which must not matter
    return evaluate_code(record, now=now, compartments=compartments)


GRANTED = Granted(compartment="3", code_id="c-1", digest="d" * 64, kind="pickup",
                  parcel_id=RECORD.parcel_id)


@pytest.mark.parametrize(
    ("record", "view", "now", "expected"),
    [
        pytest.param(None, READY, NOW, Refused(Reason.UNKNOWN), id="unknown"),
        pytest.param(RECORD, READY, NOW, GRANTED, id="valid"),
        pytest.param(replace(RECORD, not_after=NOW), READY, NOW,
                     Refused(Reason.EXPIRED, "c-1", "3"), id="expires-exactly-now"),
        pytest.param(replace(RECORD, not_after=NOW - timedelta(seconds=1)), READY, NOW,
                     Refused(Reason.EXPIRED, "c-1", "3"), id="expired"),
        pytest.param(replace(RECORD, not_after=NOW + timedelta(microseconds=1)), READY, NOW,
                     GRANTED, id="last-microsecond"),
        pytest.param(replace(RECORD, not_before=NOW + timedelta(seconds=1)), READY, NOW,
                     Refused(Reason.NOT_YET_VALID, "c-1", "3"), id="not-yet-valid"),
        pytest.param(replace(RECORD, not_before=NOW), READY, NOW, GRANTED,
                     id="valid-from-exactly-now"),
        pytest.param(replace(RECORD, not_before=None), READY, NOW, GRANTED,
                     id="no-not-before"),
        pytest.param(replace(RECORD, uses=1), READY, NOW,
                     Refused(Reason.USED, "c-1", "3"), id="used-up"),
        pytest.param(replace(RECORD, uses=5, max_uses=3), READY, NOW,
                     Refused(Reason.USED, "c-1", "3"), id="over-used"),
        pytest.param(replace(RECORD, max_uses=0), READY, NOW,
                     Refused(Reason.USED, "c-1", "3"), id="zero-uses-allowed"),
        pytest.param(replace(RECORD, uses=2, max_uses=3), READY, NOW, GRANTED,
                     id="multi-use-with-one-left"),
        pytest.param(replace(RECORD, uses=2, max_uses=2), READY, NOW,
                     Refused(Reason.USED, "c-1", "3"), id="multi-use-used-up"),
        # A deposit or courier code is only checked for validity here: the session it starts
        # assigns the compartment, so the state of the one it names does not matter yet.
        pytest.param(replace(RECORD, kind="deposit"),
                     CompartmentView(in_service=False, idle=False, occupied=True), NOW,
                     replace(GRANTED, kind="deposit"), id="deposit-kind"),
        pytest.param(replace(RECORD, kind="courier", compartment=None), None, NOW,
                     replace(GRANTED, kind="courier", compartment=None), id="courier-kind"),
        pytest.param(replace(RECORD, kind="courier", uses=1), READY, NOW,
                     Refused(Reason.USED, "c-1", "3"), id="courier-used"),
        pytest.param(replace(RECORD, kind="service"), READY, NOW,
                     Refused(Reason.UNSUPPORTED, "c-1", "3"), id="service-kind"),
        pytest.param(replace(RECORD, compartment="99"), READY, NOW,
                     Refused(Reason.NO_COMPARTMENT, "c-1", "99"), id="unknown-compartment"),
        pytest.param(replace(RECORD, compartment=None), READY, NOW,
                     Refused(Reason.NO_COMPARTMENT, "c-1", None), id="no-compartment"),
        pytest.param(RECORD, None, NOW,
                     Refused(Reason.NO_COMPARTMENT, "c-1", "3"), id="compartment-missing"),
        pytest.param(RECORD, CompartmentView(in_service=False, idle=True, occupied=True), NOW,
                     Refused(Reason.OUT_OF_SERVICE, "c-1", "3"), id="out-of-service"),
        pytest.param(RECORD, CompartmentView(in_service=True, idle=False, occupied=True), NOW,
                     Refused(Reason.BUSY, "c-1", "3"), id="busy"),
        pytest.param(RECORD, CompartmentView(in_service=True, idle=True, occupied=False), NOW,
                     Refused(Reason.EMPTY, "c-1", "3"), id="empty"),
        pytest.param(RECORD, CompartmentView(in_service=True, idle=True, occupied=None), NOW,
                     GRANTED, id="occupancy-unknown"),
        # When several rules fail, the code's own state is reported before the compartment's.
        pytest.param(replace(RECORD, not_after=NOW, uses=1),
                     CompartmentView(in_service=False, idle=False, occupied=False), NOW,
                     Refused(Reason.EXPIRED, "c-1", "3"), id="expired-wins"),
        pytest.param(replace(RECORD, uses=1),
                     CompartmentView(in_service=False, idle=False, occupied=False), NOW,
                     Refused(Reason.USED, "c-1", "3"), id="used-before-compartment"),
        pytest.param(RECORD, CompartmentView(in_service=False, idle=False, occupied=False), NOW,
                     Refused(Reason.OUT_OF_SERVICE, "c-1", "3"), id="out-of-service-wins"),
        pytest.param(RECORD, CompartmentView(in_service=True, idle=False, occupied=False), NOW,
                     Refused(Reason.BUSY, "c-1", "3"), id="busy-before-empty"),
    ],
)
def test_evaluate_code(
    record: CodeRecord | None, view: CompartmentView | None, now: datetime, expected: object
) -> None:
    assert evaluate(record, view, now=now) == expected


@pytest.mark.parametrize("reason", list(Reason))
def test_only_unknown_codes_count_as_guesses(reason: Reason) -> None:
    assert reason.counts_as_guess is (reason is Reason.UNKNOWN)


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_a_display_text(reason: Reason) -> None:
    msg = messages.refused(reason, remaining_s=42.0)
    assert msg.lines
    assert all(line.strip() for line in msg.lines)
    assert msg.indicator == "error"
    assert len(msg.lines) <= 4


def test_refusal_texts_are_distinct() -> None:
    texts = {messages.refused(r, remaining_s=5.0).lines for r in Reason}
    assert len(texts) == len(Reason)


@pytest.mark.parametrize(("remaining", "shown"), [(0.0, "1 s"), (0.4, "1 s"), (29.6, "30 s"),
                                                  (600.0, "600 s")])
def test_locked_out_text_shows_the_seconds_left(remaining: float, shown: str) -> None:
    assert shown in messages.refused(Reason.LOCKED_OUT, remaining_s=remaining).text


@pytest.mark.parametrize("reason", list(Reason))
def test_reason_values_are_event_words(reason: Reason) -> None:
    assert reason.value
    assert reason.value == reason.value.lower()
    assert " " not in reason.value


views = st.builds(CompartmentView, in_service=st.booleans(), idle=st.booleans(),
                  occupied=st.one_of(st.none(), st.booleans()))


@given(
    view=views,
    uses=st.integers(min_value=0, max_value=5),
    max_uses=st.integers(min_value=0, max_value=5),
    offset_s=st.integers(min_value=-10 * 86400, max_value=10 * 86400),
    kind=st.sampled_from(["pickup", "deposit", "courier", "return"]),
)
def test_grant_only_when_every_rule_holds(
    view: CompartmentView, uses: int, max_uses: int, offset_s: int, kind: str
) -> None:
    now = NOW + timedelta(seconds=offset_s)
    record = replace(RECORD, uses=uses, max_uses=max_uses, kind=kind)
    decision = evaluate(record, view, now=now)
    valid = (
        record.not_before is not None
        and record.not_before <= now < record.not_after
        and uses < max_uses
    )
    door_ready = view.in_service and view.idle and view.occupied is not False
    all_ok = valid and (kind in ("deposit", "courier") or (kind == "pickup" and door_ready))
    assert isinstance(decision, Granted) is all_ok
    if isinstance(decision, Refused):
        assert decision.code_id == "c-1"
        assert not decision.reason.counts_as_guess


def test_every_display_line_fits_a_20_column_lcd() -> None:
    from lockerd.core import messages as m

    shown = [m.idle(), m.typing(30), m.cleared(), m.timed_out(), m.too_long(),
             m.keypad_fault(), m.opening("12"), m.pickup_open("12"), m.door_open("12"),
             m.pickup_done("12"), m.pickup_incomplete("12"), m.jammed("12"),
             m.close_door("12"), m.locked_out(3600), m.deposit_open("12"),
             m.deposit_done("12"), m.deposit_aborted("12"), m.deposit_unconfirmed("12"),
             m.scan_label(0), m.scan_label(1234), m.no_free_door(None),
             m.no_free_door("XXXXXXXX"), m.session_ended(999),
             m.choose_size("P" * 64, ("S", "M", "L")),
             m.choose_size("PX1", tuple(f"SIZE{i:04d}" for i in range(9)))]
    shown += [m.label_refused(reason) for reason in Reason]
    shown += [m.refused(reason, remaining_s=30) for reason in Reason]
    long = [line for msg in shown for line in msg.lines if len(line) > m.MAX_COLUMNS]
    assert long == []


@pytest.mark.parametrize(("occupied", "parcel_id", "may"), [
    (False, None, False), (True, None, True), (None, None, True),
    # The sensor's word decides: a parcel on record the sensor sees gone is not inside.
    (False, "PX-1", False), (None, "PX-1", True),
])
def test_the_parcel_guard(occupied: bool | None, parcel_id: str | None, may: bool) -> None:
    view = CompartmentView(in_service=True, idle=True, occupied=occupied, parcel_id=parcel_id)
    assert may_hold_parcel(view) is may
