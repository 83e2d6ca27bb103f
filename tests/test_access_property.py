"""The access property of the whole controller: no sequence of keys, scans, door and parcel
actions and waiting ever opens a compartment without a valid credential, or uses a credential
without its door seen open; and the keypad's wrong-code count is reset only by a use consumed
for good (a pickup completed, a deposit confirmed), never by a credential that can be
presented again.

A jammed pickup door's guided retry is part of it: `#` in the window pulses once more, and the
door may still come open in the window (the customer pushed it); a guided pulse follows only a
jam that offered one, once.

The real controller, code store and SQLite database run with a clock the test moves; the test
plays the physical world (a door opens only after a pulse released its lock) and then audits
the event log and the use counts.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hal.base import DoorChanged, DoorState, KeyPressed, OccupancyChanged, Scanned
from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.core.lockout import CONSUMED_USE_EVENTS, LockoutState
from lockerd.dev.provision import BankKit, PlainCode, make_bank
from lockerd.services.controller import load_lockout_state
from lockerd.store.events import StoredEvent
from lockerd.store.parcels import SpentTokens
from lockerd.timeutil import utcnow
from lockerd.trust.digest import derived_pickup_code, support_code, support_window

pytestmark = pytest.mark.e2e

CIDS = ("1", "2", "3", "4")
CODES = [
    PlainCode("p-1", "111111", "1", parcel_id="PX-1"),
    PlainCode("p-2", "222222", "2", parcel_id="PX-2", max_uses=2),
    PlainCode("c-1", "333333", None, kind="courier", max_uses=2),
    PlainCode("d-1", "444444", None, kind="deposit", parcel_id="PX-D"),
    PlainCode("x-old", "555555", "2", not_after=utcnow() - timedelta(days=1)),
]
ISSUED = {c.id: c for c in CODES if c.id != "x-old"}
LABELS = ("PX-A", "PX-B")


class ManualClock:
    """Monotonic and wall time that move only when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._base = utcnow()

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self._base + timedelta(seconds=self.t - 1000.0)


@dataclass
class Bank:
    """Made once: keys, code key and tokens are the same for every example."""

    kit: BankKit
    valid_ctis: set[str] = field(default_factory=set)
    presses: list[str] = field(default_factory=list)
    scans: list[str] = field(default_factory=list)
    support: dict[str, str] = field(default_factory=dict)  # parcel -> its support code now


def _make_bank() -> Bank:
    directory = Path(tempfile.mkdtemp(prefix="lk-prop-"))
    kit = make_bank(directory / "template", compartments=len(CIDS), codes=CODES,
                    sizes=["S", "M", "L", "L"], socket=False,
                    overrides={"codes": {"derived_pickup": True, "support_codes": True},
                               "doors": {"open_timeout_s": 2.0, "held_open_after_s": 60.0,
                                         "show_result_s": 3.0, "jam_retry_s": 30.0},
                               "deposits": {"session_idle_s": 30.0},
                               "lockout": {"free_attempts": 1000}})
    bank = Bank(kit)
    pickup = bytes(range(1, 13))
    courier = bytes(range(20, 32))
    bank.valid_ctis = {pickup.hex(), courier.hex()}
    now = utcnow()
    bank.scans = [
        kit.qr_token("pickup", compartment="1", cti=pickup, expires_at=now + timedelta(days=1)),
        kit.qr_token("courier", cti=courier, expires_at=now + timedelta(days=1)),
        kit.qr_token("pickup", compartment="2", expires_at=now - timedelta(seconds=1)),
        kit.qr_token("pickup", compartment="2", signer=kit.codes_key),
        kit.qr_token("pickup", compartment="2", locker_id="L9"),
        *LABELS, "not a label", "LK1:!!",
    ]
    derived = [derived_pickup_code(kit.code_key, kit.locker_id, p, 8) for p in LABELS]
    # Support codes of this window and the next (a plan waits up to 20 minutes): of parcels
    # named by bundle codes, of parcels a courier may deposit, and of one never here.
    w = support_window(utcnow().timestamp())
    support = [support_code(kit.code_key, kit.locker_id, p, window, 8)
               for p in ("PX-1", "PX-2", *LABELS, "PX-NOWHERE") for window in (w, w + 1)]
    bank.support = {p: support_code(kit.code_key, kit.locker_id, p, w, 8) + "#"
                    for p in ("PX-1", "PX-2")}
    bank.presses = [c.code + "#" for c in CODES] + [d + "#" for d in derived] + [
        s + "#" for s in support] + ["999999#", "*", "#", "1", "2", "3", "12"]
    return bank


