"""Tests of the "serial" scanner and keypad on real pseudo-terminals, and of their emulators."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import running as daemon
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from waiting import until

from hal.base import HealthChanged, InputEvent, KeyPressed, Scanned
from hal.errors import BackendError
from hal.registry import HalContext, build_device
from hal.serial_input import LineSplitter, Overlong, SerialKeypad, SerialScanner
from lockerd.dev.provision import BankKit, PlainCode
from sim.wire.pty import open_pty
from sim.wire.serial_devices import KeypadEmulator, ScannerEmulator
from sim.world import SimWorld

pytestmark = pytest.mark.e2e

FAST = {"reopen_cooldown_s": 0.05, "dead_after_s": 0.3}


class Ptys:
    """Pseudo-terminals of one test; the masters still open at the end are closed."""

    def __init__(self) -> None:
        self.masters: set[int] = set()

    def open(self) -> tuple[int, str]:
        master, path = open_pty()
        self.masters.add(master)
        return master, path

    def close(self, master: int) -> None:
        self.masters.discard(master)
        os.close(master)


@pytest.fixture
def ptys() -> Iterator[Ptys]:
    pool = Ptys()
    yield pool
    for master in pool.masters:
        os.close(master)


@pytest.fixture
def ctx(tmp_path: Path) -> HalContext:
    return HalContext(compartments=("1",), state_dir=tmp_path, config_dir=tmp_path)


def scanner(ctx: HalContext, port: str, **options: Any) -> SerialScanner:
    device = build_device("scanner", "serial", options={"port": port, **options}, context=ctx,
                          config_key="hal.scanner")
    assert isinstance(device, SerialScanner)
    return device


def keypad(ctx: HalContext, port: str, **options: Any) -> SerialKeypad:
    device = build_device("keypad", "serial", options={"port": port, **options}, context=ctx,
                          config_key="hal.keypad")
    assert isinstance(device, SerialKeypad)
    return device


class Recorder:
    """The emit callback of a device under test: every event with the loop time it came."""

    def __init__(self) -> None:
        self.timed: list[tuple[float, InputEvent]] = []

    def __call__(self, event: InputEvent) -> None:
        self.timed.append((asyncio.get_running_loop().time(), event))

    @property
    def events(self) -> list[InputEvent]:
        return [event for _, event in self.timed]

    def scans(self) -> list[str]:
        return [e.data for e in self.events if isinstance(e, Scanned)]

    def keys(self) -> str:
        return "".join(e.key for e in self.events if isinstance(e, KeyPressed))

    def health(self) -> list[HealthChanged]:
        return [e for e in self.events if isinstance(e, HealthChanged)]


@asynccontextmanager
async def running(*tasks: Callable[[], Any]) -> AsyncIterator[None]:
    """Run coroutines as tasks for the body; afterwards they must end by cancellation only."""
    started = [asyncio.create_task(make()) for make in tasks]
    try:
        yield
    finally:
        for task in started:
            task.cancel()
        done, pending = await asyncio.wait(started, timeout=5)
        assert not pending, "a task did not stop when cancelled"
        for task in done:
            assert task.cancelled(), f"task ended with {task.exception()!r}"


def run_device(device: SerialScanner | SerialKeypad) -> tuple[Recorder, Callable[[], Any]]:
    rec = Recorder()
    return rec, lambda: device.run(rec)


# -- line splitting -------------------------------------------------------------------------


def test_splitter_joins_a_terminator_split_across_reads() -> None:
    lines = LineSplitter(b"\r\n", 16)
    assert lines.feed(b"ab\r") == []
    assert lines.feed(b"\ncd\r\n") == [b"ab", b"cd"]


def test_splitter_skips_the_rest_of_an_overlong_line() -> None:
    lines = LineSplitter(b"\r\n", 4)
    # Decided once max_line + len(terminator) bytes hold no terminator ("1234\r" may end well).
    assert lines.feed(b"12345") == []
    assert lines.feed(b"6") == [Overlong()]
    assert lines.feed(b"789" * 100 + b"\r") == []
    assert lines.feed(b"\nok\r\n1234\r\n") == [b"ok", b"1234"]


@given(
    lines=st.lists(st.binary(max_size=8).filter(lambda b: b"\n" not in b), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=6),
)
def test_splitter_returns_every_line_whatever_the_chunking(
    lines: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    splitter = LineSplitter(b"\n", 8)
    out: list[bytes | Overlong] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        out += splitter.feed(stream[start:cut])
        start = max(start, cut)
    assert out == lines


# -- scanner --------------------------------------------------------------------------------


@pytest.mark.parametrize("terminator", ["\r\n", "\n", "\r"])
async def test_scanner_lines_become_scans(ctx: HalContext, ptys: Ptys, terminator: str) -> None:
    master, path = ptys.open()
    dev = scanner(ctx, path, terminator=terminator)
    rec, run = run_device(dev)
    end = terminator.encode()
    async with running(run):
        await until(lambda: dev.port_open)
        os.write(master, b"123456" + end + "Grüße".encode() + end)
        os.write(master, b"78")  # a line may arrive in pieces
        os.write(master, b"9" + end)
        await until(lambda: len(rec.scans()) == 3)
    assert rec.scans() == ["123456", "Grüße", "789"]
    assert dev.dropped == {}
    assert (await dev.health()).ok


async def test_scanner_drops_an_overlong_line_and_keeps_the_next(
    ctx: HalContext, ptys: Ptys
) -> None:
    master, path = ptys.open()
    dev = scanner(ctx, path, max_line=16)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        with capture_logs() as logs:
            os.write(master, b"x" * 40 + b"\r\n" + b"y" * 16 + b"\r\n")
            await until(lambda: len(rec.scans()) == 1)
            # Without any terminator the line is dropped as soon as it is too long.
            os.write(master, b"z" * 30)
            await until(lambda: dev.dropped.get("too_long") == 2)
            os.write(master, b"zzz\r\ngood\r\n")
            await until(lambda: len(rec.scans()) == 2)
    assert rec.scans() == ["y" * 16, "good"]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert warnings and warnings[0]["reason"] == "too_long"


async def test_scanner_drops_non_utf8_without_logging_the_data(
    ctx: HalContext, ptys: Ptys
) -> None:
    master, path = ptys.open()
    dev = scanner(ctx, path)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        with capture_logs() as logs:
            os.write(master, b"\xff\xfe918273\r\n" + b"ok\r\n")
            await until(lambda: len(rec.scans()) == 1)
    assert rec.scans() == ["ok"]
    assert dev.dropped == {"not_utf8": 1}
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["reason"] == "not_utf8" and warning["device"] == "scanner"
    assert "918273" not in repr(warning)


async def test_scanner_flood_is_cut_to_the_limit_with_one_warning(
    ctx: HalContext, ptys: Ptys
) -> None:
    master, path = ptys.open()
    dev = scanner(ctx, path, max_lines_per_s=10)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        with capture_logs() as logs:
            os.write(master, b"".join(f"{i}\r\n".encode() for i in range(50)))
            await until(lambda: len(rec.scans()) + dev.dropped.get("flood", 0) == 50)
    passed = rec.scans()
    assert 10 <= len(passed) <= 12  # the burst, plus what refilled while reading
    assert passed == [str(i) for i in range(len(passed))]
    floods = [e for e in logs if e.get("reason") == "flood"]
    assert len(floods) == 1  # the rest are counted into the next warning, not logged


# -- keypad ---------------------------------------------------------------------------------


async def test_keypad_bytes_become_keys_and_junk_is_dropped(ctx: HalContext, ptys: Ptys) -> None:
    master, path = ptys.open()
    dev = keypad(ctx, path)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        with capture_logs() as logs:
            os.write(master, b"12#*\r\n9A\x00\xff0")
            await until(lambda: len(rec.keys()) == 6)
    assert rec.keys() == "12#*90"
    assert dev.dropped == {"junk": 3}
    assert [e["byte"] for e in logs if e.get("reason") == "junk"] == ["0x41"]


async def test_a_spy_keypad_is_read_through_pyserial_and_its_capture_sees_the_keys(
        ctx: HalContext, ptys: Ptys, tmp_path: Path) -> None:
    # A plain port is read with os.read; a spy:// one must keep its handler, which logs.
    master, path = ptys.open()
    capture = tmp_path / "keypad-spy.txt"
    dev = keypad(ctx, f"spy://{path}?file={capture}")
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        os.write(master, b"42#")
        await until(lambda: rec.keys() == "42#")
    assert "34 32 23" in capture.read_text(encoding="utf-8")


async def test_keypad_flood_is_cut_to_the_limit(ctx: HalContext, ptys: Ptys) -> None:
    master, path = ptys.open()
    dev = keypad(ctx, path, max_keys_per_s=5)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        os.write(master, b"1" * 40)
        await until(lambda: len(rec.keys()) + dev.dropped.get("flood", 0) == 40)
    assert 5 <= len(rec.keys()) <= 7


# -- a port that goes away --------------------------------------------------------------------


async def test_lost_port_is_a_fault_after_dead_after_s_and_recovers(
    ctx: HalContext, ptys: Ptys, tmp_path: Path
) -> None:
    master, path = ptys.open()
    link = tmp_path / "scanner-port"
    link.symlink_to(path)
    dev = scanner(ctx, str(link), **FAST)
    rec, run = run_device(dev)
    loop = asyncio.get_running_loop()
    async with running(run):
        await until(lambda: dev.port_open)
        os.write(master, b"before\r\n")
        await until(lambda: rec.scans() == ["before"])

        unplugged = loop.time()
        ptys.close(master)  # the device end sees EIO / hang-up
        link.unlink()  # and the device node is gone, as when USB is unplugged
        await until(lambda: len(rec.health()) == 1, what="the fault")
        (fault_at, fault), = [(t, e) for t, e in rec.timed if isinstance(e, HealthChanged)]
        assert fault == HealthChanged("scanner", False, fault.detail)
        assert fault_at - unplugged >= FAST["dead_after_s"]
        assert str(link) in fault.detail
        health = await dev.health()
        assert not health.ok and str(link) in health.detail

        master2, path2 = ptys.open()  # plugged in again: a new node at the configured path
        link.symlink_to(path2)
        await until(lambda: len(rec.health()) == 2, what="the recovery")
        await until(lambda: dev.port_open)
        os.write(master2, b"after\r\n")
        await until(lambda: rec.scans() == ["before", "after"])
    assert [h.ok for h in rec.health()] == [False, True]
    assert (await dev.health()).ok


async def test_missing_port_at_start_is_reported_once(ctx: HalContext, ptys: Ptys,
                                                      tmp_path: Path) -> None:
    link = tmp_path / "not-plugged-in"
    dev = scanner(ctx, str(link), reopen_cooldown_s=0.02, dead_after_s=0.1)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: len(rec.health()) == 1)
        assert (await dev.health()).ok is False
        # Many more failed opens follow while it stays missing; none is reported again.
        _, path = ptys.open()
        link.symlink_to(path)
        await until(lambda: len(rec.health()) == 2)
    assert [h.ok for h in rec.health()] == [False, True]
    assert "No such file" in rec.health()[0].detail


async def test_keypad_keeps_working_while_the_scanner_is_dead(
    ctx: HalContext, ptys: Ptys, tmp_path: Path
) -> None:
    scan_master, scan_path = ptys.open()
    key_master, key_path = ptys.open()
    link = tmp_path / "scanner-port"
    link.symlink_to(scan_path)
    scan_dev = scanner(ctx, str(link), **FAST)
    key_dev = keypad(ctx, key_path, **FAST)
    scans, run_scanner = run_device(scan_dev)
    keys, run_keypad = run_device(key_dev)
    async with running(run_scanner, run_keypad):
        await until(lambda: scan_dev.port_open and key_dev.port_open)
        ptys.close(scan_master)
        link.unlink()
        await until(lambda: len(scans.health()) == 1)
        os.write(key_master, b"42#")
        await until(lambda: keys.keys() == "42#")
    assert keys.health() == []
    assert (await key_dev.health()).ok
    assert not (await scan_dev.health()).ok


async def test_an_open_port_is_read_from_the_loop_without_a_thread(
    ctx: HalContext, ptys: Ptys
) -> None:
    master, path = ptys.open()
    dev = keypad(ctx, path)
    rec, run = run_device(dev)

    def port_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("hal-keypad")]

    async with running(run):
        await until(lambda: dev.port_open)
        # The thread that opened the port ends; the keys still come, read when they arrive.
        await until(lambda: not port_threads(), what=lambda: f"threads {port_threads()}")
        os.write(master, b"7#")
        await until(lambda: rec.keys() == "7#")
        assert not port_threads()


async def test_a_port_opened_at_start_loses_no_key_typed_before_run(
    ctx: HalContext, ptys: Ptys
) -> None:
    master, path = ptys.open()
    dev = keypad(ctx, path)
    await dev.start()  # the daemon starts its devices before it says it is up
    os.write(master, b"12#")  # a key pressed the moment it is up, before run() reads
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: rec.keys() == "12#")
    assert rec.health() == []


async def test_close_after_start_without_run_closes_the_port(ctx: HalContext, ptys: Ptys) -> None:
    master, path = ptys.open()
    dev = keypad(ctx, path)
    await dev.start()
    await dev.close()
    os.set_blocking(master, False)
    with pytest.raises(OSError) as caught:
        os.read(master, 1)
    assert caught.value.errno == errno.EIO


async def test_a_port_missing_at_start_is_no_startup_error(ctx: HalContext,
                                                           tmp_path: Path) -> None:
    dev = keypad(ctx, str(tmp_path / "not-plugged-in"), **FAST)
    await dev.start()
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: len(rec.health()) == 1, what="the fault, reported by run")
    assert not rec.health()[0].ok


async def test_cancel_closes_the_port(ctx: HalContext, ptys: Ptys) -> None:
    master, path = ptys.open()
    dev = keypad(ctx, path)
    _, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
    assert not dev.port_open
    # Reading the master gives EIO only once no one holds the device end open.
    os.set_blocking(master, False)
    with pytest.raises(OSError) as caught:
        os.read(master, 1)
    assert caught.value.errno == errno.EIO


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "key"),
    [
        ("scanner", {}, "port"),
        ("scanner", {"port": ""}, "port"),
        ("scanner", {"port": "/dev/ttyACM0", "speed": 9600}, "speed"),
        ("scanner", {"port": "/dev/ttyACM0", "terminator": "\t"}, "terminator"),
        ("scanner", {"port": "/dev/ttyACM0", "max_line": 0}, "max_line"),
        ("scanner", {"port": "/dev/ttyACM0", "baudrate": "9600"}, "baudrate"),
        ("scanner", {"port": "/dev/ttyACM0", "max_lines_per_s": 0}, "max_lines_per_s"),
        ("scanner", {"port": "/dev/ttyACM0", "dead_after_s": -1}, "dead_after_s"),
        ("scanner", {"port": "/dev/ttyACM0", "reopen_cooldown_s": float("nan")},
         "reopen_cooldown_s"),
        ("scanner", {"port": "carrier-pigeon:///dev/x"}, "port"),
        ("keypad", {"port": "/dev/ttyUSB0", "terminator": "\n"}, "terminator"),
        ("keypad", {"port": "/dev/ttyUSB0", "max_keys_per_s": -3}, "max_keys_per_s"),
    ],
)
def test_bad_options_name_the_config_key(
    ctx: HalContext, kind: str, options: dict[str, Any], key: str
) -> None:
    with pytest.raises(BackendError) as caught:
        build_device(kind, "serial", options=options, context=ctx,
                     config_key=f"lockerd.toml: [hal.{kind}] backend")
    message = str(caught.value)
    assert f"[hal.{kind}]" in message and key in message


def test_defaults(ctx: HalContext) -> None:
    scan = scanner(ctx, "spy:///dev/ttyACM0")
    assert (scan.settings.baudrate, scan.settings.terminator, scan.settings.max_line) == (
        9600, "\r\n", 512)
    assert (scan.settings.max_lines_per_s, scan.settings.reopen_cooldown_s,
            scan.settings.dead_after_s) == (10.0, 2.0, 10.0)
    assert keypad(ctx, "/dev/ttyUSB0").settings.max_keys_per_s == 30.0


# -- emulators: the world drives the real backends byte for byte ----------------------------


async def test_world_scan_reaches_the_serial_scanner(ctx: HalContext, ptys: Ptys) -> None:
    world = SimWorld(["1"])
    master, path = ptys.open()
    dev = scanner(ctx, path, terminator="\n")
    rec, run = run_device(dev)
    emulator = ScannerEmulator(world, terminator=b"\n")
    async with running(run):
        await until(lambda: dev.port_open)
        async with running(lambda: emulator.run(master)):
            world.scan("123456")
            world.scan("LK1:äöü")
            await until(lambda: len(rec.scans()) == 2)
    assert rec.scans() == ["123456", "LK1:äöü"]


async def test_world_keys_reach_the_serial_keypad(ctx: HalContext, ptys: Ptys) -> None:
    world = SimWorld(["1"])
    master, path = ptys.open()
    dev = keypad(ctx, path)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        async with running(lambda: KeypadEmulator(world).run(master)):
            world.press("12#")
            await until(lambda: len(rec.keys()) == 3)
    assert rec.events == [KeyPressed("1"), KeyPressed("2"), KeyPressed("#")]


async def test_dead_scanner_sends_nothing(ctx: HalContext, ptys: Ptys) -> None:
    world = SimWorld(["1"])
    master, path = ptys.open()
    dev = scanner(ctx, path)
    rec, run = run_device(dev)
    emulator = ScannerEmulator(world)
    async with running(run):
        await until(lambda: dev.port_open)
        async with running(lambda: emulator.run(master)):
            world.set_fault("scanner", "dead", True)
            world.scan("111111")
            world.set_fault("scanner", "dead", False)
            world.scan("222222")
            await until(lambda: len(rec.scans()) == 1)
    assert rec.scans() == ["222222"]
    assert emulator.lines_written == 1


async def test_garbage_scanner_lines_are_dropped(ctx: HalContext, ptys: Ptys) -> None:
    world = SimWorld(["1"], seed=7)
    master, path = ptys.open()
    dev = scanner(ctx, path)
    rec, run = run_device(dev)
    emulator = ScannerEmulator(world, seed=7)
    async with running(run):
        await until(lambda: dev.port_open)
        async with running(lambda: emulator.run(master)):
            world.set_fault("scanner", "garbage", True)
            for _ in range(5):
                world.scan("333333")
            await until(lambda: dev.dropped.get("not_utf8") == 5)
            world.set_fault("scanner", "garbage", False)
            world.scan("444444")
            await until(lambda: len(rec.scans()) == 1)
    assert rec.scans() == ["444444"]


async def test_stuck_key_repeats_until_cleared(ctx: HalContext, ptys: Ptys) -> None:
    world = SimWorld(["1"])
    master, path = ptys.open()
    dev = keypad(ctx, path)
    rec, run = run_device(dev)
    async with running(run):
        await until(lambda: dev.port_open)
        async with running(lambda: KeypadEmulator(world).run(master)):
            world.set_fault("keypad", "stuck_key", True, key="5")
            await until(lambda: rec.keys().count("5") >= 3)
            world.set_fault("keypad", "stuck_key", False)
            world.press("7")
            await until(lambda: rec.keys().endswith("7"))
    assert set(rec.keys()[:-1]) == {"5"}


# -- the daemon on serial input devices -------------------------------------------------------


async def test_daemon_takes_codes_from_serial_devices_and_events_a_dead_scanner(
    make_kit: Callable[..., BankKit], ptys: Ptys, tmp_path: Path
) -> None:
    key_master, key_path = ptys.open()
    scan_link = tmp_path / "scanner-port"  # nothing plugged in yet
    kit = make_kit([PlainCode(id="p-1", code="482913", compartment="3", parcel_id="PX1")],
                   parcels=["3"], overrides={"hal": {
                       "keypad": {"backend": "serial", "options": {"port": key_path}},
                       "scanner": {"backend": "serial", "options": {
                           "port": str(scan_link), "reopen_cooldown_s": 0.05,
                           "dead_after_s": 0.2}},
                   }})
    async with daemon(kit) as r:
        fault = await r.wait_event("hardware.fault")
        assert fault.data["device"] == "scanner" and str(scan_link) in fault.data["detail"]
        keypad_dev = r.app.devices.keypad
        assert isinstance(keypad_dev, SerialKeypad)
        await until(lambda: keypad_dev.port_open)
        async with running(lambda: KeypadEmulator(r.world).run(key_master)):
            r.world.press("482913#")
            opened = await r.wait_event("pickup.opened")
        assert opened.data["source"] == "keypad"

        scan_master, scan_path = ptys.open()
        scan_link.symlink_to(scan_path)
        recovered = await r.wait_event("hardware.recovered")
        assert recovered.data["device"] == "scanner"
        scanner_dev = r.app.devices.scanner
        assert isinstance(scanner_dev, SerialScanner)
        health = await r.app.controller.health({"scanner": scanner_dev})
        assert health["scanner"]["ok"] is True
        await until(lambda: scanner_dev.port_open)
        async with running(lambda: ScannerEmulator(r.world).run(scan_master)):
            r.world.scan("000000")
            rejected = await r.wait_event("code.rejected")
        assert rejected.data["source"] == "scanner"
