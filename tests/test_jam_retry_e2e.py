"""The guided retry after a jam end to end: the daemon on the simulated bank, the jam injected
and cleared through the simulator's control socket, the customer's `#` on its keypad."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import FAST, Running, running, wait_until

from lockerd.dev.provision import BankKit, PlainCode
from sim.client import SimClient

pytestmark = pytest.mark.e2e

CODE = "482913"
PARCEL_CODE = PlainCode("p-1", CODE, "3", parcel_id="PX1")


def _kit(make_kit: Callable[..., BankKit], jam_retry_s: float) -> BankKit:
    doors = {**FAST["doors"], "jam_retry_s": jam_retry_s}
    return make_kit([PARCEL_CODE], parcels=["3"], overrides={"doors": doors})


def _uses(r: Running) -> int:
    record = r.app.codes.lookup(r.kit.digest(CODE))
    assert record is not None
    return record.uses


async def _jam_a_pickup(r: Running, sim: SimClient) -> None:
    await sim.fault("lock:3", "jam", True)
    await sim.press(CODE + "#")
    jam = await r.wait_event("door.jammed")
    assert jam.data["guided_retry_s"] == r.app.config.doors.jam_retry_s
    await wait_until(lambda: "Push it, press #" in r.display(), what="the retry prompt")
    assert r.events("compartment.out_of_service") == []
    assert r.app.controller.compartments["3"].in_service


async def test_the_jam_cleared_and_hash_pressed_opens_the_door_and_uses_the_code_once(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = _kit(make_kit, 30.0)
    async with running(kit) as r, SimClient(kit.socket_path) as sim:
        await _jam_a_pickup(r, sim)
        assert _uses(r) == 0
        # The customer pushes the door: the jam clears; then `#` on the empty entry.
        await sim.fault("lock:3", "jam", False)
        await sim.press("#")
        opened = await r.wait_event("pickup.opened")
        pulses = r.events("lock.pulse")
        assert [(p.data["attempt"], p.data.get("retry")) for p in pulses] == [
            (1, None), (2, None), (3, "guided")]
        assert pulses[-1].seq < opened.seq
        assert opened.code_id == "p-1"
        assert _uses(r) == 1
        await sim.parcel("3", False)
        await sim.door("3", "close")
        await r.wait_event("pickup.completed")
        assert r.events("compartment.out_of_service") == []
        assert _uses(r) == 1
        assert r.app.db.get_meta("out_of_service") == {}


async def test_a_guided_pulse_that_fails_too_puts_it_out_of_service_and_keeps_the_code(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = _kit(make_kit, 30.0)
    async with running(kit) as r, SimClient(kit.socket_path) as sim:
        await _jam_a_pickup(r, sim)
        await sim.press("#")  # the jam stays
        await r.wait_event("door.jammed", count=2)
        out = await r.wait_event("compartment.out_of_service")
        assert out.data["reason"] == "jammed"
        assert r.events("lock.pulse")[-1].data["retry"] == "guided"
        assert r.events("pickup.opened") == []
        assert _uses(r) == 0
        assert r.app.db.get_meta("out_of_service") == {"3": "jammed"}
        # Out of service: the still valid code is refused now without a pulse.
        await sim.fault("lock:3", "jam", False)
        await sim.press(CODE + "#")
        refused = await r.wait_event("code.rejected")
        assert refused.data["reason"] == "out_of_service"
        assert len(r.events("lock.pulse")) == 3


async def test_nobody_pressing_hash_in_time_puts_it_out_of_service(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = _kit(make_kit, 0.4)
    async with running(kit) as r, SimClient(kit.socket_path) as sim:
        await _jam_a_pickup(r, sim)
        assert (await sim.state())["compartments"]["3"]["in_service"] is True
        out = await r.wait_event("compartment.out_of_service")
        assert out.data["reason"] == "jammed"
        assert len(r.events("lock.pulse")) == 2
        # The lock's out-of-service mark follows the event, not the saved restart mark
        # (which named the compartment since the window opened).
        await wait_until(lambda: r.world.state()["compartments"]["3"]["in_service"] is False,
                         what="the sim to show the compartment out of service")
        assert _uses(r) == 0
        # `#` after the window pulses nothing.
        await sim.fault("lock:3", "jam", False)
        await sim.press("#")  # no window: this starts help, which `*` leaves
        await sim.press("*")
        await sim.press("1#")  # a later input the controller handles after the `#`
        await r.wait_event("code.rejected")
        assert len(r.events("lock.pulse")) == 2


async def test_a_restart_in_the_window_finds_the_compartment_out_of_service(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = _kit(make_kit, 30.0)
    async with running(kit) as r, SimClient(kit.socket_path) as sim:
        await _jam_a_pickup(r, sim)
        # Saved through the writer right after the event that took it out of service.
        await wait_until(lambda: r.app.db.get_meta("out_of_service") == {"3": "jammed"},
                         what="the out-of-service mark saved")
    async with running(kit) as r2, SimClient(kit.socket_path) as sim2:
        comp = r2.app.controller.compartments["3"]
        assert not comp.in_service and comp.service_reason == "jammed"
        await sim2.press("#")  # no window after a restart: this starts help, `*` leaves it
        await sim2.press("*")
        await sim2.press(CODE + "#")
        refused = await r2.wait_event("code.rejected")
        assert refused.data["reason"] == "out_of_service"
        assert r2.events("lock.pulse")[-1].data.get("retry") is None
        assert len(r2.events("lock.pulse")) == 2
        assert _uses(r2) == 0
