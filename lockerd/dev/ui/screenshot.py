"""`python -m lockerd.dev.ui.screenshot FILE.svg`: the UI's picture in the docs, made again.

A demo bank with fixed codes; the customer of compartment 1 has typed their code and the door
is open, so the picture shows a highlighted open door, the display and the events in words."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from lockerd.dev.demo import demo_sizes
from lockerd.dev.provision import BankKit, PlainCode, make_bank
from lockerd.dev.ui.app import LockerUi
from lockerd.dev.ui.host import DemoHost
from lockerd.logs import configure_logging

SIZE = (130, 40)
DEADLINE_S = 15.0


def _kit(directory: Path) -> BankKit:
    codes = [PlainCode(id=f"p-{1000 + i}", code=f"{i}{i}{i}{i + 1}{i + 1}{i + 1}",
                       compartment=str(i), parcel_id=f"PX{100 + i}") for i in (1, 2, 3)]
    codes.append(PlainCode(id="c-1", code="777000", compartment=None, kind="courier",
                           max_uses=100))
    return make_bank(directory, compartments=8, codes=codes, parcels=["1", "2", "3"],
                     sizes=demo_sizes(8), overrides={"codes": {"derived_pickup": True}})


async def _shoot(kit: BankKit) -> str:
    async with DemoHost(kit) as link:
        ui = LockerUi(link, list(kit.compartments))
        async with ui.run_test(size=SIZE) as pilot:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S

            async def until_event(type_: str) -> None:
                while not any(e.type == type_ for e in ui.events_seen):
                    if loop.time() > deadline:
                        raise TimeoutError(f"no {type_} within {DEADLINE_S:g} s")
                    await pilot.pause(0.05)

            await until_event("daemon.started")
            await pilot.press(*"111222", "enter")
            await until_event("pickup.opened")
            await pilot.pause(0.3)
            return ui.export_screenshot(title="lockerd demo")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].endswith(".svg"):
        print("usage: python -m lockerd.dev.ui.screenshot FILE.svg", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lk-shot-") as tmp:
        log = Path(tmp) / "lockerd.log"
        with log.open("a", encoding="utf-8") as stream:
            configure_logging("warning", "json", stream=stream)
            svg = asyncio.run(_shoot(_kit(Path(tmp) / "bank")))
    Path(args[0]).write_text(svg, encoding="utf-8")
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
