"""Keypress-to-pulse latency of a `lockerd run` subprocess: idle, and while `import-bundle` runs."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

from benchlib import (
    LOCKERD,
    START_TIMEOUT_S,
    Daemon,
    Summary,
    machine_line,
    provision,
    run_in_work_directory,
    start_daemon,
    stop_process,
)
from benchlib import report as result
from sim_pickups import PULSE_S, SPRING_DELAY_S, STEP_TIMEOUT_S, one_pickup

from lockerd.dev.provision import BankKit
from sim.client import SimClient

TARGET_RATIO = 2.0
"""The target: p99 keypress-to-pulse while a big import runs within 2x of idle."""
STAGING = "codes_staging"
START_S_PER_CODE = 0.001
"""Time the daemon is given to start per code of its bundle file, beside benchlib's."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` on a simulated bank holding N codes and time pickups "
        "through the sim control socket (press CODE# -> the door seen open, the doors spring "
        "at once, so that is the pulse): first idle, then while `lockerd import-bundle` of a "
        "snapshot of N codes runs beside it in its own process (timed from the moment its "
        "staging table is being filled until it exits; another import follows while fewer "
        "than --pickups were timed, up to --imports). Prints the p99 of each, their ratio "
        "and the target; asserts nothing.")
    parser.add_argument("--codes", type=int, default=1_000_000, metavar="N",
                        help="codes held and imported (1000000)")
    parser.add_argument("--pickups", type=int, default=200, metavar="N",
                        help="timed pickups idle, and at least this many during imports (200)")
    parser.add_argument("--imports", type=int, default=3, metavar="N",
                        help="imports at most, to time --pickups during them (3)")
    parser.add_argument("--compartments", type=int, default=16, metavar="N",
                        help="compartments of the bank (16)")
    parser.add_argument("--dir", type=Path, default=None, metavar="PATH",
                        help="work under PATH and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)
    if min(args.codes, args.pickups, args.imports, args.compartments) < 1:
        parser.error("every count must be at least 1")
    return args


def import_writing(db: Path) -> bool:
    """Has the import begun writing? Its staging table exists, or (a store that applies a
    snapshot in one transaction, as before the staging table) it holds the write lock."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?",
                        (STAGING,)).fetchone() is not None:
            return True
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        conn.execute("ROLLBACK")
        return False
    finally:
        conn.close()


async def pickups_while(sim: SimClient, kit: BankKit, daemon: Daemon,
                        until: asyncio.subprocess.Process | None, n: int,
                        start: int) -> tuple[list[float], int]:
    """Time pickups in turn over the compartments: `n` of them, or (with `until`) as many as
    fit before that process exits. Returns the times and the next code index."""
    codes = [(c.code, c.compartment or "") for c in kit.codes[: 4 * len(kit.compartments)]]
    times: list[float] = []
    i = start
    while len(times) < n and (until is None or until.returncode is None):
        code, cid = codes[i % len(codes)]
        i += 1
        pickup = await one_pickup(sim, code, cid, daemon, "burst")
        if until is None or until.returncode is None:
            times.append(pickup.open_s)
    return times, i


async def measure(kit: BankKit, daemon: Daemon, args: argparse.Namespace,
                  work: Path) -> tuple[list[float], list[float], list[float]]:
    db = kit.state_dir / "lockerd.db"
    imports_s: list[float] = []
    busy: list[float] = []
    async with SimClient(kit.socket_path, timeout=STEP_TIMEOUT_S) as sim:
        await pickups_while(sim, kit, daemon, None, 8, 0)  # warm-up
        idle, i = await pickups_while(sim, kit, daemon, None, args.pickups, 8)
        for k in range(args.imports):
            if len(busy) >= args.pickups:
                break
            bundle = work / f"import-{k}.json"
            bundle.write_bytes(kit.bundle(kit.codes, version=2 + k))
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *LOCKERD, "import-bundle", "-c", str(kit.config_path), str(bundle),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                # Polled: the staging table is another process's.
                while proc.returncode is None and not import_writing(db):  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                times, i = await pickups_while(sim, kit, daemon, proc, args.pickups, i)
                busy.extend(times)
            finally:
                _, err = await proc.communicate()
            imports_s.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise RuntimeError(f"import-bundle failed ({proc.returncode}): {err.decode()}")
            if b"database is locked" in err:
                raise RuntimeError("import-bundle met a locked database")
            bundle.unlink()
    return idle, busy, imports_s


def report(args: argparse.Namespace, idle: list[float], busy: list[float],
           imports_s: list[float]) -> None:
    a, b = Summary.of(idle), Summary.of(busy)
    print("import_while_serving: keypress (CODE# over the sim socket) to the door seen open")
    print(f"  {machine_line()}")
    print(f"  bank: {args.codes} codes held, a snapshot of {args.codes} imported by "
          f"`lockerd import-bundle` ({len(imports_s)} imports, "
          f"{', '.join(f'{s:.1f}' for s in imports_s)} s each)")
    print(f"  {'':28} {'n':>5} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for label, s in (("idle (baseline)", a), ("while import-bundle runs", b)):
        print(f"  {label:28} {s.n:>5} {s.median * 1e3:>10.2f} {s.p99 * 1e3:>8.2f} "
              f"{s.max * 1e3:>8.2f}")
    ratio = b.p99 / a.p99 if a.p99 else float("nan")
    verdict = "holds" if ratio <= TARGET_RATIO else "MISSED"
    print(f"  p99 ratio {ratio:.2f}x (target <= {TARGET_RATIO:.1f}x: {verdict})")
    result(f"import_while_serving {args.codes} codes",
           f"p99 keypress to pulse {b.p99 * 1e3:.2f} ms while import-bundle runs against "
           f"{a.p99 * 1e3:.2f} ms idle (medians {b.median * 1e3:.2f} and {a.median * 1e3:.2f} ms)",
           ratio, TARGET_RATIO)
    if b.n < args.pickups:
        print(f"  note: only {b.n} pickups fitted in the imports (asked {args.pickups}); "
              "give more --codes or --imports")


def run(args: argparse.Namespace, work: Path) -> None:
    print(f"provisioning {args.codes} codes...", file=sys.stderr)
    kit = provision(work / "bank", compartments=args.compartments, codes=args.codes,
                    doors={"pulse_s": PULSE_S}, sim={"spring_delay_s": SPRING_DELAY_S})
    # The daemon applies the bank's bundle file of N codes before it shows idle: a minute or
    # more at a million codes.
    daemon = start_daemon(kit, timeout_s=START_TIMEOUT_S + args.codes * START_S_PER_CODE)
    try:
        idle, busy, imports_s = asyncio.run(measure(kit, daemon, args, work))
    finally:
        code = stop_process(daemon.proc)
    if code != 0:
        raise RuntimeError(f"the daemon exited with status {code}:\n{daemon.log_tail()}")
    report(args, idle, busy, imports_s)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_work_directory("import_while_serving", args.dir, lambda w: run(args, w))


if __name__ == "__main__":
    sys.exit(main())
