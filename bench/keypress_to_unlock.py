"""Keypress to unlock frame on the wire: `lockerd run` with its real serial keypad and Kerong
drivers on pseudo-terminals, beside a minimal correct relay doing the same work, in one run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    Summary,
    filesystem_of,
    machine_line,
    rss_kib,
    run_in_work_directory,
    stop_process,
    unique_codes,
)
from benchlib import report as result
from wire_relay import fill, unlock_frame
from wirelib import (
    KERONG,
    STEP_TIMEOUT_S,
    FrameClock,
    LogMarks,
    Ports,
    board_emulator,
    shut_after_pickup,
    start_daemon,
    until_keypad_open,
)

from hal.kerong.codec import RequestDecoder, encode_unlock
from lockerd.dev.provision import BankKit, PlainCode, make_bank
from sim.wire.bank import WirePaths, kerong_wiring
from sim.world import SimWorld

TARGET = 1.5
# The digits of the "#" phase go out first; this long later the daemon has long taken them.
TYPED_SETTLE_S = 0.05
# Before each timed write, both systems have been left alone this long: the previous pickup's
# lazy flush (the daemon's fdatasync after pickup.incomplete) is not inside the other's window.
QUIET_S = 0.05
PHASES = ("hash", "full")
LABELS = {"hash": "'#' after the code was typed", "full": "full code and '#' in one burst"}
RELAY = Path(__file__).with_name("wire_relay.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` with the serial keypad and Kerong backends on "
        "pseudo-terminals (the bench holds their other ends: it types on the keypad pty and "
        "emulates the boards), and a minimal relay process (bench/wire_relay.py) doing the same "
        "work on ptys of its own. Times each from the first key byte written to the unlock "
        "frame read on the board pty, for '#' typed after the code and for the whole code in "
        "one burst, in interleaved rounds of daemon and relay pickups (in turn, the order "
        "alternating). Prints medians, p99, each round's ratio of medians and their median "
        "beside the 1.5x target; asserts nothing.")
    parser.add_argument("--pickups", type=int, default=200, metavar="N",
                        help="timed pickups of each kind for each of daemon and relay (200)")
    parser.add_argument("--codes", type=int, default=10_000, metavar="N",
                        help="codes held by the daemon's cache and the relay's table (10000)")
    parser.add_argument("--compartments", type=int, default=8, metavar="N",
                        help="compartments of the bank, used in turn (8)")
    parser.add_argument("--rounds", type=int, default=5, metavar="R",
                        help="rounds the timed pickups are split into, both kinds in each; "
                        "the ratio reported is the median of the rounds' ratios (5)")
    parser.add_argument("--warmup", type=int, default=8, metavar="N",
                        help="untimed pickups of each before the timed ones (8)")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="work in PATH (empty) and keep it; default a temporary directory")
    args = parser.parse_args(argv)
    if args.pickups < 1 or args.compartments < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--pickups, --compartments and --rounds must be at least 1, --warmup at "
                     "least 0")
    args.rounds = min(args.rounds, args.pickups)
    if args.codes < args.compartments:
        parser.error("--codes must be at least --compartments")
    return args


# -- the wire harness ---------------------------------------------------------------------


def watch_unlocks(fd: int, clock: FrameClock) -> None:
    """The relay's board pty: nobody answers there; only its unlock frames are timed."""
    decoder = RequestDecoder()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 256)
        except OSError:
            return
        for request in decoder.feed(data):
            clock.heard(request)

    asyncio.get_running_loop().add_reader(fd, readable)


# -- the two systems ----------------------------------------------------------------------


@dataclass
class System:
    """One thing timed: its keypad master, the clock on its board pty, its process."""

    name: str
    keypad: int
    clock: FrameClock
    proc: subprocess.Popen[bytes]
    samples: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    rounds: dict[str, list[list[float]]] = field(
        default_factory=lambda: {p: [] for p in PHASES})
    """The samples again, one list per round."""

    async def press(self, code: str, slot: tuple[int, int], phase: str) -> float:
        """Type `code` and '#' as `phase` says; the seconds from the timed write to the frame.
        The timed write follows a quiet wait in both phases (the digits in the "#" one)."""
        keys = code + "#"
        if phase == "hash":
            os.write(self.keypad, code.encode("ascii"))
            await asyncio.sleep(TYPED_SETTLE_S)
            keys = "#"
        else:
            await asyncio.sleep(QUIET_S)
        frame = self.clock.expect(*slot)
        t0 = time.perf_counter()
        os.write(self.keypad, keys.encode("ascii"))
        async with asyncio.timeout(STEP_TIMEOUT_S):
            t1 = await frame
        return t1 - t0


