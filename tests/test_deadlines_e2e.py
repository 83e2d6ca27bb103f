"""A power cut, as kill -9 of a real `lockerd run`: the pickup code of the parcel that waited is
extended by the downtime when the clock is synchronised, and not at all when it is not.

The system clock of the test machine cannot be moved, so the time that passed while the bank
was off is made by moving the killed daemon's last heartbeat back: to the daemon that is the
same as a clock that moved forward between the kill and the restart."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from waiting import until_sync

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store import CodeStore, open_database
from lockerd.store.events import EventLog, StoredEvent
from lockerd.timeutil import format_time, parse_time, utcnow

pytestmark = pytest.mark.e2e

CODE = "246813"
DOWN_S = 2 * 3600
LOCKERD = [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c"]


def heartbeat(kit: BankKit) -> dict[str, Any] | None:
    """The heartbeat as the daemon last wrote it, read beside the running daemon."""
    path = kit.state_dir / "lockerd.db"
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'heartbeat'").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return None
    finally:
        conn.close()
    return None if row is None else dict(json.loads(row[0]))


@contextmanager
def daemon(kit: BankKit) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*LOCKERD, str(kit.config_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kit.socket_path.unlink(missing_ok=True)  # a killed daemon leaves its socket behind


def power_cut(kit: BankKit) -> dict[str, Any]:
    """Run the daemon until it wrote a heartbeat, then kill -9 it; the heartbeat it left."""
    with daemon(kit) as proc:
        until_sync(lambda: (heartbeat(kit) or {}).get("at") is not None, 20,
                   what="the first heartbeat", interval=0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    beat = heartbeat(kit)
    assert beat is not None
    return beat


def move_clock(kit: BankKit, beat: dict[str, Any], seconds: float) -> None:
    """`seconds` pass while the bank is off. The marker tells the restarted daemon's first
    heartbeat (which never writes it) from this one."""
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        db.set_meta("heartbeat", {**beat, "at": beat["at"] - seconds, "moved": True})
    finally:
        db.close()


def restart_until_heartbeat(kit: BankKit, trust_clock: str) -> list[StoredEvent]:
    """Restart with `[time] trust_system_clock = trust_clock`; the events once the first
    heartbeat of the new run is written (the downtime is measured before or with it)."""
    text = kit.config_path.read_text(encoding="utf-8")
    kit.config_path.write_text(
        text.replace('trust_system_clock = "always"', f'trust_system_clock = "{trust_clock}"'),
        encoding="utf-8")
    with daemon(kit) as proc:
        until_sync(lambda: "moved" not in (heartbeat(kit) or {"moved": 1}) or
                   proc.poll() is not None, 20, what="the restarted daemon's heartbeat",
                   interval=0.02)
        assert proc.poll() is None, "the daemon stopped"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        return EventLog(db).recent(1000)
    finally:
        db.close()


def not_after(kit: BankKit) -> str:
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        record = CodeStore(db).lookup(kit.digest(CODE))
        assert record is not None
        return format_time(record.not_after)
    finally:
        db.close()


def provision(make_kit: Callable[..., BankKit]) -> tuple[BankKit, str]:
    deadline = utcnow().replace(microsecond=0) + timedelta(days=1)
    kit = make_kit([PlainCode("p-1", CODE, "2", parcel_id="PX9", not_after=deadline)],
                   parcels=["2"], overrides={"time": {"trust_system_clock": "always"}})
    return kit, format_time(deadline)


def test_a_power_cut_extends_the_waiting_parcels_code(
        make_kit: Callable[..., BankKit]) -> None:
    kit, deadline = provision(make_kit)
    move_clock(kit, power_cut(kit), DOWN_S)
    events = restart_until_heartbeat(kit, "always")
    extended = [e for e in events if e.type == "code.extended"]
    assert [(e.code_id, e.compartment, e.data["reason"]) for e in extended] == [
        ("p-1", "2", "downtime")]
    by = extended[0].data["extended_by_s"]
    # The time the bank was off: the two hours, plus the seconds of the kill and restart.
    assert DOWN_S <= by <= DOWN_S + 60
    assert extended[0].data["not_after"] == not_after(kit)
    assert parse_time(not_after(kit)) == parse_time(deadline) + timedelta(seconds=by)


def test_a_clock_that_is_not_synchronised_extends_nothing(
        make_kit: Callable[..., BankKit]) -> None:
    kit, deadline = provision(make_kit)
    move_clock(kit, power_cut(kit), 2 * 86400)
    events = restart_until_heartbeat(kit, "never")
    assert "code.extended" not in [e.type for e in events]
    assert [e.type for e in events].count("daemon.started") == 2
    assert not_after(kit) == deadline
