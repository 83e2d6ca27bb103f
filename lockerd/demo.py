"""`lockerd demo`: the daemon on the simulated bank, driven by a person typing in the terminal."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.logs import configure_logging
from lockerd.provision import BankKit, PlainCode, make_bank, random_code
from sim.backend import world_of
from sim.wire.bank import WireBank
from sim.world import (
    DisplayChanged,
    DoorMoved,
    LockChanged,
    SimError,
    SimWorld,
    Subscription,
    WorldChange,
)

HELP = """\
Commands (a compartment is named by its number):
  123456#        press keys on the keypad (* clears, # enters); digits alone get a # added
  scan TEXT      the scanner reads TEXT
  open N         open door N by hand (only works once it is unlocked)
  close N        close door N
  take N / put N take the parcel out of / put a parcel into compartment N
  force N        force door N open (the daemon reports door.forced)
  jam N / unjam N  jam the lock of N so the door does not spring open
  state          what the simulator sees: doors, locks, parcels, display
  codes          the demo codes again
  events [N]     the last N events the daemon recorded (10)
  help           this text
  quit           stop the daemon and leave (Ctrl-D works too)
"""


def run_demo(*, directory: Path | None, compartments: int = 8, stdin: TextIO | None = None,
             stdout: TextIO | None = None, wire: bool = False) -> int:
    """Provision a demo bank, run the daemon on the simulator, and read commands from stdin.

    With `wire`, the simulated hardware runs on pseudo-terminals (Kerong boards, a serial
    scanner and keypad) and the daemon uses its real drivers for them."""
    out = stdout or sys.stdout
    temp = directory is None
    base = Path(tempfile.mkdtemp(prefix="lockerd-demo-")) if directory is None else directory
    try:
        wire_dir = base / "wire" if wire else None
        kit = _provision(base / "bank", compartments, wire_dir)
        config = load_config(kit.config_path)
        # Logs go to a file so the terminal shows the customer's view; JSON lines for grep.
        log_file = (base / "lockerd.log").open("a", encoding="utf-8")
        configure_logging("info", "json", stream=log_file)
        print(f"lockerd demo: bank {kit.locker_id} with {compartments} compartments "
              f"(files in {base})", file=out)
        if wire_dir is not None:
            print(f"Hardware on the wire: Kerong boards on {wire_dir / 'kerong'}, serial "
                  f"scanner on {wire_dir / 'scanner'}, serial keypad on "
                  f"{wire_dir / 'keypad'}; the daemon uses its real drivers.", file=out)
        print("Pickup codes (the parcels are in their compartments):", file=out)
        for code in kit.codes:
            print(f"  compartment {code.compartment}: {code.code}   (code id {code.id})",
                  file=out)
        print("Type 'help' for commands, 'quit' to leave.\n", file=out)
        try:
            asyncio.run(_session(config_app=lambda: build_app(config), kit=kit,
                                 stdin=stdin or sys.stdin, out=out, wire_dir=wire_dir))
        finally:
            log_file.close()
        return 0
    finally:
        if temp:
            shutil.rmtree(base, ignore_errors=True)


def _provision(directory: Path, compartments: int, wire_dir: Path | None) -> BankKit:
    if (directory / "lockerd.toml").exists():
        shutil.rmtree(directory)
    count = min(3, compartments)
    codes = [
        PlainCode(id=f"p-{1000 + i}", code=random_code(6), compartment=str(i),
                  parcel_id=f"PX{100 + i}")
        for i in range(1, count + 1)
    ]
    return make_bank(directory, compartments=compartments, codes=codes,
                     parcels=[c.compartment for c in codes if c.compartment],
                     overrides={"entry": {"timeout_s": 60.0}}, wire=wire_dir)


async def _session(*, config_app: Callable[[], App], kit: BankKit, stdin: TextIO,
                   out: TextIO, wire_dir: Path | None = None) -> None:
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
    daemon = asyncio.create_task(app.run(), name="daemon")
    await app.ready.wait()
    # The person acts on the bank's world; the customer display is the daemon's (simulated).
    world = bank.world if bank is not None else world_of(app.hal)
    display = world_of(app.hal)
    printer = asyncio.create_task(_print_changes(app, world, display, out), name="printer")
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    pending = b""

    def on_input() -> None:
        # Read the descriptor directly: a buffered readline() would hide a second line already
        # read into Python's buffer from the selector.
        nonlocal pending
        chunk = os.read(fd, 4096)
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
        reader = True
    except (OSError, ValueError, NotImplementedError):
        # Not a selectable file (a test's StringIO): read it all at once.
        reader = False
        for line in stdin.read().splitlines():
            lines.put_nowait(line)
        lines.put_nowait(None)
    try:
        while not app.stop.is_set():
            get = asyncio.create_task(lines.get())
            stop = asyncio.create_task(app.stop.wait())
            done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if get not in done:
                get.cancel()
                break
            text = get.result()
            if text is None or not _command(text.strip(), world, display, app, kit, out):
                break
            # Let the daemon react before the next command is read.
            await asyncio.sleep(0.15)
    finally:
        if reader:
            loop.remove_reader(fd)
        app.request_stop()
        await daemon
        printer.cancel()
        if bank_task is not None:
            bank_task.cancel()
            await asyncio.gather(bank_task, return_exceptions=True)
        print("lockerd demo stopped.", file=out)


def _command(line: str, world: SimWorld, display: SimWorld, app: App, kit: BankKit,
             out: TextIO) -> bool:
    """Run one typed command; False means leave."""
    if not line:
        return True
    word, _, rest = line.partition(" ")
    arg = rest.strip()
    try:
        if word in ("quit", "exit"):
            return False
        if word == "help":
            print(HELP, file=out)
        elif set(line) <= set("0123456789*#"):
            world.press(line if line.endswith(("#", "*")) else line + "#")
        elif word == "scan":
            world.scan(arg)
        elif word == "open":
            world.open_door(arg)
        elif word == "close":
            world.close_door(arg)
        elif word == "take":
            world.set_parcel(arg, False)
        elif word == "put":
            world.set_parcel(arg, True)
        elif word == "force":
            world.force_door(arg)
        elif word in ("jam", "unjam"):
            world.set_fault(f"lock:{arg}", "jam", word == "jam")
        elif word == "state":
            _print_state(world, display, out)
        elif word == "codes":
            for code in kit.codes:
                print(f"  compartment {code.compartment}: {code.code}", file=out)
        elif word == "events":
            n = int(arg) if arg.isdigit() else 10
            for event in app.events.recent(n):
                _print_event(event.seq, event.type, event.compartment, event.code_id, out)
        else:
            print(f"unknown command {word!r}; type 'help'", file=out)
    except SimError as exc:
        print(f"simulator: {exc}", file=out)
    return True


def _print_state(world: SimWorld, display: SimWorld, out: TextIO) -> None:
    state = world.state()
    print("  door  lock      door    parcel  service", file=out)
    for cid, c in state["compartments"].items():
        print(f"  {cid:>4}  {'locked' if c['locked'] else 'released':8}  "
              f"{'open' if c['door_open'] else 'closed':6}  {'yes' if c['occupied'] else 'no':6}  "
              f"{'in' if c['in_service'] else 'OUT'}", file=out)
    print("  display: " + " | ".join(display.state()["display"].splitlines()), file=out)


def _print_event(seq: int, type_: str, compartment: str | None, code_id: str | None,
                 out: TextIO) -> None:
    where = f" door {compartment}" if compartment else ""
    code = f" code {code_id}" if code_id else ""
    print(f"  event #{seq} {type_}{where}{code}", file=out)


async def _print_changes(app: App, world: SimWorld, display: SimWorld, out: TextIO) -> None:
    """Print what a person at the bank would notice, as it happens."""
    seen = app.events.last_seq()
    with world.subscribe(DisplayChanged, DoorMoved, LockChanged) as sub, \
            display.subscribe(DisplayChanged) as shown:
        changes: asyncio.Queue[WorldChange] = asyncio.Queue()

        async def forward(source: Subscription) -> None:
            while True:
                changes.put_nowait(await source.get())

        tasks = [asyncio.create_task(forward(sub))]
        if display is not world:
            tasks.append(asyncio.create_task(forward(shown)))
        try:
            await _print_loop(app, changes, seen, out)
        finally:
            for task in tasks:
                task.cancel()


async def _print_loop(app: App, changes: asyncio.Queue[WorldChange], seen: int,
                      out: TextIO) -> None:
    while True:
        change = await changes.get()
        if isinstance(change, DisplayChanged):
            if change.message.lines[0].startswith("Code: "):
                continue  # one masked line per digit typed adds nothing here
            print("  [display] " + " | ".join(change.message.lines), file=out)
        elif isinstance(change, DoorMoved):
            print(f"  [door {change.compartment}] {'opened' if change.open else 'closed'}",
                  file=out)
        for event in app.events.since(seen):
            _print_event(event.seq, event.type, event.compartment, event.code_id, out)
            seen = event.seq
        out.flush()
