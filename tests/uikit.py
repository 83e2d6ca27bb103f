"""The simulator UI on a demo bank with fixed codes, for the UI tests and their snapshots."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from waiting import What, until

from lockerd.dev.demo import demo_sizes
from lockerd.dev.provision import BankKit, PlainCode, make_bank
from lockerd.dev.ui.app import LockerUi
from lockerd.dev.ui.host import DemoHost

SIZE = (130, 42)  # columns, rows: fixed, so a snapshot does not depend on the terminal
COURIER = "777000"
PICKUPS = {"1": "111222", "2": "222333", "3": "333444"}


def ui_kit(directory: Path, **overrides: dict[str, Any]) -> BankKit:
    """The demo's bank (8 compartments, parcels in 1-3) with fixed codes and fast doors."""
    codes = [PlainCode(id=f"p-{1000 + int(cid)}", code=code, compartment=cid,
                       parcel_id=f"PX{100 + int(cid)}") for cid, code in PICKUPS.items()]
    codes.append(PlainCode(id="c-1", code=COURIER, compartment=None, kind="courier",
                           max_uses=100))
    config: dict[str, dict[str, Any]] = {"codes": {"derived_pickup": True},
              "doors": {"pulse_s": 0.2, "open_timeout_s": 0.3, "show_result_s": 0.5},
              "entry": {"timeout_s": 60.0}, **overrides}
    return make_bank(directory, compartments=8, codes=codes, parcels=list(PICKUPS),
                     sizes=demo_sizes(8), overrides=config)


@asynccontextmanager
async def running_ui(kit: BankKit, *, tour: bool = False) -> AsyncIterator[Pilot[None]]:
    """The daemon on the simulator and the UI over it, the first events shown."""
    async with DemoHost(kit) as link:
        ui = LockerUi(link, list(kit.compartments), tour=tour, tour_pause_s=0.0)
        async with ui.run_test(size=SIZE) as pilot:
            await wait_ui(pilot, lambda: any(e.type == "daemon.started" for e in ui.events_seen),
                          what="daemon.started in the event pane")
            yield pilot


def app_of(pilot: Pilot[None]) -> LockerUi:
    assert isinstance(pilot.app, LockerUi)
    return pilot.app


async def wait_ui(pilot: Pilot[None], cond: object, *, what: What, timeout: float = 8.0) -> None:
    """Poll `cond()` between the UI's own turns until it holds."""
    assert callable(cond)

    async def check() -> bool:
        await pilot.pause()
        return bool(cond())

    await until(check, timeout, what=what, interval=0.02)


def event_types(pilot: Pilot[None]) -> list[str]:
    return [e.type for e in app_of(pilot).events_seen]


async def wait_event(pilot: Pilot[None], type_: str, *, compartment: str | None = None,
                     timeout: float = 8.0) -> None:
    def seen() -> bool:
        return any(e.type == type_ and (compartment is None or e.compartment == compartment)
                   for e in app_of(pilot).events_seen)

    await wait_ui(pilot, seen, timeout=timeout,
                  what=lambda: f"{type_} in the event pane; it shows {event_types(pilot)}")
