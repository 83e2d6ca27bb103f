"""The simulator's world model of one locker bank: doors, latches, parcels, inputs and faults."""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar

from hal.base import (
    MAX_PULSE_S,
    DisplayMessage,
    DoorChanged,
    DoorState,
    KeyPressed,
    OccupancyChanged,
    Scanned,
    TamperChanged,
)

KEYS: Final = frozenset("0123456789*#")
MAX_KEYS_PER_PRESS: Final = 256
MAX_SCAN_CHARS: Final = 4096
MAX_PARCEL_ID_CHARS: Final = 64
MAX_SIZE_CHARS: Final = 8
BACKLOG_LIMIT: Final = 256
STUCK_KEY_REPEAT_S: Final = 0.1
BOARD_COUNT: Final = 16

_COMPARTMENT_ID = re.compile(r"[A-Za-z0-9-]{1,16}")
_BOARD_NUMBER = re.compile(r"[0-9]{1,2}")
_SIZE_LABEL = re.compile(rf"[A-Za-z0-9]{{1,{MAX_SIZE_CHARS}}}")
# Printable ASCII without the space: what a courier's label barcode carries as the parcel id.
_PARCEL_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_PARCEL_ID_CHARS}}}")
# Characters a broken scanner spits out: C0 and C1 controls, none of them printable.
_JUNK: Final = "".join(chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)])

FAULT_KINDS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "lock": ("jam",),
        "door_sensor": ("stuck_open", "stuck_closed"),
        "keypad": ("stuck_key",),
        "scanner": ("dead", "garbage"),
        "board": ("offline", "garbage"),
        "tamper": ("open",),
    }
)


class SimError(ValueError):
    """A simulator request names an unknown compartment, op, fault or value."""


@dataclass(frozen=True, slots=True)
class LockChanged:
    """The latch of a compartment engaged (locked=True) or let go."""

    compartment: str
    locked: bool


@dataclass(frozen=True, slots=True)
class DoorMoved:
    """The physical door moved; the sensed state (DoorChanged) may differ under a fault."""

    compartment: str
    open: bool


@dataclass(frozen=True, slots=True)
class ServiceChanged:
    """The daemon put a compartment in or out of service."""

    compartment: str
    in_service: bool


@dataclass(frozen=True, slots=True)
class DisplayChanged:
    """The customer display now shows `message`."""

    message: DisplayMessage


@dataclass(frozen=True, slots=True)
class FaultChanged:
    """A fault was injected (on=True) or cleared."""

    target: str
    kind: str
    on: bool
    key: str | None = None


WorldChange = (
    KeyPressed
    | Scanned
    | DoorChanged
    | OccupancyChanged
    | TamperChanged
    | LockChanged
    | DoorMoved
    | ServiceChanged
    | DisplayChanged
    | FaultChanged
)

# Inputs that exist only as a moment (a key press, a scan) are kept for a listener that has not
# subscribed yet, the way a serial device's buffer would; states can be read at any time.
_BACKLOGGED: Final = (KeyPressed, Scanned)


@dataclass(frozen=True, slots=True)
class CompartmentView:
    """A snapshot of one compartment as the world knows it."""

    id: str
    locked: bool
    door_open: bool
    occupied: bool
    in_service: bool
    released: bool
    jammed: bool
    sensor_stuck: DoorState | None
    sensed: DoorState
    size: str | None


@dataclass(slots=True)
class _Compartment:
    locked: bool = True
    door_open: bool = False
    occupied: bool = False
    in_service: bool = True
    released: bool = False  # the lock output is energised
    jammed: bool = False
    sensor_stuck: DoorState | None = None
    size: str | None = None  # the size label from the config; None when unknown
    pulse_end: asyncio.TimerHandle | None = None
    pulse_end_at: float = 0.0
    spring: asyncio.TimerHandle | None = None

    def sensed(self) -> DoorState:
        if self.sensor_stuck is not None:
            return self.sensor_stuck
        return DoorState.OPEN if self.door_open else DoorState.CLOSED


