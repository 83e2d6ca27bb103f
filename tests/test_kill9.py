"""SIGKILL at random points of a workload of pickups and deposits: after every restart no event
is missing, no code is consumed without its event, every confirmed deposit is on record (and
nothing else is), and the database is intact."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from waiting import until_value

from lockerd.dev.provision import BankKit, PlainCode, to_toml
from lockerd.store import CodeStore, open_database
from lockerd.store.parcels import ParcelStore
from sim.client import SimClient
from sim.world import SimError

pytestmark = pytest.mark.e2e

KILLS = 52
SEED = 20261129

# Compartments 1-4 hold the pickup parcels of today's workload (the sim always has a parcel
# there); 5-8 start empty and take the deposits. 1-4 are of the largest size and never free
# (a parcel is always inside when a deposit is chosen), so assignment only ever picks 5-8.
PICKUP_DOORS = ("1", "2", "3", "4")
DEPOSIT_DOORS = ("5", "6", "7", "8")
DEPOSIT_SIZES = ("S", "M", "L")
SIZES = {**dict.fromkeys(PICKUP_DOORS, "L"), "5": "S", "6": "M", "7": "M", "8": "L"}
CODES = {cid: cid * 6 for cid in PICKUP_DOORS}  # compartment -> its pickup code
# The parcels couriers bring, each with a pickup code naming only the parcel (the door is the
# one holding it on record), reusable so the same parcel can come and go many times.
PARCELS = {f"PD{n}": f"6{n:05d}" for n in range(1, 9)}  # parcel id -> its pickup code
COURIER_ID, COURIER = "c-1", "700700"
DROP_ID, DROP = "d-1", "800800"
WAIT_S = 2.0  # longer than a whole round: a wait that runs out is a daemon that stopped


def bank_codes() -> list[PlainCode]:
    return [
        *(PlainCode(f"p-{cid}", code, cid, parcel_id=f"PX{cid}", max_uses=10_000)
          for cid, code in CODES.items()),
        *(PlainCode(f"q-{pid}", code, None, parcel_id=pid, max_uses=10_000)
          for pid, code in PARCELS.items()),
        PlainCode(COURIER_ID, COURIER, None, kind="courier", max_uses=10_000),
        PlainCode(DROP_ID, DROP, None, kind="deposit", max_uses=10_000),
    ]


# -- the workload -----------------------------------------------------------------------------


async def until(sim: SimClient, cond: Callable[[dict[str, Any]], bool],
                what: str) -> dict[str, Any]:
    """Poll the simulator's state until `cond` holds; the state that satisfied it."""
    return await until_value(sim.state, cond, WAIT_S, what=what)


def shows(*texts: str) -> Callable[[dict[str, Any]], bool]:
    return lambda state: any(t in state["display"] for t in texts)


async def pickup(sim: SimClient, rng: random.Random) -> None:
    """Today's pickup at 1-4: open, then close with or without the parcel; it goes back in."""
    cid = rng.choice(PICKUP_DOORS)
    if rng.random() < 0.1:
        await sim.press("999#")
        return
    await sim.press(CODES[cid] + "#")
    await until(sim, lambda s: s["compartments"][cid]["door_open"], f"door {cid} to open")
    if rng.random() < 0.5:
        await sim.parcel(cid, False)
    await sim.door(cid, "close")
    await sim.parcel(cid, True)


async def deposit_one(sim: SimClient, rng: random.Random, held: dict[str, str]) -> None:
    """In a session waiting for a label: scan one, choose a size that has a free door, put the
    parcel in the door that opens (or close it empty), and see the daemon's verdict."""
    free = [cid for cid in DEPOSIT_DOORS if cid not in held]
    parcel_id = rng.choice([p for p in PARCELS if p not in held.values()])
    size = SIZES[rng.choice(free)]
    await sim.label(parcel_id)
    await until(sim, shows("Size?"), "the size prompt")
    await sim.press(str(DEPOSIT_SIZES.index(size) + 1))
    state = await until(sim, lambda s: any(c["door_open"] for c in s["compartments"].values()),
                        "the deposit door to open")
    cid = next(c for c, v in state["compartments"].items() if v["door_open"])
    put = rng.random() < 0.75
    if put:
        await sim.parcel(cid, True)
    await sim.door(cid, "close")
    if put:
        held[cid] = parcel_id
    await until(sim, shows("Deposit confirmed", "closed empty"), "the deposit's result")


