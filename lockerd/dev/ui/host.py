"""A demo bank for the UI, run in this process: its daemon on the simulator (or on the
wire-level emulators), its control socket served, its database beside it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.dev.demobank import DemoBank
from lockerd.dev.provision import BankKit
from lockerd.dev.tour import play_tour
from lockerd.dev.ui.feed import EventFeed
from lockerd.dev.ui.link import BankLink, DaemonHooks
from lockerd.services.banksetup import DB_NAME
from lockerd.trust.digest import derived_pickup_code
from sim.backend import world_of
from sim.client import SimClient
from sim.wire.bank import WireBank
from sim.world import SimError

START_S = 15.0  # a daemon not ready within this has failed to start
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path on Linux, less the final NUL


class HostError(Exception):
    """The demo's daemon did not start."""


class DemoHost:
    """`async with DemoHost(kit) as link:` the daemon runs until the block ends."""

    def __init__(self, kit: BankKit, *, wire_dir: Path | None = None) -> None:
        self.kit = kit
        self.wire_dir = wire_dir
        self.app: App | None = None
        self.bank: WireBank | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.link: BankLink | None = None

    async def __aenter__(self) -> BankLink:
        socket = self.kit.socket_path
        if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
            raise HostError(f"the simulator's control socket path {socket} is longer than a "
                            f"Unix socket allows ({MAX_SOCKET_PATH} bytes): use a shorter "
                            "--dir or TMPDIR")
        if self.wire_dir is not None:
            # The "hardware" is there before the daemon opens its ports, as at a real bank.
            self.bank = WireBank(compartments=list(self.kit.compartments),
                                 parcels=[c.compartment for c in self.kit.codes
                                          if c.compartment],
                                 directory=self.wire_dir)
            self._tasks.append(asyncio.create_task(self.bank.run(), name="wire bank"))
            await self._ready(self.bank.ready, self._tasks[-1])
            socket = self.bank.paths.socket
        config = load_config(self.kit.config_path)
        self.app = app = build_app(config)
        self._tasks.append(asyncio.create_task(app.run(install_signal_handlers=False),
                                               name="daemon"))
        await self._ready(app.ready, self._tasks[-1])
        title = f"bank {self.kit.locker_id}" + (
            ": real drivers, hardware emulated on ptys" if self.bank is not None else "")
        self.link = BankLink(title=title, control=SimClient(socket),
                             feed=EventFeed(config.state_dir / DB_NAME),
                             hooks=self._hooks(app))
        await self._answering(socket)
        return self.link

    async def _answering(self, socket: Path) -> None:
        """The UI speaks only through the control socket: it must answer (a socket path too
        long for the system, for one, leaves the daemon running without it)."""
        assert self.link is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_S
        while True:
            try:
                await self.link.control.state()
                return
            except (OSError, SimError, TimeoutError) as exc:
                if loop.time() > deadline:
                    await self._stop()
                    raise HostError(f"the simulator's control socket {socket} does not "
                                    f"answer ({exc}); a shorter --dir or TMPDIR helps when "
                                    "the path is long") from exc
            await asyncio.sleep(0.05)

    async def _ready(self, ready: asyncio.Event, task: asyncio.Task[None]) -> None:
        waiting = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({waiting, task}, timeout=START_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            await self._stop()
            if task in done and task.exception() is not None:
                raise HostError(f"the demo bank did not start: {task.exception()}")
            raise HostError(f"the demo bank was not ready within {START_S:g} s")

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self.link is not None:
            await self.link.close()
        if self.app is not None:
            self.app.request_stop()
        # The daemon first (it turns the outputs off and records daemon.stopping), then the
        # emulated hardware under it.
        for task in reversed(self._tasks):
            if task.get_name() != "daemon":
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(task, return_exceptions=True)
        self._tasks.clear()

    def _hooks(self, app: App) -> DaemonHooks:
        kit = self.kit

        async def put_in_service(cid: str) -> bool:
            return await app.controller.set_service(cid, True, "technician")

        def service() -> Mapping[str, bool]:
            return {cid: c.in_service for cid, c in app.controller.compartments.items()}

        shown = world_of(app.hal)  # the daemon's own display, simulated even with --wire
        bank = DemoBank(world=self.bank.world if self.bank is not None else shown,
                        display=shown, app=app, kit=kit)

        def display() -> str:
            return "\n".join(shown.display.lines)

        return DaemonHooks(
            display=display if self.bank is not None else None,
            service=service, put_in_service=put_in_service,
            sizes=lambda: {cid: c.size for cid, c in app.controller.compartments.items()},
            codes=lambda: codes_lines(kit, app),
            qr_token=lambda cid: kit.qr_token("pickup", compartment=cid),
            tour=lambda say: play_tour(bank, say))


def codes_lines(kit: BankKit, app: App) -> list[str]:
    """The demo's printed codes, and the derived pickup code of each parcel on record."""
    lines = ["Codes to type:"]
    for code in kit.codes:
        if code.kind == "pickup":
            lines.append(f"  pickup {code.compartment}: {code.code}  ({code.parcel_id})")
        elif code.kind == "courier":
            lines.append(f"  courier: {code.code}, then a label and a size key")
    printed = {c.parcel_id for c in kit.codes}
    digits = app.config.codes.derived_digits
    for cid, comp in app.controller.compartments.items():
        if comp.parcel_id and comp.parcel_id not in printed and app.config.codes.derived_pickup:
            derived = derived_pickup_code(kit.code_key, kit.locker_id, comp.parcel_id, digits)
            lines.append(f"  pickup {cid}: {derived}  ({comp.parcel_id}, derived)")
    return lines
