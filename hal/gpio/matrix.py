"""The matrix keypad backend: rows and columns on GPIO, scanned, debounced, one key per press."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec

from hal.base import DeviceHealth, Emit, HealthChanged, Keypad, KeyPressed
from hal.errors import BackendError, HardwareFault
from hal.gpio.debounce import ScanDebouncer
from hal.gpio.lines import InputLines, OutputLines, load_library
from hal.gpio.options import DEFAULT_CHIP, ChipPath, Pin, claim_pins, options_key, table_name
from hal.registry import decode_options

if TYPE_CHECKING:
    from hal.registry import HalContext

DEFAULT_KEYS: Final = ("123", "456", "789", "*0#")
NO_KEY: Final = " "  # a position of the layout with no key behind it
DEVICE: Final = "keypad"  # the device named in HealthChanged

Cell = tuple[int, int]  # (row, column)


class MatrixOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[hal.keypad.options]` of the matrix backend."""

    library: Literal["rpigpio", "gpiod"]
    """Which GPIO library drives the pins."""
    chip: ChipPath | None = None
    """gpiod only: the GPIO character device (default /dev/gpiochip0)."""
    rows: Annotated[list[Pin], msgspec.Meta(min_length=1, max_length=8)]
    """The row pins, top to bottom; driven LOW one at a time."""
    cols: Annotated[list[Pin], msgspec.Meta(min_length=1, max_length=8)]
    """The column pins, left to right; read with the internal pull-ups."""
    keys: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_KEYS))
    """One string per row, one character per column; a space marks a position without a key."""
    scan_interval_ms: Annotated[int, msgspec.Meta(ge=5, le=200)] = 20
    """One sweep of every row takes this long."""
    debounce_scans: Annotated[int, msgspec.Meta(ge=1, le=10)] = 2
    """A key counts as pressed (and later as released) after this many sweeps in a row."""
    stuck_after_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """A key held this long is reported as a keypad fault (and recovered when let go)."""


def _check(opts: MatrixOptions, where: str) -> None:
    table = table_name(where)
    if opts.chip is not None and opts.library != "gpiod":
        raise BackendError(f"{table}: chip is for the gpiod library only (key 'chip')")
    pins = [*opts.rows, *opts.cols]
    dupes = sorted({pin for pin in pins if pins.count(pin) > 1})
    if dupes:
        raise BackendError(
            f"{table}: GPIO {', '.join(map(str, dupes))} used twice in rows/cols (key 'rows')")
    if len(opts.keys) != len(opts.rows):
        raise BackendError(f"{table}: keys has {len(opts.keys)} rows but rows has "
                           f"{len(opts.rows)} pins (key 'keys')")
    for index, row in enumerate(opts.keys):
        if len(row) != len(opts.cols):
            raise BackendError(f"{table}: keys row {index} {row!r} has {len(row)} keys but "
                               f"cols has {len(opts.cols)} pins (key 'keys')")


class MatrixKeypad(Keypad):
    """A passive key matrix: rows driven LOW one at a time, columns read with pull-ups.

    This is the daemon's one polling loop: a matrix has no "key down" signal without a driven
    row, so it has to be scanned. One row is driven per tick and the columns are read at the
    end of the tick, so lines settle while we sleep and the loop never spins: with 4 rows at
    the default 20 ms per sweep that is 200 short wake-ups a second.

    Rows are driven open-drain (LOW, or let go), never HIGH: two keys pressed in one column
    then cannot short a HIGH row to the LOW one.
    """

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        where = options_key(config_key)
        opts = decode_options(options, MatrixOptions, where)
        _check(opts, where)
        self._library = load_library(opts.library, chip=opts.chip or DEFAULT_CHIP,
                                     backend="matrix", config_key=config_key)
        claim_pins(context, self._library.claim_space, [*opts.rows, *opts.cols],
                   owner=config_key, where=where)
        self._rows = list(opts.rows)
        self._cols = list(opts.cols)
        self._keys = list(opts.keys)
        self._tick_s = opts.scan_interval_ms / 1000 / len(self._rows)
        self._stuck_after_s = opts.stuck_after_s
        # Kept across runs: a key held while a crashed run restarts is not pressed again.
        self._debouncer: ScanDebouncer[Cell] = ScanDebouncer(opts.debounce_scans)
        self._held_since: dict[Cell, float] = {}
        self._stuck: dict[Cell, None] = {}
        self._lines: tuple[OutputLines, InputLines] | None = None

    def _open(self) -> tuple[OutputLines, InputLines]:
        if self._lines is None:
            rows = self._library.open_drain(self._rows, label=self.config_key)
            try:
                cols = self._library.inputs(self._cols, active_low=True, pull="up",
                                            filter_ms=0, edges=False, label=self.config_key)
            except BaseException:
                rows.close()
                raise
            self._lines = (rows, cols)
        return self._lines

    async def start(self) -> None:
        self._open()

    async def run(self, emit: Emit) -> None:
        rows, cols = self._open()
        loop = asyncio.get_running_loop()
        while True:
            down: list[Cell] = []
            for r, row_pin in enumerate(self._rows):
                rows.set(row_pin, True)
                try:
                    # The row stays driven while we sleep: the columns have settled by the
                    # time they are read.
                    await asyncio.sleep(self._tick_s)
                    levels = cols.active_many(self._cols)
                except BaseException:
                    with contextlib.suppress(HardwareFault):
                        rows.set(row_pin, False)
                    raise
                rows.set(row_pin, False)
                down.extend((r, c) for c, pressed in enumerate(levels)
                            if pressed and self._keys[r][c] != NO_KEY)
            self._after_sweep(down, loop.time(), emit)

    def _after_sweep(self, down: list[Cell], now: float, emit: Emit) -> None:
        pressed, released = self._debouncer.update(down)
        for cell in pressed:
            self._held_since[cell] = now
            emit(KeyPressed(self._key(cell)))
        for cell in released:
            self._held_since.pop(cell, None)
            if cell in self._stuck:
                del self._stuck[cell]
                emit(HealthChanged(DEVICE, ok=True, detail=f"key {self._key(cell)!r} released"))
        for cell, since in self._held_since.items():
            if cell not in self._stuck and now - since >= self._stuck_after_s:
                # One press was reported; a key that never lets go is a fault to fix, and the
                # rest of its row and column may read wrong meanwhile.
                self._stuck[cell] = None
                emit(HealthChanged(DEVICE, ok=False, detail=(
                    f"key {self._key(cell)!r} held for more than {self._stuck_after_s:g} s")))

    def _key(self, cell: Cell) -> str:
        return self._keys[cell[0]][cell[1]]

    async def health(self) -> DeviceHealth:
        if self._stuck:
            keys = ", ".join(repr(self._key(cell)) for cell in self._stuck)
            return DeviceHealth(ok=False, detail=f"stuck key(s): {keys}")
        return DeviceHealth(ok=True)

    async def close(self) -> None:
        if self._lines is None:
            return
        rows, cols = self._lines
        self._lines = None
        try:
            for pin in self._rows:
                rows.set(pin, False)
        finally:
            try:
                rows.close()
            finally:
                cols.close()
