"""The UI's pure parts: events in words, the 4x20 display, the state reply, the event feed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lockerd.cli.lockerd_cmd import main as lockerd_main
from lockerd.core.events import EventType
from lockerd.dev.provision import make_bank
from lockerd.dev.ui.feed import EventFeed, FeedError
from lockerd.dev.ui.host import DemoHost, HostError
from lockerd.dev.ui.meaning import MEANINGS, EventRow, describe
from lockerd.dev.ui.model import display_lines, snapshot_of

pytestmark = pytest.mark.unit


def test_every_event_type_has_a_meaning_in_words() -> None:
    assert {t.value for t in EventType} <= set(MEANINGS)
    for type_ in EventType:
        # Whatever the data holds (here nothing), the words come out.
        assert describe(EventRow(seq=1, type=type_.value)).startswith(f"{type_.value} — ")


def test_an_event_in_words() -> None:
    done = EventRow(seq=9, type="pickup.completed", compartment="3", code_id="p-1",
                    data={"parcel_id": "PX103"})
    assert describe(done) == "pickup.completed — parcel PX103 taken from 3, door closed"
    qr = EventRow(seq=10, type="pickup.opened", compartment="2", data={"cti": "ab12cd34ef"})
    assert "QR token ab12cd34" in describe(qr)
    refused = EventRow(seq=11, type="code.rejected", data={"reason": "unknown_code",
                                                           "source": "keypad"})
    assert describe(refused) == "code.rejected — a code from the keypad was refused: unknown code"
    jam = EventRow(seq=13, type="door.jammed", compartment="2", data={"guided_retry_s": 60.0})
    assert describe(jam).endswith("press # within 60 s")
    assert describe(EventRow(seq=12, type="no.such")) == "no.such"
    ended = EventRow(seq=14, type="session.ended", data={"reason": "ended_by_user",
                                                         "deposits": 1})
    assert describe(ended).endswith("(ended by user, 1 deposit)")


def test_the_display_is_four_rows_of_twenty() -> None:
    rows = display_lines("Door 1 is open\nTake your parcel and close the door")
    assert rows == ("Door 1 is open      ", "Take your parcel and", " " * 20, " " * 20)
    assert display_lines("") == (" " * 20,) * 4
    assert len(display_lines("a\nb\nc\nd\ne")) == 4


def test_a_state_reply_with_faults_and_odd_fields() -> None:
    state = {"compartments": {
        "1": {"locked": True, "door_open": False, "occupied": True, "in_service": True,
              "size": "S"},
        "2": {"locked": "yes", "door_open": True, "occupied": False, "in_service": False,
              "size": None},
        "3": "not an object"},
        "display": "Hello",
        "faults": [{"target": "lock:2", "kind": "jam"},
                   {"target": "door_sensor:1", "kind": "stuck_closed"},
                   {"target": "keypad", "kind": "stuck_key", "key": "5"}, "junk"]}
    snap = snapshot_of(state)
    assert [c.id for c in snap.cells] == ["1", "2"]
    one, two = snap.cells
    assert one.sensor_stuck == "closed" and not one.jammed and one.size == "S"
    assert two.jammed and two.locked and two.door_open and not two.in_service  # bad -> default
    assert snap.stuck_key == "5" and snap.has_fault("lock:2", "jam")
    assert snap.display[0] == "Hello".ljust(20)
    # The daemon's own view wins where it is given (a wire bank's world knows no service).
    view = snapshot_of(state, service={"1": False}, display="X", sizes={"2": "L"})
    assert view.cells[0].in_service is False and view.display[0].startswith("X")
    assert view.cells[0].size == "S" and view.cells[1].size == "L"  # the reply wins if it knows


async def test_the_feed_reads_new_events_once_and_refuses_a_missing_or_foreign_file(
        tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="no events database"):
        await EventFeed(tmp_path / "none.db").poll()
    db = tmp_path / "x.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(FeedError, match="cannot read events"):
        await EventFeed(db).poll()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, type TEXT, "
                     "compartment TEXT, code_id TEXT, data TEXT)")
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", [
            (1, "door.opened", "1", None, '{"kind": "pickup"}'),
            (2, "door.closed", "1", None, "not json"),
            (3, "tamper", None, None, "[1, 2]")])
    conn.close()
    feed = EventFeed(db)
    rows = await feed.poll()
    assert [r.seq for r in rows] == [1, 2, 3]
    assert rows[0].data == {"kind": "pickup"} and rows[1].data == {} and rows[2].data == {}
    assert await feed.poll() == []
    feed.close()
    assert await feed.poll() == []  # closed: nothing more is read, no connection reopened


def test_attaching_takes_a_socket_and_a_database_and_says_what_is_wrong(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock, db = str(tmp_path / "sim.sock"), str(tmp_path / "lockerd.db")
    assert lockerd_main(["demo", "--socket", sock]) == 2
    assert "--socket and --db go together" in capsys.readouterr().err
    assert lockerd_main(["demo", "--socket", sock, "--db", db, "--tour"]) == 2
    assert "for the demo's own bank" in capsys.readouterr().err
    assert lockerd_main(["demo", "--socket", sock, "--db", db]) == 1  # nothing listens there
    assert f"cannot reach the simulator at {sock}" in capsys.readouterr().err


async def test_a_demo_bank_whose_socket_path_is_too_long_is_refused_before_it_starts(
        tmp_path: Path) -> None:
    kit = make_bank(tmp_path / ("x" * 110), compartments=2)
    with pytest.raises(HostError, match="longer than a Unix socket allows"):
        async with DemoHost(kit):
            pass
