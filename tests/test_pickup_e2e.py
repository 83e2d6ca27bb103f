"""Pickup end to end on the simulator through its Python API: the daemon as it really runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from conftest import FAST, running, stored_events, wait_until

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.timeutil import utcnow

pytestmark = pytest.mark.e2e

CODE = "482913"


def parcel_code(**kw: object) -> PlainCode:
    fields: dict[str, object] = {"id": "p-1", "code": CODE, "compartment": "3", "parcel_id": "PX1"}
    fields.update(kw)
    return PlainCode(**fields)  # type: ignore[arg-type]


async def test_pickup_consumes_code_only_after_door_seen_open(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        r.world.press(CODE + "#")
        opened = await r.wait_event("pickup.opened")
        pulse = r.events("lock.pulse")[0]
        assert pulse.seq < opened.seq, "the pulse is recorded before the door is reported open"
        assert (opened.compartment, opened.code_id) == ("3", "p-1")
        assert r.world.state()["compartments"]["3"]["door_open"] is True
        await r.wait_display("Take your parcel")
        r.world.set_parcel("3", False)
        r.world.close_door("3")
        done = await r.wait_event("pickup.completed")
        assert done.code_id == "p-1"
        # The code is spent: entering it again is refused and the door stays shut.
        r.world.press(CODE + "#")
        rejected = await r.wait_event("code.rejected")
        assert rejected.data["reason"] == "used"
        await r.wait_display("already used")
        assert r.world.state()["compartments"]["3"]["door_open"] is False
    assert r.world.pulses == ["3"]


async def test_scanned_digits_take_the_same_path_as_typed_codes(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        r.world.scan(CODE)
        ev = await r.wait_event("pickup.opened")
        assert ev.data["source"] == "scanner"


async def test_wrong_code_is_refused_with_reason_on_display(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        r.world.press("000000#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "unknown_code"
        assert ev.code_id is None
        await r.wait_display("not recognised")
        assert r.world.pulses == []


async def test_expired_and_not_yet_valid_codes_are_refused(
    make_kit: Callable[..., BankKit],
) -> None:
    now = utcnow()
    kit = make_kit([
        parcel_code(id="p-old", code="111222", not_after=now - timedelta(minutes=1)),
        parcel_code(id="p-new", code="333444", compartment="4",
                    not_before=now + timedelta(hours=1)),
    ], parcels=["3", "4"])
    async with running(kit) as r:
        r.world.press("111222#")
        first = await r.wait_event("code.rejected")
        r.world.press("333444#")
        second = await r.wait_event("code.rejected", count=2)
        assert (first.code_id, first.data["reason"]) == ("p-old", "expired")
        assert (second.code_id, second.data["reason"]) == ("p-new", "not_yet_valid")
        await r.wait_display("not valid yet")
        assert r.world.pulses == []


async def test_code_for_empty_compartment_is_refused(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([parcel_code()], parcels=[])
    async with running(kit) as r:
        r.world.press(CODE + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "empty"
        assert r.world.pulses == []


async def test_jammed_door_keeps_code_retries_once_and_marks_compartment(
    make_kit: Callable[..., BankKit],
) -> None:
    # `[doors] jam_retry_s = 0`: no guided retry, out of service at the jam (test_jam_retry_e2e).
    kit = make_kit([parcel_code()], parcels=["3"],
                   overrides={"doors": {**FAST["doors"], "jam_retry_s": 0}})
    async with running(kit) as r:
        r.world.set_fault("lock:3", "jam", True)
        r.world.press(CODE + "#")
        jam = await r.wait_event("door.jammed")
        assert jam.code_id == "p-1"
        assert [e.data["attempt"] for e in r.events("lock.pulse")] == [1, 2]
        assert r.world.pulses == ["3", "3"]
        assert r.events("pickup.opened") == []
        assert r.events("compartment.out_of_service")[0].data["reason"] == "jammed"
        await r.wait_display("still valid")
        await wait_until(lambda: r.world.state()["compartments"]["3"]["in_service"] is False,
                         what="sim shows the compartment out of service")
        # Out of service: the same (still valid) code is refused without a pulse.
        r.world.press(CODE + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "out_of_service"
        assert len(r.world.pulses) == 2
    # The mark survives a restart; the code is still unused.
    async with running(kit) as r2:
        r2.world.press(CODE + "#")
        ev = await r2.wait_event("code.rejected", count=2)
        assert ev.data["reason"] == "out_of_service"
        assert r2.app.codes.lookup(kit.digest(CODE)).uses == 0  # type: ignore[union-attr]


async def test_door_closed_on_parcel_gives_the_use_back(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")
        assert r.app.codes.lookup(kit.digest(CODE)).uses == 1  # type: ignore[union-attr]
        r.world.close_door("3")  # parcel still inside
        inc = await r.wait_event("pickup.incomplete")
        assert inc.code_id == "p-1"
        assert r.app.codes.lookup(kit.digest(CODE)).uses == 0  # type: ignore[union-attr]
        await r.wait_display("works again")
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened", count=2)
        r.world.set_parcel("3", False)
        r.world.close_door("3")
        await r.wait_event("pickup.completed")


async def test_forced_and_held_open_doors_are_reported(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        r.world.force_door("5")
        forced = await r.wait_event("door.forced")
        assert forced.compartment == "5"
        held = await r.wait_event("door.held_open")
        assert held.compartment == "5"
        await r.wait_display("close door 5")
        r.world.close_door("5")
        await r.wait_event("door.closed")
        assert len(r.events("door.held_open")) == 1


async def test_lockout_grows_and_survives_restart(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        for i in range(3):
            r.world.press(f"99999{i}#")
            await r.wait_event("code.rejected", count=i + 1)
        lock = await r.wait_event("keypad.lockout")
        assert lock.data["seconds"] == 30.0
        await r.wait_display("Too many wrong codes")
    async with running(kit) as r2:
        # Even the right code is refused while locked out, and nothing is pulsed.
        r2.world.press(CODE + "#")
        await wait_until(lambda: "Too many wrong codes" in r2.display(), what="lockout shown")
        r2.world.scan(CODE)
        ev = await r2.wait_event("code.rejected", count=4)
        assert ev.data["reason"] == "locked_out"
        assert r2.world.pulses == []
        # A technician clears it (the console will call this); the next failure locks longer.
        await r2.app.controller.clear_lockout()
        assert r2.app.controller.bank.lockout.remaining(utcnow().timestamp()) == 0


async def test_stuck_key_is_reported_as_a_hardware_fault(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([parcel_code()], parcels=["3"], overrides={"entry": {"stuck_key_repeats": 5}})
    async with running(kit) as r:
        r.world.set_fault("keypad", "stuck_key", True, key="7")
        fault = await r.wait_event("hardware.fault")
        assert fault.data["device"] == "keypad"
        await r.wait_display("Keypad fault")
        r.world.set_fault("keypad", "stuck_key", False)
        r.world.scan(CODE)
        await r.wait_event("pickup.opened")


async def test_every_event_has_seq_id_type_time_and_no_plain_code(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([parcel_code()], parcels=["3"])
    async with running(kit) as r:
        r.world.press("1#")
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")
    events = stored_events(kit)
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len({e.event_id for e in events}) == len(events)
    assert events[-1].type == "daemon.stopping"
    raw = (kit.state_dir / "lockerd.db").read_bytes()
    assert CODE.encode() not in raw