class Subscription:
    """A queue of world changes for one observer; close it (or use `with`) to stop receiving."""

    def __init__(self, world: SimWorld, kinds: tuple[type[Any], ...]) -> None:
        self._world = world
        self.kinds = kinds
        self.queue: asyncio.Queue[WorldChange] = asyncio.Queue()

    def wants(self, change: WorldChange) -> bool:
        return not self.kinds or isinstance(change, self.kinds)

    async def get(self) -> WorldChange:
        return await self.queue.get()

    def get_nowait(self) -> WorldChange:
        """The next change; raises asyncio.QueueEmpty when there is none."""
        return self.queue.get_nowait()

    def close(self) -> None:
        self._world._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _checked_fault(target: str, kind: str, on: bool, key: str | None) -> tuple[str, str]:
    """The (family, id) of a fault request, once its types, target, kind and key are valid."""
    if not isinstance(target, str) or not isinstance(kind, str):
        raise SimError("fault target and kind must be strings")
    if not isinstance(on, bool):
        raise SimError("fault 'on' must be true or false")
    family, sep, ident = target.partition(":")
    if family not in FAULT_KINDS:
        raise SimError(
            f"unknown fault target {target!r}; targets: lock:<id>, door_sensor:<id>, "
            "keypad, scanner, board:<n>, tamper"
        )
    needs_id = family in ("lock", "door_sensor", "board")
    if needs_id and not (sep and ident):
        raise SimError(f"fault target {family!r} needs an id: {family}:<id>")
    if not needs_id and sep:
        raise SimError(f"fault target {family!r} takes no id")
    if kind not in FAULT_KINDS[family]:
        kinds = ", ".join(FAULT_KINDS[family])
        raise SimError(f"target {target!r} has no fault {kind!r}; its faults: {kinds}")
    if key is not None and kind != "stuck_key":
        raise SimError(f"only stuck_key takes a key, not {kind!r}")
    return family, ident


