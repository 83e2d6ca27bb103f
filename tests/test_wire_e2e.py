"""Pickup end to end with the daemon's REAL kerong and serial drivers on pseudo-terminals,
against the wire-level simulator."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import stored_events
from waiting import until, until_value

from hal.kerong.codec import CMD_STATUS
from lockerd.dev.provision import BankKit, PlainCode
from sim.client import SimClient
from sim.wire.bank import WireBank

pytestmark = pytest.mark.e2e

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


def recorded(kit: BankKit, type_: str) -> Callable[[], bool]:
    """Whether the daemon has recorded an event of `type_`, read from its database."""
    return lambda: any(e.type == type_ for e in stored_events(kit))


def recorded_types(kit: BankKit, wanted: str) -> Callable[[], str]:
    """What a timed-out wait for `wanted` reports: the event types recorded so far."""
    return lambda: f"{wanted} among {[e.type for e in stored_events(kit)]}"


async def wait_state(sim: SimClient, cond: Callable[[dict[str, Any]], bool], what: str,
                     timeout: float = 10) -> dict[str, Any]:
    return await until_value(sim.state, cond, timeout, what=what, interval=0.02)


@pytest.mark.parametrize("unlock_reply", [False, True], ids=["silent-unlock", "unlock-reply"])
async def test_pickup_on_the_wire(
    make_kit: Callable[..., BankKit], bank_dir: Path, unlock_reply: bool
) -> None:
    wire = bank_dir / "wire"
    async with wire_bank(wire, parcels=["3"]) as bank:
        # Both kinds of board: one that never answers an unlock, one that sends its status.
        bank.kerong.unlock_reply = unlock_reply
        # The emulated board shares this (loaded) test process's loop: for the board that
        # answers, a generous reply window keeps a late unlock reply a late reply, not a
        # collision with the next poll. (A silent board keeps the default: its first unlock
        # waits the whole window, which must stay short of the door's open timeout.)
        kerong = {"reply_timeout_s": 1.0} if unlock_reply else {}
        kit = make_kit([PlainCode("p-1", CODE, "3", parcel_id="PX1")], parcels=["3"],
                       socket=False, wire=wire, overrides={"backends": {"kerong": kerong}})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path),
            stderr=asyncio.subprocess.PIPE)
        try:
            async with SimClient(bank.paths.socket) as sim:
                # Typed on the serial keypad: bytes on a pty, decoded by the real driver.
                started = recorded(kit, "daemon.started")
                await until(lambda: proc.returncode is not None or started(), 15,
                            what="daemon.started", interval=0.05)
                assert proc.returncode is None
                await sim.press(CODE + "#")
                # The unlock frame reached the emulated board: the door sprang open, and the
                # real driver saw the released latch on its next status poll.
                await wait_state(sim, lambda s: s["compartments"]["3"]["door_open"],
                                 "door 3 open")
                # The customer shuts the door once the daemon has seen it open: shut before,
                # on a loaded machine, it would meet the daemon's second pulse (the first
                # looked unanswered), and the spring would push it open again.
                await until(recorded(kit, "pickup.opened"), 10,
                            what=recorded_types(kit, "pickup.opened"), interval=0.05)
                await sim.parcel("3", False)
                await sim.door("3", "close")
                await until(recorded(kit, "pickup.completed"), 10,
                            what=recorded_types(kit, "pickup.completed"), interval=0.05)
                # And a scan on the serial scanner goes the same validation path.
                await sim.scan("000000")
                await until(recorded(kit, "code.rejected"), 10, what="code.rejected",
                            interval=0.05)
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
                started = recorded(kit, "daemon.started")
                await until(lambda: proc.returncode is not None or started(), 15,
                            what="daemon.started", interval=0.05)
                assert proc.returncode is None
                # Garbage around every reply: the driver resynchronises and the doors still
                # follow the world.
                await sim.fault("board:0", "garbage", True)
                await sim.request({"op": "door", "compartment": "5", "action": "force"})
                await until(recorded(kit, "door.forced"), 10,
                            what=recorded_types(kit, "door.forced"), interval=0.05)
                await sim.fault("board:0", "garbage", False)
                # A silent board becomes a fault, and recovers by itself.
                await sim.fault("board:0", "offline", True)
                await until(recorded(kit, "hardware.fault"), 10,
                            what=recorded_types(kit, "hardware.fault"), interval=0.05)
                await sim.fault("board:0", "offline", False)
                await until(recorded(kit, "hardware.recovered"), 10,
                            what=recorded_types(kit, "hardware.recovered"), interval=0.05)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
    fault = next(e for e in stored_events(kit) if e.type == "hardware.fault")
    assert fault.data["device"] == "board:0"


async def test_a_door_forced_while_the_bus_polls_idle_is_reported(
    make_kit: Callable[..., BankKit], bank_dir: Path
) -> None:
    wire = bank_dir / "wire"
    async with wire_bank(wire, parcels=[]) as bank:
        polls: list[float] = []
        loop = asyncio.get_running_loop()
        bank.kerong.listeners.append(
            lambda request: polls.append(loop.time()) if request.cmd == CMD_STATUS else None)
        kit = make_kit([], socket=False, wire=wire, overrides={"backends": {"kerong": {
            "poll_interval_s": 0.05, "idle_poll_interval_s": 0.5, "fast_poll_for_s": 0.3}}})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path),
            stderr=asyncio.subprocess.DEVNULL)
        try:
            started = recorded(kit, "daemon.started")
            await until(lambda: proc.returncode is not None or started(), 15,
                        what="daemon.started", interval=0.05)
            assert proc.returncode is None
            # The idle rhythm: two status polls the idle interval apart, nothing expected to
            # move. Then a door is broken open by hand; the next idle round sees it.
            await until(lambda: any(b - a >= 0.4 for a, b in itertools.pairwise(polls)), 10,
                        what="the idle polling rhythm", interval=0.05)
            bank.world.force_door("5")
            await until(recorded(kit, "door.forced"), 10,
                        what=recorded_types(kit, "door.forced"), interval=0.05)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 15)
    forced = next(e for e in stored_events(kit) if e.type == "door.forced")
    assert forced.compartment == "5"
