"""Idle CPU, wake-ups, threads and memory of `lockerd run` with 100k codes, on the simulator
and on the wire (real drivers on ptys), beside a bare process of the libraries it uses."""

from __future__ import annotations

import argparse
import asyncio
import glob
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CLK_TCK,
    cpu_seconds,
    machine_line,
    proc_status,
    rss_kib,
    run_in_work_directory,
    start_daemon,
    stop_process,
)
from benchlib import report as result
from wirelib import KERONG, Ports, board_emulator, until_keypad_open
from wirelib import start_daemon as start_wire_daemon

from lockerd.dev.provision import PlainCode, make_bank
from sim.world import SimWorld

CPU_TARGET_PCT = 0.2
WAKEUPS_TARGET = 5.0
RSS_TARGET = 1.3
# The libraries `lockerd run` imports, and nothing of lockerd: what any daemon doing this work
# in Python would carry. It prints "ready" once they are in, then idles in asyncio. structlog
# is imported as lockerd/logs.py imports it: without rich (installed with textual), which
# lockerd does not use.
BARE = (
    "import asyncio, sqlite3, json, hashlib, hmac, logging, tomllib, ssl, sys; "
    "import cryptography.hazmat.primitives.asymmetric.ed25519, "
    "cryptography.hazmat.primitives.hashes; "
    "sys.modules['rich'] = None; import structlog; del sys.modules['rich']; "
    "import msgspec, aiomqtt, serial, cbor2, base45; "
    "print('ready', flush=True); asyncio.run(asyncio.sleep({s}))"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` twice with N codes: on the simulator backend, and on "
        "the wire (Kerong boards emulated in this process, serial keypad and scanner on ptys, "
        "polling as config/wire.toml), plus a bare process that imports the libraries lockerd "
        "uses (asyncio, sqlite3, cryptography, msgspec, structlog, aiomqtt, pyserial, ...) "
        "without lockerd and idles. Over one idle window: CPU % (utime+stime), wake-ups/s "
        "(voluntary + involuntary context switches of all threads), threads, RSS. Prints the "
        "ratios beside the targets; asserts nothing.")
    parser.add_argument("--seconds", type=float, default=60.0, metavar="S",
                        help="length of the idle window (60)")
    parser.add_argument("--codes", type=int, default=100_000, metavar="N",
                        help="pickup codes in each daemon's cache (100000)")
    parser.add_argument("--compartments", type=int, default=16, metavar="N",
                        help="compartments of each bank (16)")
    parser.add_argument("--settle", type=float, default=15.0, metavar="S",
                        help="wait this long after start-up before the window opens (15: past "
                        "the fast polling that follows a start)")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="work in PATH (empty) and keep it; default a temporary directory")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.settle < 0 or args.codes < 0 or args.compartments < 1:
        parser.error("--seconds must be positive, --settle and --codes not negative")
    return args


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of `pid`: its wake-ups."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split(":")[1])
        except OSError:
            continue  # a thread that ended meanwhile
    return total


@dataclass
class Watched:
    """One process measured over the window."""

    label: str
    pid: int
    cpu_s: float = 0.0
    switches: int = 0
    rss_kib: int = 0
    hwm_kib: int = 0
    threads: int = 0

    def begin(self) -> None:
        self.cpu_s = -cpu_seconds(self.pid)
        self.switches = -context_switches(self.pid)

    def end(self) -> None:
        self.cpu_s += cpu_seconds(self.pid)
        self.switches += context_switches(self.pid)
        status = proc_status(self.pid)
        self.rss_kib = rss_kib(self.pid)
        self.hwm_kib = int(status["VmHWM"].split()[0])
        self.threads = int(status["Threads"])


def start_bare(lifetime_s: float, cwd: Path) -> subprocess.Popen[str]:
    # Run outside the checkout: `python -c` puts its working directory first on sys.path.
    proc = subprocess.Popen([sys.executable, "-c", BARE.format(s=lifetime_s)], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        stop_process(proc)
        raise RuntimeError("the bare library process did not start")
    return proc


def codes(n: int, compartments: int) -> list[PlainCode]:
    return [PlainCode(id=f"p-{i}", code=f"{i:08d}", compartment=str(1 + i % compartments),
                      parcel_id=f"PX{i}") for i in range(n)]


async def measure(args: argparse.Namespace, work: Path,
                  first_rss: dict[str, int]) -> tuple[list[Watched], float]:
    ids = [str(i) for i in range(1, args.compartments + 1)]
    procs: list[subprocess.Popen[bytes]] = []
    ports = Ports(work / "wire")
    wire = ports.open()
    bare: subprocess.Popen[str] | None = None
    emulator_task: asyncio.Task[None] | None = None
    try:
        world = SimWorld(ids, parcels=ids, spring_delay_s=0.0)
        emulator = board_emulator(world, ids)
        emulator_task = asyncio.create_task(emulator.run(ports.masters["kerong"]))
        sim_kit = make_bank(work / "sim-bank", compartments=args.compartments,
                            codes=codes(args.codes, args.compartments), parcels=ids,
                            overrides={"logging": {"level": "info", "format": "json"}})
        wire_kit = make_bank(work / "wire-bank", compartments=args.compartments,
                             codes=codes(args.codes, args.compartments), parcels=ids,
                             socket=False, wire=wire.directory,
                             overrides={"logging": {"level": "info", "format": "json"},
                                        "backends": {"kerong": dict(KERONG)}})
        # A first start takes the bundle file in; the bank idles after the next boot, which
        # finds the file already applied. Both RSS figures are printed.
        for start in ("first", "again"):
            for p in procs:
                stop_process(p)
            procs.clear()
            sim_daemon = await asyncio.to_thread(start_daemon, sim_kit)
            procs.append(sim_daemon.proc)
            wire_proc, marks = start_wire_daemon(wire_kit, work / f"wire-daemon-{start}.log")
            procs.append(wire_proc)
            await until_keypad_open(marks)
            if start == "first":
                first_rss.update(sim=rss_kib(sim_daemon.pid), wire=rss_kib(wire_proc.pid))
        bare = start_bare(args.settle + args.seconds + 60, work)
        await asyncio.sleep(args.settle)
        watched = [Watched("bare libraries, asyncio idle", bare.pid),
                   Watched("lockerd run, simulator", sim_daemon.pid),
                   Watched("lockerd run, wire (real drivers)", wire_proc.pid)]
        for w in watched:
            w.begin()
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        window = time.monotonic() - t0
        for w in watched:
            w.end()
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a daemon exited during the window (status {p.returncode})")
        return watched, window
    finally:
        if emulator_task is not None:
            emulator_task.cancel()
            await asyncio.gather(emulator_task, return_exceptions=True)
        for p in procs:
            stop_process(p)
        if bare is not None:
            stop_process(bare)
            if bare.stdout is not None:
                bare.stdout.close()
        ports.close()


def verdict(ok: bool) -> str:
    return "holds" if ok else "MISSED"


def report(args: argparse.Namespace, watched: list[Watched], window: float,
           first_rss: dict[str, int]) -> None:
    tick = 1 / CLK_TCK
    print(f"idle_footprint: {window:.1f} s idle window after {args.settle:g} s settling; "
          f"daemons with {args.compartments} compartments and {args.codes} codes, on their "
          "second start (the bundle file already applied)")
    print(f"  {machine_line()}")
    print(f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; CPU time resolution "
          f"{tick * 1000:.0f} ms = {tick / window * 100:.3f} % of the window")
    print()
    print(f"  {'process':<36}{'CPU s':>8}{'CPU %':>8}{'wakeups/s':>11}{'threads':>9}"
          f"{'RSS MiB':>9}{'HWM MiB':>9}")
    for w in watched:
        print(f"  {w.label:<36}{w.cpu_s:>8.2f}{w.cpu_s / window * 100:>8.3f}"
              f"{w.switches / window:>11.2f}{w.threads:>9}{w.rss_kib / 1024:>9.1f}"
              f"{w.hwm_kib / 1024:>9.1f}")
    bare, sim, wire = watched
    print()
    if args.settle < KERONG["fast_poll_for_s"]:
        print(f"  note: --settle {args.settle:g} s is shorter than fast_poll_for_s = "
              f"{KERONG['fast_poll_for_s']:g} s: the wire daemon's window starts while it still "
              "polls fast after its start")
    cpu = wire.cpu_s / window * 100
    wakeups = wire.switches / window
    print(f"  wire idle CPU {cpu:.3f} % (target < {CPU_TARGET_PCT} %: "
          f"{verdict(cpu < CPU_TARGET_PCT)}); wake-ups {wakeups:.2f}/s "
          f"(target < {WAKEUPS_TARGET:g}/s: {verdict(wakeups < WAKEUPS_TARGET)})")
    result("idle_footprint wire CPU", f"lockerd run on the wire idle {wire.cpu_s:.2f} s of "
           f"CPU in {window:.0f} s", cpu, CPU_TARGET_PCT, unit=" %")
    result("idle_footprint wire wakeups", f"lockerd run on the wire idle, {wire.threads} "
           "threads", wakeups, WAKEUPS_TARGET, unit=" /s")
    for w, first in ((sim, first_rss["sim"]), (wire, first_rss["wire"])):
        ratio = w.rss_kib / bare.rss_kib
        result(f"idle_footprint RSS {w.label.split(',')[-1].strip()}",
               f"{w.label} {w.rss_kib / 1024:.1f} MiB against the bare libraries "
               f"{bare.rss_kib / 1024:.1f} MiB", ratio, RSS_TARGET)
        print(f"  {w.label}: RSS {ratio:.2f}x the bare libraries (target <= {RSS_TARGET}x: "
              f"{verdict(ratio <= RSS_TARGET)}); on its first start, which applied the "
              f"bundle file, {first / bare.rss_kib:.2f}x ({first / 1024:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(work: Path) -> None:
        first_rss: dict[str, int] = {}
        watched, window = asyncio.run(measure(args, work, first_rss))
        report(args, watched, window, first_rss)

    return run_in_work_directory("idle_footprint", args.dir, run)


if __name__ == "__main__":
    sys.exit(main())