class SimWorld:
    """The simulated bank. Sync methods must be called from the thread running the event loop.

    Person side: `press`, `scan`, `scan_label`, `open_door`, `close_door`, `force_door`,
    `set_parcel`, `set_fault`. Daemon side (through the backends): `release_lock`, `all_off`,
    `set_display`, `set_in_service`. Observers `subscribe()` to changes instead of polling.
    """

    def __init__(
        self,
        compartments: Iterable[str],
        *,
        spring_delay_s: float = 0.05,
        parcels: Iterable[str] = (),
        sizes: Mapping[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        ids = list(compartments)
        if not ids:
            raise SimError("a bank needs at least one compartment")
        for cid in ids:
            if not isinstance(cid, str) or not _COMPARTMENT_ID.fullmatch(cid):
                raise SimError(f"bad compartment id {cid!r}: 1-16 of A-Z, a-z, 0-9 and '-'")
        if len(set(ids)) != len(ids):
            raise SimError("compartment ids must be unique")
        if not (isinstance(spring_delay_s, int | float) and 0 <= spring_delay_s <= MAX_PULSE_S):
            raise SimError(f"spring_delay_s must be between 0 and {MAX_PULSE_S} s")
        self._compartments: dict[str, _Compartment] = {cid: _Compartment() for cid in ids}
        self.spring_delay_s = float(spring_delay_s)
        for cid in parcels:
            self._get(cid).occupied = True
        for cid, size in check_sizes(ids, sizes or {}).items():
            self._compartments[cid].size = size
        self._rng = random.Random(seed)
        self._stuck_key: str | None = None
        self._scanner_dead = False
        self._scanner_garbage = False
        self._tamper_open = False
        self._boards_offline: set[int] = set()
        self._boards_garbage: set[int] = set()
        # (target, kind) -> key; a dict keeps the order faults were injected in.
        self._faults: dict[tuple[str, str], str | None] = {}
        self._display = DisplayMessage(lines=())
        self._subscriptions: list[Subscription] = []
        self._backlog: deque[WorldChange] = deque(maxlen=BACKLOG_LIMIT)
        self.pulses: list[str] = []
        """Compartment of every pulse the daemon sent, jammed or not, in order."""
        self.display_history: list[DisplayMessage] = []
        """Every message the daemon showed, in order."""
        self.scans: list[str] = []
        """Every string a person scanned, in order, whatever the scanner made of it."""
        self.labels: list[str] = []
        """The parcel id of every label a courier scanned (`scan_label`), in order."""

    # -- reading ----------------------------------------------------------------------------

    @property
    def compartment_ids(self) -> tuple[str, ...]:
        return tuple(self._compartments)

    def compartment(self, cid: str) -> CompartmentView:
        c = self._get(cid)
        return CompartmentView(
            id=cid,
            locked=c.locked,
            door_open=c.door_open,
            occupied=c.occupied,
            in_service=c.in_service,
            released=c.released,
            jammed=c.jammed,
            sensor_stuck=c.sensor_stuck,
            sensed=c.sensed(),
            size=c.size,
        )

    def sensed_doors(self) -> dict[str, DoorState]:
        """What the door sensors report: the stuck value under a fault, else the real door."""
        return {cid: c.sensed() for cid, c in self._compartments.items()}

    def occupancy(self) -> dict[str, bool]:
        return {cid: c.occupied for cid, c in self._compartments.items()}

    @property
    def display(self) -> DisplayMessage:
        return self._display

    @property
    def tamper_open(self) -> bool:
        return self._tamper_open

    @property
    def stuck_key(self) -> str | None:
        return self._stuck_key

    @property
    def scanner_dead(self) -> bool:
        return self._scanner_dead

    @property
    def scanner_garbage(self) -> bool:
        return self._scanner_garbage

    @property
    def boards_offline(self) -> frozenset[int]:
        return frozenset(self._boards_offline)

    @property
    def boards_garbage(self) -> frozenset[int]:
        """Boards whose wire-level emulator sends random bytes around every reply."""
        return frozenset(self._boards_garbage)

    def faults(self) -> list[dict[str, str]]:
        """Active faults in the order injected: {"target", "kind"} plus "key" for stuck_key."""
        out: list[dict[str, str]] = []
        for (target, kind), key in self._faults.items():
            item = {"target": target, "kind": kind}
            if key is not None:
                item["key"] = key
            out.append(item)
        return out

    def state(self) -> dict[str, Any]:
        """The body of the control surface's `state` reply (without "ok")."""
        return {
            "compartments": {
                cid: {
                    "locked": c.locked,
                    "door_open": c.door_open,
                    "occupied": c.occupied,
                    "in_service": c.in_service,
                    "size": c.size,
                }
                for cid, c in self._compartments.items()
            },
            "display": self._display.text,
            "faults": self.faults(),
        }

    # -- observers --------------------------------------------------------------------------

    def subscribe(self, *kinds: type[Any]) -> Subscription:
        """A queue of every change, or only of the given change classes.

        A subscription that names KeyPressed or Scanned first receives the presses and scans
        made while nobody named them (up to BACKLOG_LIMIT), so a keypad task that starts a
        moment late loses nothing.
        """
        sub = Subscription(self, kinds)
        self._subscriptions.append(sub)
        if kinds:
            kept: deque[WorldChange] = deque(maxlen=BACKLOG_LIMIT)
            for change in self._backlog:
                if sub.wants(change):
                    sub.queue.put_nowait(change)
                else:
                    kept.append(change)
            self._backlog = kept
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    def _publish(self, change: WorldChange) -> None:
        claimed = False
        for sub in self._subscriptions:
            if sub.wants(change):
                sub.queue.put_nowait(change)
                claimed = claimed or bool(sub.kinds)
        if not claimed and isinstance(change, _BACKLOGGED):
            self._backlog.append(change)

    # -- person side ------------------------------------------------------------------------

    def press(self, keys: str) -> None:
        """Press `keys` in order on the keypad."""
        if not isinstance(keys, str) or not keys:
            raise SimError("keys must be a non-empty string of 0-9, '*' and '#'")
        if len(keys) > MAX_KEYS_PER_PRESS:
            raise SimError(f"at most {MAX_KEYS_PER_PRESS} keys per press")
        bad = sorted(set(keys) - KEYS)
        if bad:
            raise SimError(f"the keypad has no key {bad[0]!r}; keys are 0-9, '*' and '#'")
        for key in keys:
            self._publish(KeyPressed(key))

    def scan(self, data: str) -> None:
        """Present `data` to the scanner; a dead one ignores it, a garbage one mangles it."""
        if not isinstance(data, str) or not data:
            raise SimError("scan data must be a non-empty string")
        if len(data) > MAX_SCAN_CHARS:
            raise SimError(f"scan data is longer than {MAX_SCAN_CHARS} characters")
        _append_bounded(self.scans, data)
        if self._scanner_dead:
            return
        if self._scanner_garbage:
            data = "".join(self._rng.choice(_JUNK) for _ in range(self._rng.randint(4, 32)))
        self._publish(Scanned(data))

    def scan_label(self, parcel_id: str) -> None:
        """A courier scans the label of parcel `parcel_id`: the scanner reads exactly that text.

        It goes through `scan`, so scanner faults apply; `labels` records it either way.
        """
        if not isinstance(parcel_id, str) or not _PARCEL_ID.fullmatch(parcel_id):
            raise SimError(
                f"bad parcel id {_shown(parcel_id)}: 1-{MAX_PARCEL_ID_CHARS} printable ASCII "
                "characters, no spaces"
            )
        _append_bounded(self.labels, parcel_id)
        self.scan(parcel_id)

    def open_door(self, cid: str) -> None:
        """A person pulls the door open; refused while the latch holds it (see force_door)."""
        c = self._get(cid)
        if c.door_open:
            return
        if c.locked:
            raise SimError(
                f"compartment {cid} is locked: a person cannot open it (force_door breaks it open)"
            )
        self._move_door(cid, c, True)

    def close_door(self, cid: str) -> None:
        """A person shuts the door; the latch catches it unless the lock is still released."""
        c = self._get(cid)
        if not c.door_open:
            return
        self._move_door(cid, c, False)
        if not c.released:
            self._set_locked(cid, c, True)

    def force_door(self, cid: str) -> None:
        """The door is broken open whatever the latch, jammed or not."""
        c = self._get(cid)
        if c.door_open:
            return
        self._cancel_spring(c)
        self._set_locked(cid, c, False)
        self._move_door(cid, c, True)

    def set_parcel(self, cid: str, present: bool) -> None:
        """Put a parcel in (True) or take it out; the occupancy sensor sees it at once."""
        if not isinstance(present, bool):
            raise SimError("present must be true or false")
        c = self._get(cid)
        if c.occupied != present:
            c.occupied = present
            self._publish(OccupancyChanged(cid, present))

    def set_fault(self, target: str, kind: str, on: bool, key: str | None = None) -> None:
        """Inject (on=True) or clear a fault; targets and kinds as in PROTOCOL.md section 11."""
        family, ident = _checked_fault(target, kind, on, key)
        target = self._apply_fault(target, family, ident, kind, on, key)
        if on:
            self._faults[(target, kind)] = key if kind == "stuck_key" else None
        else:
            self._faults.pop((target, kind), None)
        self._publish(FaultChanged(target, kind, on, key if on else None))

    def _apply_fault(self, target: str, family: str, ident: str, kind: str, on: bool,
                     key: str | None) -> str:
        """Set or clear one checked fault; returns the target as recorded (board:<n>)."""
        if family == "lock":
            self._get(ident).jammed = on
        elif family == "door_sensor":
            self._set_sensor_stuck(ident, kind, on)
        elif family == "keypad":
            if on and (not isinstance(key, str) or key not in KEYS):
                raise SimError("stuck_key needs a 'key': one of 0-9, '*' or '#'")
            self._stuck_key = key if on else None
        elif family == "scanner":
            if kind == "dead":
                self._scanner_dead = on
            else:
                self._scanner_garbage = on
        elif family == "board":
            return self._set_board_fault(ident, kind, on)
        else:
            self._set_tamper(on)
        return target

    def _set_board_fault(self, ident: str, kind: str, on: bool) -> str:
        if not (_BOARD_NUMBER.fullmatch(ident) and int(ident) < BOARD_COUNT):
            raise SimError(f"bad board number {ident!r}: 0-{BOARD_COUNT - 1}")
        chosen = self._boards_offline if kind == "offline" else self._boards_garbage
        if on:
            chosen.add(int(ident))
        else:
            chosen.discard(int(ident))
        return f"board:{int(ident)}"

    # -- daemon side ------------------------------------------------------------------------

    async def release_lock(self, cid: str, duration_s: float) -> None:
        """Energise the lock of `cid` for `duration_s` seconds, then return.

        The end of the pulse is a loop timer, not this coroutine: cancelling the caller cuts
        the wait short but the latch still re-engages on time. A pulse arriving during another
        one extends it to the later end.
        """
        c = self._get(cid)
        if (
            not isinstance(duration_s, int | float)
            or isinstance(duration_s, bool)
            or not math.isfinite(duration_s)
            or not 0 < duration_s <= MAX_PULSE_S
        ):
            raise SimError(f"pulse duration must be in (0, {MAX_PULSE_S}] s, not {duration_s!r}")
        loop = asyncio.get_running_loop()
        _append_bounded(self.pulses, cid)
        end_at = loop.time() + duration_s
        if c.pulse_end is None or end_at > c.pulse_end_at:
            if c.pulse_end is not None:
                c.pulse_end.cancel()
            c.pulse_end = loop.call_at(end_at, self._end_pulse, cid)
            c.pulse_end_at = end_at
        if not c.released:
            c.released = True
            if not c.jammed:
                self._set_locked(cid, c, False)
                if not c.door_open:
                    self._schedule_spring(cid, c, loop)
        elif not c.jammed and not c.door_open and c.spring is None:
            # Shut while still released (closed during the pulse): the latch never caught it,
            # so the new pulse lets the spring push it open again.
            self._schedule_spring(cid, c, loop)
        await asyncio.sleep(duration_s)
        # Timers due at the same moment run in no set order: end the pulse here if its timer
        # has not yet, so that a returned pulse is an ended one (unless another extended it).
        if c.pulse_end is not None and c.pulse_end_at <= loop.time():
            self._end_pulse(cid)

    async def all_off(self) -> None:
        """End every pulse now: each latch re-engages on a closed door."""
        self.end_all_pulses()

    def end_all_pulses(self) -> None:
        for cid, c in self._compartments.items():
            self._cancel_spring(c)
            if c.released:
                self._end_pulse(cid)

    def set_display(self, lines: Sequence[str], indicator: str = "idle") -> None:
        if isinstance(lines, str) or not all(isinstance(line, str) for line in lines):
            raise SimError("display lines must be a sequence of strings")
        if not isinstance(indicator, str):
            raise SimError("display indicator must be a string")
        message = DisplayMessage(lines=tuple(lines), indicator=indicator)
        self._display = message
        _append_bounded(self.display_history, message)
        self._publish(DisplayChanged(message))

    def set_in_service(self, cid: str, in_service: bool) -> None:
        if not isinstance(in_service, bool):
            raise SimError("in_service must be true or false")
        c = self._get(cid)
        if c.in_service != in_service:
            c.in_service = in_service
            self._publish(ServiceChanged(cid, in_service))

    # -- internals --------------------------------------------------------------------------

    def _get(self, cid: str) -> _Compartment:
        if not isinstance(cid, str):
            raise SimError(f"compartment id must be a string, not {type(cid).__name__}")
        try:
            return self._compartments[cid]
        except KeyError:
            raise SimError(f"unknown compartment {cid!r}") from None

    def _set_locked(self, cid: str, c: _Compartment, locked: bool) -> None:
        if c.locked != locked:
            c.locked = locked
            self._publish(LockChanged(cid, locked))

    def _move_door(self, cid: str, c: _Compartment, open_: bool) -> None:
        before = c.sensed()
        c.door_open = open_
        self._publish(DoorMoved(cid, open_))
        after = c.sensed()
        if after != before:
            self._publish(DoorChanged(cid, after))

    def _set_sensor_stuck(self, cid: str, kind: str, on: bool) -> None:
        c = self._get(cid)
        value = DoorState.OPEN if kind == "stuck_open" else DoorState.CLOSED
        other = "stuck_closed" if kind == "stuck_open" else "stuck_open"
        before = c.sensed()
        if on:
            c.sensor_stuck = value
            # A sensor is stuck one way at a time: the new fault replaces the other.
            self._faults.pop((f"door_sensor:{cid}", other), None)
        elif c.sensor_stuck == value:
            c.sensor_stuck = None
        after = c.sensed()
        if after != before:
            self._publish(DoorChanged(cid, after))

    def _set_tamper(self, on: bool) -> None:
        if self._tamper_open != on:
            self._tamper_open = on
            self._publish(TamperChanged(on))

    def _schedule_spring(self, cid: str, c: _Compartment, loop: asyncio.AbstractEventLoop) -> None:
        self._cancel_spring(c)
        if self.spring_delay_s == 0:
            self._spring(cid)
        else:
            c.spring = loop.call_later(self.spring_delay_s, self._spring, cid)

    def _cancel_spring(self, c: _Compartment) -> None:
        if c.spring is not None:
            c.spring.cancel()
            c.spring = None

    def _spring(self, cid: str) -> None:
        c = self._compartments[cid]
        c.spring = None
        # A jam (even one injected after the pulse began) holds the door; a pulse shorter than
        # the spring delay has let the latch catch the door again.
        if c.jammed or c.door_open or not (c.released or not c.locked):
            return
        self._set_locked(cid, c, False)
        self._move_door(cid, c, True)

    def _end_pulse(self, cid: str) -> None:
        c = self._compartments[cid]
        if c.pulse_end is not None:
            c.pulse_end.cancel()
            c.pulse_end = None
        c.released = False
        if not c.door_open:
            self._cancel_spring(c)
            self._set_locked(cid, c, True)


def check_sizes(compartments: Iterable[str], sizes: Mapping[str, str]) -> dict[str, str]:
    """`sizes` (compartment id -> size label) checked against the bank's compartment ids.

    A label is 1-8 of A-Z, a-z and 0-9 ("S", "M", "XL"); raises SimError naming the first
    unknown id or bad label.
    """
    if not isinstance(sizes, Mapping):
        raise SimError("sizes must map compartment ids to size labels")
    known = set(compartments)
    out: dict[str, str] = {}
    for cid, size in sizes.items():
        if cid not in known:
            raise SimError(f"sizes names unknown compartment {_shown(cid)}")
        if not isinstance(size, str) or not _SIZE_LABEL.fullmatch(size):
            raise SimError(
                f"bad size {_shown(size)} of compartment {cid!r}: 1-{MAX_SIZE_CHARS} of "
                "A-Z, a-z and 0-9"
            )
        out[cid] = size
    return out


def _shown(value: object) -> str:
    """`value` for an error message, cut short: it may come from a socket."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


HISTORY_LIMIT: Final = 1000
T = TypeVar("T")


def _append_bounded(history: list[T], item: T) -> None:
    """Histories are for tests and the demo; a simulator that runs for days must not grow."""
    history.append(item)
    if len(history) > HISTORY_LIMIT:
        del history[: len(history) - HISTORY_LIMIT]
