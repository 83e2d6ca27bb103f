"""The Kerong bus driver: polls every board, keeps latch and infrared state, reports changes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec
import structlog

from hal.base import (
    ArmedPulse,
    DeviceHealth,
    DoorChanged,
    DoorState,
    HealthChanged,
    OccupancyChanged,
)
from hal.errors import BackendError, HardwareFault
from hal.kerong.codec import MAX_BOARD, MAX_LOCK, StatusReply
from hal.kerong.schedule import PollSchedule
from hal.kerong.transport import (
    DEFAULT_BAUDRATE,
    ArmedUnlock,
    KerongTransport,
    PortUnavailable,
)
from hal.serial_url import check_port_url

if TYPE_CHECKING:
    from hal.registry import HalContext

SETTINGS_KEY: Final = "kerong"
BUS_DEVICE: Final = "rs485"
"""HealthChanged.device of the serial port itself (adapter unplugged, port missing)."""
# One lost reply is line noise; this many in a row is a board that is gone. At the default
# timings a dead board is reported about a second after it stopped answering.
MISSES_BEFORE_FAULT: Final = 3
# While no door is expected to move, the bus is polled this seldom (unless poll_interval_s is
# longer still): a door forced open then is seen within this long.
DEFAULT_IDLE_POLL_S: Final = 1.0

log = structlog.get_logger("hal.kerong")

BusEvent = DoorChanged | OccupancyChanged | HealthChanged

_SLOT = re.compile(r"\s*([0-9]{1,2})\s*/\s*([0-9]{1,2})\s*")

UnlockReply = Literal["none", "status", "auto"]
"""Whether a board answers an unlock with a status reply: "none" never (the bus is free at
once), "status" always (wait up to reply_timeout_s for it), "auto" find out: wait after the
first unlock, and keep waiting only if the board answered."""


class BoardSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One `[[backends.kerong.boards]]` table."""

    address: Annotated[int, msgspec.Meta(ge=0, le=MAX_BOARD)]
    """The board's address (its DIP switches), 0-15."""
    engaged_bit: Literal[0, 1]
    """The latch-bit value that means "engaged" (door shut) on this board's revision."""
    unlock_reply: UnlockReply | None = None
    """This board's answer to an unlock; None: the bus's `unlock_reply`."""


class KerongSettings(msgspec.Struct, forbid_unknown_fields=True):
    """The `[backends.kerong]` table of the configuration."""

    port: Annotated[str, msgspec.Meta(min_length=1)]
    """A pyserial URL or device path: /dev/ttyUSB0, spy:///dev/ttyUSB0?file=/tmp/bus.txt, ..."""
    boards: Annotated[list[BoardSettings], msgspec.Meta(min_length=1, max_length=MAX_BOARD + 1)]
    compartments: dict[str, str]
    """Compartment id -> "board/lock", e.g. {"1" = "0/0"}; locks are numbered 0-15."""
    baudrate: Annotated[int, msgspec.Meta(gt=0)] = DEFAULT_BAUDRATE
    reply_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=5)] = 0.2
    poll_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.25
    """Pause between two rounds while a door may move (after a pulse, while open, after a
    change)."""
    idle_poll_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] | None = None
    """Pause between two rounds while nothing is expected to move; None: the larger of
    DEFAULT_IDLE_POLL_S and poll_interval_s."""
    fast_poll_for_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    """How long after a pulse or a change the bus is polled every poll_interval_s."""
    reopen_cooldown_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 2.0
    unlock_reply: UnlockReply = "auto"


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a compartment's lock is wired: board address and lock number (0-15)."""

    board: int
    lock: int


