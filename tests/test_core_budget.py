"""The open budget, pure: rolling hour, refusals not counted, overrides counted, one report an
hour, a clock set back; and which signed open commands may override it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from trustkit import NOW, keys, raw_envelope, role, signature

from lockerd.core.budget import BudgetState, OpenBudget
from lockerd.errors import TrustError
from lockerd.services.controller import load_budget_state
from lockerd.store.db import open_database
from lockerd.trust.command import (
    build_command_payload,
    override_authorised,
    parse_command_payload,
    verify_command,
)
from lockerd.trust.dsse import COMMAND_PAYLOAD_TYPE, sign_envelope

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0


def test_the_nth_open_of_an_hour_is_let_through_and_the_next_is_not() -> None:
    budget = OpenBudget(per_hour=3)
    assert [budget.take(T0 + i) for i in range(5)] == [True, True, True, False, False]
    assert budget.used(T0 + 5) == 3
    assert budget.left(T0 + 5) == 0


@pytest.mark.parametrize(
    ("later_s", "allowed"),
    [
        (3599.0, False),  # the first open is still within the hour
        (3600.0, True),  # an hour after the first open, its slot is free again
        (7200.0, True),
    ],
)
def test_the_window_rolls(later_s: float, allowed: bool) -> None:
    budget = OpenBudget(per_hour=2)
    assert budget.take(T0) and budget.take(T0 + 10)
    assert budget.take(T0 + later_s) is allowed


def test_a_refused_open_is_not_counted() -> None:
    budget = OpenBudget(per_hour=1)
    assert budget.take(T0)
    for i in range(100):
        assert not budget.take(T0 + 1 + i)
    assert budget.used(T0 + 200) == 1
    # One hour after the only counted open the budget is whole again, however many were refused.
    assert budget.take(T0 + 3600)


def test_an_override_goes_past_the_budget_and_counts() -> None:
    budget = OpenBudget(per_hour=1)
    assert budget.take(T0)
    assert budget.take(T0 + 1, override=True)
    assert budget.used(T0 + 2) == 2
    assert not budget.take(T0 + 3600.5), "the override's own slot is still within its hour"
    assert budget.take(T0 + 3601)


def test_zero_allows_only_overrides() -> None:
    budget = OpenBudget(per_hour=0)
    assert not budget.take(T0)
    assert budget.take(T0, override=True)


def test_a_negative_budget_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="per_hour"):
        OpenBudget(per_hour=-1)


def test_one_report_an_hour() -> None:
    budget = OpenBudget(per_hour=0)
    assert budget.report_due(T0)
    assert not budget.report_due(T0 + 1)
    assert not budget.report_due(T0 + 3599)
    assert budget.report_due(T0 + 3600)
    assert not budget.report_due(T0 + 3601)


def test_a_clock_set_back_cannot_stretch_the_window() -> None:
    budget = OpenBudget(per_hour=1)
    assert budget.take(T0 + 86_400)  # recorded a day ahead, then the clock is set back
    assert not budget.take(T0)
    assert budget.take(T0 + 3600), "counted as made at the earlier time, so gone an hour later"
    assert budget.report_due(T0 + 86_400)
    assert budget.report_due(T0), "a report 'in the future' does not silence the next hour"


def test_the_state_round_trips_through_the_database(tmp_path: Path) -> None:
    db = open_database(tmp_path / "lockerd.db")
    try:
        assert load_budget_state(db) == BudgetState()
        db.set_meta("open_budget", {"opens": [T0, T0 + 1], "reported_at": T0 + 2})
        state = load_budget_state(db)
        assert state == BudgetState(opens=(T0, T0 + 1), reported_at=T0 + 2)
        again = OpenBudget(per_hour=2, state=state)
        assert not again.take(T0 + 3)
        assert not again.report_due(T0 + 3)
        for garbage in ([1, 2], {"opens": "x"}, {"opens": [None]}, {"reported_at": "soon"}):
            db.set_meta("open_budget", garbage)
            assert load_budget_state(db) == BudgetState(), garbage
    finally:
        db.close()


@given(st.lists(st.tuples(st.floats(0, 20_000), st.booleans()), max_size=60),
       st.integers(0, 5))
def test_an_open_is_let_through_only_within_the_budget_or_by_override(
    steps: list[tuple[float, bool]], per_hour: int
) -> None:
    budget = OpenBudget(per_hour=per_hour)
    t = T0
    let_through: list[float] = []
    for gap, override in steps:
        t += gap
        before = [at for at in let_through if t - at < 3600]
        ok = budget.take(t, override=override)
        assert ok == (override or len(before) < per_hour)
        if ok:
            let_through.append(t)
        assert budget.used(t) == len(before) + ok


# -- which open commands may override it ----------------------------------------------------

def _open(override: bool = False) -> bytes:
    return build_command_payload(cmd_id="c-1", locker_id="L1", issued_at=NOW,
                                 expires_at=NOW + timedelta(minutes=5), action="open",
                                 args={"compartment": "7"}, override=override)


@pytest.mark.parametrize(
    ("threshold", "signed_by", "override", "authorised"),
    [
        (1, 1, True, False),  # one stolen key: never past the budget
        (1, 2, True, True),
        (2, 2, True, False),  # the threshold's worth is what a normal command needs
        (2, 3, True, True),
        (1, 3, False, False),  # not asked for
        (2, 3, False, False),
    ],
)
def test_an_override_needs_more_distinct_commands_keys_than_the_threshold(
    threshold: int, signed_by: int, override: bool, authorised: bool
) -> None:
    private = keys(3)
    commands = role(private, threshold)
    raw = sign_envelope(COMMAND_PAYLOAD_TYPE, _open(override), private[:signed_by])
    cmd = verify_command(raw, commands_role=commands, keyring_expires_at=NOW + timedelta(days=1),
                         locker_id="L1", now=NOW)
    assert len(cmd.signers) == signed_by
    assert override_authorised(cmd, commands) is authorised


def test_a_signature_repeated_or_from_another_role_does_not_count_towards_an_override() -> None:
    private = keys(2)
    outsider = keys(1)[0]
    commands = role(private, 1)
    payload = _open(override=True)
    sig = signature(private[0], COMMAND_PAYLOAD_TYPE, payload)
    raw = raw_envelope(COMMAND_PAYLOAD_TYPE, payload, [
        sig, sig, signature(outsider, COMMAND_PAYLOAD_TYPE, payload)])
    cmd = verify_command(raw, commands_role=commands, keyring_expires_at=NOW + timedelta(days=1),
                         locker_id="L1", now=NOW)
    assert not override_authorised(cmd, commands)


@pytest.mark.parametrize("value", ['"yes"', "1", "null", "[]"])
def test_a_mistyped_override_rejects_the_command(value: str) -> None:
    doc = _open().decode().replace('"action"', f'"override":{value},"action"')
    with pytest.raises(TrustError) as err:
        parse_command_payload(doc.encode())
    assert err.value.reason == "malformed"
