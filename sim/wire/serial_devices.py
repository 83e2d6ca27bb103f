"""Scanner and keypad emulators: the serial protocols of hal.serial_input on pseudo-terminals."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from typing import Final

import structlog

from hal.base import KeyPressed, Scanned
from sim.world import STUCK_KEY_REPEAT_S, FaultChanged, SimWorld

log = structlog.get_logger("sim.wire.serial")

TERMINATORS: Final = (b"\r\n", b"\n", b"\r")


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write `data` to the non-blocking master `fd`, waiting while the pty buffer is full."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await _writable(fd)
            continue
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            # Nobody holds the device end open: the bytes go nowhere, as on an unplugged line.
            log.debug("pty has no reader; bytes lost", fd=fd, length=len(view))
            return
        view = view[written:]


class ScannerEmulator:
    """A serial QR/barcode scanner: every scan the world publishes becomes one line.

    Faults come from the world: `dead` writes nothing (the world publishes no scan), `garbage`
    writes a line of random bytes that are not UTF-8 instead of the scan.
    """

    def __init__(
        self, world: SimWorld, *, terminator: bytes = b"\r\n", seed: int | None = None
    ) -> None:
        if terminator not in TERMINATORS:
            raise ValueError(f"terminator must be one of {TERMINATORS!r}, not {terminator!r}")
        self.world = world
        self.terminator = terminator
        self._rng = random.Random(seed)
        self.lines_written = 0

    def _junk(self) -> bytes:
        # 0xFF never occurs in UTF-8, so the line is certainly not UTF-8; CR and LF are left
        # out so that the junk stays one line.
        body = [b for b in self._rng.randbytes(self._rng.randint(3, 31)) if b not in b"\r\n"]
        return bytes([0xFF, *body])

    async def run(self, master_fd: int) -> None:
        """Write scans to `master_fd` until cancelled."""
        os.set_blocking(master_fd, False)
        with self.world.subscribe(Scanned) as sub:
            while True:
                change = await sub.get()
                if not isinstance(change, Scanned) or self.world.scanner_dead:
                    continue
                garbage = self.world.scanner_garbage
                line = self._junk() if garbage else change.data.encode("utf-8")
                await write_all(master_fd, line + self.terminator)
                self.lines_written += 1


class KeypadEmulator:
    """A serial keypad: each key the world publishes is one ASCII byte.

    A stuck key (the keypad `stuck_key` fault) repeats every STUCK_KEY_REPEAT_S while the fault
    is on, as the sim backend's keypad does.
    """

    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.keys_written = 0

    async def _send(self, master_fd: int, key: str) -> None:
        await write_all(master_fd, key.encode("ascii"))
        self.keys_written += 1

    async def run(self, master_fd: int) -> None:
        """Write key presses to `master_fd` until cancelled."""
        os.set_blocking(master_fd, False)
        loop = asyncio.get_running_loop()
        with self.world.subscribe(KeyPressed, FaultChanged) as sub:
            next_repeat: float | None = None
            while True:
                key = self.world.stuck_key
                if key is None:
                    next_repeat = None
                    change = await sub.get()
                else:
                    now = loop.time()
                    if next_repeat is None or now >= next_repeat:
                        await self._send(master_fd, key)
                        next_repeat = now + STUCK_KEY_REPEAT_S
                    try:
                        async with asyncio.timeout_at(next_repeat):
                            change = await sub.get()
                    except TimeoutError:
                        continue
                if isinstance(change, KeyPressed):
                    await self._send(master_fd, change.key)
