"""The hd44780 display backend over a pytest-mock fake of RPLCD: layout, off-loop writes, faults."""

from __future__ import annotations

import errno
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pytest_mock import MockerFixture

from hal.base import Display, DisplayMessage
from hal.errors import BackendError, HardwareFault
from hal.registry import HalContext, build_device, load_backend_class

pytestmark = pytest.mark.unit

MODULE = "hal.hd44780"


@dataclass
class FakeLcd:
    """Stands in for RPLCD.i2c.CharLCD: records what reaches the display, and from which thread."""

    kwargs: dict[str, Any]
    writes: list[tuple[int, str, int]] = field(default_factory=list)  # (row, text, thread id)
    closed_with: bool | None = None
    fail_next: bool = False
    _row: int = 0

    @property
    def cursor_pos(self) -> tuple[int, int]:
        return self._row, 0

    @cursor_pos.setter
    def cursor_pos(self, pos: tuple[int, int]) -> None:
        self._row = pos[0]

    def write_string(self, text: str) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        self.writes.append((self._row, text, threading.get_ident()))

    def close(self, clear: bool = False) -> None:
        self.closed_with = clear

    def screen(self) -> list[str]:
        rows = ["?" * self.kwargs["cols"]] * self.kwargs["rows"]
        for row, text, _ in self.writes:
            rows[row] = text
        return rows


@dataclass
class FakeRplcd:
    char_lcd: Any  # the mock standing in for the CharLCD class
    made: list[FakeLcd]


@pytest.fixture
def rplcd(monkeypatch: pytest.MonkeyPatch, mocker: MockerFixture) -> Iterator[FakeRplcd]:
    made: list[FakeLcd] = []

    def construct(**kwargs: Any) -> FakeLcd:
        made.append(FakeLcd(kwargs))
        return made[-1]

    package = types.ModuleType("RPLCD")
    i2c = types.ModuleType("RPLCD.i2c")
    char_lcd = mocker.Mock(name="CharLCD", side_effect=construct)
    i2c.CharLCD = char_lcd  # type: ignore[attr-defined]
    package.i2c = i2c  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "RPLCD", package)
    monkeypatch.setitem(sys.modules, "RPLCD.i2c", i2c)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield FakeRplcd(char_lcd, made)
    sys.modules.pop(MODULE, None)


@pytest.fixture
def ctx(tmp_path: Path) -> HalContext:
    return HalContext(compartments=("1",), state_dir=tmp_path)


def display(ctx: HalContext, **options: Any) -> Any:
    device = build_device("display", "hd44780", options=options, context=ctx,
                          config_key="lockerd.toml: [hal.display]")
    assert isinstance(device, Display)
    return device


def test_layout_truncates_what_cannot_fit(rplcd: FakeRplcd) -> None:
    from hal.hd44780 import layout

    lines = ("Enter your code and press #", "or scan your QR code")
    # Wrapped, these need four rows; a 16x2 shows each line cut at the last column.
    assert layout(lines, cols=16, rows=2) == ["Enter your code ", "or scan your QR "]
    # A 20x4 has room for the wrapped text.
    assert layout(lines, cols=20, rows=4) == [
        "Enter your code and ", "press #             ", "or scan your QR code",
        "                    "]
    assert layout(("Thank you!",), cols=16, rows=2) == ["Thank you!      ", " " * 16]
    assert layout(("a\nb\rc\x1bd",), cols=16, rows=2)[0] == "a b c d         "
    assert layout((), cols=16, rows=2) == [" " * 16] * 2
    assert layout(("1", "2", "3", "4", "5"), cols=16, rows=4)[3] == "4" + " " * 15


async def test_show_writes_the_geometry_off_the_loop(rplcd: FakeRplcd, ctx: HalContext) -> None:
    lcd = display(ctx, address=0x3F, port=1, cols=16, rows=2, charmap="A02")
    await lcd.start()
    rplcd.char_lcd.assert_called_once_with(
        i2c_expander="PCF8574", address=0x3F, port=1, cols=16, rows=2, charmap="A02",
        auto_linebreaks=False, backlight_enabled=True)
    await lcd.show(DisplayMessage(("Door 12 is opening now", "Please wait"), "busy"))
    fake = rplcd.made[0]
    assert fake.screen() == ["Door 12 is openi", "Please wait     "]
    loop_thread = threading.get_ident()
    assert fake.writes and all(thread != loop_thread for _, _, thread in fake.writes)
    await lcd.close()
    assert fake.closed_with is True  # a blank display: the bank is not running


async def test_unchanged_rows_are_not_sent_again(rplcd: FakeRplcd, ctx: HalContext) -> None:
    lcd = display(ctx)
    await lcd.start()
    await lcd.show(DisplayMessage(("Code: **", "# to enter, * to clear")))
    fake = rplcd.made[0]
    before = len(fake.writes)
    await lcd.show(DisplayMessage(("Code: ***", "# to enter, * to clear")))
    assert [row for row, _, _ in fake.writes[before:]] == [0]
    assert fake.screen() == ["Code: ***       ", "# to enter, * to"]


async def test_a_bus_error_is_a_fault_and_the_next_show_starts_afresh(
        rplcd: FakeRplcd, ctx: HalContext) -> None:
    lcd = display(ctx, cols=20, rows=4)
    await lcd.start()
    rplcd.made[0].fail_next = True
    with pytest.raises(HardwareFault, match=r"lockerd\.toml: \[hal\.display\]: LCD at I2C address "
                                            r"0x27 on bus 1: .*Remote I/O error"):
        await lcd.show(DisplayMessage(("Hello",)))
    health = await lcd.health()
    assert not health.ok and "0x27" in health.detail
    await lcd.show(DisplayMessage(("Hello",)))
    assert len(rplcd.made) == 2  # initialised again: the 4-bit protocol is back in step
    assert rplcd.made[1].screen()[0] == "Hello" + " " * 15
    assert (await lcd.health()).ok


async def test_a_missing_display_does_not_stop_startup(rplcd: FakeRplcd,
                                                       ctx: HalContext) -> None:
    rplcd.char_lcd.side_effect = OSError(errno.EREMOTEIO, "Remote I/O error")
    lcd = display(ctx)
    await lcd.start()  # no exception: the bank works without its display
    assert not (await lcd.health()).ok
    with pytest.raises(HardwareFault):
        await lcd.show(DisplayMessage(("Hello",)))
    await lcd.close()


def test_options_are_validated(rplcd: FakeRplcd, ctx: HalContext) -> None:
    with pytest.raises(BackendError) as info:
        display(ctx, cols=24)
    assert str(info.value) == ("lockerd.toml: [hal.display.options]: Invalid enum value 24 "
                               "(key 'cols')")
    with pytest.raises(BackendError, match=r"key 'address'"):
        display(ctx, address=0x80)
    with pytest.raises(BackendError, match=r"unknown field `bus`"):
        display(ctx, bus=1)


def test_a_missing_rplcd_is_the_registrys_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (MODULE, "RPLCD", "RPLCD.i2c"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(BackendError) as info:
        load_backend_class("display", "hd44780", config_key="lockerd.toml: [hal.display]")
    assert str(info.value).startswith(
        "lockerd.toml: [hal.display]: backend 'hd44780' needs a library that is not "
        "installed (No module named 'RPLCD'")