async def courier(sim: SimClient, rng: random.Random, held: dict[str, str]) -> None:
    """A courier session: one to three deposits while doors are free, then `*`."""
    await sim.press(COURIER + "#")
    await until(sim, shows("scan label"), "the courier's label prompt")
    for _ in range(rng.randint(1, 3)):
        if len(held) == len(DEPOSIT_DOORS):
            break
        await deposit_one(sim, rng, held)
    await sim.press("*")
    await until(sim, shows("Session ended"), "the end of the session")


async def drop_off(sim: SimClient, rng: random.Random, held: dict[str, str]) -> None:
    """A single drop-off code: its session ends with its one deposit."""
    await sim.press(DROP + "#")
    await until(sim, shows("scan label"), "the drop-off's label prompt")
    await deposit_one(sim, rng, held)


async def collect(sim: SimClient, rng: random.Random, held: dict[str, str]) -> None:
    """A customer picks up a deposited parcel with the code naming only the parcel."""
    cid = rng.choice(sorted(held))
    await sim.press(PARCELS[held[cid]] + "#")
    await until(sim, lambda s: s["compartments"][cid]["door_open"], f"door {cid} to open")
    take = rng.random() < 0.8
    if take:
        await sim.parcel(cid, False)
    await sim.door(cid, "close")
    if take:
        del held[cid]
    await until(sim, shows("Thank you!", "still inside"), "the pickup's result")


async def workload(kit: BankKit, rng: random.Random, held: dict[str, str]) -> None:
    """Pickups and deposits until the daemon dies under it. `held`: the deposit doors' parcels
    on record (compartment -> parcel id), kept up to date as the workload goes."""
    async with SimClient(kit.socket_path, timeout=2) as sim:
        while True:
            roll = rng.random()
            full = len(held) == len(DEPOSIT_DOORS)
            if roll < 0.35:
                await pickup(sim, rng)
            elif roll < 0.6 and not full:
                await courier(sim, rng, held)
            elif roll < 0.8 and not full:
                await drop_off(sim, rng, held)
            elif held:
                await collect(sim, rng, held)
            else:
                await pickup(sim, rng)


def restock(kit: BankKit, on_record: dict[str, str]) -> None:
    """The sim world does not outlive the daemon, the physical bank does: the next start sees
    the pickup parcels and every deposited parcel the database has on record."""
    config = tomllib.loads(kit.config_path.read_text(encoding="utf-8"))
    config["backends"]["sim"]["parcels"] = sorted({*PICKUP_DOORS, *on_record})
    kit.config_path.write_text(to_toml(config), encoding="utf-8")


# -- the checks -------------------------------------------------------------------------------


@dataclass
class Door:
    """A compartment's last lock.pulse and what the log says happened since."""

    code_id: str | None
    parcel_id: str | None
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (type, code id)


