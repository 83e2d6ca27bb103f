"""The simulator's control surface (PROTOCOL.md section 11): JSON lines on a Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import msgspec

from sim.world import SimError, SimWorld

MAX_LINE: Final = 64 * 1024
"""Longest request line accepted, in bytes, newline excluded."""
OPS: Final = ("press", "scan", "label", "door", "parcel", "fault", "state")
DOOR_ACTIONS: Final = ("open", "close", "force")
_READ_CHUNK: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Press:
    keys: str


@dataclass(frozen=True, slots=True)
class Scan:
    data: str


@dataclass(frozen=True, slots=True)
class Label:
    parcel_id: str


@dataclass(frozen=True, slots=True)
class Door:
    compartment: str
    action: str


@dataclass(frozen=True, slots=True)
class Parcel:
    compartment: str
    present: bool


@dataclass(frozen=True, slots=True)
class Fault:
    target: str
    kind: str
    on: bool
    key: str | None = None


@dataclass(frozen=True, slots=True)
class State:
    pass


Request = Press | Scan | Label | Door | Parcel | Fault | State


def _field(obj: dict[str, Any], name: str, kind: type[Any], what: str) -> Any:
    if name not in obj:
        raise SimError(f"{obj['op']!r} request is missing field {name!r}")
    value = obj[name]
    # bool is a subclass of int and JSON keeps them apart, so compare types exactly.
    if type(value) is not kind:
        raise SimError(f"field {name!r} must be {what}")
    return value


def _door(obj: dict[str, Any]) -> Door:
    compartment = _field(obj, "compartment", str, "a string")
    action = _field(obj, "action", str, "a string")
    if action not in DOOR_ACTIONS:
        raise SimError(f"unknown door action {action!r}; actions: {', '.join(DOOR_ACTIONS)}")
    return Door(compartment, action)


def _fault(obj: dict[str, Any]) -> Fault:
    target = _field(obj, "target", str, "a string")
    kind = _field(obj, "kind", str, "a string")
    on = _field(obj, "on", bool, "true or false")
    key = obj.get("key")
    if key is not None and not isinstance(key, str):
        raise SimError("field 'key' must be a string")
    return Fault(target, kind, on, key)


def parse_request(obj: object) -> Request:
    """Check one decoded request; anything wrong raises SimError saying what. Extra fields
    are ignored so that a client may tag its requests."""
    if not isinstance(obj, dict):
        raise SimError("a request must be a JSON object")
    if "op" not in obj:
        raise SimError("request is missing field 'op'")
    op = obj["op"]
    if not isinstance(op, str):
        raise SimError("field 'op' must be a string")
    if op == "press":
        return Press(_field(obj, "keys", str, "a string"))
    if op == "scan":
        return Scan(_field(obj, "data", str, "a string"))
    if op == "label":
        return Label(_field(obj, "parcel_id", str, "a string"))
    if op == "door":
        return _door(obj)
    if op == "parcel":
        return Parcel(
            _field(obj, "compartment", str, "a string"),
            _field(obj, "present", bool, "true or false"),
        )
    if op == "fault":
        return _fault(obj)
    if op == "state":
        return State()
    shown = op if len(op) <= 40 else op[:40] + "..."
    raise SimError(f"unknown op {shown!r}; ops: {', '.join(OPS)}")


def apply_request(world: SimWorld, request: Request) -> dict[str, Any]:
    """Carry out one request on the world; returns the reply (with "ok": true)."""
    if isinstance(request, Press):
        world.press(request.keys)
    elif isinstance(request, Scan):
        world.scan(request.data)
    elif isinstance(request, Label):
        world.scan_label(request.parcel_id)
    elif isinstance(request, Door):
        if request.action == "open":
            world.open_door(request.compartment)
        elif request.action == "close":
            world.close_door(request.compartment)
        else:
            world.force_door(request.compartment)
    elif isinstance(request, Parcel):
        world.set_parcel(request.compartment, request.present)
    elif isinstance(request, Fault):
        world.set_fault(request.target, request.kind, request.on, request.key)
    else:
        return {"ok": True, **world.state()}
    return {"ok": True}


def handle_line(world: SimWorld, line: bytes) -> dict[str, Any]:
    """Decode, check and apply one request line; every failure becomes an ok:false reply."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _error("request is not valid UTF-8")
    if not text.strip():
        return _error("empty request: send one JSON object per line")
    try:
        obj = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return _error(f"request is not valid JSON: {detail}")
    try:
        return apply_request(world, parse_request(obj))
    except SimError as exc:
        return _error(str(exc))


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line, spaced like the protocol's examples: `{"ok": true}`."""
    return json.dumps(reply).encode("ascii") + b"\n"


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


class ControlServer:
    """The control socket as an async context manager; `serve_control` runs one until cancelled.

    The socket file is created with mode 0600 (its directory is created if missing), replaces a
    stale socket left by a crash, and is removed on close. A live socket, or a path that is not
    a socket, is never replaced.
    """

    def __init__(self, world: SimWorld, path: str | os.PathLike[str]) -> None:
        self.world = world
        self.path = Path(path)
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self._server is not None:
            return
        sock, self._identity = _bind(self.path)
        try:
            self._server = await asyncio.start_unix_server(self._serve_client, sock=sock)
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await server.wait_closed()
        self._remove_socket_file()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _remove_socket_file(self) -> None:
        # Only our own socket: another simulator may have taken the path over since.
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = bytearray()
        # After an over-long line has been answered, its remainder is skipped up to the newline.
        skipping = False
        while True:
            chunk = await reader.read(_READ_CHUNK)
            if chunk:
                buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > MAX_LINE:
                        if not skipping:
                            writer.write(encode_reply(_too_long()))
                            skipping = True
                        buffer.clear()
                    break
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if skipping:
                    skipping = False
                    continue
                line = line.removesuffix(b"\r")
                reply = _too_long() if len(line) > MAX_LINE else self._answer(line)
                writer.write(encode_reply(reply))
            if not chunk:
                # A last request without its newline still gets its answer.
                if buffer and not skipping:
                    writer.write(encode_reply(self._answer(bytes(buffer))))
                await writer.drain()
                return
            await writer.drain()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            return handle_line(self.world, line)
        except Exception as exc:
            # A bug in the simulator must not take the control socket down with it.
            logging.getLogger(__name__).exception("sim control request failed")
            return _error(f"internal error: {type(exc).__name__}: {exc}")


def _too_long() -> dict[str, Any]:
    return _error(f"request line longer than {MAX_LINE} bytes")


async def serve_control(world: SimWorld, path: str | os.PathLike[str]) -> None:
    """Serve the control surface of `world` on the Unix socket `path` until cancelled."""
    async with ControlServer(world, path):
        await asyncio.Event().wait()


def _bind(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path`, mode 0600 from its first moment; returns (dev, inode)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_replaceable(path)
    # Bound inside a private directory, chmodded, then renamed into place: no one can connect
    # while the mode is still the umask's, and a stale socket is replaced atomically.
    private = tempfile.mkdtemp(prefix=".sim", dir=path.parent)
    temp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(temp)
        except OSError as exc:
            raise OSError(f"cannot create control socket {path}: {exc}") from exc
        os.chmod(temp, 0o600)
        sock.listen(64)
        os.replace(temp, path)
        st = path.lstat()
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        os.rmdir(private)
    sock.setblocking(False)
    return sock, (st.st_dev, st.st_ino)


def _check_replaceable(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: left by a process that is gone
    except TimeoutError:
        pass  # someone is listening, just too busy to accept
    finally:
        probe.close()
    raise FileExistsError(f"{path}: another simulator is already listening there")
