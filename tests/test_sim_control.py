"""Tests of the simulator's control socket (PROTOCOL.md section 11), its client and validator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import until

from hal.base import KeyPressed, Scanned
from sim.client import SimClient, request_sync
from sim.control import (
    MAX_LINE,
    ControlServer,
    Door,
    Fault,
    Label,
    Parcel,
    Press,
    Scan,
    State,
    encode_reply,
    handle_line,
    parse_request,
    serve_control,
)
from sim.world import SimError, SimWorld

pytestmark = pytest.mark.e2e


def mode_of(path: Path) -> int:
    return path.stat().st_mode


def exists(path: Path) -> bool:
    return path.exists()


@pytest.fixture
def world() -> SimWorld:
    return SimWorld(["1", "7"], spring_delay_s=0, sizes={"7": "L"})


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "sim.sock"


@pytest.fixture
async def server(world: SimWorld, sock_path: Path) -> AsyncIterator[ControlServer]:
    async with ControlServer(world, sock_path) as srv:
        yield srv


class Raw:
    """A bare connection that sends bytes as they are and reads reply lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        assert line.endswith(b"\n")
        obj = json.loads(line)
        assert isinstance(obj, dict)
        return obj

    async def ask(self, data: bytes) -> dict[str, Any]:
        await self.send(data)
        return await self.reply()


@contextlib.asynccontextmanager
async def raw(path: Path) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- the socket file ----------------------------------------------------------------------


async def test_socket_is_private_and_removed_on_close(world: SimWorld, sock_path: Path) -> None:
    assert not sock_path.parent.exists()
    async with ControlServer(world, sock_path):
        mode = mode_of(sock_path)
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(mode_of(sock_path.parent)) == 0o700
        assert sorted(os.listdir(sock_path.parent)) == ["sim.sock"]  # no temp left behind
    assert not exists(sock_path)


async def test_stale_socket_is_replaced(world: SimWorld, sock_path: Path) -> None:
    sock_path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(sock_path))
    stale.close()  # bound, never listening: what a crashed process leaves
    async with ControlServer(world, sock_path), SimClient(sock_path) as client:
        assert (await client.state())["faults"] == []