BANK = _make_bank()

steps = st.lists(
    st.one_of(
        st.tuples(st.just("press"), st.sampled_from(BANK.presses)),
        st.tuples(st.just("scan"), st.sampled_from(BANK.scans)),
        st.tuples(st.sampled_from(["open", "close", "put", "take"]), st.sampled_from(CIDS)),
        st.tuples(st.just("wait"), st.sampled_from(["0.5", "3", "31"])),
    ),
    max_size=40,
)


async def _play(kit: BankKit, plan: list[tuple[str, str]]) -> None:
    clock = ManualClock()
    app = build_app(load_config(kit.config_path), clock=clock)
    await app.load_bundle_file()
    ctl = app.controller
    door_open = dict.fromkeys(CIDS, False)
    occupied = {"1": True, "2": True, "3": False, "4": False}
    released: set[str] = set()
    seen = 0
    lockout = load_lockout_state(app.db)
    try:
        for cid in CIDS:
            await ctl.step(OccupancyChanged(cid, occupied[cid]))
        for action, arg in plan:
            match action:
                case "press":
                    for key in arg:
                        await ctl.step(KeyPressed(key))
                case "scan":
                    await ctl.step(Scanned(arg))
                case "open" if arg in released and not door_open[arg]:
                    # A person can pull a door open only while a pulse has released its lock.
                    door_open[arg] = True
                    await ctl.step(DoorChanged(arg, DoorState.OPEN))
                case "close" if door_open[arg]:
                    door_open[arg] = False
                    released.discard(arg)
                    await ctl.step(DoorChanged(arg, DoorState.CLOSED))
                case "put" | "take" if door_open[arg]:
                    occupied[arg] = action == "put"
                    await ctl.step(OccupancyChanged(arg, occupied[arg]))
                case "wait":
                    clock.t += float(arg)
                    await ctl.step(None)
            new = app.events.since(seen)
            seen = new[-1].seq if new else seen
            _track_latches(released, new)
            lockout = _audit_lockout(lockout, load_lockout_state(app.db), new, (action, arg))
        await ctl.wait_pulses()
        events = app.events.recent(100_000)
        _audit(app, kit, events)
    finally:
        app.db.close()


def _track_latches(released: set[str], new: list[StoredEvent]) -> None:
    """Which doors a person can pull open: released by a pulse, until the bank gives up."""
    for event in new:
        if event.compartment is None:
            continue
        if event.type == "lock.pulse":
            released.add(event.compartment)
        elif event.type == "door.jammed" and "guided_retry_s" not in event.data:
            released.discard(event.compartment)  # the latch held: it stays shut
        elif event.type == "compartment.out_of_service":
            # The end of a guided-retry window (until then a push may free the door).
            released.discard(event.compartment)


def _audit_lockout(before: LockoutState, after: LockoutState, new: list[StoredEvent],
                   step: tuple[str, str]) -> LockoutState:
    """(3) The persisted wrong-code count falls only in a step that consumed a use for good
    (a pickup completed, a deposit confirmed, each naming its credential), and such a step
    always clears it. No step of the plan waits long enough for the count to be forgotten."""
    consumed = [e for e in new if e.type in CONSUMED_USE_EVENTS and _credential(e)]
    if consumed:
        assert after == LockoutState(), (step, after, [e.type for e in consumed])
    else:
        assert after.failures >= before.failures, (step, before, after, [e.type for e in new])
        assert after.lockouts >= before.lockouts, (step, before, after)
    return after


