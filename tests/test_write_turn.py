"""The write lock's doorbell: rung by every transaction, a copy steps aside only while it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from waiting import until_sync

from lockerd.store import open_database
from lockerd.store.staging import GAP_S, CodeStaging, SnapshotMeta, _GiveWay
from lockerd.store.turn import TURN_SUFFIX, WriteTurn
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodeEntry

pytestmark = pytest.mark.unit


def test_a_transaction_rings_from_before_its_begin_until_it_ends(tmp_path: Path) -> None:
    db = open_database(tmp_path / "lockerd.db")
    observer = WriteTurn(db.path)
    assert observer.rung() is False
    with db.transaction():
        assert observer.rung() is True
    assert observer.rung() is False
    # A transaction that fails lets go of the bell too.
    with pytest.raises(ZeroDivisionError), db.transaction():
        assert observer.rung() is True
        1 / 0  # noqa: B018
    assert observer.rung() is False
    # The daemon's writer (prompt BEGIN) rings the same way.
    db.wait_for_lock_promptly()
    with db.transaction():
        assert observer.rung() is True
    assert observer.rung() is False
    assert (tmp_path / f"lockerd.db{TURN_SUFFIX}").exists()
    db.close()
    observer.close()


def test_a_copy_waits_while_a_writer_rings_and_goes_on_when_it_is_done(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    open_database(path).close()
    copy = WriteTurn(path)
    assert copy.step_aside() is False  # nobody rings: no wait at all
    rang = threading.Event()
    done: list[str] = []

    def writer() -> None:
        db = open_database(path)
        with db.transaction() as conn:
            rang.set()
            time.sleep(0.05)
            conn.execute("INSERT INTO meta VALUES ('probe', '1')")
            done.append("committing")
        db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    assert rang.wait(10)
    # Returns once the writer let go, not at its bound: the writer's work is done by then.
    assert copy.step_aside(max_s=30.0) is True
    assert done == ["committing"]
    thread.join()
    copy.close()


def test_a_writer_that_never_lets_go_holds_a_copy_back_only_so_long(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    stuck, copy = WriteTurn(path), WriteTurn(path)
    assert stuck.ring()
    assert copy.step_aside(max_s=0.02) is True  # it came back, the bell still rung
    assert copy.rung() is True
    stuck.release()
    assert copy.rung() is False
    stuck.close()
    copy.close()


def test_a_writer_that_died_rings_no_more(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.db"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from lockerd.store.turn import WriteTurn;"
         " t = WriteTurn(Path(sys.argv[1])); assert t.ring(); print('rung', flush=True);"
         " time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "rung\n"
        copy = WriteTurn(path)
        assert copy.rung() is True
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        until_sync(lambda: copy.rung() is False, what="the dead writer's bell let go")
        copy.close()
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_without_a_file_for_the_bell_each_side_is_told_so(tmp_path: Path) -> None:
    turn = WriteTurn(tmp_path / "no such directory" / "lockerd.db")
    assert turn.ring() is False
    assert turn.rung() is None
    assert turn.step_aside() is None
    turn.release()  # not held: harmless
    turn.close()


def test_between_steps_a_copy_pauses_only_for_a_writer_or_now_and_then(tmp_path: Path) -> None:
    db = open_database(tmp_path / "lockerd.db")
    give_way = _GiveWay(db, pause_every_s=3600.0)
    for _ in range(50):
        give_way()
    assert (give_way.stepped_aside, give_way.pauses) == (0, 0)
    # Now and then a pause all the same, for a writer that does not ring.
    now_and_then = _GiveWay(db, pause_every_s=0.0)
    for _ in range(3):
        now_and_then()
    assert now_and_then.pauses == 3 and GAP_S > 0
    # A writer ringing: the copy steps aside.
    writer = WriteTurn(db.path)
    assert writer.ring()
    threading.Timer(0.02, writer.release).start()
    give_way()
    assert give_way.stepped_aside == 1
    for gw in (give_way, now_and_then):
        gw.close()
    writer.close()
    db.close()


def test_a_prompt_writer_commits_between_the_copy_steps_of_a_swap(tmp_path: Path) -> None:
    """The daemon's kind of writer, committing at its pace while a snapshot is copied in:
    none of its commits is refused, some land before the swap, and the swap is whole."""
    path = tmp_path / "lockerd.db"
    db = open_database(path)
    n = 60_000
    now = utcnow()
    entries = [CodeEntry(id=f"c-{i}", kind="pickup", digest=f"{i:064x}",
                         not_after=now + timedelta(days=1), compartment="1")
               for i in range(n)]
    staging = CodeStaging(db)
    staging.begin(1)
    staging.add(entries)
    swapped = threading.Event()
    commits_before_swap: list[int] = []

    def writer() -> None:
        daemon = open_database(path)
        daemon.wait_for_lock_promptly()
        i = 0
        while not swapped.is_set():
            with daemon.transaction() as conn:
                conn.execute("INSERT INTO meta VALUES ('probe', ?) ON CONFLICT(key)"
                             " DO UPDATE SET value = excluded.value", (str(i),))
            if not swapped.is_set():
                commits_before_swap.append(i)
            i += 1
            time.sleep(0.002)
        daemon.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        staging.swap(SnapshotMeta(version=1, issued_at=now, expires_at=now + timedelta(days=1),
                                  revoke=()))
    finally:
        swapped.set()
        thread.join()
    assert int(db.conn.execute("SELECT COUNT(*) FROM codes").fetchone()[0]) == n
    assert commits_before_swap
    db.close()
