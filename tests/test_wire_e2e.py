"""Pickup end to end with the daemon's REAL kerong and serial drivers on pseudo-terminals,
against the wire-level simulator."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import stored_events

from lockerd.dev.provision import BankKit, PlainCode
from sim.client import SimClient
from sim.wire.bank import WireBank

CODE = "482913"


@asynccontextmanager
async def wire_bank(directory: Path, parcels: list[str]) -> AsyncIterator[WireBank]:
    bank = WireBank(compartments=[str(i) for i in range(1, 9)], parcels=parcels,
                    directory=directory)
    task = asyncio.create_task(bank.run())
    await asyncio.wait_for(bank.ready.wait(), 10)
    try:
        yield bank
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_state(sim: SimClient, cond: Callable[[dict[str, Any]], bool], what: str,
                     timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = await sim.state()
        if cond(state):
            return state
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {state}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("unlock_reply", [False, True], ids=["silent-unlock", "unlock-reply"])
async def test_pickup_on_the_wire(
    make_kit: Callable[..., BankKit], bank_dir: Path, unlock_reply: bool
) -> None:
    wire = bank_dir / "wire"
    async with wire_bank(wire, parcels=["3"]) as bank:
        # Both kinds of board: one that never answers an unlock, one that sends its status.
        bank.kerong.unlock_reply = unlock_reply
        kit = make_kit([PlainCode("p-1", CODE, "3", parcel_id="PX1")], parcels=["3"],
                       socket=False, wire=wire)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path),
            stderr=asyncio.subprocess.PIPE)
        try:
            async with SimClient(bank.paths.socket) as sim:
                # Typed on the serial keypad: bytes on a pty, decoded by the real driver.
                deadline = time.monotonic() + 15
                while not any(e.type == "daemon.started" for e in stored_events(kit)):
                    assert time.monotonic() < deadline and proc.returncode is None
                    await asyncio.sleep(0.05)
                await sim.press(CODE + "#")
                # The unlock frame reached the emulated board: the door sprang open, and the
                # real driver saw the released latch on its next status poll.
                await wait_state(sim, lambda s: s["compartments"]["3"]["door_open"],
                                 "door 3 open")
                await sim.parcel("3", False)
                await sim.door("3", "close")
                deadline = time.monotonic() + 10
                while not any(e.type == "pickup.completed" for e in stored_events(kit)):
                    assert time.monotonic() < deadline, [e.type for e in stored_events(kit)]
                    await asyncio.sleep(0.05)
                # And a scan on the serial scanner goes the same validation path.
                await sim.scan("000000")
                deadline = time.monotonic() + 10
                while not any(e.type == "code.rejected" for e in stored_events(kit)):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
    types = [e.type for e in stored_events(kit)]
    assert types.index("lock.pulse") < types.index("pickup.opened") < types.index(
        "pickup.completed")
    rejected = next(e for e in stored_events(kit) if e.type == "code.rejected")
    assert rejected.data["source"] == "scanner"
    assert bank.kerong.unlocks, "the unlock crossed the wire"
    # The daemon's poll never spoke over a board's unlock reply.
    assert bank.kerong.collisions == 0
    assert bank.kerong.unlock_replies == (len(bank.kerong.unlocks) if unlock_reply else 0)


async def test_board_faults_on_command_through_the_control_socket(
    make_kit: Callable[..., BankKit], bank_dir: Path
) -> None:
    wire = bank_dir / "wire"
    async with wire_bank(wire, parcels=[]) as bank:
        kit = make_kit([], socket=False, wire=wire)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path),
            stderr=asyncio.subprocess.DEVNULL)
        try:
            async with SimClient(bank.paths.socket) as sim:
                deadline = time.monotonic() + 15
                while not any(e.type == "daemon.started" for e in stored_events(kit)):
                    assert time.monotonic() < deadline and proc.returncode is None
                    await asyncio.sleep(0.05)
                # Garbage around every reply: the driver resynchronises and the doors still
                # follow the world.
                await sim.fault("board:0", "garbage", True)
                await sim.request({"op": "door", "compartment": "5", "action": "force"})
                deadline = time.monotonic() + 10
                while not any(e.type == "door.forced" for e in stored_events(kit)):
                    assert time.monotonic() < deadline, [e.type for e in stored_events(kit)]
                    await asyncio.sleep(0.05)
                await sim.fault("board:0", "garbage", False)
                # A silent board becomes a fault, and recovers by itself.
                await sim.fault("board:0", "offline", True)
                deadline = time.monotonic() + 10
                while not any(e.type == "hardware.fault" for e in stored_events(kit)):
                    assert time.monotonic() < deadline, [e.type for e in stored_events(kit)]
                    await asyncio.sleep(0.05)
                await sim.fault("board:0", "offline", False)
                deadline = time.monotonic() + 10
                while not any(e.type == "hardware.recovered" for e in stored_events(kit)):
                    assert time.monotonic() < deadline, [e.type for e in stored_events(kit)]
                    await asyncio.sleep(0.05)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
    fault = next(e for e in stored_events(kit) if e.type == "hardware.fault")
    assert fault.data["device"] == "board:0"
