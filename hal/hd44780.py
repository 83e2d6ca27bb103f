"""The hd44780 display backend: a character LCD on a PCF8574 I2C backpack, through RPLCD."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import textwrap
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

import msgspec

from hal.base import DeviceHealth, Display, DisplayMessage
from hal.errors import HardwareFault
from hal.registry import decode_options

if TYPE_CHECKING:
    from hal.registry import HalContext

# The registry imports this module only when the configuration names the backend, so RPLCD
# (and the smbus2 it imports) is imported only then; a missing one becomes the registry's
# BackendError. RPLCD has no type hints: Any at this boundary.
RPLCD_I2C: Any = importlib.import_module("RPLCD.i2c")

EXPANDER: Final = "PCF8574"
# What smbus2 and RPLCD raise when the bus or the backpack misbehaves (no device at the
# address is OSError 121, "Remote I/O error").
LCD_ERRORS: Final = (OSError, RuntimeError, ValueError)


class Hd44780Options(msgspec.Struct, forbid_unknown_fields=True):
    """`[hal.display.options]` of the hd44780 backend."""

    address: Annotated[int, msgspec.Meta(ge=0x03, le=0x77)] = 0x27
    """I2C address of the backpack (0x27 for PCF8574, 0x3F for PCF8574A; `i2cdetect -y 1`)."""
    port: Annotated[int, msgspec.Meta(ge=0, le=255)] = 1
    """I2C bus number: 1 is pins 3 (SDA) and 5 (SCL) of the Pi header."""
    cols: Literal[16, 20] = 16
    rows: Literal[2, 4] = 2
    charmap: Literal["A00", "A02"] = "A00"
    """The character ROM of the controller: A00 (Japanese, the common one) or A02 (European)."""
    backlight: bool = True


def layout(lines: Sequence[str], *, cols: int, rows: int) -> list[str]:
    """The `rows` strings of exactly `cols` characters that show `lines`.

    Lines are word-wrapped when the wrapped text still fits the rows (a 20x4 shows a long
    message whole); otherwise each line is cut at the last column. Control characters become
    spaces, so a line can never move the cursor.
    """
    clean = ["".join(ch if ch.isprintable() else " " for ch in line) for line in lines]
    wrapped = [part for line in clean for part in (textwrap.wrap(line, cols) or [""])]
    chosen = wrapped if len(wrapped) <= rows else clean
    shown = [line[:cols].ljust(cols) for line in chosen[:rows]]
    return shown + [" " * cols] * (rows - len(shown))


class Hd44780Display(Display):
    """An HD44780 LCD over I2C; every bus transfer runs in a worker thread, never on the loop.

    A failed write drops the connection so the next message starts from a fresh
    initialisation (a transfer cut half-way leaves the controller out of step with the 4-bit
    protocol). The display is not essential to the bank, so a fault is reported through
    `health` and the HardwareFault of `show`, and never stops the daemon.
    """

    def __init__(
        self, *, options: Mapping[str, Any], context: HalContext, config_key: str
    ) -> None:
        super().__init__(options=options, context=context, config_key=config_key)
        self._opts = decode_options(options, Hd44780Options, f"{config_key}.options")
        # One writer on the bus at a time, even when a cancelled show() left its thread
        # still writing.
        self._bus_lock = threading.Lock()
        self._lcd: Any = None
        self._shown: list[str | None] = [None] * self._opts.rows
        self._fault: str | None = None

    @property
    def geometry(self) -> tuple[int, int]:
        return self._opts.cols, self._opts.rows

    async def start(self) -> None:
        # A fault is recorded by _write and every show() tries again: no display is no
        # reason to keep the bank from starting.
        with contextlib.suppress(HardwareFault):
            await asyncio.to_thread(self._write, [" " * self._opts.cols] * self._opts.rows)

    async def show(self, message: DisplayMessage) -> None:
        text = layout(message.lines, cols=self._opts.cols, rows=self._opts.rows)
        await asyncio.to_thread(self._write, text)

    def _write(self, text: list[str]) -> None:
        # Worker thread.
        with self._bus_lock:
            try:
                if self._lcd is None:
                    self._lcd = self._connect()
                    # RPLCD's initialisation clears the display.
                    self._shown = [" " * self._opts.cols] * self._opts.rows
                for row, line in enumerate(text):
                    # Each character costs a few I2C transfers: rows that did not change are
                    # not sent again.
                    if self._shown[row] == line:
                        continue
                    self._shown[row] = None
                    self._lcd.cursor_pos = (row, 0)
                    self._lcd.write_string(line)
                    self._shown[row] = line
            except LCD_ERRORS as exc:
                self._lcd = None
                self._fault = (f"LCD at I2C address {self._opts.address:#04x} on bus "
                               f"{self._opts.port}: {exc}")
                raise HardwareFault(f"{self.config_key}: {self._fault}") from exc
            self._fault = None

    def _connect(self) -> Any:
        return RPLCD_I2C.CharLCD(
            i2c_expander=EXPANDER,
            address=self._opts.address,
            port=self._opts.port,
            cols=self._opts.cols,
            rows=self._opts.rows,
            charmap=self._opts.charmap,
            # We place every row ourselves; a full row must not wrap onto the next.
            auto_linebreaks=False,
            backlight_enabled=self._opts.backlight,
        )

    async def health(self) -> DeviceHealth:
        if self._fault is not None:
            return DeviceHealth(ok=False, detail=self._fault)
        return DeviceHealth(ok=True)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        # Worker thread. A blank display says the bank is not running.
        with self._bus_lock:
            lcd, self._lcd = self._lcd, None
            if lcd is None:
                return
            try:
                lcd.close(clear=True)
            except LCD_ERRORS as exc:
                raise HardwareFault(f"{self.config_key}: closing the LCD failed: {exc}") from exc
