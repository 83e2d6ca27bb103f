"""The "serial" scanner and keypad backends: lines and key bytes from a pyserial port URL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, Protocol, TypeVar, cast

import msgspec
import serial  # type: ignore[import-untyped]
import structlog

from hal.base import (
    Device,
    DeviceHealth,
    Emit,
    HealthChanged,
    Keypad,
    KeyPressed,
    Scanned,
    Scanner,
)
from hal.registry import decode_options
from hal.serial_url import check_port_url

if TYPE_CHECKING:
    from hal.registry import HalContext

log = structlog.get_logger("hal.serial")

KEYPAD_KEYS: Final = frozenset(b"0123456789*#")
# A keypad that ends its keys with a newline is not sending junk.
_KEYPAD_IGNORED: Final = frozenset(b"\r\n")
# A port with a file descriptor (a tty, a pty, socket://) is read from the event loop when the
# descriptor is readable: no thread and no timed wake-up. Only a URL handler without one
# (loop://, rfc2217://) is read in a worker thread, by blocking reads of at most this long.
# Cancellation interrupts such a read at once (Serial.cancel_read), so this only bounds the
# wait for handlers that cannot be interrupted and how soon a port that reopened without
# traffic counts as working again.
READ_TIMEOUT_S: Final = 0.5
READ_CHUNK: Final = 4096
# One warning per kind of drop in this interval; the rest are counted into the next warning so
# that a babbling device cannot flood the journal.
WARN_INTERVAL_S: Final = 5.0

T = TypeVar("T")


class _Options(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    port: Annotated[str, msgspec.Meta(min_length=1)]
    """pyserial port or URL: /dev/ttyACM0, /dev/serial/by-id/..., spy:///dev/ttyUSB1."""
    baudrate: Annotated[int, msgspec.Meta(ge=50, le=4_000_000)] = 9600
    reopen_cooldown_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    """Pause between attempts to (re)open a port that is missing or failed."""
    dead_after_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 10.0
    """The port unusable this long: the device is reported faulty (HealthChanged ok=False)."""


class SerialScannerOptions(_Options, kw_only=True):
    """The `[hal.scanner.options]` table of the "serial" scanner."""

    terminator: Literal["\r\n", "\n", "\r"] = "\r\n"
    max_line: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 512
    """Longest accepted line in bytes, without the terminator."""
    max_lines_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 10.0
    """Flood limit: sustained lines per second (a burst of this many lines passes at once)."""


class SerialKeypadOptions(_Options, kw_only=True):
    """The `[hal.keypad.options]` table of the "serial" keypad: one byte is one key."""

    max_keys_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 30.0
    """Flood limit: sustained keys per second (a burst of this many keys passes at once)."""