@dataclass
class Replay:
    """The event log replayed in seq order, checked as it goes."""

    kinds: dict[str, str]  # code id -> kind, from the bundle
    net: Counter[str] = field(default_factory=Counter)  # code id -> uses its events account for
    parcels: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # cid -> (id, code)
    types: Counter[str] = field(default_factory=Counter)
    pulsed_codes: set[str] = field(default_factory=set)
    doors: dict[str, Door] = field(default_factory=dict)
    session: str | None = None  # the code id of the live deposit session
    session_doors = 0  # deposit.opened in the live session
    sessions_cut = 0  # sessions a kill ended (no session.ended)
    multi_door_sessions = 0
    deposits_collected = 0  # pickup.completed of a deposited parcel

    def restarted(self) -> None:
        """A kill ends the session it interrupted: a session lives in memory only."""
        self.sessions_cut += self.session is not None
        self._end_session()

    def _end_session(self) -> None:
        self.multi_door_sessions += self.session is not None and self.session_doors > 1
        self.session = None

    def feed(self, seq: int, type_: str, cid: str | None, code_id: str | None,
             data: dict[str, Any]) -> None:
        self.types[type_] += 1
        kind = self.kinds.get(code_id or "")
        where = f"seq {seq} {type_} compartment {cid} code {code_id}"
        door = self.doors.get(cid or "")
        if door is not None:
            door.seen.append((type_, code_id))
        if type_ == "daemon.started":
            self.restarted()
        elif type_ == "lock.pulse":
            assert cid is not None, where
            self._pulsed(cid, code_id, data)
        elif type_ == "session.started":
            assert self.session is None, f"{where}: a session started inside another"
            assert kind in ("courier", "deposit"), where
            self.session, self.session_doors = code_id, 0
        elif type_ == "session.ended":
            assert self.session == code_id, f"{where}: ends a session that is not live"
            assert data["credential_used"] == (self.session_doors > 0), where
            self._end_session()
        elif type_ == "deposit.opened":
            self._deposit_opened(where, code_id, kind, door)
        elif type_ == "deposit.aborted":
            if kind == "deposit" and data.get("use_returned") is True:
                self.net[code_id or ""] -= 1
        elif type_ == "deposit.confirmed":
            assert cid in DEPOSIT_DOORS, f"{where}: the layout keeps deposits in 5-8"
            assert door is not None and door.code_id == code_id, f"{where}: no pulse for it"
            assert ("door.opened", code_id) in door.seen, \
                f"{where}: no door.opened since the last pulse: {door.seen}"
            assert door.parcel_id == data["parcel_id"], f"{where}: pulsed for {door.parcel_id}"
            assert cid not in self.parcels, f"{where}: the compartment held a parcel already"
            self.parcels[cid] = (data["parcel_id"], code_id)
        elif type_ == "pickup.opened":
            assert code_id in self.pulsed_codes, f"{where}: reported before any pulse for it"
            self.net[code_id or ""] += 1
        elif type_ == "pickup.incomplete":
            self.net[code_id or ""] -= 1
        self._collected(type_, cid)

    def _collected(self, type_: str, cid: str | None) -> None:
        """A parcel on record leaves its compartment with a pickup or a removal."""
        if type_ in ("pickup.completed", "parcel.removed") and cid in self.parcels:
            self.deposits_collected += type_ == "pickup.completed"
            del self.parcels[cid]

    def _pulsed(self, cid: str, code_id: str | None, data: dict[str, Any]) -> None:
        if code_id:
            self.pulsed_codes.add(code_id)
        self.doors[cid] = Door(code_id, data.get("parcel_id"))

    def _deposit_opened(self, where: str, code_id: str | None, kind: str | None,
                        door: Door | None) -> None:
        # The use of a deposit credential is taken with this event, in the transaction of
        # the door.opened just before it, and only after a pulse for that credential.
        assert self.session == code_id, f"{where}: no live session of that code"
        assert door is not None and door.code_id == code_id, f"{where}: not after its pulse"
        assert door.seen[-2:] == [("door.opened", code_id), ("deposit.opened", code_id)], \
            f"{where}: not right after its door.opened: {door.seen}"
        self.session_doors += 1
        # A courier session takes one use, with its first door; a drop-off, each door.
        if kind == "deposit" or self.session_doors == 1:
            self.net[code_id or ""] += 1


