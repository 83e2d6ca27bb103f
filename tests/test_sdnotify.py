"""sd_notify against a real Unix datagram socket in NOTIFY_SOCKET: ready, watchdog, stopping."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from waiting import until_sync

from lockerd.app import build_app
from lockerd.config import load_config
from lockerd.dev.provision import BankKit
from lockerd.services.systemd import SdNotifier

pytestmark = pytest.mark.e2e


@pytest.fixture
def notify_socket(bank_dir: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = bank_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def wait_for_message(sock: socket.socket, got: list[str], text: str, timeout: float = 15) -> None:
    def arrived() -> bool:
        got.extend(drain(sock))
        return any(text in m for m in got)

    until_sync(arrived, timeout, what=lambda: f"{text!r} in {got}", interval=0.01)


def test_ready_watchdog_stopping_from_the_daemon_process(
    make_kit: Callable[..., BankKit], notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    kit = make_kit([])
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"}
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "lockerd.cli.lockerd_cmd", "run", "-c",
                             str(kit.config_path)], env=env, stderr=subprocess.DEVNULL)
    got: list[str] = []
    try:
        wait_for_message(sock, got, "READY=1")
        ready_at = next(i for i, m in enumerate(got) if "READY=1" in m)
        def three_pings() -> bool:
            got.extend(drain(sock))
            return sum("WATCHDOG=1" in m for m in got) >= 3

        until_sync(three_pings, 10, what=lambda: f"three WATCHDOG=1 in {got}", interval=0.02)
        first_watchdog = next(i for i, m in enumerate(got) if "WATCHDOG=1" in m)
        assert ready_at <= first_watchdog
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        wait_for_message(sock, got, "STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_watchdog_is_not_fed_while_the_controller_is_stuck(
    make_kit: Callable[..., BankKit], notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    kit = make_kit([])
    notifier = SdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_s == 0.1
    app = build_app(load_config(kit.config_path), notifier=notifier)
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        got: list[str] = []

        def pings() -> int:
            got.extend(drain(sock))
            return sum("WATCHDOG=1" in m for m in got)

        await wait_until(lambda: pings() >= 2, what="watchdog pings")
        app.controller.busy_since = time.monotonic() - 120  # stuck in one input for 2 min
        await asyncio.sleep(0.1)
        drain(sock)
        await asyncio.sleep(0.3)  # three watchdog periods
        assert not any("WATCHDOG=1" in m for m in drain(sock))
        app.controller.busy_since = None
        app.task_up["hal.keypad"] = False  # a hardware task waiting to be restarted
        await asyncio.sleep(0.3)
        assert not any("WATCHDOG=1" in m for m in drain(sock))
        app.task_up["hal.keypad"] = True
        got = []
        await wait_until(lambda: pings() >= 1, what="pings resume")
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 10)


def test_notifier_without_systemd_does_nothing_and_handles_abstract_sockets() -> None:
    assert not SdNotifier({}).enabled
    assert SdNotifier({}).notify("READY=1") is False
    assert SdNotifier({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    name = f"lockerd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert SdNotifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1", "STATUS=x")
        assert sock.recv(100) == b"READY=1\nSTATUS=x"
    finally:
        sock.close()


async def test_a_crash_looping_console_does_not_starve_the_watchdog(
    make_kit: Callable[..., BankKit], notify_socket: tuple[socket.socket, Path]
) -> None:
    sock, path = notify_socket
    # A USB serial adapter that is not there: every start of the console fails to open it.
    gone = path.parent / "unplugged" / "ttyACM0"
    kit = make_kit([], overrides={"console": {"socket": "console.sock",
                                              "serial_port": str(gone)}})
    notifier = SdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    app = build_app(load_config(kit.config_path), notifier=notifier)
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    events = app.events
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        assert "console" not in app.watchdog_tasks and "controller" in app.watchdog_tasks
        pings_while_down = 0

        def count() -> bool:
            nonlocal pings_while_down
            got = drain(sock)
            if not app.task_up.get("console", True):
                pings_while_down += sum("WATCHDOG=1" in m for m in got)
            return pings_while_down >= 3 and len(
                events.recent(100, type_prefix="daemon.task_failed")) >= 2

        await wait_until(count, timeout=10, what="pings while the console is down")
        failed = events.recent(100, type_prefix="daemon.task_failed")
        assert {e.data["task"] for e in failed} == {"console"}
        assert [e.data["delay_s"] for e in failed[:2]] == [0.5, 1.0]  # backoff
        assert str(gone) in failed[0].data["error"]
        faults = events.recent(100, type_prefix="hardware.fault")
        assert [(f.data["device"], f.data["task"]) for f in faults] == [
            ("task:console", "console")], "one fault for the crash loop, not one per crash"
        assert "doors keep working" in faults[0].data["detail"]
        # The controller stuck in one input does stop the pings.
        app.controller.busy_since = time.monotonic() - 120
        assert not app.alive()
        await asyncio.sleep(0.1)
        drain(sock)
        await asyncio.sleep(0.3)  # three watchdog periods
        assert not any("WATCHDOG=1" in m for m in drain(sock))
    finally:
        app.controller.busy_since = None
        app.request_stop()
        await asyncio.wait_for(task, 10)
