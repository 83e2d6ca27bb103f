"""`lockerd demo`: the daemon on the simulated bank, driven by a person typing in the terminal."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.dev.commands import Commands, code_lines
from lockerd.dev.demobank import DemoBank
from lockerd.dev.provision import BankKit, PlainCode, make_bank, random_code
from lockerd.dev.transcript import Output, Printer, use_colour
from lockerd.logs import configure_logging
from sim.backend import world_of
from sim.wire.bank import WireBank

COURIER_ID = "c-1"
COURIER_USES = 100
PROMPT = "bank> "
# Ctrl-C, closing the terminal (SIGHUP) and a kill (SIGTERM) all stop the demo cleanly.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


def run_demo(*, directory: Path | None, compartments: int = 8, stdin: TextIO | None = None,
             stdout: TextIO | None = None, wire: bool = False, tour: bool = False) -> int:
    """Provision a demo bank, run the daemon on the simulator, and read commands from stdin.

    With `wire`, the simulated hardware runs on pseudo-terminals (Kerong boards, a serial
    scanner and keypad) and the daemon uses its real drivers for them. With `tour`, run the
    guided tour instead of reading commands, and return 1 if one of its steps fails. Ctrl-C,
    a closed terminal (SIGHUP) and SIGTERM stop the daemon; a temporary directory (no
    `directory`) is removed with its keys however the demo ends."""
    stream = stdout or sys.stdout
    source = stdin or sys.stdin
    out = Output(stream, colour=use_colour(stream),
                 prompt=PROMPT if not tour and _is_terminal(source) and _is_terminal(stream)
                 else None)
    temp = directory is None
    with _StopRequest() as stop:
        base = Path(tempfile.mkdtemp(prefix="lockerd-demo-")) if directory is None else directory
        try:
            wire_dir = base / "wire" if wire else None
            kit = provision_demo_bank(base / "bank", compartments, wire_dir)
            config = load_config(kit.config_path)
            # Logs go to a file so the terminal shows the customer's view; JSON lines for grep.
            log_file = (base / "lockerd.log").open("a", encoding="utf-8")
            configure_logging("info", "json", stream=log_file)
            for line in _opening(kit, base, wire_dir, tour, sizes="  ".join(
                    f"{c.id}:{c.size}" for c in config.compartments)):
                out.line(line)
            try:
                if stop.signal is None:
                    ok = asyncio.run(_session(
                        config_app=lambda: build_app(config), kit=kit, stdin=source, out=out,
                        wire_dir=wire_dir, tour=tour, stop=stop))
                else:  # stopped while the bank was being made: the daemon never started
                    ok = True
                    out.line("lockerd demo stopped.")
            finally:
                stop.arm()
                log_file.close()
            return 0 if ok else 1
        finally:
            if temp:
                shutil.rmtree(base, ignore_errors=True)


def _opening(kit: BankKit, base: Path, wire_dir: Path | None, tour: bool, *,
             sizes: str) -> list[str]:
    """The lines printed before the daemon starts: the bank, its files, sizes and codes."""
    lines = [f"lockerd demo: bank {kit.locker_id} with {len(kit.compartments)} compartments "
             f"(files in {base})"]
    if wire_dir is not None:
        lines.append(f"Hardware on the wire: Kerong boards on {wire_dir / 'kerong'}, serial "
                     f"scanner on {wire_dir / 'scanner'}, serial keypad on "
                     f"{wire_dir / 'keypad'}; the daemon uses its real drivers.")
    lines.append(f"Compartment sizes: {sizes}")
    lines += code_lines(kit)
    lines.append("Running the tour ('lockerd demo' without --tour lets you drive the bank "
                 "yourself).\n" if tour else
                 "Type 'help' for commands, 'tour' for a guided deposit and pickup, 'quit' "
                 "to leave.\n")
    return lines


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


class _StopRequest:
    """The stop signals that come while no event loop takes them (provisioning, cleaning
    up): noted, so that the demo stops cleanly at the next step instead of dying with its
    temporary keys left behind. In the loop, the session's handlers stop the daemon."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[signal.Signals, Any] = {}  # what getsignal gave

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name

    def arm(self) -> None:
        """Take the signals (again: the loop leaves their default behind when it ends)."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self)

    def __enter__(self) -> _StopRequest:
        self._previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
        self.arm()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def demo_sizes(compartments: int) -> list[str]:
    """Sizes for a demo bank, in compartment order: a quarter S, three eighths M, the rest L
    (S, S, M, M, M, L, L, L for eight)."""
    small = compartments // 4
    medium = (3 * compartments + 4) // 8
    return ["S"] * small + ["M"] * medium + ["L"] * (compartments - small - medium)


def provision_demo_bank(directory: Path, compartments: int = 8,
                        wire_dir: Path | None = None) -> BankKit:
    """A fresh demo bank in `directory` (emptied first if it holds one): the printed pickup
    codes of compartments 1-3 with their parcels inside, the courier code `c-1`, derived and
    support codes on; with `wire_dir`, its hardware on the wire-level emulators there."""
    if (directory / "lockerd.toml").exists():
        shutil.rmtree(directory)
    count = min(3, compartments)
    codes = [
        PlainCode(id=f"p-{1000 + i}", code=random_code(6), compartment=str(i),
                  parcel_id=f"PX{100 + i}")
        for i in range(1, count + 1)
    ]
    pickup_codes = {c.code for c in codes}
    courier = random_code(6)
    while courier in pickup_codes:  # one code, one meaning
        courier = random_code(6)
    codes.append(PlainCode(id=COURIER_ID, code=courier, compartment=None, kind="courier",
                           max_uses=COURIER_USES))
    return make_bank(directory, compartments=compartments, codes=codes,
                     parcels=[c.compartment for c in codes if c.compartment],
                     sizes=demo_sizes(compartments),
                     overrides={"entry": {"timeout_s": 60.0},
                                "codes": {"derived_pickup": True, "support_codes": True},
                                # Two pulses of 2 s before door.jammed: the tour's jam is brief.
                                "doors": {"open_timeout_s": 2.0}},
                     wire=wire_dir)


async def _session(*, config_app: Callable[[], App], kit: BankKit, stdin: TextIO,
                   out: Output, stop: _StopRequest, wire_dir: Path | None = None,
                   tour: bool = False) -> bool:
    """Run the daemon and the person's commands (or the tour); False if the tour failed."""
    loop = asyncio.get_running_loop()
    apps: list[App] = []

    def halt() -> None:
        stop.signal = stop.signal or "signal"
        for app in apps:
            app.request_stop()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, halt)
    bank: WireBank | None = None
    bank_task: asyncio.Task[None] | None = None
    if wire_dir is not None:
        # The "hardware": emulated boards and serial devices on ptys, before the daemon opens
        # them, as a real bank's hardware is there before its controller boots.
        bank = WireBank(compartments=list(kit.compartments),
                        parcels=[c.compartment for c in kit.codes if c.compartment],
                        directory=wire_dir)
        bank_task = asyncio.create_task(bank.run(), name="wire bank")
        await bank.ready.wait()
    app = config_app()
    apps.append(app)
    if stop.signal is not None:
        app.request_stop()  # it starts, sees the stop and shuts down as it would on Ctrl-C
    try:
        daemon = asyncio.create_task(app.run(), name="daemon")
        ready = asyncio.create_task(app.ready.wait())
        await asyncio.wait({daemon, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not app.ready.is_set():
            ready.cancel()
            await daemon  # it ended before it was ready: its error, if any, goes up
            return False
        # The person acts on the bank's world; the customer display is the daemon's.
        world = bank.world if bank is not None else world_of(app.hal)
        display = world_of(app.hal)
        printer = Printer(app, out)
        printing = asyncio.create_task(printer.run(world, display), name="printer")
        commands = Commands(DemoBank(world=world, display=display, app=app, kit=kit),
                            out=out, printer=printer)
        try:
            if tour:
                return await commands.tour()
            await _read_commands(commands, stdin, out)
            return True
        finally:
            app.request_stop()
            await daemon
            printing.cancel()
            out.answered()
            out.line("lockerd demo stopped.")
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        if bank_task is not None:
            bank_task.cancel()
            await asyncio.gather(bank_task, return_exceptions=True)


def _line_reader(stdin: TextIO, lines: asyncio.Queue[str | None]) -> Callable[[], None]:
    """Feed the lines typed on `stdin` into `lines` (None at the end); returns the function
    that stops reading."""
    loop = asyncio.get_running_loop()
    pending = b""

    def on_input() -> None:
        # Read the descriptor directly: a buffered readline() would hide a second line already
        # read into Python's buffer from the selector.
        nonlocal pending
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal is gone
            chunk = b""
        if not chunk:
            if pending:
                lines.put_nowait(pending.decode("utf-8", "replace"))
            lines.put_nowait(None)
            loop.remove_reader(fd)
            return
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            lines.put_nowait(raw.decode("utf-8", "replace"))

    try:
        fd = stdin.fileno()
        loop.add_reader(fd, on_input)
    except (OSError, ValueError, NotImplementedError):
        # Not a selectable file (a test's StringIO): read it all at once.
        for line in stdin.read().splitlines():
            lines.put_nowait(line)
        lines.put_nowait(None)
        return lambda: None

    def stop() -> None:
        loop.remove_reader(fd)

    return stop


async def _read_commands(commands: Commands, stdin: TextIO, out: Output) -> None:
    app = commands.app
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    stop_reading = _line_reader(stdin, lines)
    try:
        while not app.stop.is_set():
            await commands.printer.settle()
            out.ask()
            get = asyncio.create_task(lines.get())
            stop = asyncio.create_task(app.stop.wait())
            done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if get not in done:
                get.cancel()
                break
            out.answered()
            text = get.result()
            if text is None or not await commands.command(text.strip()):
                break
            # Let the daemon react before the next command is read.
            await asyncio.sleep(0.15)
    finally:
        stop_reading()
