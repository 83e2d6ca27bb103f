"""Async transport to a Kerong RS-485 bus over a pyserial URL: one request at a time, reopens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import serial  # type: ignore[import-untyped]
import structlog

from hal.errors import HardwareFault
from hal.kerong.codec import FrameDecoder, StatusReply, encode_status, encode_unlock

DEFAULT_BAUDRATE: Final = 19200
# A 5-byte frame leaves at once on any working adapter; the bound only matters for one whose
# output has stalled, which then counts as a failed port instead of holding the event loop.
WRITE_TIMEOUT_S: Final = 0.1
# Ports without a file descriptor (rfc2217://) are read in a worker thread in slices this long,
# so a cancelled request never leaves a thread blocked for long.
THREAD_READ_S: Final = 0.05
READ_CHUNK: Final = 256

log = structlog.get_logger("hal.kerong")


class PortUnavailable(HardwareFault):
    """The serial port is not usable: it would not open, or it failed (adapter unplugged)."""


@dataclass(slots=True)
class TransportStats:
    """Counters for diagnostics; they only ever grow."""

    opens: int = 0
    failures: int = 0
    """The port would not open, or failed while open."""
    queries: int = 0
    timeouts: int = 0
    """Status queries that got no valid reply in time."""
    unlocks: int = 0
    unlock_replies: int = 0
    """Status replies received after an unlock, within the window asked for."""
    stray_replies: int = 0
    """Valid replies nobody was waiting for (late, or from another board)."""


def _close_quietly(port: Any) -> None:
    # Closing a port that has just failed may fail again; there is nothing left to do about it.
    with contextlib.suppress(OSError, ValueError):
        port.close()
    # pyserial's spy:// opens its capture file (`?file=`) and never closes it: close it here so
    # the capture is flushed to disk now, not whenever the port object is collected.
    output = getattr(getattr(port, "formatter", None), "output", None)
    if output is not None and output not in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            output.close()


class ArmedUnlock:
    """An unlock frame with the bus reserved for it (`KerongTransport.arm_unlock`): `fire`
    writes it from any thread, then the event loop calls `finish` (or `release`)."""

    def __init__(self, transport: KerongTransport, port: Any, write: Callable[[bytes], Any],
                 board: int, frame: bytes) -> None:
        self._transport = transport
        self._port = port
        self._write = write
        self.board = board
        self._frame = frame
        # Held by a write and by the loop retiring the frame, so that the port is never
        # closed under a write in progress on another thread.
        self._guard = threading.Lock()
        self._state: Literal["armed", "sent", "failed", "retired"] = "armed"
        self._error: OSError | ValueError | None = None
        self._done = False

    def fire(self) -> None:
        """Write the frame now, from any thread, unless it was written or retired already;
        never raises (a failed write is raised by `finish`, on the loop)."""
        with self._guard:
            if self._state != "armed":
                return
            try:
                self._write(self._frame)
            except (OSError, ValueError) as exc:
                self._state, self._error = "failed", exc
                return
            self._state = "sent"

    def retire(self) -> None:
        """The port is going away (or nobody waits for the frame): a later `fire` writes
        nothing. Waits for a write in progress, at most one 5-byte write."""
        with self._guard:
            if self._state == "armed":
                self._state = "retired"

    async def finish(self, *, reply_window_s: float = 0.0) -> StatusReply | None:
        """On the loop, once the frame may go: write it if `fire` did not, wait for the
        board's reply as `send_unlock` does, and free the bus. Raises PortUnavailable when the
        frame could not be written (or the port was lost before it was)."""
        self.fire()
        transport = self._transport
        try:
            if self._state == "failed":
                raise transport._lose(_failed("write", self._error)) from self._error
            if self._state == "retired":
                raise PortUnavailable(f"{transport.url}: {transport.error or 'port closed'}")
            return await transport._unlock_sent(self._port, self.board, reply_window_s)
        finally:
            self._free()

    def release(self) -> None:
        """On the loop: free the bus without sending anything more (a frame `fire` wrote
        already stays written)."""
        self.retire()
        self._free()

    def _free(self) -> None:
        if not self._done:
            self._done = True
            self._transport._disarm(self)


def _fileno(port: Any) -> int | None:
    try:
        fd = port.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _frame_writer(port: Any) -> Callable[[bytes], Any]:
    """How frames are written to `port`. A plain local port takes a frame in one os.write of
    its descriptor (non-blocking, as pyserial opens it; five bytes fit any tty's output
    buffer): pyserial's write adds a select and a timer object to every frame, about 25 us
    of an unlock here. The rest of a frame the buffer cannot take at once, and every other
    port (spy://, which records the frame; socket://, rfc2217://), go through pyserial's
    write and its write timeout. Raises OSError or ValueError as pyserial's write does."""
    fd = _fileno(port)
    if type(port) is not serial.Serial or fd is None:
        return port.write  # type: ignore[no-any-return]

    def write(frame: bytes) -> None:
        try:
            sent = os.write(fd, frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(frame):
            port.write(frame[sent:])

    return write


def _failed(what: str, exc: BaseException | None) -> str:
    """'<what> failed: <the error>', said once: pyserial's own errors begin with it already
    ("write failed: [Errno 5] Input/output error")."""
    text = str(exc)
    prefix = f"{what} failed: "
    return text if text.startswith(prefix) else prefix + text


def _no_port(frame: bytes) -> None:
    raise ValueError("the port is not open")


class KerongTransport:
    """The serial line to the boards, as a request/response service.

    `query_status` writes a status query and waits (without blocking the event loop) for the
    reply of that board, or returns None after `reply_timeout_s`. `send_unlock` writes an
    unlock frame and, if asked to, waits a bounded window for the status reply some boards
    send after an unlock. Requests are serialised: RS-485 is half duplex, and a frame written
    while a board is answering would collide with the answer.

    A port that fails (USB adapter unplugged: EIO, ENXIO, ENOENT on reopen; a SerialException)
    is closed, and reopened on the next request once `reopen_cooldown_s` has passed; meanwhile
    requests raise PortUnavailable at once. Nothing here raises anything else for a hardware
    problem, and nothing crashes on bytes from the line.
    """

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = DEFAULT_BAUDRATE,
        reply_timeout_s: float = 0.2,
        reopen_cooldown_s: float = 2.0,
    ) -> None:
        if not url:
            raise ValueError("the serial port URL must not be empty")
        if reply_timeout_s <= 0 or reopen_cooldown_s <= 0 or baudrate <= 0:
            raise ValueError("baudrate, reply_timeout_s and reopen_cooldown_s must be positive")
        self.url = url
        self.baudrate = baudrate
        self.reply_timeout_s = reply_timeout_s
        self.reopen_cooldown_s = reopen_cooldown_s
        self.decoder = FrameDecoder()
        self.stats = TransportStats()
        self._lock = asyncio.Lock()
        self._port: Any = None
        self._fd: int | None = None
        self._retry_at = 0.0
        self._error = ""
        self._logged_error = ""
        self._waiter: tuple[int, asyncio.Future[StatusReply]] | None = None
        self._armed: ArmedUnlock | None = None
        self._write_frame: Callable[[bytes], Any] = _no_port

    # -- state ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._port is not None

    @property
    def error(self) -> str:
        """Why the port is not open ("" when it is, or was never tried)."""
        return "" if self._port is not None else self._error

    def retry_in(self) -> float:
        """Seconds until the next attempt to open the port is allowed (0 when open or due)."""
        if self._port is not None:
            return 0.0
        return max(0.0, self._retry_at - asyncio.get_running_loop().time())

    # -- requests ---------------------------------------------------------------------------

    async def ensure_open(self) -> None:
        """Open the port unless it is open; raises PortUnavailable (at once during the cooldown)."""
        async with self._lock:
            await self._ensure_open_locked()

    async def query_status(self, board: int) -> StatusReply | None:
        """The status of `board`, or None when it did not answer in time."""
        frame = encode_status(board)
        async with self._lock:
            port = await self._ensure_open_locked()
            self.stats.queries += 1
            self._write(frame)
            reply = await self._await_reply(port, board, self.reply_timeout_s)
            if reply is None:
                self.stats.timeouts += 1
            return reply

    async def send_unlock(
        self, board: int, lock: int, *, reply_window_s: float = 0.0
    ) -> StatusReply | None:
        """Write the unlock frame of `lock` on `board`; the board times the pulse.

        With `reply_window_s` > 0 the bus stays held for up to that long, for the status reply
        some boards send after an unlock: it is returned as soon as it arrives (None if it did
        not), and cannot collide with the next request. Raises PortUnavailable when the frame
        could not be written.
        """
        frame = encode_unlock(board, lock)
        async with self._lock:
            port = await self._ensure_open_locked()
            self._write(frame)
            return await self._unlock_sent(port, board, reply_window_s)

    async def _unlock_sent(self, port: Any, board: int,
                           reply_window_s: float) -> StatusReply | None:
        """An unlock frame went out on `port`, the bus still held: counted, and the board's
        status reply waited for up to `reply_window_s` (none from a port lost since)."""
        self.stats.unlocks += 1
        if reply_window_s <= 0 or self._port is not port:
            return None
        reply = await self._await_reply(port, board, reply_window_s)
        if reply is not None:
            self.stats.unlock_replies += 1
        return reply

    async def arm_unlock(self, board: int, lock: int) -> ArmedUnlock | None:
        """Reserve the bus for the unlock frame of `lock` on `board`, to be written from
        another thread (`ArmedUnlock.fire`) the instant its commit is on the disk; the bus is
        held until `finish` or `release`. None, and nothing reserved, unless the bus is free
        at once and the port open and read on the loop: the caller uses `send_unlock`."""
        if self._port is None or self._fd is None or self._lock.locked():
            return None
        # Free and not locked: taken without waiting (asyncio.Lock's fast path; only a waiter
        # woken by the last release but not yet run is served first, one exchange at most).
        await self._lock.acquire()
        if self._port is None:  # lost while a waiter ran first
            self._lock.release()
            return None
        armed = ArmedUnlock(self, self._port, self._write_frame, board, encode_unlock(board, lock))
        self._armed = armed
        return armed

    async def close(self) -> None:
        """Close the port; a later request opens it again without waiting for a cooldown."""
        async with self._lock:
            port = self._detach()
            self._retry_at = 0.0
            self._error = ""
            if port is not None:
                await asyncio.to_thread(_close_quietly, port)

    # -- internals --------------------------------------------------------------------------

    async def _ensure_open_locked(self) -> Any:
        if self._port is not None:
            return self._port
        loop = asyncio.get_running_loop()
        wait = self._retry_at - loop.time()
        if wait > 0:
            raise PortUnavailable(f"{self.url}: {self._error} (next attempt in {wait:.1f} s)")
        # Opening may block (a network serial server, a slow USB enumeration): not on the loop.
        opening = loop.run_in_executor(None, self._open_blocking)
        try:
            port = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread still finishes opening; close what it opens rather than leak the port
            # (and the exclusive lock on it).
            opening.add_done_callback(self._close_abandoned)
            raise
        except (OSError, ValueError) as exc:
            # OSError covers SerialException; ValueError is pyserial's answer to a bad URL.
            self.stats.failures += 1
            self._retry_at = loop.time() + self.reopen_cooldown_s
            self._error = f"cannot open: {exc}"
            self._log_failure()
            raise PortUnavailable(f"{self.url}: {self._error}") from exc
        self._attach(port)
        return port

    @staticmethod
    def _close_abandoned(opening: asyncio.Future[Any]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            _close_quietly(opening.result())

    def _open_blocking(self) -> Any:
        port = serial.serial_for_url(
            self.url,
            baudrate=self.baudrate,
            bytesize=serial.EIGHTBITS,
            parity=serial.PARITY_NONE,
            stopbits=serial.STOPBITS_ONE,
            timeout=0,
            write_timeout=WRITE_TIMEOUT_S,
            # Two programs polling one RS-485 bus garble each other's frames: refuse instead.
            exclusive=True,
        )
        try:
            # Bytes that arrived before this open are not answers to anything we will ask.
            port.reset_input_buffer()
            if _fileno(port) is None:
                port.timeout = THREAD_READ_S
        except (OSError, ValueError):
            _close_quietly(port)
            raise
        return port

    def _attach(self, port: Any) -> None:
        loop = asyncio.get_running_loop()
        self._port = port
        self._write_frame = _frame_writer(port)
        self._fd = None
        self.decoder.reset()
        fd = _fileno(port)
        if fd is not None:
            try:
                loop.add_reader(fd, self._on_readable)
                self._fd = fd
            except (OSError, ValueError):
                # A descriptor the selector cannot watch: read in a worker thread instead.
                port.timeout = THREAD_READ_S
        self.stats.opens += 1
        if self._logged_error:
            log.info("kerong port open again", port=self.url)
        else:
            log.info("kerong port open", port=self.url)
        self._logged_error = ""
        self._error = ""

    def _disarm(self, armed: ArmedUnlock) -> None:
        if self._armed is armed:
            self._armed = None
        self._lock.release()

    def _detach(self) -> Any:
        port = self._port
        self._port = None
        self._write_frame = _no_port
        if self._armed is not None:
            # Its frame is never written to a port closed (or a descriptor reused) under it.
            self._armed.retire()
        if self._fd is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        self.decoder.reset()
        return port

    def _lose(self, detail: str) -> PortUnavailable:
        """The open port failed: close it, start the cooldown, fail a pending query."""
        loop = asyncio.get_running_loop()
        port = self._detach()
        self.stats.failures += 1
        self._retry_at = loop.time() + self.reopen_cooldown_s
        self._error = detail
        self._log_failure()
        fault = PortUnavailable(f"{self.url}: {detail}")
        if self._waiter is not None and not self._waiter[1].done():
            self._waiter[1].set_exception(fault)
        if port is not None:
            # A tty close can wait for unsent output to drain; never on the event loop.
            loop.run_in_executor(None, _close_quietly, port)
        return fault

    def _log_failure(self) -> None:
        # One line per distinct failure, not one per reopen attempt every cooldown.
        if self._error != self._logged_error:
            log.warning("kerong port unavailable", port=self.url, error=self._error,
                        retry_in_s=self.reopen_cooldown_s)
            self._logged_error = self._error

    def _write(self, frame: bytes) -> None:
        try:
            self._write_frame(frame)
        except (OSError, ValueError) as exc:
            raise self._lose(_failed("write", exc)) from exc

    def _on_readable(self) -> None:
        port = self._port
        if port is None:
            return
        try:
            data = port.read(READ_CHUNK)
        except (OSError, ValueError) as exc:
            # An unplugged adapter: EIO, or "readiness to read but returned no data".
            self._lose(_failed("read", exc))
            return
        self._deliver(self.decoder.feed(data))

    def _deliver(self, replies: list[StatusReply]) -> None:
        for reply in replies:
            waiter = self._waiter
            if waiter is not None and waiter[0] == reply.board and not waiter[1].done():
                waiter[1].set_result(reply)
            else:
                self.stats.stray_replies += 1

    async def _await_reply(self, port: Any, board: int, timeout_s: float) -> StatusReply | None:
        """The next reply of `board` within `timeout_s` of a frame just written, or None."""
        if self._fd is None:
            return await self._read_threaded(port, board, timeout_s)
        # The waiter is set after the write: a reply can only be delivered by the reader
        # callback, which cannot run before this task awaits.
        future: asyncio.Future[StatusReply] = asyncio.get_running_loop().create_future()
        self._waiter = (board, future)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return None
        finally:
            self._waiter = None

    async def _read_threaded(self, port: Any, board: int, timeout_s: float) -> StatusReply | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                data: bytes = await asyncio.to_thread(port.read, READ_CHUNK)
            except (OSError, ValueError) as exc:
                raise self._lose(_failed("read", exc)) from exc
            found: StatusReply | None = None
            for reply in self.decoder.feed(data):
                if found is None and reply.board == board:
                    found = reply
                else:
                    self.stats.stray_replies += 1
            if found is not None:
                return found
        return None
