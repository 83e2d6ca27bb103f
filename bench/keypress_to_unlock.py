"""Keypress-to-unlock latency of a `lockerd run` subprocess, beside same-run socket baselines."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import (
    Daemon,
    Summary,
    exit_on_sigterm,
    filesystem_of,
    machine_line,
    provision,
    rss_kib,
    start_daemon,
    stop_process,
)

from lockerd.core import messages
from lockerd.dev.provision import BankKit
from lockerd.store import EventLog, open_database
from lockerd.timeutil import utcnow
from sim.client import SimClient

STEP_TIMEOUT_S = 10.0
PULSE_S = 0.2
SPRING_DELAY_S = 0.0


@dataclass(frozen=True)
class Pickup:
    phase: str
    """warmup | burst (CODE# in one press) | hash (digits typed first, "#" timed alone)."""
    compartment: str
    open_s: float
    """press sent -> first `state` reply with the compartment's door_open true."""
    committed_s: float
    """press sent -> first `state` reply whose display says "Door N is open"."""
    polls: int
    pressed_at: float
    """Wall-clock time (time.time) the press was sent, to line up with the daemon's log."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` on a simulated bank (spring delay 0) as a subprocess "
        "and time N pickups through the simulator's control socket, twice: CODE# sent in one "
        "press, then the digits typed first and the '#' timed alone. Each is timed from "
        "sending the press to the first `state` reply showing the door open, and to the first "
        "showing 'Door N is open' (pickup.opened committed). Same-run baselines: an in-process "
        "Unix-socket JSON round trip, the sim socket's `state` round trip, and one durable "
        "SQLite commit. Prints figures; asserts nothing."
    )
    parser.add_argument(
        "--pickups",
        type=int,
        default=1000,
        metavar="N",
        help="timed pickups of each kind, also the number of baseline round trips and commits "
        "(1000)",
    )
    parser.add_argument(
        "--compartments",
        type=int,
        default=16,
        metavar="N",
        help="compartments of the bank, used in turn (16)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=16,
        metavar="N",
        help="untimed pickups before the timed ones (16)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="provision the bank under PATH and keep it (default: a temporary "
        "directory, removed at exit); choose the disk whose fsync to measure",
    )
    args = parser.parse_args(argv)
    if args.pickups < 1 or args.compartments < 1 or args.warmup < 0:
        parser.error("--pickups and --compartments must be at least 1, --warmup at least 0")
    return args


# -- baselines --------------------------------------------------------------------------------


async def echo_round_trips(directory: Path, reply: bytes, n: int) -> list[float]:
    """A tiny asyncio server in this process answering every JSON line with `reply`, and a
    SimClient (the same client code as the daemon's baseline) sending `state` requests."""
    path = directory / "echo.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            json.loads(line)
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path)
    try:
        async with SimClient(path) as client:
            return await _state_round_trips(client, n)
    finally:
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)


async def _state_round_trips(client: SimClient, n: int) -> list[float]:
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.state()
        samples.append(time.perf_counter() - t0)
    return samples


def commit_times(directory: Path, n: int) -> list[float]:
    """One event per transaction, as the daemon commits them: same store code, WAL,
    synchronous=FULL, on the same filesystem as the daemon's database."""
    db = open_database(directory / "commit-baseline.db")
    try:
        log = EventLog(db)
        samples: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            log.record(
                type="bench.commit",
                at=utcnow(),
                compartment="1",
                code_id=f"c-{i}",
                data={"attempt": 1, "kind": "pickup", "source": "keypad"},
            )
            samples.append(time.perf_counter() - t0)
        return samples
    finally:
        db.close()


# -- pickups ----------------------------------------------------------------------------------


async def wait_state(
    sim: SimClient, cond: Callable[[dict[str, Any]], bool], what: str, daemon: Daemon
) -> dict[str, Any]:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        state = await sim.state()
        if cond(state):
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out waiting for {what}; display {state['display']!r}\n"
                f"daemon log:\n{daemon.log_tail()}"
            )


