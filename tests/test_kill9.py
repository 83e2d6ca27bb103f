"""SIGKILL at random points of a pickup workload: after every restart no event is missing,
no code is consumed without its event, and the database is intact."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable

from lockerd.provision import BankKit, PlainCode
from lockerd.store import CodeStore, open_database
from sim.client import SimClient
from sim.world import SimError

KILLS = 52
CODES = {str(c): f"{c}{c}{c}{c}{c}{c}" for c in range(1, 5)}


async def workload(kit: BankKit, rng: random.Random) -> None:
    """Pickups until the daemon dies under it: open, then close with or without the parcel."""
    async with SimClient(kit.socket_path, timeout=2) as sim:
        while True:
            cid = rng.choice(list(CODES))
            await sim.press(CODES[cid] + "#" if rng.random() > 0.1 else "999#")
            for _ in range(100):
                state = await sim.state()
                if state["compartments"][cid]["door_open"]:
                    break
                await asyncio.sleep(0.005)
            else:
                continue
            if rng.random() < 0.5:
                await sim.parcel(cid, False)
            await sim.door(cid, "close")
            await sim.parcel(cid, True)


def check(kit: BankKit) -> int:
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        assert db.integrity_ok()
        rows = db.conn.execute("SELECT seq, type, code_id FROM events ORDER BY seq").fetchall()
        seqs = [r[0] for r in rows]
        assert seqs == list(range(1, len(seqs) + 1)), "seq has a hole"
        net: Counter[str] = Counter()
        pulsed: set[str] = set()
        for _, type_, code_id in rows:
            if type_ == "lock.pulse" and code_id:
                pulsed.add(code_id)
            if type_ == "pickup.opened":
                assert code_id in pulsed, "a pickup was reported before any pulse for it"
                net[code_id] += 1
            elif type_ == "pickup.incomplete":
                net[code_id] -= 1
        codes = CodeStore(db)
        for cid, code in CODES.items():
            record = codes.lookup(kit.digest(code))
            assert record is not None
            assert record.uses == net[f"p-{cid}"], (cid, record.uses, net[f"p-{cid}"])
        return len(seqs)
    finally:
        db.close()


async def test_sigkill_at_random_points(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([PlainCode(f"p-{cid}", code, cid, parcel_id=f"PX{cid}", max_uses=10_000)
                    for cid, code in CODES.items()], parcels=list(CODES),
                   overrides={"doors": {"pulse_s": 0.1, "open_timeout_s": 0.5,
                                        "held_open_after_s": 30},
                              "backends": {"sim": {"spring_delay_s": 0.0}},
                              "lockout": {"free_attempts": 1000}})
    rng = random.Random(20261129)
    cmd = [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c", str(kit.config_path)]
    events_seen = 0
    for _ in range(KILLS):
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(1000):
                if kit.socket_path.exists():
                    break
                await asyncio.sleep(0.01)
            driver = asyncio.create_task(workload(kit, rng))
            await asyncio.sleep(rng.uniform(0.05, 0.6))
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
        count = check(kit)
        assert count >= events_seen
        events_seen = count
    assert events_seen > KILLS * 2, "the workload produced events between the kills"