def check(kit: BankKit) -> tuple[int, dict[str, str], Replay]:
    """Check the database of a killed daemon; the events' count, the parcels on record and
    the replay."""
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        assert db.integrity_ok()
        rows = db.conn.execute(
            "SELECT seq, type, compartment, code_id, data FROM events ORDER BY seq").fetchall()
        on_record = {cid: (p.parcel_id, p.code_id) for cid, p in ParcelStore(db).all().items()}
        codes = CodeStore(db)
        uses = {}
        for code in kit.codes:
            record = codes.lookup(kit.digest(code.code))
            assert record is not None
            uses[code.id] = record.uses
    finally:
        db.close()
    seqs = [r[0] for r in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "seq has a hole"
    replay = Replay(kinds={c.id: c.kind for c in kit.codes})
    for seq, type_, cid, code_id, data in rows:
        replay.feed(seq, type_, cid, code_id, json.loads(data))
    replay.restarted()  # the daemon was killed after the last event
    # Every confirmed deposit not taken out since is on record, and nothing else is.
    assert on_record == replay.parcels, (on_record, replay.parcels)
    parcel_ids = [p for p, _ in on_record.values()]
    assert len(set(parcel_ids)) == len(parcel_ids), f"a parcel on record twice: {on_record}"
    # A code's count is exactly what its events account for: no use without its event, no
    # event without its use.
    for code_id, count in uses.items():
        assert count == replay.net[code_id], (code_id, count, replay.net[code_id])
    return len(seqs), {cid: p for cid, (p, _) in on_record.items()}, replay


# 52 daemon starts take about a minute alone and twice that on a loaded machine (the suite's
# other workers): past the suite's 120 s, this timeout still stops a test that hangs.
@pytest.mark.timeout(600)
async def test_sigkill_at_random_points(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit(bank_codes(), parcels=list(PICKUP_DOORS),
                   sizes=[SIZES[str(n)] for n in range(1, 9)],
                   overrides={"doors": {"pulse_s": 0.1, "open_timeout_s": 0.5,
                                        "held_open_after_s": 30},
                              "backends": {"sim": {"spring_delay_s": 0.0}},
                              "deposits": {"sizes": list(DEPOSIT_SIZES),
                                           "session_idle_s": 30.0},
                              "lockout": {"free_attempts": 1000}})
    kill_rng = random.Random(SEED)
    cmd = [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path)]
    events_seen = 0
    held: dict[str, str] = {}
    replay: Replay | None = None
    for round_ in range(KILLS):
        restock(kit, held)
        # Each round's choices come from a seed of its own: what one round does does not shift
        # the random choices of the next.
        rng = random.Random(f"{SEED}:{round_}")
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(1000):
                if kit.socket_path.exists():
                    break
                await asyncio.sleep(0.01)
            driver = asyncio.create_task(workload(kit, rng, dict(held)))
            await asyncio.sleep(kill_rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            driver.cancel()
            results = await asyncio.gather(driver, return_exceptions=True)
            assert all(isinstance(e, asyncio.CancelledError | SimError | OSError |
                                  asyncio.IncompleteReadError | ConnectionError)
                       for e in results), results
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        kit.socket_path.unlink(missing_ok=True)  # a killed daemon leaves its socket behind
        count, held, replay = check(kit)
        assert count >= events_seen
        events_seen = count
    assert replay is not None
    print(f"\n{events_seen} events: {dict(sorted(replay.types.items()))}; sessions cut by a "
          f"kill {replay.sessions_cut}, with 2+ doors {replay.multi_door_sessions}; deposited "
          f"parcels picked up {replay.deposits_collected}; on record at the end {held}; "
          f"uses {dict(replay.net)}")
    assert events_seen > KILLS * 2, "the workload produced events between the kills"
    # Deposits really happened, of both kinds, and the kills caught some sessions mid-way.
    assert replay.types["deposit.confirmed"] >= 20, replay.types
    assert replay.types["deposit.aborted"] >= 5, replay.types
    assert replay.net[DROP_ID] >= 3 and replay.net[COURIER_ID] >= 5, replay.net
    assert replay.multi_door_sessions >= 3, "courier sessions with more than one door"
    assert replay.deposits_collected >= 5, "deposited parcels were picked up again"
    assert replay.sessions_cut >= 3, "kills landed inside deposit sessions"
