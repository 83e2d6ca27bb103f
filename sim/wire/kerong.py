"""Kerong CU16 lock boards on a pseudo-terminal: the RS-485 frames, answered from a SimWorld."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

import structlog

from hal.base import MAX_PULSE_S, DoorState
from hal.kerong.codec import (
    CMD_STATUS,
    CMD_UNLOCK,
    MAX_BOARD,
    MAX_LOCK,
    Request,
    RequestDecoder,
    StatusReply,
    encode_reply,
)
from sim.world import SimError, SimWorld

log = structlog.get_logger("sim.wire.kerong")

HISTORY: Final = 1000
# While nobody holds the slave end open, the master reports a hang-up on every poll; looking
# again this often keeps an idle emulator from spinning.
IDLE_RETRY_S: Final = 0.02
MAX_GARBAGE: Final = 12


class KerongEmulator:
    """CU16 boards on one bus, speaking PROTOCOL.md section 10 on the master side of a pty.

    `boards` maps board address -> lock number -> compartment id of `world`. A status query
    is answered from the world: a lock bit says whether the latch is engaged (in the polarity
    of that board's `engaged_bit`; an unwired lock reads engaged), an infrared bit whether the
    compartment holds a parcel. A `door_sensor:<id>` stuck_open / stuck_closed fault pins the
    latch bit at released / engaged, as a cut or shorted feedback wire would. An unlock calls
    `world.release_lock(cid, pulse_s)`, so the simulated door springs open by itself. A board
    whose world fault `board:<n>` offline is on hears nothing and says nothing; so does an
    address with no board.

    With `unlock_reply` on, the boards answer an unlock too, the way some CU16 revisions do:
    a status reply (latch already released, ADDR carrying the lock number) `unlock_reply_s`
    after the unlock frame. RS-485 is half duplex, so a frame heard while that reply is still
    due collides with it: the frame is lost, the reply goes out garbled (a bad checksum), and
    `collisions` counts it.

    Test-side controls: `garbage = True` sends random bytes before and after every reply;
    `bad_checksums = n` gives the next n replies a wrong checksum. `requests`, `unlocks`,
    `replies` and `unlock_replies` record what crossed the wire.
    """

    def __init__(
        self,
        world: SimWorld,
        *,
        boards: Mapping[int, Mapping[int, str]],
        engaged_bit: Mapping[int, int] | int = 1,
        pulse_s: float = 0.5,
        seed: int | None = None,
        unlock_reply: bool = False,
        unlock_reply_s: float = 0.005,
    ) -> None:
        known = set(world.compartment_ids)
        wired: dict[int, dict[int, str]] = {}
        seen: set[str] = set()
        for board, locks in boards.items():
            if isinstance(board, bool) or not isinstance(board, int) or not 0 <= board <= MAX_BOARD:
                raise SimError(f"board address must be 0-{MAX_BOARD}, not {board!r}")
            wired[board] = {}
            for lock, cid in locks.items():
                if isinstance(lock, bool) or not isinstance(lock, int) or not 0 <= lock <= MAX_LOCK:
                    raise SimError(f"lock number must be 0-{MAX_LOCK}, not {lock!r}")
                if cid not in known:
                    raise SimError(f"unknown compartment {cid!r} on board {board} lock {lock}")
                if cid in seen:
                    raise SimError(f"compartment {cid!r} is wired to two locks")
                seen.add(cid)
                wired[board][lock] = cid
        polarity = (
            dict(engaged_bit)
            if isinstance(engaged_bit, Mapping)
            else dict.fromkeys(wired, engaged_bit)
        )
        for board, bit in polarity.items():
            if bit not in (0, 1) or isinstance(bit, bool):
                raise SimError(f"engaged_bit of board {board} must be 0 or 1, not {bit!r}")
        if not (isinstance(pulse_s, int | float) and 0 < pulse_s <= MAX_PULSE_S):
            raise SimError(f"pulse_s must be in (0, {MAX_PULSE_S}], not {pulse_s!r}")
        if not (isinstance(unlock_reply_s, int | float) and 0 <= unlock_reply_s <= MAX_PULSE_S):
            raise SimError(f"unlock_reply_s must be in [0, {MAX_PULSE_S}], not {unlock_reply_s!r}")
        self.world = world
        self.boards = wired
        self.engaged_bit = {board: polarity.get(board, 1) for board in wired}
        self.pulse_s = float(pulse_s)
        self.garbage = False
        """Send random bytes before and after every reply."""
        self.bad_checksums = 0
        """The next this-many replies go out with a wrong checksum."""
        self.requests: deque[Request] = deque(maxlen=HISTORY)
        """Every valid frame heard, for any address."""
        self.unlocks: deque[tuple[int, int]] = deque(maxlen=HISTORY)
        """(board, lock) of every unlock a present, online board obeyed."""
        self.replies = 0
        """Status replies sent."""
        self.unlock_reply = unlock_reply
        """Answer every unlock with a status reply."""
        self.unlock_reply_s = float(unlock_reply_s)
        """How long after an unlock frame its reply goes out."""
        self.unlock_replies = 0
        """Status replies sent after an unlock (garbled ones included)."""
        self.collisions = 0
        """Frames heard while an unlock reply was due: both were lost."""
        self.listeners: list[Callable[[Request], None]] = []
        """Called with every valid frame as soon as it is heard, before it is obeyed (a
        benchmark times unlock frames so)."""
        self._due: tuple[asyncio.TimerHandle, int, int, int] | None = None  # timer, fd, board, lock
        self._rng = random.Random(seed)
        self._decoder = RequestDecoder()
        self._pulses: set[asyncio.Task[None]] = set()

    def status(self, board: int) -> StatusReply:
        """What board `board` answers now (it must be one of `boards`)."""
        engaged_bit = self.engaged_bit[board]
        lock_bits = ir_bits = 0
        for lock in range(MAX_LOCK + 1):
            cid = self.boards[board].get(lock)
            view = self.world.compartment(cid) if cid is not None else None
            if view is None:
                engaged = True
            elif view.sensor_stuck is not None:
                # The latch feedback is this bank's door sensor: a stuck sensor fault is a
                # feedback wire stuck (stuck_open reads released, like a cut cable).
                engaged = view.sensor_stuck is DoorState.CLOSED
            else:
                engaged = view.locked
            if (engaged_bit if engaged else 1 - engaged_bit):
                lock_bits |= 1 << lock
            if view is not None and view.occupied:
                ir_bits |= 1 << lock
        return StatusReply(board=board, lock_bits=lock_bits, ir_bits=ir_bits)

    async def run(self, master_fd: int) -> None:
        """Serve the bus on `master_fd` until cancelled (the fd stays open: the caller's).

        Raises OSError if the fd breaks in a way a cable cannot (closed under us).
        """
        loop = asyncio.get_running_loop()
        os.set_blocking(master_fd, False)
        broken: asyncio.Future[None] = loop.create_future()
        retry: asyncio.TimerHandle | None = None

        def arm() -> None:
            nonlocal retry
            retry = None
            loop.add_reader(master_fd, on_readable)

        def on_readable() -> None:
            nonlocal retry
            try:
                data = os.read(master_fd, 1024)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:
                    loop.remove_reader(master_fd)
                    if not broken.done():
                        broken.set_exception(exc)
                    return
                data = b""
            if not data:
                # EIO (or EOF): nobody has the slave end open; the driver is away.
                loop.remove_reader(master_fd)
                retry = loop.call_later(IDLE_RETRY_S, arm)
                return
            for request in self._decoder.feed(data):
                self._handle(master_fd, request)

        arm()
        try:
            await broken
        finally:
            if retry is not None:
                retry.cancel()
            if self._due is not None:
                self._due[0].cancel()
                self._due = None
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(master_fd)
            for task in list(self._pulses):
                # The world ends each pulse with its own timer; this only stops the waiting.
                task.cancel()

    def _handle(self, fd: int, request: Request) -> None:
        for listener in self.listeners:
            listener(request)
        if self._due is not None:
            # Another frame on the line while a board is about to answer: both are garbled.
            self.collisions += 1
            timer, due_fd, due_board, due_lock = self._due
            timer.cancel()
            self._send_unlock_reply(due_fd, due_board, due_lock, garbled=True)
            return
        self.requests.append(request)
        board = request.board
        if board not in self.boards or board in self.world.boards_offline:
            return
        if request.cmd == CMD_UNLOCK:
            self.unlocks.append((board, request.lock))
            cid = self.boards[board].get(request.lock)
            if cid is not None:
                task = asyncio.create_task(
                    self.world.release_lock(cid, self.pulse_s), name=f"kerong-pulse:{cid}"
                )
                self._pulses.add(task)
                task.add_done_callback(self._pulse_done)
            if self.unlock_reply:
                # A timer, not an immediate write: it also runs after the pulse task's first
                # step, so the reply shows the latch released.
                timer = asyncio.get_running_loop().call_later(
                    self.unlock_reply_s, self._send_unlock_reply, fd, board, request.lock)
                self._due = (timer, fd, board, request.lock)
        elif request.cmd == CMD_STATUS:
            frame = encode_reply(self.status(board))
            if self.bad_checksums > 0:
                self.bad_checksums -= 1
                frame = frame[:-1] + bytes(((frame[-1] + 1) & 0xFF,))
            if self.garbage or board in self.world.boards_garbage:
                frame = self._noise() + frame + self._noise()
            self._write(fd, frame)
            self.replies += 1

    def _send_unlock_reply(self, fd: int, board: int, lock: int, *, garbled: bool = False) -> None:
        self._due = None
        frame = encode_reply(self.status(board), lock=lock)
        if garbled:
            frame = frame[:-1] + bytes(((frame[-1] + 1) & 0xFF,))
        self._write(fd, frame)
        self.unlock_replies += 1

    def _pulse_done(self, task: asyncio.Task[None]) -> None:
        self._pulses.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("emulated pulse failed", error=str(task.exception()))

    def _noise(self) -> bytes:
        return bytes(self._rng.randrange(256) for _ in range(self._rng.randint(1, MAX_GARBAGE)))

    @staticmethod
    def _write(fd: int, frame: bytes) -> None:
        try:
            os.write(fd, frame)
        except OSError as exc:
            # A full buffer or a vanished driver: on a real bus the reply would be lost too.
            log.debug("reply not delivered", error=str(exc))
