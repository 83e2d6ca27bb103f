"""A codes bundle applied while the process is killed: the previous set or the new one, never a
mix, and the database passes its integrity check."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store import CodeStore, open_database
from lockerd.store.staging import RETIRED_TABLE, STAGING_TABLE

pytestmark = pytest.mark.e2e


def test_sigkill_during_import_leaves_old_or_new_set(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([PlainCode(f"a-{i}", f"{100000 + i}", "1") for i in range(50)])
    big = [PlainCode(f"b-{i}", f"{200000 + i}", "2") for i in range(60_000)]
    path = kit.directory / "big.json"
    path.write_bytes(kit.bundle(big, version=2))
    cmd = [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "import-bundle", "-c",
           str(kit.config_path)]
    assert subprocess.run([*cmd, str(kit.bundle_path)], capture_output=True).returncode == 0
    outcomes = set()
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0):
        proc = subprocess.Popen([*cmd, str(path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        db = open_database(kit.state_dir / "lockerd.db")
        try:
            assert db.integrity_ok()
            codes = CodeStore(db)
            state = (codes.version(), codes.count())
            assert state in {(1, 50), (2, 60_000)}, state
            outcomes.add(state)
            if state == (2, 60_000):
                assert codes.lookup(kit.digest("100000")) is None
                assert codes.lookup(kit.digest("200000")) is not None
                break  # applied in full before the kill; nothing left to interrupt
            assert codes.lookup(kit.digest("100000")) is not None
        finally:
            db.close()
    assert outcomes, "at least one kill was checked"


def test_sigkill_while_staging_leaves_the_old_set_and_the_next_import_clears_it(
        make_kit: Callable[..., BankKit]) -> None:
    """Killed once the staging table is being filled: the live codes are the old ones (the
    staging rows are not codes), and the next import discards the leftovers and swaps in."""
    kit = make_kit([PlainCode(f"a-{i}", f"{100000 + i}", "1") for i in range(50)])
    big = [PlainCode(f"b-{i}", f"{200000 + i}", "2") for i in range(60_000)]
    path = kit.directory / "big.json"
    path.write_bytes(kit.bundle(big, version=2))
    cmd = [sys.executable, "-m", "lockerd.cli.lockerd_cmd", "import-bundle", "-c",
           str(kit.config_path)]
    assert subprocess.run([*cmd, str(kit.bundle_path)], capture_output=True).returncode == 0
    db_path = kit.state_dir / "lockerd.db"
    proc = subprocess.Popen([*cmd, str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    watcher = open_database(db_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            staged = watcher.conn.execute(
                f"SELECT COUNT(*) FROM sqlite_master WHERE name = '{STAGING_TABLE}'"
            ).fetchone()[0]
            if staged and watcher.conn.execute(
                    f"SELECT COUNT(*) FROM {STAGING_TABLE}").fetchone()[0] > 0:
                break
            time.sleep(0.01)  # a poll interval: the importer needs the CPU more than we do
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watcher.close()
    db = open_database(db_path)
    try:
        assert db.integrity_ok()
        codes = CodeStore(db)
        state = (codes.version(), codes.count())
        assert state in {(1, 50), (2, 60_000)}, state
        live = db.conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0]
        assert live == codes.count()
    finally:
        db.close()
    assert subprocess.run([*cmd, str(path)], capture_output=True).returncode in (0, 1)
    db = open_database(db_path)
    try:
        codes = CodeStore(db)
        assert (codes.version(), codes.count()) == (2, 60_000)
        assert codes.lookup(kit.digest("200000")) is not None
        names = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master")}
        assert STAGING_TABLE not in names and RETIRED_TABLE not in names
    finally:
        db.close()
