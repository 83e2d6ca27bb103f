"""Shared pieces of the benchmarks that run `lockerd run` with its real drivers on ptys: the
bench's ends of the ports, the boards emulated in the bench process, the daemon's log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import LOCKERD

from hal.kerong.codec import CMD_UNLOCK, Request
from lockerd.dev.provision import BankKit
from sim.wire.bank import WirePaths, kerong_wiring
from sim.wire.kerong import KerongEmulator
from sim.wire.pty import open_pty
from sim.world import SimWorld

STEP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
KERONG = {"poll_interval_s": 0.1, "idle_poll_interval_s": 1.0, "fast_poll_for_s": 10.0}
"""Kerong polling as config/wire.toml has it."""


@dataclass
class Ports:
    """The bench's ends of one system's ptys, linked at the paths a config names."""

    directory: Path
    masters: dict[str, int] = field(default_factory=dict)

    def open(self) -> WirePaths:
        paths = WirePaths(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, link in (("kerong", paths.kerong), ("scanner", paths.scanner),
                           ("keypad", paths.keypad)):
            master, slave = open_pty()
            self.masters[name] = master
            link.symlink_to(slave)
        return paths

    def close(self) -> None:
        for fd in self.masters.values():
            os.close(fd)


class LogMarks:
    """Event lines of the daemon's JSON log, read as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.seen: list[dict[str, Any]] = []

    def _read(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                self.seen.append(json.loads(line))
            except ValueError:
                continue

    async def wait(self, cond: Callable[[dict[str, Any]], bool], what: str,
                   within_s: float = STEP_TIMEOUT_S) -> None:
        """Until a line after the last one waited for satisfies `cond`."""
        deadline = time.monotonic() + within_s
        while True:
            self._read()
            for i, rec in enumerate(self.seen):
                if cond(rec):
                    del self.seen[: i + 1]
                    return
            self.seen.clear()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def event(self, type_: str, cid: str) -> None:
        await self.wait(lambda r: r.get("type") == type_ and r.get("compartment") == cid,
                        f"{type_} of compartment {cid}")


class FrameClock:
    """Unlock frames seen on a board pty, each with the perf_counter time it was read."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[int, int], asyncio.Future[float]] = {}

    def heard(self, request: Request) -> None:
        if request.cmd != CMD_UNLOCK:
            return
        now = time.perf_counter()
        future = self._waiting.pop((request.board, request.lock), None)
        if future is not None and not future.done():
            future.set_result(now)

    def expect(self, board: int, lock: int) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[(board, lock)] = future
        return future


async def shut_after_pickup(marks: LogMarks, world: SimWorld, cid: str) -> None:
    """After a pickup's unlock: the door seen open, shut on its parcel, and the use given back
    (pickup.incomplete), so the same code works again."""
    await marks.event("pickup.opened", cid)
    world.close_door(cid)
    await marks.event("pickup.incomplete", cid)


def board_emulator(world: SimWorld, compartments: list[str], *,
                   pulse_s: float | None = None) -> KerongEmulator:
    """CU16 boards wired as `make_bank(wire=...)` configures them; `pulse_s`, the boards'
    own pulse length (the emulator's default if None)."""
    boards: dict[int, dict[int, str]] = {}
    for cid, place in kerong_wiring(compartments).items():
        b, n = (int(x) for x in place.split("/"))
        boards.setdefault(b, {})[n] = cid
    if pulse_s is None:
        return KerongEmulator(world, boards=boards, engaged_bit=1)
    return KerongEmulator(world, boards=boards, engaged_bit=1, pulse_s=pulse_s)


def start_daemon(kit: BankKit, log_path: Path) -> tuple[subprocess.Popen[bytes], LogMarks]:
    """`lockerd run` on `kit`, its log to `log_path` (never a pipe nobody reads)."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*LOCKERD, "run", "-c", str(kit.config_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=kit.directory, start_new_session=True)
    return proc, LogMarks(log_path)



async def until_keypad_open(marks: LogMarks) -> None:
    """Until the daemon has opened its keypad port: bytes sent earlier are lost, as on a real
    line."""
    await marks.wait(lambda r: r.get("event") == "serial port open"
                     and r.get("device") == "keypad", "the daemon to open the keypad",
                     START_TIMEOUT_S)
