"""Hardware diagnostics hooks (for the technician console): bus scan, pulse test, sensor
read-out, keypad and scanner echo."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import running
from test_wire_e2e import wire_bank

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.services.controller import RequestRefused

pytestmark = pytest.mark.e2e


async def test_sensors_pulse_test_and_echo_on_the_sim(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([PlainCode("p-1", "482913", "3", parcel_id="PX1")], parcels=["3"])
    async with running(kit) as r:
        diag = r.app.diagnostics
        r.world.force_door("6")
        await r.wait_event("door.forced")
        sensors = await diag.sensors()
        assert sensors["door_sensor"]["6"] == "open" and sensors["door_sensor"]["1"] == "closed"
        assert sensors["occupancy"]["3"] is True and sensors["occupancy"]["2"] is False
        assert sensors["tamper"] is False
        assert all(h["ok"] for h in sensors["health"].values())
        with pytest.raises(RequestRefused, match="may hold a parcel"):
            await diag.pulse_test("3", tech_id="t-1")
        assert await diag.pulse_test("2", tech_id="t-1") == "opened"
        pulse = r.events("lock.pulse")[-1]
        assert (pulse.compartment, pulse.data["tech_id"], pulse.data["kind"]) == (
            "2", "t-1", "console")
        assert await diag.pulse_test("3", tech_id="t-1", force=True) == "opened"
        assert await diag.bus_scan() == {}, "the sim lock driver has no bus"

        async def type_and_scan() -> None:
            # No wait needed: gather starts the echo's task first, and it adds its tap before
            # it first awaits; the controller hands the keys to the taps only later, in its own
            # task.
            r.world.press("12")
            r.world.scan("4829")

        keys, _ = await asyncio.gather(diag.echo("keypad", 0.4), type_and_scan())
        assert [line.value for line in keys] == ["1", "2"]
        scans, _ = await asyncio.gather(diag.echo("scanner", 0.4), type_and_scan())
        assert [line.value for line in scans] == ["4 characters"]
        with pytest.raises(RequestRefused):
            await diag.echo("printer", 0.1)


async def test_bus_scan_over_the_wire(make_kit: Callable[..., BankKit], bank_dir: Path) -> None:
    wire = bank_dir / "wire"
    async with wire_bank(wire, parcels=[]):
        kit = make_kit([], socket=False, wire=wire)
        from lockerd.app import build_app
        from lockerd.config import load_config

        app = build_app(load_config(kit.config_path))
        task = asyncio.create_task(app.run(install_signal_handlers=False))
        try:
            await asyncio.wait_for(app.ready.wait(), 10)
            found = await app.diagnostics.bus_scan()
            assert found["board:0"] is True
            assert found["board:1"] is False
            assert len(found) == 16
        finally:
            app.request_stop()
            await asyncio.wait_for(task, 10)