def _credential(e: StoredEvent) -> str | None:
    """The credential an event names: its code id, "cti:<hex>" for a QR token, or
    "support:<parcel>:<window>" for a support code of a parcel with no code of its own."""
    cti = e.data.get("cti")
    if e.code_id is None and e.data.get("via") == "support":
        return f"support:{e.data['parcel_id']}:{e.data['window']}"
    return e.code_id or (f"cti:{cti}" if cti else None)


def _net_uses(events: list[StoredEvent]) -> Counter[str]:
    """Uses per credential as the events account for them: a pickup opened and not given
    back, a drop-off's door opened and not given back, a courier session's first door."""
    net: Counter[str] = Counter()
    session_used: dict[str, bool] = {}
    for e in events:
        cred = _credential(e)
        if cred is None:
            continue
        if e.type == "session.started":
            session_used[cred] = False
        elif e.type == "pickup.opened":
            net[cred] += 1
        elif e.type == "pickup.incomplete":
            net[cred] -= 1
        elif e.type == "deposit.opened":
            if e.data["kind"] == "deposit":
                net[cred] += 1
            elif not session_used.get(cred, True):
                session_used[cred] = True
                net[cred] += 1
        elif e.type == "deposit.aborted" and e.data.get("use_returned"):
            net[cred] -= 1
    return net


def _audit_guided(events: list[StoredEvent]) -> None:
    """(4) A guided pulse follows a jam that offered one, for the same compartment and
    credential, with no other pulse of that door between them, and at most once per jam."""
    offered: dict[str, str | None] = {}
    for e in events:
        cid = e.compartment
        if cid is None:
            continue
        if e.type == "door.jammed" and "guided_retry_s" in e.data:
            offered[cid] = _credential(e)
        elif e.type == "lock.pulse":
            window = offered.pop(cid, "none")
            if e.data.get("retry") == "guided":
                assert window == _credential(e), (e, window)


def _audit(app: App, kit: BankKit, events: list[StoredEvent]) -> None:
    _audit_guided(events)
    _audit_pulses(events)
    _audit_uses(app, kit, events)
    _audit_support(app, events)


def _audit_pulses(events: list[StoredEvent]) -> None:
    """(1) Every pulse is for a valid credential, and a pickup for its own door."""
    deposited: set[str] = set()
    for e in events:
        if e.type == "deposit.confirmed":
            deposited.add(str(e.data["parcel_id"]))
        if e.type != "lock.pulse":
            continue
        assert _credential(e) is not None, e
        if e.data.get("via") == "support":
            # A support code: for a parcel that lies here, through its own code if it has one.
            parcel = e.data["parcel_id"]
            own = next((c for c in ISSUED.values() if c.parcel_id == parcel), None)
            assert parcel in deposited or own is not None, e
            assert e.code_id == (own.id if own is not None else None), e
            if own is not None:
                assert e.compartment == own.compartment, e
        elif e.code_id is None:
            assert e.data.get("cti") in BANK.valid_ctis, e
        elif e.code_id.startswith("derived:"):
            assert e.code_id.removeprefix("derived:") in deposited, e
        else:
            assert e.code_id in ISSUED, e
            issued = ISSUED[e.code_id]
            assert e.data["kind"] == issued.kind, e
            if issued.kind == "pickup":
                assert e.compartment == issued.compartment, e


