"""The guided tour played from outside the transcript, through `play_tour` and its step hook."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lockerd.app import build_app
from lockerd.config import load_config
from lockerd.dev.demo import provision_demo_bank
from lockerd.dev.demobank import DemoBank
from lockerd.dev.tour import play_tour
from sim.backend import world_of

pytestmark = pytest.mark.e2e


async def test_play_tour_says_each_step_before_it_runs(tmp_path: Path) -> None:
    kit = provision_demo_bank(tmp_path / "bank", compartments=4)
    app = build_app(load_config(kit.config_path))
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        world = world_of(app.hal)
        bank = DemoBank(world=world, display=world, app=app, kit=kit)
        courier = bank.courier_code()
        assert courier is not None
        said: list[tuple[str, list[str]]] = []  # each line, with the events recorded by then

        async def say(line: str) -> None:
            said.append((line, [e.type for e in app.events.recent(1000)]))
            await asyncio.sleep(0)  # a UI awaiting a key press: the bank waits for it

        assert await play_tour(bank, say)
        lines = [line for line, _ in said]
        typed = lines.index(f"the courier types code {courier.code}#")
        assert "session.started" not in said[typed][1]
        assert "session.started" in said[typed + 1][1]
        closing = next(i for i, line in enumerate(lines) if line.startswith("the courier closes"))
        assert "deposit.confirmed" not in said[closing][1]
        assert any(line.startswith("the demo's backend answers help request H-")
                   for line in lines)
        assert lines[-1].endswith("End of the tour.")
        assert not any(line.startswith("FAILED") for line in lines)
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 10)


async def test_play_tour_on_a_full_bank_says_why_and_returns_false(tmp_path: Path) -> None:
    kit = provision_demo_bank(tmp_path / "bank", compartments=3)  # three parcels, no room
    app = build_app(load_config(kit.config_path))
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        world = world_of(app.hal)
        said: list[str] = []

        async def say(line: str) -> None:
            said.append(line)

        assert not await play_tour(DemoBank(world=world, display=world, app=app, kit=kit), say)
        failed = [line for line in said if line.startswith("FAILED: ")]
        assert len(failed) == 1 and "no_free_compartment" in failed[0]
        assert said[-1] == "the courier presses * to end the session"
        assert app.controller.session is None
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 10)
