"""Keypress to unlock frame of `lockerd run` on the wire: idle, and while `import-bundle` runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    LOCKERD,
    Summary,
    machine_line,
    run_in_work_directory,
    stop_process,
    unique_codes,
)
from benchlib import report as result
from wirelib import (
    KERONG,
    START_TIMEOUT_S,
    STEP_TIMEOUT_S,
    FrameClock,
    LogMarks,
    Ports,
    board_emulator,
    shut_after_pickup,
    start_daemon,
)

from lockerd.dev.provision import BankKit, PlainCode, make_bank
from sim.wire.bank import kerong_wiring
from sim.world import SimWorld

TARGET_RATIO = 2.0
"""The target: p99 keypress-to-pulse while a big import runs within 2x of idle."""
START_S_PER_CODE = 0.0002
"""Time the daemon is given to start per code of its bundle file, beside START_TIMEOUT_S."""
IMPORT_S_PER_CODE = 0.0002
"""Time an import is given per code, beside START_TIMEOUT_S."""
QUIET_S = 0.02
"""Each pickup's keys are written at least this long after the previous pickup ended..."""
PACE_S = 0.3
"""...and this long after the previous one's were: a code and '#' (8 keys) every 0.3 s stays
under the keypad's flood limit (30 keys a second, hal/serial_input.py), idle or not."""
BOARD_PULSE_S = 0.05
"""The emulated boards' pulse: the latch engages again this long after an unlock, and the
door, shut, reads closed at the next poll (the 0.5 s of a real board made a pickup 0.6 s)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` with its real serial keypad and Kerong drivers on "
        "pseudo-terminals (the bench types on the keypad pty and emulates the boards, as "
        "keypress_to_unlock.py), on a bank holding N codes, and time pickups from the "
        "CODE# written on the keypad to the unlock frame read on the board pty: first idle, "
        "then for the whole run of `lockerd import-bundle` of a snapshot of N codes beside it "
        "in its own process (from its start to its exit; another import follows while fewer "
        "than --pickups were timed, up to --imports). Between two pickups the bench waits on "
        "the daemon's log (the door seen open, then shut on its parcel), so it takes no "
        "CPU from the daemon. Prints the p99 of each, their ratio and the target; asserts "
        "nothing.")
    parser.add_argument("--codes", type=int, default=1_000_000, metavar="N",
                        help="codes held and imported (1000000)")
    parser.add_argument("--pickups", type=int, default=200, metavar="N",
                        help="timed pickups idle, and at least this many during imports (200)")
    parser.add_argument("--imports", type=int, default=4, metavar="N",
                        help="imports at most, to time --pickups during them (4)")
    parser.add_argument("--compartments", type=int, default=16, metavar="N",
                        help="compartments of the bank, used in turn (16)")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="work under PATH and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)
    if min(args.codes, args.pickups, args.imports, args.compartments) < 1:
        parser.error("every count must be at least 1")
    if args.codes < args.compartments:
        parser.error("--codes must be at least --compartments")
    return args


@dataclass
class Bank:
    """The daemon on the wire, the boards the bench emulates for it, and its codes."""

    kit: BankKit
    keypad: int
    world: SimWorld
    clock: FrameClock
    marks: LogMarks
    slots: dict[str, tuple[int, int]]
    codes: list[PlainCode]
    used: int = 0
    last_write: float = 0.0

    async def pickup(self) -> float:
        """One pickup on the next compartment: CODE# in one write, the seconds to its unlock
        frame. Untimed after it: the door seen open, shut on its parcel, and the use given
        back (pickup.incomplete), so the code works again."""
        code = self.codes[self.used % len(self.codes)]
        self.used += 1
        cid = code.compartment or ""
        await asyncio.sleep(max(QUIET_S, self.last_write + PACE_S - time.monotonic()))
        self.last_write = time.monotonic()
        frame = self.clock.expect(*self.slots[cid])
        t0 = time.perf_counter()
        os.write(self.keypad, (code.code + "#").encode("ascii"))
        async with asyncio.timeout(STEP_TIMEOUT_S):
            t1 = await frame
        await shut_after_pickup(self.marks, self.world, cid)
        return t1 - t0


def provision(work: Path, args: argparse.Namespace, ports: Ports) -> tuple[BankKit, list[str]]:
    ids = [str(i) for i in range(1, args.compartments + 1)]
    plain = [PlainCode(id=f"p-{n}", code=c, compartment=ids[n % len(ids)], parcel_id=f"PX{n}",
                       max_uses=1)
             for n, c in enumerate(unique_codes(args.codes))]
    wire = ports.open()
    kit = make_bank(
        work / "bank", compartments=len(ids), codes=plain, parcels=ids, socket=False,
        wire=wire.directory,
        overrides={"logging": {"level": "info", "format": "json"},
                   "doors": {"pulse_s": 0.2},
                   "backends": {"kerong": dict(KERONG)}})
    return kit, ids


async def imports(bank: Bank, args: argparse.Namespace,
                  work: Path) -> tuple[list[float], list[float]]:
    """Pickups one after another for the whole of each import, from its start to its exit;
    imports one after another until --pickups were timed or --imports ran."""
    busy: list[float] = []
    imports_s: list[float] = []
    for k in range(args.imports):
        if len(busy) >= args.pickups:
            break
        bundle = work / f"import-{k}.json"
        bundle.write_bytes(bank.kit.bundle(bank.kit.codes, version=2 + k))
        err_path = work / f"import-{k}.log"
        with err_path.open("wb") as err:
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *LOCKERD, "import-bundle", "-c", str(bank.kit.config_path), str(bundle),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        limit_s = START_TIMEOUT_S + args.codes * IMPORT_S_PER_CODE
        try:
            while proc.returncode is None:
                took = await bank.pickup()
                if proc.returncode is None:  # one that ended after the import is not "during"
                    busy.append(took)
                if time.perf_counter() - t0 > limit_s:
                    raise RuntimeError(f"import-bundle ran for more than {limit_s:.0f} s")
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        imports_s.append(time.perf_counter() - t0)
        log = err_path.read_text(encoding="utf-8", errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"import-bundle failed ({proc.returncode}): {log[-2000:]}")
        if "database is locked" in log:
            raise RuntimeError("import-bundle met a locked database")
        bundle.unlink()
    return busy, imports_s


async def measure(args: argparse.Namespace,
                  work: Path) -> tuple[list[float], list[float], list[float]]:
    ports = Ports(work / "wire")
    print(f"provisioning {args.codes} codes...", file=sys.stderr)
    kit, ids = provision(work, args, ports)
    world = SimWorld(ids, parcels=ids, spring_delay_s=0.0)
    emulator = board_emulator(world, ids, pulse_s=BOARD_PULSE_S)
    clock = FrameClock()
    emulator.listeners.append(clock.heard)
    board_task = asyncio.create_task(emulator.run(ports.masters["kerong"]))
    proc, marks = start_daemon(kit, work / "daemon.log")
    try:
        # The daemon applies the bank's bundle file of N codes before it runs.
        await marks.wait(lambda r: r.get("event") == "lockerd running", "the daemon to run",
                         START_TIMEOUT_S + args.codes * START_S_PER_CODE)
        slots = {cid: (int(p.split("/")[0]), int(p.split("/")[1]))
                 for cid, p in kerong_wiring(ids).items()}
        # Codes of every compartment in turn; a code comes back after each use.
        bank = Bank(kit, ports.masters["keypad"], world, clock, marks, slots,
                    kit.codes[: 4 * len(ids)])
        for _ in range(8):  # warm-up
            await bank.pickup()
        idle = [await bank.pickup() for _ in range(args.pickups)]
        busy, imports_s = await imports(bank, args, work)
    finally:
        board_task.cancel()
        code = stop_process(proc)
        ports.close()
    if code != 0:
        raise RuntimeError(f"the daemon exited with status {code}")
    return idle, busy, imports_s


def report(args: argparse.Namespace, idle: list[float], busy: list[float],
           imports_s: list[float]) -> None:
    a, b = Summary.of(idle), Summary.of(busy)
    print("import_while_serving: keypress (CODE# on the keypad pty) to the unlock frame on the "
          "board pty, `lockerd run` on the wire")
    print(f"  {machine_line()}")
    print(f"  bank: {args.codes} codes held, a snapshot of {args.codes} imported by "
          f"`lockerd import-bundle` ({len(imports_s)} imports, "
          f"{', '.join(f'{s:.1f}' for s in imports_s)} s each, pickups from start to exit)")
    print(f"  {'':28} {'n':>5} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for label, s in (("idle (baseline)", a), ("while import-bundle runs", b)):
        print(f"  {label:28} {s.n:>5} {s.median * 1e3:>10.2f} {s.p99 * 1e3:>8.2f} "
              f"{s.max * 1e3:>8.2f}")
    ratio = b.p99 / a.p99 if a.p99 else float("nan")
    verdict = "holds" if ratio <= TARGET_RATIO else "MISSED"
    print(f"  p99 ratio {ratio:.2f}x (target <= {TARGET_RATIO:.1f}x: {verdict})")
    result(f"import_while_serving {args.codes} codes",
           f"p99 keypress to unlock frame {b.p99 * 1e3:.2f} ms while import-bundle runs against "
           f"{a.p99 * 1e3:.2f} ms idle (medians {b.median * 1e3:.2f} and {a.median * 1e3:.2f} ms)",
           ratio, TARGET_RATIO)
    if b.n < args.pickups:
        print(f"  note: only {b.n} pickups fitted in the imports (asked {args.pickups}); "
              "give more --codes or --imports")


def run(args: argparse.Namespace, work: Path) -> None:
    idle, busy, imports_s = asyncio.run(measure(args, work))
    report(args, idle, busy, imports_s)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_work_directory("import_while_serving", args.dir, lambda w: run(args, w))


if __name__ == "__main__":
    sys.exit(main())