class _Port(Protocol):
    """What this module uses of a pyserial Serial object (pyserial ships no type hints)."""

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def cancel_read(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line passed `max_line` bytes without a terminator; the rest of it is skipped too."""


class LineSplitter:
    """Cuts a byte stream into lines at `terminator`, bounding the memory a line may take."""

    def __init__(self, terminator: bytes, max_line: int) -> None:
        if not terminator:
            raise ValueError("the terminator must not be empty")
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self._term = terminator
        self._max = max_line
        self._buf = bytearray()
        self._skipping = False  # inside an over-long line: wait for its terminator

    def feed(self, data: bytes) -> list[bytes | Overlong]:
        """The lines that `data` completes, terminators removed; an Overlong for each line
        longer than `max_line`, reported as soon as it is known."""
        out: list[bytes | Overlong] = []
        self._buf += data
        while (end := self._buf.find(self._term)) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + len(self._term)]
            if self._skipping:
                self._skipping = False  # the tail of a line already reported
            elif len(line) > self._max:
                out.append(Overlong())
            else:
                out.append(line)
        # No terminator among max_line + len(terminator) bytes: no ending can make this line
        # fit any more. Keep only what may be the start of a terminator split across reads.
        if not self._skipping and len(self._buf) >= self._max + len(self._term):
            out.append(Overlong())
            self._skipping = True
        if self._skipping:
            del self._buf[: len(self._buf) - (len(self._term) - 1)]
        return out


class TokenBucket:
    """Allows `rate` events per second on average and bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last: float | None = None

    def allow(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class _Drops:
    """Counts dropped input by reason and logs warnings, at most one per reason and interval."""

    def __init__(self, device: str, port: str) -> None:
        self._device = device
        self._port = port
        self.counts: Counter[str] = Counter()
        self._last_warned: dict[str, float] = {}
        self._unreported: Counter[str] = Counter()

    def drop(self, reason: str, message: str, now: float, **detail: object) -> None:
        self.counts[reason] += 1
        last = self._last_warned.get(reason)
        if last is not None and now - last < WARN_INTERVAL_S:
            self._unreported[reason] += 1
            return
        self._last_warned[reason] = now
        also = self._unreported.pop(reason, 0)
        if also:
            detail["also_dropped"] = also
        log.warning(message, device=self._device, port=self._port, reason=reason, **detail)


async def _in_thread(
    pool: Executor,
    fn: Callable[[], T],
    *,
    abort: Callable[[], None] | None = None,
    discard: Callable[[T], None] | None = None,
) -> T:
    """Run blocking `fn` in `pool`. On cancellation, interrupt it with `abort`, let it finish
    (so that the caller never closes a port under a running read), hand a result that comes
    anyway to `discard` (an open that completes after all is closed again), and re-raise."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(pool, fn)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if abort is not None:
            try:
                abort()
            except OSError as exc:
                log.debug("could not interrupt a serial read", error=str(exc))

        def settle(done: asyncio.Future[T]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            if discard is not None:
                discard(done.result())

        fut.add_done_callback(settle)
        await asyncio.wait([fut])
        raise


def _read_some(port: _Port) -> bytes:
    """Wait up to the port's timeout for a byte, then take what else has already arrived."""
    first = port.read(1)
    if not first:
        return b""
    waiting = min(port.in_waiting, READ_CHUNK - 1)
    return bytes(first) + (bytes(port.read(waiting)) if waiting else b"")


def _fileno(port: _Port) -> int | None:
    """The port's file descriptor, or None for a URL handler that has none."""
    try:
        fd = cast(Any, port).fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _read_now(port: _Port) -> bytes:
    """What has arrived on `port`, never a wait (its timeout is 0)."""
    return bytes(port.read(READ_CHUNK))


def _readable_reader(port: _Port, fd: int) -> Callable[[], bytes]:
    """What has arrived on `port`, for a caller that knows its descriptor is readable (the
    loop said so). A plain local port is one os.read of the descriptor: pyserial's read adds
    a select and a timer object to every key. Any other port (spy://, socket://) keeps its
    own read, which may log or translate."""
    if type(port) is not serial.Serial:
        return lambda: _read_now(port)

    def read() -> bytes:
        try:
            data = os.read(fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            raise serial.SerialException(f"read failed: {exc}") from exc
        if not data:
            # Readable yet empty (the port reads with VMIN 0): the device is gone, as
            # pyserial says of it in the same case.
            raise serial.SerialException(
                "device reports readiness to read but returned no data "
                "(device disconnected or multiple access on port?)")
        return data

    return read


def _close_quietly(port: _Port) -> None:
    try:
        port.close()
    except OSError as exc:
        log.debug("closing a serial port failed", error=str(exc))
    # pyserial's spy:// opens its capture file (`?file=`) and never closes it: closed here,
    # so that the capture is on the disk now (as the Kerong transport does).
    output = getattr(getattr(port, "formatter", None), "output", None)
    if output is not None and output not in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            output.close()


class _SerialInput(Device):
    """The loop both serial input devices share: open, read whenever bytes arrive, reopen after
    a cooldown forever, and report the device dead once its port has been unusable long enough.
    A subclass only turns bytes into events (`_feed`)."""

    DEVICE: ClassVar[str]

    def __init__(
        self,
        *,
        options: Mapping[str, Any],
        context: HalContext,
        config_key: str,
        settings: _Options,
        where: str,
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        check_port_url(settings.port, f"[{where}]")
        self._settings = settings
        self._drops = _Drops(self.DEVICE, settings.port)
        self._port_open = False
        self._dead = False
        self._unusable_since: float | None = None  # when the port last stopped working
        self._error = ""
        self._opened_early: _Port | None = None  # opened by start(), for run() to read

    @property
    def port_open(self) -> bool:
        """True while the port is open and being read."""
        return self._port_open

    @property
    def dropped(self) -> Mapping[str, int]:
        """How much input was dropped so far, by reason: too_long, not_utf8, junk, flood."""
        return dict(self._drops.counts)

    async def health(self) -> DeviceHealth:
        if self._dead:
            return DeviceHealth(ok=False, detail=self._dead_detail())
        if self._unusable_since is not None:
            return DeviceHealth(ok=True, detail=f"reopening {self._settings.port}: {self._error}")
        return DeviceHealth(ok=True)

    async def start(self) -> None:
        """Open the port before the daemon says it is up, so that a key pressed as soon as
        it is up is read. A port that will not open now is no startup error: `run` tries
        again at once, and reports it."""
        if self._opened_early is not None or self._port_open:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hal-{self.DEVICE}")
        try:
            self._opened_early = await _in_thread(pool, self._open, discard=_close_quietly)
        except (OSError, ValueError):
            return
        finally:
            pool.shutdown(wait=False)

    async def close(self) -> None:
        port, self._opened_early = self._opened_early, None
        if port is not None:
            _close_quietly(port)

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A thread of its own, for opening the port and for the blocking reads of a URL
            # handler without a file descriptor: neither may wait behind nor hold up the work
            # of the loop's default executor. It ends once the port is open and has a
            # descriptor (read from the loop): an idle daemon keeps no thread for its ports.
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hal-{self.DEVICE}")
            try:
                await self._serve_once(pool, emit)
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            # A port that opens but fails at once must not spin: always pause before reopening.
            await asyncio.sleep(self._retry_delay(loop.time()))

    async def _serve_once(self, pool: ThreadPoolExecutor, emit: Emit) -> None:
        """Open the port and read it until it fails; an error is reported, never raised."""
        port, self._opened_early = self._opened_early, None
        try:
            if port is None:
                port = await _in_thread(pool, self._open, discard=_close_quietly)
        except (OSError, ValueError) as exc:  # SerialException is an OSError
            self._unusable(exc, "cannot open the serial port; retrying", emit)
            return
        self._port_open = True
        log.info("serial port open", device=self.DEVICE, port=self._settings.port)
        try:
            self._opened()
            if _fileno(port) is not None:
                pool.shutdown(wait=False)
            await self._pump(pool, port, emit)
        except OSError as exc:
            self._unusable(exc, "serial port lost; reopening", emit)
        finally:
            self._port_open = False
            _close_quietly(port)

    def _open(self) -> _Port:
        port = cast(_Port, serial.serial_for_url(
            self._settings.port, baudrate=self._settings.baudrate, timeout=0
        ))
        if _fileno(port) is None:
            cast(Any, port).timeout = READ_TIMEOUT_S
        return port

    async def _pump(self, pool: Executor, port: _Port, emit: Emit) -> None:
        fd = _fileno(port)
        if fd is None:
            await self._pump_threaded(pool, port, emit)
        else:
            await self._pump_readable(fd, port, emit)

    async def _pump_readable(self, fd: int, port: _Port, emit: Emit) -> None:
        """Read `port` from the event loop whenever its descriptor is readable, until it fails
        (raises the OSError) or the task is cancelled."""
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        readable = _readable_reader(port, fd)

        def take(read: Callable[[], bytes] = readable) -> bool:
            try:
                data = read()  # what has arrived, never a wait
            except OSError as exc:  # EIO of an unplugged adapter is a SerialException
                if not lost.done():
                    lost.set_exception(exc)
                return False
            if data:
                self._feed(data, loop.time(), emit)
            return True

        # One read at once proves the port works (a port that opens but fails at once stays
        # dead) and takes what arrived before the reader is watching.
        if not take(lambda: _read_now(port)):
            await lost
        self._usable(emit)
        loop.add_reader(fd, take)
        try:
            await lost
        finally:
            loop.remove_reader(fd)

    async def _pump_threaded(self, pool: Executor, port: _Port, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await _in_thread(pool, lambda: _read_some(port), abort=port.cancel_read)
            # A read that completed (with data or by timing out) proves the port works; only
            # then is a dead device back, so a port that opens but cannot be read stays dead.
            self._usable(emit)
            if data:
                self._feed(data, loop.time(), emit)

    def _unusable(self, exc: BaseException, message: str, emit: Emit) -> None:
        now = asyncio.get_running_loop().time()
        self._error = str(exc) or type(exc).__name__
        port = self._settings.port
        if self._unusable_since is None:
            self._unusable_since = now
            log.warning(message, device=self.DEVICE, port=port, error=self._error)
        else:
            log.debug(message, device=self.DEVICE, port=port, error=self._error)
        if not self._dead and now - self._unusable_since >= self._settings.dead_after_s:
            self._dead = True
            log.error("serial device dead", device=self.DEVICE, port=port, error=self._error)
            emit(HealthChanged(device=self.DEVICE, ok=False, detail=self._dead_detail()))

    def _usable(self, emit: Emit) -> None:
        if self._unusable_since is None:
            return
        self._unusable_since = None
        self._error = ""
        if self._dead:
            self._dead = False
            port = self._settings.port
            log.info("serial device back", device=self.DEVICE, port=port)
            emit(HealthChanged(device=self.DEVICE, ok=True, detail=f"port {port} works again"))

    def _retry_delay(self, now: float) -> float:
        delay = self._settings.reopen_cooldown_s
        if not self._dead and self._unusable_since is not None:
            # Look again when the dead time is up, so that the fault is reported on time even
            # when the cooldown is the longer of the two.
            until_dead = self._unusable_since + self._settings.dead_after_s - now
            delay = min(delay, max(until_dead, 0.0))
        return delay

    def _dead_detail(self) -> str:
        return (f"port {self._settings.port} unusable for {self._settings.dead_after_s:g} s "
                f"or more: {self._error}")

    def _opened(self) -> None:
        """Hook: the port was (re)opened; forget what was half read from the last one."""

    @abstractmethod
    def _feed(self, data: bytes, now: float, emit: Emit) -> None:
        """Turn bytes read from the port into events."""


class SerialScanner(_SerialInput, Scanner):
    """A QR/barcode scanner that sends each read as one line of UTF-8 text."""

    DEVICE = "scanner"

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        where = f"{config_key}.options"
        settings = decode_options(options, SerialScannerOptions, where)
        super().__init__(options=options, context=context, config_key=config_key,
                         settings=settings, where=where)
        self.settings = settings
        self._bucket = TokenBucket(settings.max_lines_per_s, max(1.0, settings.max_lines_per_s))
        self._lines = self._splitter()

    def _splitter(self) -> LineSplitter:
        return LineSplitter(self.settings.terminator.encode("ascii"), self.settings.max_line)

    def _opened(self) -> None:
        # Half a line left from a port that went away must not prefix the next scan.
        self._lines = self._splitter()

    def _feed(self, data: bytes, now: float, emit: Emit) -> None:
        for item in self._lines.feed(data):
            if isinstance(item, Overlong):
                self._drops.drop("too_long", "scanner line too long; dropped", now,
                                 max_line=self.settings.max_line)
                continue
            if not item:
                continue  # an empty line carries nothing worth a warning
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                # Only the length is logged: a scan may be an access code.
                self._drops.drop("not_utf8", "scanner line is not UTF-8; dropped", now,
                                 length=len(item))
                continue
            if not self._bucket.allow(now):
                self._drops.drop("flood", "scanner sends too many lines; line dropped", now,
                                 limit_per_s=self.settings.max_lines_per_s)
                continue
            emit(Scanned(text))


class SerialKeypad(_SerialInput, Keypad):
    """A keypad that sends one ASCII byte per key: 0-9, `*` and `#`."""

    DEVICE = "keypad"

    def __init__(self, *, options: Mapping[str, Any], context: HalContext, config_key: str) -> None:
        where = f"{config_key}.options"
        settings = decode_options(options, SerialKeypadOptions, where)
        super().__init__(options=options, context=context, config_key=config_key,
                         settings=settings, where=where)
        self.settings = settings
        self._bucket = TokenBucket(settings.max_keys_per_s, max(1.0, settings.max_keys_per_s))

    def _feed(self, data: bytes, now: float, emit: Emit) -> None:
        for byte in data:
            if byte in KEYPAD_KEYS:
                if self._bucket.allow(now):
                    emit(KeyPressed(chr(byte)))
                else:
                    self._drops.drop("flood", "keypad sends too many keys; key dropped", now,
                                     limit_per_s=self.settings.max_keys_per_s)
            elif byte not in _KEYPAD_IGNORED:
                self._drops.drop("junk", "keypad sent a byte that is no key; dropped", now,
                                 byte=f"0x{byte:02x}")