async def one_pickup(sim: SimClient, code: str, cid: str, daemon: Daemon, phase: str) -> Pickup:
    """One pickup on compartment `cid`. Phase "burst" (and "warmup") times CODE# sent in one
    press; phase "hash" types the digits untimed first and times the "#" alone."""
    # Untimed: the compartment is shut and latched (its previous pulse may still be running).
    await wait_state(
        sim,
        lambda s: s["compartments"][cid]["locked"] and not s["compartments"][cid]["door_open"],
        f"door {cid} latched",
        daemon,
    )
    keys = code + "#"
    if phase == "hash":
        typed = "Code: " + "*" * len(code)
        await sim.press(code)
        await wait_state(sim, lambda s: s["display"].startswith(typed), "digits typed", daemon)
        keys = "#"
    opened_text = f"Door {cid} is open"
    open_s: float | None = None
    polls = 0
    deadline = time.monotonic() + STEP_TIMEOUT_S
    pressed_at = time.time()
    t0 = time.perf_counter()
    await sim.press(keys)
    while True:
        state = await sim.state()
        now = time.perf_counter()
        polls += 1
        if open_s is None and state["compartments"][cid]["door_open"]:
            open_s = now - t0
        if open_s is not None and state["display"].startswith(opened_text):
            committed_s = now - t0
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"code for compartment {cid} did not open it; display "
                f"{state['display']!r}\ndaemon log:\n{daemon.log_tail()}"
            )
    # Untimed: close the door on the parcel (pickup.incomplete gives the use back, so the code
    # works again) and wait until the daemon has recorded it.
    await sim.door(cid, "close")
    await wait_state(
        sim,
        # Built from the daemon's own message, so a change of wording cannot stall the run.
        lambda s: s["display"] == messages.pickup_incomplete(cid).text,
        f"door {cid} closed on its parcel",
        daemon,
    )
    assert open_s is not None
    return Pickup(phase, cid, open_s, committed_s, polls, pressed_at)


