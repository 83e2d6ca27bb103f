"""Clients of the simulator's control socket: async for tests, one blocking call for scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

from sim.world import SimError

MAX_REPLY: Final = 16 * 1024 * 1024
"""Longest reply line read, in bytes: a `state` of a large bank stays far below it."""


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(obj)).encode("utf-8") + b"\n"


def _check_reply(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise SimError("the simulator closed the connection without replying")
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise SimError(f"the simulator sent a reply that is not JSON: {exc}") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise SimError(f"the simulator sent a malformed reply: {line[:200]!r}")
    if not reply["ok"]:
        raise SimError(str(reply.get("error", "request refused")))
    return reply


class SimClient:
    """One connection to the control socket; requests are sent one at a time.

    `request` returns the reply object (with "ok": true) and raises SimError when the simulator
    answers ok:false; a connection problem raises OSError, a slow reply TimeoutError.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        if self._writer is None:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.path, limit=MAX_REPLY
                )

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            # Already gone is fine: closing is all we wanted.
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> SimClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def request(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request object and return its reply."""
        return _check_reply(await self.request_raw(_encode(obj)))

    async def request_raw(self, line: bytes) -> bytes:
        """Send bytes as they are (a test may send anything) and return one reply line."""
        async with self._lock:
            await self.connect()
            reader, writer = self._reader, self._writer
            if reader is None or writer is None:
                raise SimError("not connected to the simulator")
            try:
                async with asyncio.timeout(self.timeout):
                    writer.write(line)
                    await writer.drain()
                    return await reader.readline()
            except BaseException:
                # A reply may still be on its way: drop the connection so that a later
                # request cannot be handed this one's answer.
                await self.close()
                raise

    async def press(self, keys: str) -> None:
        await self.request({"op": "press", "keys": keys})

    async def scan(self, data: str) -> None:
        await self.request({"op": "scan", "data": data})

    async def label(self, parcel_id: str) -> None:
        """A courier scans the label of parcel `parcel_id`."""
        await self.request({"op": "label", "parcel_id": parcel_id})

    async def door(self, compartment: str, action: str = "open") -> None:
        """`action` is "open" or "close" (a person), or "force" (broken open)."""
        await self.request({"op": "door", "compartment": compartment, "action": action})

    async def parcel(self, compartment: str, present: bool = True) -> None:
        await self.request({"op": "parcel", "compartment": compartment, "present": present})

    async def fault(
        self, target: str, kind: str, on: bool = True, *, key: str | None = None
    ) -> None:
        obj: dict[str, Any] = {"op": "fault", "target": target, "kind": kind, "on": on}
        if key is not None:
            obj["key"] = key
        await self.request(obj)

    async def state(self) -> dict[str, Any]:
        """The `state` reply without its "ok": compartments (with `size`), display, faults."""
        reply = await self.request({"op": "state"})
        reply.pop("ok", None)
        return reply


def request_sync(
    path: str | os.PathLike[str], obj: Mapping[str, Any], *, timeout: float = 5.0
) -> dict[str, Any]:
    """Send one request on a fresh connection and return its reply; blocks, for scripts.

    Raises SimError on an ok:false reply, OSError when the socket cannot be reached.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(_encode(obj))
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_REPLY)
    return _check_reply(line)
