"""The composition root: outputs off at startup, supervised tasks, logging of decisions."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import running, wait_until
from waiting import until_sync, until_value

from lockerd.app import build_app
from lockerd.config import load_config
from lockerd.dev.provision import BankKit, PlainCode
from sim.backend import world_of
from sim.client import SimClient

pytestmark = pytest.mark.e2e

CODE = "482913"


async def test_all_lock_outputs_are_off_at_startup(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([], overrides={"backends": {"sim": {"spring_delay_s": 5.0,
                                                       "socket": "sim.sock"}}})
    app = build_app(load_config(kit.config_path))
    world = world_of(app.hal)
    # A pulse left running, as after a crash mid-pulse.
    leftover = asyncio.create_task(world.release_lock("2", 9.0))
    await wait_until(lambda: not world.compartment("2").locked, what="lock 2 released")
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        assert world.compartment("2").locked, "all_off re-engaged the latch before anything ran"
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 10)
        # all_off has ended that pulse; its coroutine would still sleep out the 9 s.
        leftover.cancel()
        await asyncio.gather(leftover, return_exceptions=True)


async def test_a_crashing_task_is_evented_and_restarted(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([])
    async with running(kit) as r:
        calls = 0
        release = asyncio.Event()

        async def flaky() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom")
            await release.wait()

        sup = asyncio.create_task(r.app._supervise("flaky", flaky))
        failed = await r.wait_event("daemon.task_failed")
        assert failed.data["task"] == "flaky" and "boom" in failed.data["error"]
        await wait_until(lambda: calls == 2, what="the task was restarted")
        sup.cancel()
        await asyncio.gather(sup, return_exceptions=True)


def test_decisions_are_logged_as_json_with_compartment_and_code_id(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([PlainCode("p-7", CODE, "4", parcel_id="PX4")], parcels=["4"])
    proc = subprocess.Popen([sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c",
                             str(kit.config_path)], stderr=subprocess.PIPE, text=True)
    try:
        until_sync(lambda: kit.socket_path.exists() or proc.poll() is not None, 20,
                   what="the daemon's simulator socket", interval=0.02)
        assert proc.poll() is None

        async def drive() -> None:
            async with SimClient(kit.socket_path) as sim:
                await sim.press("000000#")
                await sim.press(CODE + "#")
                await until_value(sim.state, lambda s: bool(s["compartments"]["4"]["door_open"]),
                                  5, what="door 4 to open", interval=0.01)

        asyncio.run(drive())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON off a tty
    decisions = {line["event"]: line for line in lines if line["event"].startswith("access")}
    assert decisions["access granted"]["compartment"] == "4"
    assert decisions["access granted"]["code_id"] == "p-7"
    refused = decisions["access refused"]
    assert refused["reason"] == "unknown_code"
    assert "compartment" in refused and "code_id" in refused
    assert CODE not in err and "000000" not in err
