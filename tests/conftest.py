"""Shared fixtures: a provisioned simulated bank, the daemon running on it, condition polling."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from broker import Broker
from waiting import What, until

from lockerd.app import App, build_app
from lockerd.cli.lockerctl_cmd import main as lockerctl_main
from lockerd.config import load_config
from lockerd.dev.provision import BankKit, PlainCode, make_bank
from lockerd.logs import configure_logging
from lockerd.store import EventLog, StoredEvent, open_database
from sim.backend import world_of
from sim.world import SimWorld

# Fast door timings so jam and held-open paths run in well under a second.
FAST = {
    "doors": {"pulse_s": 0.2, "open_timeout_s": 0.3, "held_open_after_s": 0.6,
              "show_result_s": 0.5},
    "lockout": {"free_attempts": 3, "base_s": 30.0, "max_s": 600.0},
}


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    configure_logging(os.environ.get("LOCKERD_TEST_LOG", "warning"), "json")
    yield


@pytest.fixture
def bank_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="lk-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def broker(bank_dir: Path) -> Iterator[Broker]:
    """A Mosquitto of this test's own on a free loopback port."""
    d = bank_dir / "broker"
    d.mkdir()
    b = Broker(d)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def make_kit(bank_dir: Path) -> Callable[..., BankKit]:
    """Provision a bank with fast timings; keyword arguments go to make_bank."""

    def make(codes: list[PlainCode] | None = None, **kwargs: Any) -> BankKit:
        overrides = {**FAST, **kwargs.pop("overrides", {})}
        return make_bank(bank_dir, codes=codes or [], overrides=overrides, **kwargs)

    return make


class Running:
    """A daemon running in this event loop on the simulator."""

    def __init__(self, app: App, kit: BankKit) -> None:
        self.app = app
        self.kit = kit
        self.world: SimWorld = world_of(app.hal)

    def events(self, type_prefix: str = "") -> list[StoredEvent]:
        return self.app.events.recent(10_000, type_prefix=type_prefix)

    def types(self) -> list[str]:
        return [e.type for e in self.events()]

    async def wait_event(self, type_: str, *, count: int = 1, timeout: float = 5.0) -> StoredEvent:
        await wait_until(lambda: len(self.events(type_)) >= count, timeout=timeout,
                         what=f"{count} {type_} event(s); got {self.types()}")
        return self.events(type_)[count - 1]

    def display(self) -> str:
        return str(self.world.state()["display"])

    async def wait_display(self, text: str, *, timeout: float = 5.0, case: str = "") -> None:
        """Wait until the display shows `text`. An event is on record a moment before the
        display shows what goes with it (the controller shows a message once the batch that
        holds its event is committed), so reading the display right after seeing the event
        races the controller."""
        await wait_until(lambda: text in self.display(), timeout=timeout,
                         what=lambda: f"{case}{': ' if case else ''}{text!r} on the display; "
                                      f"it shows {self.display()!r}")


@asynccontextmanager
async def running(kit: BankKit) -> AsyncIterator[Running]:
    app = build_app(load_config(kit.config_path))
    task = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        yield Running(app, kit)
    finally:
        app.request_stop()
        await asyncio.wait_for(task, 10)


async def wait_until(cond: Callable[[], bool], *, timeout: float = 5.0, what: What = "") -> None:
    """`waiting.until` under the name the daemon tests know it by (polling every 10 ms, as
    they always have). Waiting itself lives in waiting.py: until, until_sync, until_value."""
    await until(cond, timeout, what=what, interval=0.01)


def stored_events(kit: BankKit) -> list[StoredEvent]:
    db = open_database(kit.state_dir / "lockerd.db")
    try:
        return EventLog(db).recent(100_000)
    finally:
        db.close()


@dataclass
class Run:
    status: int
    out: str
    err: str


class RunFn(Protocol):
    def __call__(self, *argv: str | Path) -> Run: ...


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> RunFn:
    """lockerctl run in-process: its exit status and what it printed."""
    def _run(*argv: str | Path) -> Run:
        status = lockerctl_main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Run(status, captured.out, captured.err)

    return _run
