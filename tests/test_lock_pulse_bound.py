"""LockDriver.pulse checks and bounds every pulse the same way, whatever the backend.

Each backend is built through the registry over its real path: the sim world, the kerong
boards over a pseudo-terminal and the CU16 emulator, and rpigpio/gpiod over the suite's fakes of
RPi.GPIO and gpiod.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_mock import MockerFixture
from test_gpio_backends import BACKEND_MODULES, LOCK_PINS, install_fakes
from test_kerong_driver import WIRING
from test_kerong_driver import bank as kerong_bank

from hal.base import MAX_PULSE_S, LockDriver
from hal.errors import HardwareFault
from hal.registry import HalContext, build_device
from sim.backend import world_of

pytestmark = pytest.mark.e2e

BACKENDS = ("sim", "kerong", "rpigpio", "gpiod")
SHORT_CAP_S = 0.1  # the driver's own cap in these tests, so a capped pulse ends quickly


@dataclass
class Rig:
    """One lock backend as the tests see it: the driver, and what its hardware did."""

    lock: LockDriver
    pulsed: Callable[[], list[str]]  # compartments whose lock was energised, in order
    energised: Callable[[str], bool]  # whether the lock of a compartment is energised now


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `condition` until it holds; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def sim_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    ctx = HalContext(compartments=("1", "2", "3"), state_dir=tmp_path / "state",
                     backend_settings={"sim": {"spring_delay_s": 0.0}})
    lock = build_device("lock", "sim", options={}, context=ctx, config_key="hal.lock")
    assert isinstance(lock, LockDriver)
    world = world_of(ctx)
    # The sim has no cap option: its cap is the attribute every driver has.
    lock.max_pulse_s = SHORT_CAP_S
    await lock.start()
    try:
        yield Rig(lock, lambda: list(world.pulses),
                  lambda cid: world.compartment(cid).released)
    finally:
        await lock.close()
        world.end_all_pulses()


@contextlib.asynccontextmanager
async def kerong_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    places = {(board, lock): cid for board, locks in WIRING.items() for lock, cid in locks.items()}
    async with kerong_bank(tmp_path) as b:
        yield Rig(b.lock, lambda: [places[u] for u in b.emulator.unlocks],
                  lambda cid: b.world.compartment(cid).released)


@contextlib.asynccontextmanager
async def gpio_rig(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   mocker: MockerFixture) -> AsyncIterator[Rig]:
    env = install_fakes(backend, monkeypatch, mocker)
    ctx = HalContext(compartments=tuple(LOCK_PINS), state_dir=tmp_path)
    lock = build_device("lock", backend,
                        options={**env.chip_options, "pins": LOCK_PINS,
                                 "max_pulse_s": SHORT_CAP_S},
                        context=ctx, config_key=f"lockerd.toml: [hal.lock] ({backend})")
    assert isinstance(lock, LockDriver)
    pin_of = dict(LOCK_PINS)
    cid_of = {pin: cid for cid, pin in pin_of.items()}
    await lock.start()
    try:
        yield Rig(lock,
                  lambda: [cid_of[pin] for _, pin, level in env.board.history
                           if level == 1 and pin in cid_of],
                  lambda cid: env.board.level(pin_of[cid]) == 1)
    finally:
        await lock.close()
        for name in BACKEND_MODULES:
            sys.modules.pop(name, None)


@pytest.fixture(params=BACKENDS)
async def rig(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              mocker: MockerFixture) -> AsyncIterator[Rig]:
    backend: str = request.param
    if backend == "sim":
        cm = sim_rig(tmp_path)
    elif backend == "kerong":
        cm = kerong_rig(tmp_path)
    else:
        cm = gpio_rig(backend, tmp_path, monkeypatch, mocker)
    async with cm as r:
        yield r


async def test_no_backend_overrides_the_checks(rig: Rig) -> None:
    # The checks and the bound live in LockDriver.pulse; a backend implements only _pulse.
    assert type(rig.lock).pulse is LockDriver.pulse


async def test_an_unknown_compartment_is_refused_by_every_backend(rig: Rig) -> None:
    with pytest.raises(HardwareFault, match=r"\[hal\.lock\].*: unknown compartment '9'|"
                                            r"hal\.lock: unknown compartment '9'"):
        await rig.lock.pulse("9", 0.1)
    assert rig.pulsed() == []


@pytest.mark.parametrize("duration", [0, -1, -0.0, float("nan"), float("inf"), True, "0.5",
                                      None])
async def test_a_bad_duration_is_refused_by_every_backend(rig: Rig, duration: Any) -> None:
    with pytest.raises(HardwareFault, match=r"pulse duration must be positive .* not "):
        await rig.lock.pulse("1", duration)
    assert rig.pulsed() == []
    assert not rig.energised("1")


async def test_a_long_request_is_capped_by_every_backend(rig: Rig) -> None:
    # A million seconds asked for: each backend gives at most its cap (the kerong board times
    # its own pulse), so the call returns and the lock is no longer energised soon after.
    await asyncio.wait_for(rig.lock.pulse("1", 1e6), timeout=5.0)
    # A kerong pulse returns once the frame is written; the emulator reads it just after.
    await until(lambda: rig.pulsed() == ["1"])
    await until(lambda: not rig.energised("1"))
    # The driver is still usable: a normal pulse after the capped one.
    await rig.lock.pulse("2", 0.05)
    await until(lambda: rig.pulsed() == ["1", "2"])


async def test_no_driver_cap_goes_above_the_hal_bound(tmp_path: Path) -> None:
    # Even a driver whose own cap is set too high gets at most MAX_PULSE_S: the simulated
    # world refuses any pulse longer than that, so the request must arrive bounded.
    async with sim_rig(tmp_path) as r:
        r.lock.max_pulse_s = 1e9
        task = asyncio.create_task(r.lock.pulse("3", 1e6))
        await until(lambda: r.energised("3") or task.done())
        assert not task.done(), task.exception()
        assert r.pulsed() == ["3"]
        assert MAX_PULSE_S == 10.0
        await r.lock.all_off()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not r.energised("3")
