"""A whole simulated bank on the wire: Kerong boards, a serial scanner and a serial keypad on
pseudo-terminals, plus the control socket, so the daemon runs its REAL drivers against it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sim.control import ControlServer
from sim.wire.kerong import KerongEmulator
from sim.wire.pty import open_pty
from sim.wire.serial_devices import KeypadEmulator, ScannerEmulator
from sim.world import SimWorld

LOCKS_PER_BOARD = 16


def kerong_wiring(compartments: Sequence[str]) -> dict[str, str]:
    """Compartment id -> "board/lock": the i-th compartment on board i // 16, lock i % 16."""
    return {cid: f"{i // LOCKS_PER_BOARD}/{i % LOCKS_PER_BOARD}"
            for i, cid in enumerate(compartments)}


@dataclass(frozen=True)
class WirePaths:
    """Where a wire bank puts its ports (stable symlinks to the ptys) and control socket."""

    directory: Path

    @property
    def kerong(self) -> Path:
        return self.directory / "kerong"

    @property
    def scanner(self) -> Path:
        return self.directory / "scanner"

    @property
    def keypad(self) -> Path:
        return self.directory / "keypad"

    @property
    def socket(self) -> Path:
        return self.directory / "control.sock"

    def ports(self) -> Iterator[Path]:
        yield from (self.kerong, self.scanner, self.keypad)


class WireBank:
    """The emulators and the world they share. `run` serves them until cancelled."""

    def __init__(self, *, compartments: Sequence[str], parcels: Sequence[str] = (),
                 directory: Path, spring_delay_s: float = 0.05,
                 engaged_bit: int = 1) -> None:
        self.world = SimWorld(compartments, parcels=parcels, spring_delay_s=spring_delay_s)
        self.paths = WirePaths(directory)
        boards: dict[int, dict[int, str]] = {}
        for cid, place in kerong_wiring(compartments).items():
            board, lock = (int(x) for x in place.split("/"))
            boards.setdefault(board, {})[lock] = cid
        self.kerong = KerongEmulator(self.world, boards=boards, engaged_bit=engaged_bit)
        self.scanner = ScannerEmulator(self.world)
        self.keypad = KeypadEmulator(self.world)
        self.ready = asyncio.Event()

    async def run(self) -> None:
        self.paths.directory.mkdir(parents=True, exist_ok=True)
        fds: list[int] = []
        try:
            async with ControlServer(self.world, self.paths.socket), asyncio.TaskGroup() as tg:
                for path, runner in ((self.paths.kerong, self.kerong.run),
                                     (self.paths.scanner, self.scanner.run),
                                     (self.paths.keypad, self.keypad.run)):
                    master, slave = open_pty()
                    fds.append(master)
                    _link(path, slave)
                    tg.create_task(runner(master), name=f"wire:{path.name}")
                self.ready.set()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for path in self.paths.ports():
                with contextlib.suppress(OSError):
                    path.unlink()


def _link(path: Path, target: str) -> None:
    """Point the stable port name at this run's pty, replacing a stale link atomically."""
    tmp = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim.wire",
        description="Run a simulated bank's hardware on the wire: Kerong CU16 lock boards on a "
        "pty (DIR/kerong), a serial QR scanner (DIR/scanner) and a serial keypad "
        "(DIR/keypad), all driven by one simulated world whose control socket is "
        "DIR/control.sock (the JSON protocol of docs/simulator.md). Point a lockerd config "
        "with the kerong and serial backends at these paths (config/wire.toml does).")
    parser.add_argument("--dir", type=Path, required=True, help="where ports and socket go")
    parser.add_argument("--compartments", type=int, default=8)
    parser.add_argument("--parcels", default="", help="comma-separated compartments with a "
                        "parcel at start, e.g. 1,2,3")
    args = parser.parse_args(argv)
    ids = [str(i) for i in range(1, args.compartments + 1)]
    parcels = [p for p in args.parcels.split(",") if p]
    bank = WireBank(compartments=ids, parcels=parcels, directory=args.dir)

    async def go() -> None:
        task = asyncio.create_task(bank.run())
        await bank.ready.wait()
        print(f"wire bank up: {bank.paths.kerong}, {bank.paths.scanner}, {bank.paths.keypad}, "
              f"control {bank.paths.socket}", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