def provision_daemon(directory: Path, wire: Path, codes: list[PlainCode], n: int) -> BankKit:
    return make_bank(
        directory, compartments=n, codes=codes, parcels=[str(i) for i in range(1, n + 1)],
        socket=False, wire=wire,
        overrides={"logging": {"level": "info", "format": "json"},
                   "doors": {"pulse_s": 0.2},
                   "backends": {"kerong": dict(KERONG)}})


def start_relay(kit: BankKit, relay_wire: WirePaths, db: Path,
                wiring: dict[str, str]) -> subprocess.Popen[bytes]:
    slots = {cid: [int(x) for x in place.split("/")] for cid, place in wiring.items()}
    proc = subprocess.Popen(
        [sys.executable, str(RELAY), "--keypad", str(relay_wire.keypad), "--kerong",
         str(relay_wire.kerong), "--db", str(db), "--code-key", kit.code_key.hex(),
         "--locker", kit.locker_id, "--wiring", json.dumps(slots)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        stop_process(proc)
        raise RuntimeError("the relay did not start")
    return proc


async def daemon_pickup(system: System, marks: LogMarks, world: SimWorld, code: PlainCode,
                        slot: tuple[int, int], phase: str) -> float:
    """One pickup on the daemon; the door is seen open and shut on its parcel (the use comes
    back: pickup.incomplete), so the same code works again in the next phase."""
    cid = code.compartment or ""
    taken = await system.press(code.code, slot, phase)
    await shut_after_pickup(marks, world, cid)
    return taken


Pair = Callable[[PlainCode, str, bool], Awaitable[tuple[float, float]]]


async def run_rounds(args: argparse.Namespace, timed: list[PlainCode], systems: list[System],
                     pair: Pair) -> None:
    """The warm-up pickups, then the timed ones in `args.rounds` rounds of both kinds, each
    code once per kind, daemon and relay in turn (the order alternating)."""
    daemon, relay = systems
    for phase in PHASES:
        for i, code in enumerate(timed[: args.warmup]):
            await pair(code, phase, i % 2 == 1)
    # Rounds of both kinds in turn: a slow spell of the shared disk or CPU falls on one
    # round of each system and kind, not on all of one kind, and each round's ratio
    # compares pickups made at the same time.
    rest = timed[args.warmup:]
    for r in range(args.rounds):
        chunk = rest[r * len(rest) // args.rounds:(r + 1) * len(rest) // args.rounds]
        for phase in PHASES:
            for system in systems:
                system.rounds[phase].append([])
            for i, code in enumerate(chunk):
                took, relay_took = await pair(code, phase, i % 2 == 1)
                for system, value in ((daemon, took), (relay, relay_took)):
                    system.samples[phase].append(value)
                    system.rounds[phase][-1].append(value)


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ids = [str(i) for i in range(1, args.compartments + 1)]
    plain = [PlainCode(id=f"p-{i}", code=c, compartment=ids[i % len(ids)], parcel_id=f"PX{i}")
             for i, c in enumerate(unique_codes(args.codes))]
    timed = plain[: args.warmup + args.pickups]
    wiring = kerong_wiring(ids)
    daemon_ports, relay_ports = Ports(work / "wire"), Ports(work / "relay-wire")
    daemon_wire, relay_wire = daemon_ports.open(), relay_ports.open()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        world = SimWorld(ids, parcels=ids, spring_delay_s=0.0)
        emulator = board_emulator(world, ids)
        daemon_clock, relay_clock = FrameClock(), FrameClock()
        emulator.listeners.append(daemon_clock.heard)
        board_task = asyncio.create_task(emulator.run(daemon_ports.masters["kerong"]))
        watch_unlocks(relay_ports.masters["kerong"], relay_clock)

        kit = provision_daemon(work / "bank", daemon_wire.directory, plain, len(ids))
        db = work / "relay.db"
        fill(db, [(kit.digest(c.code), c.id, c.compartment or "") for c in plain])
        relay = start_relay(kit, relay_wire, db, wiring)
        procs.append(relay)
        t0 = time.monotonic()
        proc, marks = start_daemon(kit, work / "daemon.log")
        procs.append(proc)
        await until_keypad_open(marks)
        started_s = time.monotonic() - t0
        systems = [System("lockerd run", daemon_ports.masters["keypad"], daemon_clock, proc),
                   System("minimal relay", relay_ports.masters["keypad"], relay_clock, relay)]
        slots = {cid: (int(p.split("/")[0]), int(p.split("/")[1])) for cid, p in wiring.items()}
        for frame_cid, (b, n) in slots.items():
            assert unlock_frame(b, n) == encode_unlock(b, n), frame_cid

        async def pair(code: PlainCode, phase: str, relay_first: bool) -> tuple[float, float]:
            """One pickup on each, in the order given; (daemon's, relay's)."""
            slot = slots[code.compartment or ""]
            if relay_first:
                relay_took = await systems[1].press(code.code, slot, phase)
                took = await daemon_pickup(systems[0], marks, world, code, slot, phase)
                return took, relay_took
            took = await daemon_pickup(systems[0], marks, world, code, slot, phase)
            return took, await systems[1].press(code.code, slot, phase)

        await run_rounds(args, timed, systems, pair)
        rss = {s.name: rss_kib(s.proc.pid) for s in systems}
        board_task.cancel()
        await asyncio.gather(board_task, return_exceptions=True)
        return {"systems": systems, "started_s": started_s, "rss": rss,
                "kerong_requests": len(emulator.requests)}
    finally:
        for p in procs:
            stop_process(p)
            if p.stdout is not None:
                p.stdout.close()
        daemon_ports.close()
        relay_ports.close()


# -- output -------------------------------------------------------------------------------


def row(label: str, values: list[float]) -> str:
    s = Summary.of(values)
    ms = [v * 1000 for v in (s.median, s.p99, s.min, s.max)]
    return f"  {label:<44}{s.n:>6}{ms[0]:>9.3f}{ms[1]:>9.3f}{ms[2]:>9.3f}{ms[3]:>9.3f}"


def round_ratios(daemon: list[list[float]], relay: list[list[float]]) -> list[float]:
    """Each round's daemon median over its relay median (rounds with a sample on each)."""
    return [Summary.of(d).median / Summary.of(r).median
            for d, r in zip(daemon, relay, strict=True) if d and r and Summary.of(r).median]


def report(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    daemon, relay = results["systems"]
    print(f"keypress_to_unlock: {args.pickups} timed pickups of each kind on each system "
          f"(+{args.warmup} warm-up) in {args.rounds} rounds, {args.compartments} compartments, "
          f"{args.codes} codes")
    print(f"  {machine_line()}")
    print(f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; work in {work} ({filesystem_of(work)}); "
          f"daemon up in {results['started_s']:.2f} s")
    print("  timed: first key byte written on the keypad pty -> unlock frame read on the "
          "board pty")
    print()
    print(f"  {'':<44}{'n':>6}{'median':>9}{'p99':>9}{'min':>9}{'max':>9}   (ms)")
    for phase in PHASES:
        print(f"{LABELS[phase]}:")
        print(row(relay.name + " (baseline)", relay.samples[phase]))
        print(row(daemon.name, daemon.samples[phase]))
    print()
    for phase in PHASES:
        d, r = Summary.of(daemon.samples[phase]), Summary.of(relay.samples[phase])
        for stat in ("median", "p99"):
            ratio = getattr(d, stat) / getattr(r, stat)
            verdict = "holds" if ratio <= TARGET else "MISSED"
            print(f"  {LABELS[phase] + ', all ' + stat:<44} {ratio:5.2f}x the relay "
                  f"(target <= {TARGET}x: {verdict})")
    print()
    medians: dict[str, float] = {}
    for phase in PHASES:
        ratios = round_ratios(daemon.rounds[phase], relay.rounds[phase])
        medians[phase] = Summary.of(ratios).median
        shown = " ".join(f"{x:.2f}" for x in ratios)
        print(f"  {LABELS[phase]}, ratio of medians in each of {len(ratios)} rounds: {shown}"
              f" (median {medians[phase]:.2f}x)")
    for phase in PHASES:
        d, r = Summary.of(daemon.samples[phase]), Summary.of(relay.samples[phase])
        result(f"keypress_to_unlock {phase} median",
               f"{LABELS[phase]} {d.median * 1000:.3f} ms against the minimal relay "
               f"{r.median * 1000:.3f} ms ({filesystem_of(work)}, the median of "
               f"{len(daemon.rounds[phase])} rounds' ratios)", medians[phase], TARGET)
    rss = results["rss"]
    print(f"  RSS at the end: lockerd {rss[daemon.name] / 1024:.1f} MiB, relay "
          f"{rss[relay.name] / 1024:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(work: Path) -> None:
        results = asyncio.run(measure(args, work))
        report(args, work, results)

    return run_in_work_directory("keypress_to_unlock", args.dir, run)


if __name__ == "__main__":
    sys.exit(main())
