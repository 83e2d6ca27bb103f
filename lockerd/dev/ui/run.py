"""`lockerd demo` in a terminal: the UI over a demo bank run here, or attached to a daemon."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from lockerd.dev.provision import BankKit
from lockerd.dev.ui.app import LockerUi
from lockerd.dev.ui.host import DemoHost, HostError
from lockerd.dev.ui.link import BankLink
from lockerd.logs import configure_logging

# Closing the terminal (SIGHUP) or a kill (SIGTERM) leaves like q: the daemon stops cleanly
# and the temporary bank is removed.
_LEAVE_SIGNALS = (signal.SIGHUP, signal.SIGTERM)


def run_ui(*, directory: Path | None, compartments: int = 8, wire: bool = False,
           tour: bool = False) -> int:
    """Provision a demo bank, run its daemon here and the UI over it until the person leaves."""
    from lockerd.dev.demo import provision_demo_bank  # the transcript's bank, the same here

    temp = directory is None
    base = Path(tempfile.mkdtemp(prefix="lockerd-demo-")) if directory is None else directory
    try:
        wire_dir = base / "wire" if wire else None
        kit = provision_demo_bank(base / "bank", compartments, wire_dir)
        # The terminal is the UI's: the daemon logs JSON lines to a file.
        with (base / "lockerd.log").open("a", encoding="utf-8") as log_file:
            configure_logging("info", "json", stream=log_file)
            return asyncio.run(_hosted(kit, wire_dir=wire_dir, tour=tour))
    except HostError as exc:
        print(f"lockerd demo: {exc} (the log is in {base / 'lockerd.log'})", file=sys.stderr)
        return 1
    finally:
        if temp:
            shutil.rmtree(base, ignore_errors=True)


def attach_ui(*, socket: Path, db: Path) -> int:
    """The UI over a daemon already running, by its control socket and its database."""
    link = BankLink.attach(socket=socket, db=db)
    compartments = _compartments_of(socket)
    if compartments is None:
        return 1
    return asyncio.run(_show(LockerUi(link, compartments), link))


def _compartments_of(socket: Path) -> list[str] | None:
    from sim.client import request_sync
    from sim.world import SimError

    try:
        state = request_sync(socket, {"op": "state"})
    except (OSError, SimError) as exc:
        print(f"lockerd demo: cannot reach the simulator at {socket}: {exc}", file=sys.stderr)
        return None
    return [str(cid) for cid in state.get("compartments", {})]


async def _hosted(kit: BankKit, *, wire_dir: Path | None, tour: bool) -> int:
    host = DemoHost(kit, wire_dir=wire_dir)
    async with host as link:
        ui = LockerUi(link, list(kit.compartments), tour=tour)
        await _show(ui, link)
    return 0 if ui.tour_result is not False else 1


async def _show(ui: LockerUi, link: BankLink) -> int:
    loop = asyncio.get_running_loop()
    for sig in _LEAVE_SIGNALS:
        loop.add_signal_handler(sig, ui.exit)
    try:
        await ui.run_async()
    finally:
        for sig in _LEAVE_SIGNALS:
            loop.remove_signal_handler(sig)
        await link.close()
    return 0