async def test_live_socket_and_other_files_are_not_replaced(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    with pytest.raises(FileExistsError, match="already listening"):
        await ControlServer(world, sock_path).start()
    async with SimClient(sock_path) as client:  # the first one is untouched
        await client.state()
    other = sock_path.parent / "plain"
    other.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        await ControlServer(world, other).start()
    assert other.read_text() == "keep me"


async def test_serve_control_runs_until_cancelled(world: SimWorld, sock_path: Path) -> None:
    task = asyncio.create_task(serve_control(world, sock_path))
    await until(sock_path.exists)
    async with SimClient(sock_path) as client:
        await client.press("1")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not exists(sock_path)


async def test_close_ends_open_connections(world: SimWorld, sock_path: Path) -> None:
    srv = ControlServer(world, sock_path)
    await srv.start()
    async with raw(sock_path) as conn:
        assert (await conn.ask(b'{"op": "state"}\n'))["ok"] is True
        await asyncio.wait_for(srv.close(), 5)
        assert await asyncio.wait_for(conn.reader.read(), 5) == b""


# -- every op -----------------------------------------------------------------------------


async def test_every_op_over_the_socket(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    keys = world.subscribe(KeyPressed)
    scans = world.subscribe(Scanned)
    async with SimClient(sock_path) as client:
        assert await client.request({"op": "press", "keys": "123#"}) == {"ok": True}
        assert [keys.get_nowait() for _ in range(4)] == [KeyPressed(k) for k in "123#"]
        await client.scan("LK1:ABC")
        assert scans.get_nowait() == Scanned("LK1:ABC")
        await client.label("PX123")
        assert scans.get_nowait() == Scanned("PX123")
        assert world.labels == ["PX123"]

        with pytest.raises(SimError, match="locked"):
            await client.door("7", "open")
        await client.door("7", "force")
        assert world.compartment("7").door_open
        await client.door("7", "close")
        assert world.compartment("7").locked

        await client.parcel("1", True)
        assert world.compartment("1").occupied
        await client.parcel("1", False)
        assert not world.compartment("1").occupied

        await client.fault("lock:7", "jam")
        await client.fault("door_sensor:1", "stuck_open")
        await client.fault("keypad", "stuck_key", key="5")
        await client.fault("scanner", "dead")
        await client.fault("scanner", "garbage")
        await client.fault("board:0", "offline")
        await client.fault("tamper", "open")
        world.set_display(["Enter code"], "idle")
        world.set_in_service("1", False)
        reply = await client.request({"op": "state"})
    assert list(reply) == ["ok", "compartments", "display", "faults"]
    assert reply == {
        "ok": True,
        "compartments": {
            "1": {"locked": True, "door_open": False, "occupied": False, "in_service": False,
                  "size": None},
            "7": {"locked": True, "door_open": False, "occupied": False, "in_service": True,
                  "size": "L"},
        },
        "display": "Enter code",
        "faults": [
            {"target": "lock:7", "kind": "jam"},
            {"target": "door_sensor:1", "kind": "stuck_open"},
            {"target": "keypad", "kind": "stuck_key", "key": "5"},
            {"target": "scanner", "kind": "dead"},
            {"target": "scanner", "kind": "garbage"},
            {"target": "board:0", "kind": "offline"},
            {"target": "tamper", "kind": "open"},
        ],
    }
    assert world.compartment("7").jammed and world.tamper_open


async def test_door_open_after_a_pulse(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    task = asyncio.create_task(world.release_lock("1", 0.05))
    async with SimClient(sock_path) as client:
        await until(lambda: world.compartment("1").door_open)
        assert (await client.state())["compartments"]["1"]["door_open"] is True
        await client.door("1", "close")
        await task
        await client.door("1", "close")  # closing a closed door changes nothing
        assert (await client.state())["compartments"]["1"] == {
            "locked": True,
            "door_open": False,
            "occupied": False,
            "in_service": True,
            "size": None,
        }


async def test_label_op_end_to_end(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    with world.subscribe(Scanned) as scans:
        async with raw(sock_path) as conn:
            await conn.send(b'{"op": "label", "parcel_id": "PX123"}\n')
            assert await conn.reader.readline() == b'{"ok": true}\n'
            assert scans.get_nowait() == Scanned("PX123")
            # A dead scanner swallows the label; the request itself still succeeds.
            assert (await conn.ask(b'{"op": "fault", "target": "scanner", "kind": "dead", '
                                   b'"on": true}\n'))["ok"] is True
            assert (await conn.ask(b'{"op": "label", "parcel_id": "PX9"}\n')) == {"ok": True}
            with pytest.raises(asyncio.QueueEmpty):
                scans.get_nowait()
    assert world.labels == ["PX123", "PX9"]
    reply = await asyncio.to_thread(request_sync, sock_path, {"op": "label", "parcel_id": "Q1"})
    assert reply == {"ok": True} and world.labels[-1] == "Q1"


async def test_fault_can_be_cleared(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    async with SimClient(sock_path) as client:
        await client.fault("keypad", "stuck_key", True, key="#")
        assert world.stuck_key == "#"
        await client.fault("keypad", "stuck_key", False)
        assert world.stuck_key is None
        assert (await client.state())["faults"] == []


async def test_reply_bytes_follow_the_protocol(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    async with raw(sock_path) as conn:
        await conn.send(b'{"op": "parcel", "compartment": "7", "present": true}\n')
        assert await conn.reader.readline() == b'{"ok": true}\n'
        await conn.send(b'{"op": "nope"}\n')
        line = await conn.reader.readline()
        assert line.startswith(b'{"ok": false, "error": "unknown op') and line.endswith(b"}\n")


async def test_request_sync_for_scripts(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    reply = await asyncio.to_thread(request_sync, sock_path, {"op": "state"})
    assert reply["ok"] is True and set(reply["compartments"]) == {"1", "7"}
    await asyncio.to_thread(
        request_sync, sock_path, {"op": "parcel", "compartment": "1", "present": True}
    )
    assert world.compartment("1").occupied
    with pytest.raises(SimError, match="unknown compartment '9'"):
        await asyncio.to_thread(
            request_sync, sock_path, {"op": "parcel", "compartment": "9", "present": True}
        )


async def test_client_without_a_server_raises_oserror(sock_path: Path) -> None:
    with pytest.raises(OSError):
        async with SimClient(sock_path, timeout=1) as client:
            await client.state()
    with pytest.raises(OSError):
        request_sync(sock_path, {"op": "state"}, timeout=1)


# -- error paths: each gets ok:false and the connection stays usable ------------------------

BAD_REQUESTS: list[tuple[bytes, str]] = [
    (b"not json\n", "not valid JSON"),
    (b'{"op": "state"\n', "not valid JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"state"\n', "must be a JSON object"),
    (b"\n", "empty request"),
    (b"   \r\n", "empty request"),
    (b"{}\n", "missing field 'op'"),
    (b'{"op": 5}\n', "'op' must be a string"),
    (b'{"op": "dance"}\n', "unknown op 'dance'"),
    (b'{"op": "dance"}\n', "ops: press, scan, label, door, parcel, fault, state"),
    (b'{"op": "press"}\n', "missing field 'keys'"),
    (b'{"op": "press", "keys": 123}\n', "'keys' must be a string"),
    (b'{"op": "press", "keys": "12a"}\n', "no key 'a'"),
    (b'{"op": "press", "keys": ""}\n', "non-empty"),
    (b'{"op": "scan"}\n', "missing field 'data'"),
    (b'{"op": "scan", "data": null}\n', "'data' must be a string"),
    (b'{"op": "label"}\n', "'label' request is missing field 'parcel_id'"),
    (b'{"op": "label", "data": "PX1"}\n', "missing field 'parcel_id'"),
    (b'{"op": "label", "parcel_id": 123}\n', "field 'parcel_id' must be a string"),
    (b'{"op": "label", "parcel_id": null}\n', "field 'parcel_id' must be a string"),
    (b'{"op": "label", "parcel_id": ["PX1"]}\n', "field 'parcel_id' must be a string"),
    (b'{"op": "label", "parcel_id": ""}\n', "bad parcel id ''"),
    (b'{"op": "label", "parcel_id": "PX 1"}\n', "bad parcel id 'PX 1'"),
    (b'{"op": "label", "parcel_id": "PX\\u00e9"}\n', "bad parcel id"),
    (b'{"op": "label", "parcel_id": "' + b"P" * 65 + b'"}\n', "bad parcel id"),
    (b'{"op": "door", "compartment": "7"}\n', "missing field 'action'"),
    (b'{"op": "door", "compartment": 7, "action": "open"}\n', "'compartment' must be a string"),
    (b'{"op": "door", "compartment": "9", "action": "open"}\n', "unknown compartment '9'"),
    (b'{"op": "door", "compartment": "7", "action": "kick"}\n', "unknown door action 'kick'"),
    (b'{"op": "door", "compartment": "7", "action": "open"}\n', "locked"),
    (b'{"op": "parcel", "compartment": "7", "present": 1}\n', "'present' must be true or false"),
    (b'{"op": "parcel", "compartment": "7"}\n', "missing field 'present'"),
    (b'{"op": "fault", "target": "lock:9", "kind": "jam", "on": true}\n', "unknown compartment"),
    (b'{"op": "fault", "target": "lock:7", "kind": "jam"}\n', "missing field 'on'"),
    (b'{"op": "fault", "target": "lock:7", "kind": "jam", "on": "yes"}\n', "'on' must be true"),
    (b'{"op": "fault", "target": "keypad", "kind": "stuck_key", "on": true}\n', "needs a 'key'"),
    (
        b'{"op": "fault", "target": "keypad", "kind": "stuck_key", "on": true, "key": 5}\n',
        "'key' must be a string",
    ),
    (b'{"op": "fault", "target": "moon", "kind": "jam", "on": true}\n', "unknown fault target"),
    (b'{"op": "fault", "target": "scanner", "kind": "jam", "on": true}\n', "has no fault 'jam'"),
    (b'{"op": "fault", "target": "board:99", "kind": "offline", "on": true}\n', "bad board"),
    (b"\xff\xfe\x00\x01binary\n", "not valid UTF-8"),
    (b"\x00\x01\x02\n", "not valid JSON"),
    (b"[" * 100_000 + b"\n", "request line longer than"),
    (b"[" * 5_000 + b"\n", "not valid JSON"),
    (b'{"op": "press", "keys": "1", "n": 1e999}\n', "not valid JSON"),
    (b'{"op": "state", "x": NaN}\n', "not valid JSON"),
]


@pytest.mark.parametrize(("request_bytes", "error"), BAD_REQUESTS)
async def test_bad_requests_get_a_clear_error_and_the_server_stays_up(
    world: SimWorld, sock_path: Path, server: ControlServer, request_bytes: bytes, error: str
) -> None:
    async with raw(sock_path) as conn:
        reply = await conn.ask(request_bytes)
        assert reply["ok"] is False
        assert error in reply["error"]
        assert set(reply) == {"ok", "error"}
        # Same connection, still answering.
        assert (await conn.ask(b'{"op": "state"}\n'))["ok"] is True
    async with SimClient(sock_path) as client:  # and a new connection too
        await client.state()
    assert world.faults() == []
    assert world.labels == [] and world.scans == []


async def test_huge_line_gets_one_reply_then_the_next_request_works(
    sock_path: Path, server: ControlServer
) -> None:
    async with raw(sock_path) as conn:
        # Sent in pieces, the way a flood arrives; the newline comes long after the limit.
        for _ in range(5):
            await conn.send(b"x" * (MAX_LINE // 2))
        await conn.send(b'yyy\n{"op": "press", "keys": "1"}\n')
        first = await conn.reply()
        assert first == {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
        assert await conn.reply() == {"ok": True}


async def test_line_at_the_limit_is_read(sock_path: Path, server: ControlServer) -> None:
    head, tail = b'{"op": "scan", "data": "x", "pad": "', b'"}'
    line = head + b"p" * (MAX_LINE - len(head) - len(tail)) + tail
    assert len(line) == MAX_LINE
    async with raw(sock_path) as conn:
        assert (await conn.ask(line + b"\n"))["ok"] is True


async def test_many_requests_in_one_write_get_replies_in_order(
    world: SimWorld, sock_path: Path, server: ControlServer
) -> None:
    async with raw(sock_path) as conn:
        await conn.send(
            b'{"op": "parcel", "compartment": "1", "present": true}\n'
            b'{"op": "oops"}\n'
            b'{"op": "state"}\n'
        )
        assert await conn.reply() == {"ok": True}
        assert (await conn.reply())["ok"] is False
        assert (await conn.reply())["compartments"]["1"]["occupied"] is True


async def test_last_request_without_newline_is_answered(
    sock_path: Path, server: ControlServer
) -> None:
    async with raw(sock_path) as conn:
        await conn.send(b'{"op": "state"}')
        conn.writer.write_eof()
        assert (await conn.reply())["ok"] is True
        assert await conn.reader.read() == b""


async def test_client_disconnecting_mid_request_does_not_hurt(
    sock_path: Path, server: ControlServer
) -> None:
    async with raw(sock_path) as conn:
        await conn.send(b'{"op": "pre')
    async with SimClient(sock_path) as client:
        await client.state()


# -- the validator, in isolation ----------------------------------------------------------


def test_parse_request_builds_typed_requests() -> None:
    assert parse_request({"op": "press", "keys": "1#"}) == Press("1#")
    assert parse_request({"op": "scan", "data": "x"}) == Scan("x")
    assert parse_request({"op": "label", "parcel_id": "PX1"}) == Label("PX1")
    assert parse_request({"op": "door", "compartment": "7", "action": "close"}) == Door(
        "7", "close"
    )
    assert parse_request({"op": "parcel", "compartment": "7", "present": False}) == Parcel(
        "7", False
    )
    assert parse_request(
        {"op": "fault", "target": "keypad", "kind": "stuck_key", "on": True, "key": "1"}
    ) == Fault("keypad", "stuck_key", True, "1")
    assert parse_request({"op": "state", "id": 42}) == State()  # extra fields are ignored


def test_encode_reply_is_one_ascii_line() -> None:
    assert encode_reply({"ok": True, "display": "Ön\nzwei"}) == (
        b'{"ok": true, "display": "\\u00d6n\\nzwei"}\n'
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["press", "scan", "label", "door", "parcel", "fault", "state", "x"])},
    optional={
        "keys": json_values | st.text("0123456789*#", min_size=1),
        "data": json_values,
        "parcel_id": json_values | st.sampled_from(["PX1", "PX 1", ""]),
        "compartment": json_values | st.sampled_from(["1", "7", "9"]),
        "action": json_values | st.sampled_from(["open", "close", "force"]),
        "present": json_values,
        "target": json_values
        | st.sampled_from(["lock:7", "door_sensor:1", "keypad", "scanner", "board:1", "tamper"]),
        "kind": json_values
        | st.sampled_from(
            ["jam", "stuck_open", "stuck_closed", "stuck_key", "dead", "garbage", "offline", "open"]
        ),
        "on": json_values,
        "key": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(obj=json_values | request_like)
def test_validator_only_ever_raises_sim_error(obj: object) -> None:
    try:
        request = parse_request(obj)
    except SimError as exc:
        assert str(exc)
    else:
        assert isinstance(request, Press | Scan | Label | Door | Parcel | Fault | State)


@settings(max_examples=300, deadline=None)
@given(obj=request_like)
def test_any_request_gets_one_well_formed_reply(obj: dict[str, Any]) -> None:
    world = SimWorld(["1", "7"], spring_delay_s=0)
    reply = handle_line(world, json.dumps(obj).encode())
    line = encode_reply(reply)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert reply["ok"] is True or (set(reply) == {"ok", "error"} and reply["error"])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_get_a_reply(data: bytes) -> None:
    reply = handle_line(SimWorld(["1"]), data)
    assert isinstance(reply["ok"], bool)
