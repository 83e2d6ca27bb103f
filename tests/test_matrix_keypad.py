"""The matrix keypad backend over fake RPi.GPIO and gpiod: scanning, debounce, one key per press."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running
from pytest_mock import MockerFixture
from test_gpio_backends import (
    BACKEND_MODULES,
    Board,
    GpioEnv,
    install_fakes,
    started,
    stop,
    until,
    without_gpio_libraries,
)

from hal.base import HealthChanged, InputEvent, Keypad, KeyPressed
from hal.errors import BackendError
from hal.registry import HalContext, build_device
from lockerd.dev.provision import BankKit, PlainCode

pytestmark = pytest.mark.e2e

ROWS = [5, 6, 13, 19]
COLS = [12, 16, 20]
LAYOUT = ("123", "456", "789", "*0#")


class KeyMatrix:
    """The wiring of a 4x3 membrane keypad: a pressed key joins its row to its column."""

    def __init__(self, board: Board) -> None:
        self.board = board
        # (row pin, column pin) -> how many more column reads it shows up in (None: held)
        self.pressed: dict[tuple[int, int], int | None] = {}
        board.resolver = self.level

    def cell(self, key: str) -> tuple[int, int]:
        for r, row in enumerate(LAYOUT):
            if key in row:
                return ROWS[r], COLS[row.index(key)]
        raise KeyError(key)

    def press(self, key: str, *, reads: int | None = None) -> None:
        self.pressed[self.cell(key)] = reads

    def release(self, key: str) -> None:
        self.pressed.pop(self.cell(key), None)

    def level(self, pin: int) -> int | None:
        # A column reads LOW when a pressed key joins it to the row being driven LOW.
        for (row, col), left in list(self.pressed.items()):
            if col == pin and self.board.mode.get(row) == "out" and \
                    self.board.out_level.get(row) == 0:
                if left is not None:
                    if left <= 1:
                        del self.pressed[(row, col)]
                    else:
                        self.pressed[(row, col)] = left - 1
                return 0
        return None

    @property
    def sweeps(self) -> int:
        return self.board.drives.get(ROWS[0], 0)

    def rows_released(self) -> bool:
        return all(self.board.mode.get(pin) != "out" for pin in ROWS)


async def sweeps(matrix: KeyMatrix, n: int) -> None:
    """Wait until the keypad has begun `n` more sweeps."""
    target = matrix.sweeps + n
    await until(lambda: matrix.sweeps >= target)


@pytest.fixture(params=["rpigpio", "gpiod"])
def env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        mocker: MockerFixture) -> Iterator[GpioEnv]:
    yield install_fakes(request.param, monkeypatch, mocker)
    for name in BACKEND_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def ctx(tmp_path: Path) -> HalContext:
    return HalContext(compartments=("1",), state_dir=tmp_path)


def keypad(env: GpioEnv, ctx: HalContext, **options: Any) -> Any:
    base: dict[str, Any] = {"library": env.backend, "rows": ROWS, "cols": COLS,
                            "scan_interval_ms": 8}
    if env.backend == "gpiod":
        base["chip"] = "/dev/gpiochip4"
    device = build_device("keypad", "matrix", options={**base, **options}, context=ctx,
                          config_key="lockerd.toml: [hal.keypad]")
    assert isinstance(device, Keypad)
    return device


async def test_a_held_key_is_one_press(env: GpioEnv, ctx: HalContext) -> None:
    matrix = KeyMatrix(env.board)
    pad = keypad(env, ctx)
    await pad.start()
    assert matrix.rows_released()  # idle: no row driven
    events: list[InputEvent] = []
    task = await started(pad.run(events.append))
    matrix.press("5")
    await until(lambda: events == [KeyPressed("5")])
    await sweeps(matrix, 6)  # held across many more sweeps
    assert events == [KeyPressed("5")]
    matrix.release("5")
    await sweeps(matrix, 3)
    matrix.press("5")  # a second press of the same key is a second key
    await until(lambda: len(events) == 2)
    assert events == [KeyPressed("5"), KeyPressed("5")]
    await stop(task)
    assert matrix.rows_released()  # no row left driven when the scan stops
    await pad.close()


async def test_a_one_scan_bounce_is_filtered(env: GpioEnv, ctx: HalContext) -> None:
    matrix = KeyMatrix(env.board)
    pad = keypad(env, ctx, debounce_scans=2)
    await pad.start()
    events: list[InputEvent] = []
    task = await started(pad.run(events.append))
    matrix.press("7", reads=1)  # contact for one read only
    await until(lambda: not matrix.pressed)
    await sweeps(matrix, 4)
    assert events == []
    matrix.press("#")
    await until(lambda: events == [KeyPressed("#")])
    await stop(task)
    await pad.close()


async def test_two_keys_are_distinct(env: GpioEnv, ctx: HalContext) -> None:
    matrix = KeyMatrix(env.board)
    pad = keypad(env, ctx)
    await pad.start()
    events: list[InputEvent] = []
    task = await started(pad.run(events.append))
    matrix.press("1")
    await until(lambda: events == [KeyPressed("1")])
    matrix.release("1")
    matrix.press("9")
    await until(lambda: events == [KeyPressed("1"), KeyPressed("9")])
    matrix.release("9")
    matrix.press("*")
    matrix.press("3")  # two keys at once, in different rows and columns
    await until(lambda: len(events) == 4)
    assert events[2:] == [KeyPressed("3"), KeyPressed("*")]  # in scan order, each once
    await stop(task)
    await pad.close()


async def test_a_key_held_too_long_is_a_fault_until_released(env: GpioEnv,
                                                             ctx: HalContext) -> None:
    matrix = KeyMatrix(env.board)
    pad = keypad(env, ctx, stuck_after_s=0.1)
    await pad.start()
    events: list[InputEvent] = []
    task = await started(pad.run(events.append))
    matrix.press("0")
    await until(lambda: len(events) == 2)
    assert events == [KeyPressed("0"), HealthChanged(
        "keypad", ok=False, detail="key '0' held for more than 0.1 s")]
    health = await pad.health()
    assert not health.ok and "'0'" in health.detail
    matrix.release("0")
    await until(lambda: len(events) == 3)
    assert events[2] == HealthChanged("keypad", ok=True, detail="key '0' released")
    assert (await pad.health()).ok
    await stop(task)
    await pad.close()


async def test_rows_are_open_drain_and_columns_pulled_up(env: GpioEnv, ctx: HalContext,
                                                         mocker: MockerFixture) -> None:
    pad = keypad(env, ctx)
    await pad.start()
    if env.gpio is not None:
        for pin in COLS:
            env.gpio.setup.assert_any_call(pin, env.gpio.IN, pull_up_down=env.gpio.PUD_UP)
        task = await started(pad.run(lambda event: None))
        await until(lambda: env.board.drives.get(ROWS[1], 0) >= 1)
        # A row is only ever driven LOW or let go, never driven HIGH.
        assert all(level == 0 for _, pin, level in env.board.history if pin in ROWS)
        await stop(task)
    else:
        rows_call, cols_call = env.gpiod.request_lines.call_args_list
        (offsets, s), = rows_call.kwargs["config"].items()
        assert offsets == tuple(ROWS) and s.drive.name == "OPEN_DRAIN" and s.active_low
        (offsets, s), = cols_call.kwargs["config"].items()
        assert offsets == tuple(COLS) and s.bias.name == "PULL_UP" and s.active_low
        assert s.edge_detection.name == "NONE"
        assert rows_call.args[0] == cols_call.args[0] == "/dev/gpiochip4"
    await pad.close()


def test_layout_and_pins_are_checked(env: GpioEnv, ctx: HalContext) -> None:
    with pytest.raises(BackendError, match=r"keys has 3 rows but rows has 4 pins \(key 'keys'\)"):
        keypad(env, ctx, keys=["123", "456", "789"])
    with pytest.raises(BackendError, match=r"keys row 1 '45' has 2 keys"):
        keypad(env, ctx, keys=["123", "45", "789", "*0#"])
    with pytest.raises(BackendError, match=r"GPIO 12 used twice"):
        keypad(env, ctx, cols=[12, 16, 12])
    with pytest.raises(BackendError, match=r"key 'scan_interval_ms'"):
        keypad(env, ctx, scan_interval_ms=1)


def test_chip_needs_the_gpiod_library(monkeypatch: pytest.MonkeyPatch, mocker: MockerFixture,
                                      ctx: HalContext) -> None:
    env = install_fakes("rpigpio", monkeypatch, mocker)
    with pytest.raises(BackendError, match=r"chip is for the gpiod library only"):
        keypad(env, ctx, chip="/dev/gpiochip0")


@pytest.mark.parametrize(("library", "missing"), [("rpigpio", "RPi"), ("gpiod", "gpiod")])
def test_a_missing_library_is_the_registrys_error(monkeypatch: pytest.MonkeyPatch,
                                                  ctx: HalContext, library: str,
                                                  missing: str) -> None:
    without_gpio_libraries(monkeypatch)
    with pytest.raises(BackendError) as info:
        build_device("keypad", "matrix", options={"library": library, "rows": ROWS,
                                                  "cols": COLS},
                     context=ctx, config_key="lockerd.toml: [hal.keypad]")
    assert str(info.value).startswith(
        "lockerd.toml: [hal.keypad]: backend 'matrix' needs a library that is not "
        f"installed (No module named '{missing}'")



async def test_a_code_typed_on_the_matrix_opens_a_gpio_lock(
        monkeypatch: pytest.MonkeyPatch, mocker: MockerFixture,
        make_kit: Callable[..., BankKit]) -> None:
    # The daemon as it really runs, on GPIO backends over the fake gpiod: keys scanned from the
    # matrix, the pulse on a lock output, the door seen open and shut by an edge on its input.
    env = install_fakes("gpiod", monkeypatch, mocker)
    matrix = KeyMatrix(env.board)
    locks, doors = {"1": 17, "2": 27, "3": 22}, {"1": 4, "2": 9, "3": 26}
    for pin in doors.values():
        env.board.external[pin] = 1  # active low: every door shut
    hal = {
        "lock": {"backend": "gpiod", "options": {"pins": locks, "max_pulse_s": 1.0}},
        "door_sensor": {"backend": "gpiod", "options": {"pins": doors, "debounce_ms": 10}},
        "keypad": {"backend": "matrix", "options": {
            "library": "gpiod", "rows": ROWS, "cols": COLS, "scan_interval_ms": 8}},
    }
    code = PlainCode(id="p-1", code="4829", compartment="3", parcel_id="PX1")
    kit = make_kit([code], compartments=3, parcels=["3"], overrides={"hal": hal})
    async with running(kit) as r:
        assert [env.board.level(pin) for pin in locks.values()] == [0, 0, 0]
        for key in "4829#":
            matrix.press(key)  # held for 3 sweeps, then let go for 3
            await sweeps(matrix, 3)
            matrix.release(key)
            await sweeps(matrix, 3)
        await until(lambda: env.board.level(22) == 1)  # compartment 3 released
        env.board.drive(26, 0)  # its door springs open
        opened = await r.wait_event("pickup.opened")
        assert opened.compartment == "3"
        await until(lambda: env.board.level(22) == 0)
        r.world.set_parcel("3", False)  # occupancy stays simulated
        env.board.drive(26, 1)
        await r.wait_event("pickup.completed")
    assert [env.board.level(pin) for pin in locks.values()] == [0, 0, 0]
