"""The simulator-socket pickup helpers that bench/credentials.py times scans and key presses
with: a pickup record, one pickup over the sim socket, waiting on its `state`, and the
daemon's log marks per pickup."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import Daemon, provision

from lockerd.core import messages
from lockerd.dev.provision import BankKit
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