def parse_layout(
    settings: KerongSettings, compartments: Sequence[str]
) -> dict[str, Slot]:
    """Check `compartments` of the settings against the bank; errors name the config key."""
    where = f"[backends.{SETTINGS_KEY}]"
    addresses = [b.address for b in settings.boards]
    dupes = sorted({a for a in addresses if addresses.count(a) > 1})
    if dupes:
        raise BackendError(f"{where} boards: address {dupes[0]} is listed twice")
    key = f"{where} compartments"
    layout: dict[str, Slot] = {}
    taken: dict[Slot, str] = {}
    for cid, text in settings.compartments.items():
        if cid not in compartments:
            raise BackendError(f"{key}: {cid!r} is not a compartment of this bank")
        match = _SLOT.fullmatch(text)
        if match is None:
            raise BackendError(
                f"{key}: {cid!r} = {text!r} is not \"board/lock\" (e.g. \"0/3\")"
            )
        board, lock = int(match[1]), int(match[2])
        if board not in addresses:
            raise BackendError(
                f"{key}: {cid!r} is on board {board}, which is not in [[backends.kerong.boards]]"
            )
        if lock > MAX_LOCK:
            raise BackendError(f"{key}: {cid!r} names lock {lock}; locks are 0-{MAX_LOCK}")
        slot = Slot(board, lock)
        if slot in taken:
            raise BackendError(
                f"{key}: {cid!r} and {taken[slot]!r} are both wired to {board}/{lock}"
            )
        taken[slot] = cid
        layout[cid] = slot
    missing = [cid for cid in compartments if cid not in layout]
    if missing:
        raise BackendError(
            f"{key}: compartment {missing[0]!r} is not mapped to a board/lock"
            + (f" (nor are {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return layout


def idle_interval(settings: KerongSettings) -> float:
    """The pause between two rounds while nothing is expected to move; checks the setting."""
    idle = settings.idle_poll_interval_s
    if idle is None:
        return max(DEFAULT_IDLE_POLL_S, settings.poll_interval_s)
    if idle < settings.poll_interval_s:
        raise BackendError(
            f"[backends.{SETTINGS_KEY}] idle_poll_interval_s = {idle:g} is shorter than "
            f"poll_interval_s = {settings.poll_interval_s:g}: the idle pause must be at least "
            "the fast one (raise idle_poll_interval_s or lower poll_interval_s)"
        )
    return idle


def resolve_port(port: str, config_dir: Path) -> str:
    """A relative device path is taken from the config file's directory; URLs are left alone."""
    if "://" in port or Path(port).is_absolute():
        return port
    return str(config_dir / port)


@dataclass(slots=True)
class _Board:
    address: int
    engaged_bit: int
    unlock_reply: UnlockReply = "auto"
    # Learnt in "auto" mode: None until the first unlock of this run.
    answers_unlock: bool | None = None
    reply: StatusReply | None = None  # None: state unknown (never heard, faulted, port down)
    misses: int = 0
    faulted: bool = False
    detail: str = ""


class ArmedBusUnlock(ArmedPulse):
    """An unlock of one compartment armed on the bus (`KerongBus.arm_unlock`)."""

    def __init__(self, bus: KerongBus, compartment: str, slot: Slot,
                 armed: ArmedUnlock) -> None:
        self._bus = bus
        self._compartment = compartment
        self._slot = slot
        self._armed = armed

    def fire(self) -> None:
        self._armed.fire()

    async def finish(self) -> None:
        # Planned here, not when armed: nothing is said of an unlock whose commit failed,
        # and the bus, held since, has read nothing new meanwhile.
        bus = self._bus
        board, wait = bus._unlock_plan(self._compartment, self._slot)
        try:
            reply = await self._armed.finish(reply_window_s=bus._reply_window(wait))
        except PortUnavailable as exc:
            raise bus._unlock_not_sent(self._compartment, exc) from exc
        bus._unlock_sent(board, wait, reply)

    def release(self) -> None:
        self._armed.release()


class KerongBus:
    """Several CU16 boards on one RS-485 line, seen as per-compartment door and parcel states.

    The only periodic work is `run`: it polls every configured board in turn (polling is how
    RS-485 boards are read: they never speak unasked), every `poll_interval_s` while a door may
    move and every `idle_poll_interval_s` otherwise (`PollSchedule`). A reply updates the latch
    bits (the door state: released = open) and the infrared bits (occupancy) of that board's
    compartments; listeners (`listen`) get a DoorChanged / OccupancyChanged per change. A board
    that misses MISSES_BEFORE_FAULT replies in a row is a fault (HealthChanged "board:<n>"),
    its doors read UNKNOWN, and it recovers by itself when it answers again. A serial port that
    fails is a fault of BUS_DEVICE; every door reads UNKNOWN until it is back.
    """

    def __init__(
        self,
        settings: KerongSettings,
        *,
        compartments: Sequence[str],
        config_dir: Path | None = None,
        transport: KerongTransport | None = None,
    ) -> None:
        self.settings = settings
        self.layout = parse_layout(settings, compartments)
        self._idle_s = idle_interval(settings)
        # A mistyped URL scheme never works: refuse it now rather than fault forever.
        check_port_url(settings.port, f"backends.{SETTINGS_KEY}")
        self.transport = transport or KerongTransport(
            resolve_port(settings.port, config_dir or Path.cwd()),
            baudrate=settings.baudrate,
            reply_timeout_s=settings.reply_timeout_s,
            reopen_cooldown_s=settings.reopen_cooldown_s,
        )
        self._boards = {
            b.address: _Board(b.address, b.engaged_bit, b.unlock_reply or settings.unlock_reply)
            for b in sorted(settings.boards, key=lambda b: b.address)
        }
        self._bus_ok: bool | None = None  # None until the first attempt to open the port
        self._doors_seen: dict[str, DoorState] = dict.fromkeys(self.layout, DoorState.UNKNOWN)
        self._occupied_seen: dict[str, bool] = {}
        self._suspects: dict[str, str] = {}
        self._listeners: list[asyncio.Queue[BusEvent]] = []
        self._started = False
        self._schedule: PollSchedule | None = None  # made by the first round, on the loop
        self._wake = asyncio.Event()  # an unlock went out: the poll loop looks at its due time

    @classmethod
    def from_context(cls, context: HalContext) -> KerongBus:
        """The bus described by `[backends.kerong]`, for the compartments of this bank."""
        settings = context.settings(SETTINGS_KEY, KerongSettings)
        return cls(settings, compartments=context.compartments, config_dir=context.config_dir)

    # -- reading ----------------------------------------------------------------------------

    def doors(self) -> dict[str, DoorState]:
        """Door state per compartment: CLOSED when the latch is engaged, OPEN when released,
        UNKNOWN while its board (or the port) is faulty or has not answered yet."""
        return {cid: self._door(cid) for cid in self.layout}

    def occupancy(self) -> dict[str, bool]:
        """Parcel seen by the infrared sensor, for the compartments whose board state is known
        (a compartment on a silent board is left out rather than guessed)."""
        out: dict[str, bool] = {}
        for cid, slot in self.layout.items():
            reply = self._boards[slot.board].reply
            if reply is not None:
                out[cid] = bool(reply.ir_bit(slot.lock))
        return out

    def unlock_reply_of(self, address: int) -> UnlockReply:
        """How an unlock of board `address` is sent now: "status" (its reply is waited for),
        "none" (not waited for) or "auto" (not known yet: the next unlock finds out)."""
        board = self._boards[address]
        if board.unlock_reply != "auto" or board.answers_unlock is None:
            return board.unlock_reply
        return "status" if board.answers_unlock else "none"

    def faults(self) -> list[HealthChanged]:
        """The faults active now, as the events that reported them."""
        out: list[HealthChanged] = []
        if self._bus_ok is False:
            out.append(HealthChanged(BUS_DEVICE, False, self._bus_detail()))
        out += [
            HealthChanged(f"board:{b.address}", False, b.detail)
            for b in self._boards.values()
            if b.faulted
        ]
        return out

    def health(self) -> DeviceHealth:
        problems = [f"{f.device}: {f.detail}" for f in self.faults()]
        problems += [f"compartment {cid}: {why}" for cid, why in sorted(self._suspects.items())]
        decoder = self.transport.decoder
        noise = []
        if decoder.bad_checksums:
            noise.append(f"{decoder.bad_checksums} replies with a bad checksum discarded")
        if decoder.discarded_bytes:
            noise.append(f"{decoder.discarded_bytes} stray bytes skipped")
        if problems:
            return DeviceHealth(ok=False, detail="; ".join(problems + noise))
        return DeviceHealth(ok=True, detail="; ".join(noise))

    @contextmanager
    def listen(self) -> Iterator[asyncio.Queue[BusEvent]]:
        """A queue of every change from now on, until the `with` block ends."""
        queue: asyncio.Queue[BusEvent] = asyncio.Queue()
        self._listeners.append(queue)
        try:
            yield queue
        finally:
            self._listeners.remove(queue)

    # -- commands ---------------------------------------------------------------------------

    async def unlock(self, compartment: str) -> None:
        """Send the unlock frame of `compartment`'s lock; the board times the pulse.

        The frame is sent even when the latch already reads released: a cut feedback cable
        reads "released" forever, and a customer must not be refused because of it. The
        mismatch is logged and shown by `health()` until the latch reads engaged again.
        A board that answers unlocks (`unlock_reply`) is waited for, and its status reply is
        taken like a polled one: the latch it reports is known before the next poll.
        Raises HardwareFault when the frame could not be written (port unavailable).
        """
        slot = self.layout.get(compartment)
        if slot is None:
            raise HardwareFault(f"kerong: no compartment {compartment!r} on this bus")
        board, wait = self._unlock_plan(compartment, slot)
        try:
            reply = await self.transport.send_unlock(
                slot.board, slot.lock, reply_window_s=self._reply_window(wait))
        except PortUnavailable as exc:
            raise self._unlock_not_sent(compartment, exc) from exc
        self._unlock_sent(board, wait, reply)

    async def arm_unlock(self, compartment: str) -> ArmedBusUnlock | None:
        """`unlock` in two halves: the bus reserved now, the frame written by `fire` from any
        thread (the writer's, right after the commit), the rest by `finish` on the loop.
        None when the bus cannot be reserved at once (busy, port closed): use `unlock`."""
        slot = self.layout.get(compartment)
        if slot is None:
            return None
        armed = await self.transport.arm_unlock(slot.board, slot.lock)
        return None if armed is None else ArmedBusUnlock(self, compartment, slot, armed)

    def _unlock_plan(self, compartment: str, slot: Slot) -> tuple[_Board, bool]:
        """Before an unlock goes out: its board, and whether its reply is waited for."""
        if self._door(compartment) is DoorState.OPEN:
            why = "latch read released before an unlock (door open, or a cut sensor cable?)"
            self._suspects[compartment] = why
            log.warning("unlocking a compartment whose latch already reads released",
                        compartment=compartment, board=slot.board, lock=slot.lock)
        board = self._boards[slot.board]
        wait = board.unlock_reply == "status" or (
            board.unlock_reply == "auto" and board.answers_unlock is not False)
        return board, wait

    def _reply_window(self, wait: bool) -> float:
        return self.settings.reply_timeout_s if wait else 0.0

    def _unlock_not_sent(self, compartment: str, exc: PortUnavailable) -> HardwareFault:
        self._set_bus(False)
        return HardwareFault(f"kerong: unlock of compartment {compartment} not sent: {exc}")

    def _unlock_sent(self, board: _Board, wait: bool, reply: StatusReply | None) -> None:
        """After an unlock went out: faster polls, and the board's reply (or its silence)."""
        self.schedule.pulse_sent(asyncio.get_running_loop().time())
        self._wake.set()
        if reply is not None:
            board.answers_unlock = True
            self._on_reply(board, reply)
            self._publish_changes()
        elif (wait and board.unlock_reply == "auto" and board.answers_unlock is None
              and board.reply is not None):
            # Silence after the first unlock from a board that answers its status queries: it
            # does not answer unlocks, and later ones are not slowed down waiting for it. (A
            # board that is silent altogether says nothing either way.)
            board.answers_unlock = False
            log.info("kerong board does not answer unlocks; not waiting for it again",
                     board=board.address)

    async def scan(self) -> dict[str, bool]:
        """Diagnostics: probe every address 0-15 with a status query; {"board:<n>": answered}."""
        found: dict[str, bool] = {}
        for address in range(MAX_BOARD + 1):
            try:
                reply = await self.transport.query_status(address)
            except PortUnavailable as exc:
                self._set_bus(False)
                raise HardwareFault(f"kerong bus scan: {exc}") from exc
            found[f"board:{address}"] = reply is not None
        return found

    # -- polling ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Poll once, so that the first `doors()` already tells the truth. Idempotent, and
        never raises for a hardware problem: a missing port is a fault, not a startup error."""
        if self._started:
            return
        self._started = True
        await self.poll_once()

    @property
    def schedule(self) -> PollSchedule:
        """The polling rhythm (fast or idle), made on first use."""
        if self._schedule is None:
            self._schedule = PollSchedule(
                fast_s=self.settings.poll_interval_s, idle_s=self._idle_s,
                linger_s=self.settings.fast_poll_for_s,
                now=asyncio.get_running_loop().time())
        return self._schedule

    async def run(self) -> None:
        """Poll every board until cancelled (the bank's `kerong.poll` service): one timer per
        round, and an unlock brings the next round forward to the fast rhythm."""
        loop = asyncio.get_running_loop()
        while True:
            await self.poll_once()
            polled_at = loop.time()
            while True:
                self._wake.clear()
                due = max(self.schedule.next_round_at(polled_at, loop.time()),
                          loop.time() + self.transport.retry_in())
                if due <= loop.time():
                    break
                try:
                    async with asyncio.timeout_at(due):
                        await self._wake.wait()
                except TimeoutError:
                    break

    async def poll_once(self) -> None:
        """Ask every configured board for its status once and report what changed."""
        try:
            await self.transport.ensure_open()
        except PortUnavailable:
            self._set_bus(False)
            return
        self._set_bus(True)
        for board in self._boards.values():
            try:
                reply = await self.transport.query_status(board.address)
            except PortUnavailable:
                self._set_bus(False)
                return
            if reply is None:
                self._on_miss(board)
            else:
                self._on_reply(board, reply)
            self._publish_changes()

    async def close(self) -> None:
        await self.transport.close()

    # -- internals --------------------------------------------------------------------------

    def _door(self, cid: str) -> DoorState:
        slot = self.layout[cid]
        board = self._boards[slot.board]
        if board.reply is None:
            return DoorState.UNKNOWN
        engaged = board.reply.lock_bit(slot.lock) == board.engaged_bit
        return DoorState.CLOSED if engaged else DoorState.OPEN

    def _on_reply(self, board: _Board, reply: StatusReply) -> None:
        board.misses = 0
        board.reply = reply
        if board.faulted:
            board.faulted = False
            log.info("kerong board answers again", board=board.address)
            self._publish(HealthChanged(f"board:{board.address}", True, "answers again"))
        for cid, slot in self.layout.items():
            if slot.board == board.address and self._door(cid) is DoorState.CLOSED:
                # The latch feedback works: whatever was suspected of it is resolved.
                self._suspects.pop(cid, None)

    def _on_miss(self, board: _Board) -> None:
        board.misses += 1
        if board.misses >= MISSES_BEFORE_FAULT and not board.faulted:
            board.faulted = True
            board.reply = None
            board.detail = (
                f"no reply to {board.misses} status queries in a row on {self.transport.url}"
            )
            log.warning("kerong board does not answer", board=board.address, detail=board.detail)
            self._publish(HealthChanged(f"board:{board.address}", False, board.detail))

    def _bus_detail(self) -> str:
        return f"{self.transport.url}: {self.transport.error or 'not open'}"

    def _set_bus(self, ok: bool) -> None:
        if ok == self._bus_ok:
            return
        was = self._bus_ok
        self._bus_ok = ok
        if not ok:
            # Nothing read before the loss says anything about the boards now.
            for board in self._boards.values():
                board.reply = None
                board.misses = 0
            self._publish(HealthChanged(BUS_DEVICE, False, self._bus_detail()))
            self._publish_changes()
        elif was is False:
            self._publish(HealthChanged(BUS_DEVICE, True, f"{self.transport.url}: open again"))

    def _publish_changes(self) -> None:
        doors = self.doors()
        for cid, state in doors.items():
            if self._doors_seen.get(cid) is not state:
                self._doors_seen[cid] = state
                self._publish(DoorChanged(cid, state))
        for cid, occupied in self.occupancy().items():
            if self._occupied_seen.get(cid) != occupied:
                self._occupied_seen[cid] = occupied
                self._publish(OccupancyChanged(cid, occupied))
        self.schedule.doors_open(DoorState.OPEN in doors.values())

    def _publish(self, event: BusEvent) -> None:
        # Every change (door, parcel, health) keeps the bus polled fast for a while.
        self.schedule.changed(asyncio.get_running_loop().time())
        for queue in self._listeners:
            queue.put_nowait(event)