async def measure(
    kit: BankKit, daemon: Daemon, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    async with SimClient(kit.socket_path, timeout=STEP_TIMEOUT_S) as sim:
        # The echo server answers with a real `state` reply, so both baselines move and
        # decode the same bytes with the same client code.
        state_line = await sim.request_raw(b'{"op": "state"}\n')
        echo = await echo_round_trips(work, state_line, args.pickups)
        state = await _state_round_trips(sim, args.pickups)
        codes = [(c.code, c.compartment or "") for c in kit.codes]
        pickups = [
            await one_pickup(sim, code, cid, daemon, "warmup") for code, cid in codes[: args.warmup]
        ]
        rss_before = rss_kib(daemon.pid)
        for phase in ("burst", "hash"):
            # Both phases use the same codes: each pickup gave its use back.
            for code, cid in codes[args.warmup :]:
                pickups.append(await one_pickup(sim, code, cid, daemon, phase))
        rss_after = rss_kib(daemon.pid)
    return {
        "echo": echo,
        "state": state,
        "pickups": pickups,
        "state_bytes": len(state_line),
        "rss_kib": (rss_before, rss_after),
    }


MARKS = ("granted", "lock.pulse", "door.opened", "pickup.opened")


def daemon_marks(log_path: Path, pickups: list[Pickup]) -> list[dict[str, float]]:
    """For every pickup, in order, the wall-clock times the daemon logged "access granted" and
    the events lock.pulse, door.opened and pickup.opened (an event line is written after its
    commit). Matched by order of "access granted" and then by compartment."""
    marks: list[dict[str, float]] = [{} for _ in pickups]
    current: dict[str, int] = {}
    granted = 0
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            at = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        cid = rec.get("compartment")
        mark = "granted" if rec.get("event") == "access granted" else rec.get("type")
        if mark == "granted":
            if granted >= len(pickups) or pickups[granted].compartment != cid:
                return []  # not the sequence this run produced: no breakdown
            current[cid] = granted
            granted += 1
        if mark in MARKS and cid in current:
            marks[current[cid]].setdefault(str(mark), at)
    return marks


def intervals(
    pickups: list[Pickup], marks: list[dict[str, float]], phase: str
) -> dict[str, list[float]]:
    steps: dict[str, list[float]] = {
        "press sent -> access granted": [],
        "granted -> lock.pulse committed": [],
        "lock.pulse -> door.opened committed": [],
        "door.opened -> pickup.opened committed": [],
    }
    names = list(steps)
    for pickup, m in zip(pickups, marks, strict=True):
        if pickup.phase != phase or any(k not in m for k in MARKS):
            continue
        steps[names[0]].append(m["granted"] - pickup.pressed_at)
        for name, (a, b) in zip(names[1:], itertools.pairwise(MARKS), strict=True):
            steps[name].append(m[b] - m[a])
    return steps


# -- output -----------------------------------------------------------------------------------


def row(label: str, values: list[float]) -> str:
    s = Summary.of(values)
    ms = [v * 1000 for v in (s.median, s.p99, s.min, s.max)]
    return f"  {label:<48}{s.n:>6}{ms[0]:>9.3f}{ms[1]:>9.3f}{ms[2]:>9.3f}{ms[3]:>9.3f}"


def report(
    kit: BankKit,
    daemon: Daemon,
    args: argparse.Namespace,
    results: dict[str, Any],
    commits: list[float],
) -> None:
    pickups: list[Pickup] = results["pickups"]
    burst = [p for p in pickups if p.phase == "burst"]
    hashed = [p for p in pickups if p.phase == "hash"]
    print(
        f"keypress_to_unlock: {args.pickups} timed pickups x 2 ways (+{args.warmup} warm-up) "
        f"on {args.compartments} compartments, {len(kit.codes)} codes in the cache"
    )
    print(f"  {machine_line()}")
    print(
        f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; bank in {kit.directory} "
        f"({filesystem_of(kit.directory)})"
    )
    print(
        f"  simulator spring_delay_s = {SPRING_DELAY_S:g} (default 0.05 s, which would add "
        f"50 ms to every open); doors.pulse_s = {PULSE_S:g}; daemon up in "
        f"{daemon.started_s:.2f} s"
    )
    print()
    print(f"  {'':<48}{'n':>6}{'median':>9}{'p99':>9}{'min':>9}{'max':>9}   (ms)")
    print("baselines, same run:")
    print(row("echo round trip (in-process asyncio server)", results["echo"]))
    print(row("sim `state` round trip (daemon, no key press)", results["state"]))
    print(row("SQLite commit of one event (WAL, FULL)", commits))
    print("daemon: sent -> first `state` reply showing it")
    print(row("CODE# in one press -> door open", [p.open_s for p in burst]))
    print(row("CODE# in one press -> 'Door N is open'", [p.committed_s for p in burst]))
    print(row("'#' alone (digits typed) -> door open", [p.open_s for p in hashed]))
    print(row("'#' alone (digits typed) -> 'Door N is open'", [p.committed_s for p in hashed]))
    marks = daemon_marks(daemon.log_path, pickups)
    if marks:
        print("inside the daemon (its log timestamps), CODE# in one press:")
        for name, values in intervals(pickups, marks, "burst").items():
            print(row(name, values))
        hash_steps = intervals(pickups, marks, "hash")
        print(row("'#' alone: press sent -> access granted", hash_steps[next(iter(hash_steps))]))
    polls = sorted(p.polls for p in burst + hashed)
    state_median = Summary.of(results["state"]).median
    open_median = Summary.of([p.open_s for p in burst]).median
    print()
    print(
        f"  `state` polls per pickup: median {polls[len(polls) // 2]}, max {polls[-1]} "
        f"(state reply {results['state_bytes']} bytes); CODE# -> door open is "
        f"{open_median / state_median:.1f}x a bare `state` round trip"
    )
    before, after = results["rss_kib"]
    timed = len(burst) + len(hashed)
    print(
        f"  daemon RSS before the timed pickups {before / 1024:.1f} MiB, after "
        f"{after / 1024:.1f} MiB ({(after - before) / max(1, timed):+.1f} KiB per pickup)"
    )


def provision_bank(directory: Path, args: argparse.Namespace) -> BankKit:
    """The timed bank: short pulses, doors that spring at once, and one pickup code for every
    timed and warm-up pickup (the size of the code cache the lookups run against)."""
    return provision(
        directory,
        compartments=args.compartments,
        codes=args.pickups + args.warmup,
        doors={"pulse_s": PULSE_S},
        sim={"spring_delay_s": SPRING_DELAY_S},
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    temp = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="lkbench-")) if temp else args.dir
    daemon: Daemon | None = None
    status = 0
    try:
        if (work / "bank").exists():
            raise RuntimeError(f"{work / 'bank'} exists: give --dir a fresh directory")
        work.mkdir(parents=True, exist_ok=True)
        kit = provision_bank(work / "bank", args)
        daemon = start_daemon(kit)
        results = asyncio.run(measure(kit, daemon, args, work))
        commits = commit_times(work, args.pickups)
        report(kit, daemon, args, results, commits)
    except RuntimeError as exc:
        print(f"keypress_to_unlock: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("keypress_to_unlock: interrupted", file=sys.stderr)
        status = 130
    finally:
        if daemon is not None:
            code = stop_process(daemon.proc)
            if code != 0 and status == 0:
                print(
                    f"keypress_to_unlock: the daemon exited with status {code}:\n"
                    f"{daemon.log_tail()}",
                    file=sys.stderr,
                )
                status = 1
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