def _audit_uses(app: App, kit: BankKit, events: list[StoredEvent]) -> None:
    """(2) Every use on record, codes and spent QR tokens alike, is one the events account
    for with its door seen open, and no credential is used more than it may be."""
    net = _net_uses(events)
    for code in ISSUED.values():
        record = app.codes.lookup(kit.digest(code.code))
        assert record is not None
        assert record.uses == net[code.id], (code.id, record.uses, net)
        assert 0 <= record.uses <= code.max_uses, (code.id, record.uses)
        if record.uses:
            opened = [e for e in events if e.type == "door.opened" and e.code_id == code.id]
            assert opened, f"{code.id} used without its door seen open"
    spent = SpentTokens(app.db)
    for cti in BANK.valid_ctis:
        assert spent.is_spent(cti) == (net[f"cti:{cti}"] == 1), (cti, net)
        assert net[f"cti:{cti}"] in (0, 1)


def _audit_support(app: App, events: list[StoredEvent]) -> None:
    """A support code is used at most once per (parcel, window), and only when its door was
    seen open: the marks on record are exactly the support openings not given back."""
    support: Counter[tuple[str, str]] = Counter()
    for e in events:
        if e.data.get("via") == "support" and e.type in ("pickup.opened", "pickup.incomplete"):
            key = (str(e.data["parcel_id"]), str(e.data["window"]))
            support[key] += 1 if e.type == "pickup.opened" else -1
            assert support[key] in (0, 1), (key, support)
    marks = {(p, str(w)) for p, w in app.db.conn.execute(
        "SELECT parcel_id, window FROM support_uses")}
    assert marks == {k for k, n in support.items() if n == 1}, (marks, support)


WRONG = ("press", "999999#")
JAM_1 = [("press", "111111#"), ("wait", "3"), ("wait", "3")]  # both pulses, no door: jammed


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=steps)
# Credentials that can be presented again, after a wrong code: none may forgive it.
@example(plan=[WRONG, ("press", "333333#")])  # a courier code starts a session
@example(plan=[WRONG, ("press", "444444#")])  # a deposit code starts a session
@example(plan=[WRONG, ("scan", BANK.scans[1])])  # a courier QR token starts a session
@example(plan=[WRONG, ("press", "111111#"), ("open", "1"), ("close", "1")])  # left inside
# Uses consumed for good forgive it.
@example(plan=[WRONG, ("press", "111111#"), ("open", "1"), ("take", "1"), ("close", "1")])
@example(plan=[WRONG, ("press", "444444#"), ("press", "3"), ("open", "3"), ("put", "3"),
               ("close", "3")])
# The guided retry: pressed and the door opens, opened without it, left to time out, failing.
@example(plan=[*JAM_1, ("press", "#"), ("open", "1"), ("take", "1"), ("close", "1")])
@example(plan=[*JAM_1, ("open", "1"), ("close", "1"), ("press", "111111#")])
@example(plan=[*JAM_1, ("wait", "31"), ("press", "#"), ("press", "111111#")])
@example(plan=[*JAM_1, ("press", "#"), ("wait", "3"), ("press", "#"), ("open", "1")])
# Support codes: taken for good, left inside and given back, tried again, a jam.
@example(plan=[WRONG, ("press", BANK.support["PX-1"]), ("open", "1"), ("take", "1"),
               ("close", "1"), ("press", BANK.support["PX-1"])])
@example(plan=[("press", BANK.support["PX-2"]), ("open", "2"), ("close", "2"),
               ("press", BANK.support["PX-2"]), ("wait", "3"), ("wait", "3"),
               ("press", BANK.support["PX-2"])])
def test_no_door_opens_without_a_valid_credential_and_no_use_without_a_door(
    plan: list[tuple[str, str]],
) -> None:
    work = Path(tempfile.mkdtemp(prefix="lk-prop-run-"))
    try:
        kit_dir = work / "bank"
        shutil.copytree(BANK.kit.directory, kit_dir)
        kit = replace(BANK.kit, directory=kit_dir, config_path=kit_dir / "lockerd.toml",
                      state_dir=kit_dir / "state")
        asyncio.run(_play(kit, plan))
    finally:
        shutil.rmtree(work, ignore_errors=True)
