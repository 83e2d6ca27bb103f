"""Derived pickup codes: a parcel deposited while the locker is offline is picked up with a code
computed from its parcel id alone (PROTOCOL section 4)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable

import aiomqtt
import pytest
from broker import Broker
from conftest import Running, running, wait_until
from test_sync_mqtt import Watcher, mqtt_overrides, watching

from lockerd.dev.provision import BankKit, PlainCode

pytestmark = pytest.mark.e2e

COURIER = "700700"
DERIVED_ON = {"codes": {"derived_pickup": True}}


def courier() -> PlainCode:
    return PlainCode("c-1", COURIER, None, kind="courier", max_uses=5)


def derive(kit: BankKit, parcel_id: str, *extra: str) -> str:
    """The code as the backend computes it: with lockerctl, from the parcel id alone."""
    out = subprocess.run(
        [sys.executable, "-m", "lockerd.cli.lockerctl_cmd", "derive-code",
         "--code-key", str(kit.directory / "keys" / "code_key"), "--locker", kit.locker_id,
         "--parcel", parcel_id, *extra],
        capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def courier_deposit(r: Running, parcel_id: str, *, count: int = 1) -> str:
    r.world.press(COURIER + "#")
    await wait_until(lambda: "scan label" in r.display(), what="the label prompt")
    r.world.scan_label(parcel_id)
    await wait_until(lambda: "Size?" in r.display(), what="the size prompt")
    r.world.press("2")
    opened = await r.wait_event("door.opened", count=count)
    cid = opened.compartment
    assert cid is not None
    r.world.set_parcel(cid, True)
    r.world.close_door(cid)
    await r.wait_event("deposit.confirmed", count=count)
    r.world.press("*")
    await r.wait_event("session.ended", count=count)
    await wait_until(lambda: r.app.controller.session is None, what="the session to end")
    return cid


async def test_parcel_deposited_offline_is_picked_up_with_its_derived_code(
    make_kit: Callable[..., BankKit], broker: Broker,
) -> None:
    kit = make_kit([courier()], compartments=4,
                   overrides={**mqtt_overrides(broker), **DERIVED_ON})
    code = derive(kit, "PX-OFF")
    assert len(code) == 8 and code.isdigit()
    async with running(kit) as r:
        assert r.app.link is not None
        await wait_until(lambda: r.app.link.status.connected, what="link up")  # type: ignore[union-attr]
        broker.stop()
        await wait_until(lambda: not r.app.link.status.connected, what="link down")  # type: ignore[union-attr]

        # Before the deposit the code opens nothing.
        r.world.press(code + "#")
        before = await r.wait_event("code.rejected")
        assert before.data["reason"] == "unknown_code"

        cid = await courier_deposit(r, "PX-OFF")
        confirmed = r.events("deposit.confirmed")[0]
        assert r.app.outbox.depth() > 0, "the deposit waits in the outbox while offline"

        r.world.press(code + "#")
        opened = await r.wait_event("pickup.opened")
        assert opened.compartment == cid
        assert opened.code_id == "derived:PX-OFF"
        assert opened.data["parcel_id"] == "PX-OFF"
        r.world.set_parcel(cid, False)
        r.world.close_door(cid)
        done = await r.wait_event("pickup.completed")
        assert done.code_id == "derived:PX-OFF"
        assert r.app.controller.compartments[cid].parcel_id is None

        # After the pickup the code is dead: no parcel of that id lies here any more.
        pulses = len(r.world.pulses)
        r.world.press(code + "#")
        after = await r.wait_event("code.rejected", count=2)
        assert after.data["reason"] == "unknown_code"
        assert len(r.world.pulses) == pulses

        # Back online, the backend learns of the deposit and the pickup.
        broker.start()
        async with watching(broker) as w:
            # The bank may have reconnected and published before this subscriber was there:
            # like any backend that came late, it asks for a resend (PROTOCOL section 5).
            await until_resent(broker, w, from_seq=confirmed.seq, event_id=done.event_id)
            types = [e["type"] for e in w.on("events")]
            assert "deposit.confirmed" in types
            deposit_event = next(e for e in w.on("events")
                                 if e["event_id"] == confirmed.event_id)
            assert deposit_event["data"]["parcel_id"] == "PX-OFF"
            assert deposit_event["code_id"] == "c-1"


async def until_resent(broker: Broker, w: Watcher, *, from_seq: int, event_id: str,
                       timeout: float = 15.0) -> None:
    """Ask `events/resend` from `from_seq` every second until `event_id` arrives."""
    deadline = time.monotonic() + timeout
    async with aiomqtt.Client(broker.host, broker.port) as client:
        while not any(e["event_id"] == event_id for e in w.on("events")):
            assert time.monotonic() < deadline, "the pickup was not published after the outage"
            await client.publish("lockers/L1/events/resend",
                                 json.dumps({"from_seq": from_seq}), qos=1)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: any(e["event_id"] == event_id for e in w.on("events")),
                                 timeout=1.0)


async def test_derived_code_survives_a_restart_and_a_revocation_disables_it(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([courier()], compartments=4, overrides=DERIVED_ON)
    async with running(kit) as r:
        cid = await courier_deposit(r, "PX-R")
        kept = await courier_deposit(r, "PX-KEEP", count=2)
    code, keep = derive(kit, "PX-R"), derive(kit, "PX-KEEP")
    async with running(kit) as r:
        # The parcels are still in their doors (the simulator starts empty: put them back).
        r.world.set_parcel(cid, True)
        r.world.set_parcel(kept, True)
        await wait_until(lambda: r.app.controller.compartments[kept].occupied is True,
                         what="the daemon to see the parcels")
        assert r.app.controller.compartments[cid].parcel_id == "PX-R"
        r.app.cache.load_bundle(kit.bundle([courier()], version=2, base_version=1,
                                           revoke=["derived:PX-R"]), source="test")
        r.world.press(code + "#")
        ev = await r.wait_event("code.rejected")
        assert (ev.data["reason"], ev.code_id) == ("revoked", "derived:PX-R")
        await r.wait_display("withdrawn")
        # A later snapshot that does not repeat the revocation does not bring it back.
        r.app.cache.load_bundle(kit.bundle([courier()], version=3), source="test")
        r.world.press(code + "#")
        ev = await r.wait_event("code.rejected", count=2)
        assert ev.data["reason"] == "revoked"
        assert r.world.pulses == []
        # Another parcel's derived code is untouched.
        r.world.press(keep + "#")
        opened = await r.wait_event("pickup.opened")
        assert opened.code_id == "derived:PX-KEEP"


async def test_derived_codes_are_refused_unless_enabled(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([courier()], compartments=4)
    async with running(kit) as r:
        await courier_deposit(r, "PX-NO")
        r.world.press(derive(kit, "PX-NO") + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "unknown_code"
        assert r.events("pickup.opened") == []


async def test_derived_code_length_follows_the_configuration(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([courier()], compartments=4,
                   overrides={"codes": {"derived_pickup": True, "derived_digits": 6}})
    async with running(kit) as r:
        cid = await courier_deposit(r, "PX-6")
        eight = derive(kit, "PX-6")
        r.world.press(eight + "#")
        ev = await r.wait_event("code.rejected")
        assert ev.data["reason"] == "unknown_code"
        r.world.press(derive(kit, "PX-6", "--digits", "6") + "#")
        opened = await r.wait_event("pickup.opened")
        assert opened.compartment == cid
