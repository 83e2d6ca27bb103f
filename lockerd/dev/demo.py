"""`lockerd demo`: the daemon on the simulated bank, driven by a person typing in the terminal."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, TypeVar

from lockerd.app import App, build_app
from lockerd.config import load_config
from lockerd.core.deposit import is_parcel_id
from lockerd.core.help import Step
from lockerd.dev.demobank import DemoBank
from lockerd.dev.helpdesk import backend_answers
from lockerd.dev.provision import BankKit, PlainCode, make_bank, random_code
from lockerd.dev.tour import TOUR_STEP_S, play_tour
from lockerd.logs import configure_logging
from lockerd.store.events import StoredEvent
from lockerd.trust.digest import support_code, support_window
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

T = TypeVar("T")

HELP = """\
Commands (a compartment is named by its number):
  123456#        press keys on the keypad (* clears, # enters); digits alone get a # added
  scan TEXT      the scanner reads TEXT
  label PARCEL   the courier scans the label of parcel PARCEL (after typing the courier code)
  open N         open door N by hand (only works once it is unlocked)
  close N        close door N
  take N / put N take the parcel out of / put a parcel into compartment N
  force N        force door N open (the daemon reports door.forced)
  jam N / unjam N  jam the lock of N so the door does not spring open / clear the jam
                 (after door.jammed: 'unjam N' then '#' is the customer's guided retry)
  help TRACKING PHONE4  a customer without a code asks for help (# on an empty entry):
                 tracking number, phone's last 4 digits; the demo's backend answers
  derive PARCEL  the pickup code of a parcel deposited here, as the backend derives it offline
  support PARCEL the code support reads out over the phone for a parcel here (10-20 minutes)
  qr pickup N    scan a signed pickup QR token for compartment N
  qr pickup-parcel PARCEL  scan a signed pickup QR token for the compartment holding PARCEL
  tour           a guided run: a courier deposits a parcel, a customer picks it up
  state          what the simulator sees: doors, locks, parcels, sizes, display
  codes          the demo codes again
  events [N]     the last N events the daemon recorded (10)
  help           this text
  quit           stop the daemon and leave (Ctrl-D works too)
"""

COURIER_ID = "c-1"
COURIER_USES = 100
_POLL_S = 0.02


def run_demo(*, directory: Path | None, compartments: int = 8, stdin: TextIO | None = None,
             stdout: TextIO | None = None, wire: bool = False, tour: bool = False) -> int:
    """Provision a demo bank, run the daemon on the simulator, and read commands from stdin.

    With `wire`, the simulated hardware runs on pseudo-terminals (Kerong boards, a serial
    scanner and keypad) and the daemon uses its real drivers for them. With `tour`, run the
    guided tour instead of reading commands, and return 1 if one of its steps fails."""
    out = stdout or sys.stdout
    temp = directory is None
    base = Path(tempfile.mkdtemp(prefix="lockerd-demo-")) if directory is None else directory
    try:
        wire_dir = base / "wire" if wire else None
        kit = provision_demo_bank(base / "bank", compartments, wire_dir)
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
        print("Compartment sizes: " + "  ".join(
            f"{c.id}:{c.size}" for c in config.compartments), file=out)
        _print_codes(kit, out)
        if tour:
            print("Running the tour ('lockerd demo' without --tour lets you drive the bank "
                  "yourself).\n", file=out)
        else:
            print("Type 'help' for commands, 'tour' for a guided deposit and pickup, 'quit' "
                  "to leave.\n", file=out)
        try:
            ok = asyncio.run(_session(config_app=lambda: build_app(config), kit=kit,
                                      stdin=stdin or sys.stdin, out=out, wire_dir=wire_dir,
                                      tour=tour))
        finally:
            log_file.close()
        return 0 if ok else 1
    finally:
        if temp:
            shutil.rmtree(base, ignore_errors=True)


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


def _print_codes(kit: BankKit, out: TextIO) -> None:
    print("Pickup codes (the parcels are in their compartments):", file=out)
    for code in kit.codes:
        if code.kind == "pickup":
            print(f"  compartment {code.compartment}: {code.code}   (code id {code.id})",
                  file=out)
    courier = next((c for c in kit.codes if c.kind == "courier"), None)
    if courier is not None:
        print(f"Courier code: {courier.code}   (code id {courier.id}): type it, then 'label "
              "PX200' scans a parcel, a digit picks the size, 'put N' and 'close N' deposit it, "
              "* ends the session.", file=out)


async def _session(*, config_app: Callable[[], App], kit: BankKit, stdin: TextIO,
                   out: TextIO, wire_dir: Path | None = None, tour: bool = False) -> bool:
    """Run the daemon and the person's commands (or the tour); False if the tour failed."""
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
    printer = _Printer(app, out)
    printing = asyncio.create_task(printer.run(world, display), name="printer")
    demo = _Demo(DemoBank(world=world, display=display, app=app, kit=kit), out=out,
                 printer=printer)
    try:
        if tour:
            return await demo.tour()
        await _read_commands(demo, stdin)
        return True
    finally:
        app.request_stop()
        await daemon
        printing.cancel()
        if bank_task is not None:
            bank_task.cancel()
            await asyncio.gather(bank_task, return_exceptions=True)
        print("lockerd demo stopped.", file=out)


async def _read_commands(demo: _Demo, stdin: TextIO) -> None:
    app = demo.app
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
            if text is None or not await demo.command(text.strip()):
                break
            # Let the daemon react before the next command is read.
            await asyncio.sleep(0.15)
    finally:
        if reader:
            loop.remove_reader(fd)


class _Demo:
    """The typed commands: a person's hands on the simulated bank, plus the backend's tools."""

    def __init__(self, bank: DemoBank, *, out: TextIO, printer: _Printer) -> None:
        self.bank = bank
        self.world = bank.world
        self.display = bank.display
        self.app = bank.app
        self.kit = bank.kit
        self.out = out
        self.printer = printer

    def say(self, text: str) -> None:
        print(text, file=self.out)
        self.out.flush()

    async def tour(self) -> bool:
        """The guided tour, each step's line printed after what the last step made happen."""

        async def narrate(line: str) -> None:
            await self.printer.settle()
            self.say(f"[tour] {line}")

        ok = await play_tour(self.bank, narrate)
        await self.printer.settle()
        return ok

    async def command(self, line: str) -> bool:
        """Run one typed command; False means leave."""
        if not line:
            return True
        word, _, rest = line.partition(" ")
        arg = rest.strip()
        if word in ("quit", "exit"):
            return False
        try:
            if word == "tour":
                await self.tour()
            elif word == "help" and arg:
                await _ask_for_help(self, arg)
            elif set(line) <= set("0123456789*#"):
                self.world.press(line if line.endswith(("#", "*")) else line + "#")
            else:
                handler = self._handlers().get(word)
                if handler is None:
                    self.say(f"unknown command {word!r}; type 'help'")
                else:
                    handler(arg)
        except SimError as exc:
            self.say(f"simulator: {exc}")
        return True

    def _handlers(self) -> dict[str, Callable[[str], object]]:
        """The typed words besides keys, tour and quit, each with what it does to its argument."""
        world = self.world
        return {
            "help": lambda _: self.say(HELP),
            "scan": world.scan,
            "label": self._label,
            "open": world.open_door,
            "close": world.close_door,
            "take": lambda cid: world.set_parcel(cid, False),
            "put": lambda cid: world.set_parcel(cid, True),
            "force": world.force_door,
            "jam": lambda cid: self._jam(cid, True),
            "unjam": lambda cid: self._jam(cid, False),
            "derive": self._derive,
            "support": self._support,
            "qr": self._qr,
            "state": lambda _: self._state(),
            "codes": lambda _: _print_codes(self.kit, self.out),
            "events": self._events,
        }

    def _label(self, arg: str) -> None:
        if not arg:
            self.say("usage: label PARCEL (the parcel id on its label, e.g. PX200)")
        else:
            self.world.scan_label(arg)

    def _events(self, arg: str) -> None:
        n = int(arg) if arg.isdigit() else 10
        for event in self.app.events.recent(n):
            _print_event(event, self.out)

    def _jam(self, arg: str, on: bool) -> None:
        self.world.set_fault(f"lock:{arg}", "jam", on)
        if not on:
            self.say(f"lock {arg} works again")
            return
        retry_s = self.app.config.doors.jam_retry_s
        self.say(f"lock {arg} jammed: a pulse no longer opens door {arg}. 'unjam {arg}' clears "
                 "it; after door.jammed the display asks the customer to push the door and "
                 + (f"press #: 'unjam {arg}' then '#' within {retry_s:g} s is that guided retry"
                    if retry_s > 0 else "call support ([doors] jam_retry_s = 0)"))

    def _derive(self, arg: str) -> None:
        if not arg or " " in arg:
            self.say("usage: derive PARCEL (the parcel id on its label, e.g. PX200)")
            return
        if not is_parcel_id(arg):
            self.say(f"bad parcel id {arg!r}: 1-64 printable ASCII characters, no spaces")
            return
        self.say(f"derived pickup code of parcel {arg}: {self.bank.derived_code(arg)}   (the "
                 "daemon accepts it while that parcel lies here)")

    def _support(self, arg: str) -> None:
        if not arg or " " in arg or not is_parcel_id(arg):
            self.say("usage: support PARCEL (the parcel id the customer reads out, e.g. PX101)")
            return
        # The bank's own trusted time: the window the daemon checks the code against.
        window = support_window(self.app.clock.wall().timestamp())
        code = support_code(self.kit.code_key, self.kit.locker_id, arg, window,
                            self.app.config.codes.derived_digits)
        self.say(f"support code of parcel {arg}: {code}   (valid once, for 10 to 20 minutes, "
                 "while that parcel lies here)")

    def _qr(self, arg: str) -> None:
        kind, _, target = arg.partition(" ")
        target = target.strip()
        usage = "usage: qr pickup N | qr pickup-parcel PARCEL"
        if kind == "pickup" and target:
            if target not in self.kit.compartments:
                self.say(f"no compartment {target!r} in this bank (1-{len(self.kit.compartments)})"
                         f"; {usage}")
                return
            token = self.kit.qr_token("pickup", compartment=target)
        elif kind == "pickup-parcel" and target:
            if not is_parcel_id(target):
                self.say(f"bad parcel id {target!r}: 1-64 printable ASCII characters, no "
                         f"spaces; {usage}")
                return
            token = self.kit.qr_token("pickup", parcel_id=target)
        else:
            self.say(usage)
            return
        self.say(f"scanning a signed QR token: {_shorten(token)} ({len(token)} characters)")
        self.world.scan(token)

    def _state(self) -> None:
        state = self.world.state()
        compartments = self.app.controller.compartments
        self.say("  door  size  lock      door    parcel  service  parcel on record")
        for cid, c in state["compartments"].items():
            comp = compartments.get(cid)
            size = (comp.size if comp is not None else None) or "-"
            parcel_id = (comp.parcel_id if comp is not None else None) or "-"
            self.say(f"  {cid:>4}  {size:4}  {'locked' if c['locked'] else 'released':8}  "
                     f"{'open' if c['door_open'] else 'closed':6}  "
                     f"{'yes' if c['occupied'] else 'no':6}  "
                     f"{'in' if c['in_service'] else 'OUT':7}  {parcel_id}")
        self.say("  display: " + " | ".join(self.display.state()["display"].splitlines()))


async def _ask_for_help(demo: _Demo, arg: str) -> None:
    """`help TRACKING PHONE4`: a customer asks for help at the bank; the demo plays the
    backend, which answers with a signed reply through the bank's own checks."""
    tracking, _, phone = arg.partition(" ")
    phone = phone.strip() or "1234"
    if not (len(phone) == 4 and phone.isdigit()):
        demo.say("usage: help TRACKING PHONE4 (e.g. help PX200 9876)")
        return
    app, world = demo.app, demo.world
    # The demo's backend is in this process: requests reach it, so the customer waits for
    # the reply as at a bank that is online.
    app.controller.online = lambda: True
    mark = app.events.last_seq()

    def at(step: Step) -> bool | None:
        flow = app.controller.bank.help
        return True if flow is not None and flow.step is step else None

    # Keys and scans come from two devices: each waits for the screen that asks for it.
    world.press("#")
    if await _wait_for(lambda: at(Step.TRACKING)) is None:
        demo.say("[backend] help did not start (see 'state')")
        return
    if tracking.isdigit():
        world.press(tracking + "#")
    else:
        world.scan(tracking)
    if await _wait_for(lambda: at(Step.PHONE)) is None:
        demo.say("[backend] the tracking number was not taken (see 'state')")
        return
    world.press(phone)
    request = await _wait_for(lambda: next((e for e in app.events.since(mark)
                                            if e.type == "help.requested"), None))
    if request is None:
        demo.say("[backend] no help request was recorded (see 'events')")
        return
    await demo.printer.settle()

    async def tell(line: str) -> None:
        demo.say(f"[backend] {line}")

    await backend_answers(demo.bank, request, tell)
    await demo.printer.settle()


async def _wait_for(check: Callable[[], T | None]) -> T | None:
    """`check()` once it is not None, or None after TOUR_STEP_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TOUR_STEP_S
    while True:
        result = check()
        if result is not None or loop.time() >= deadline:
            return result
        await asyncio.sleep(_POLL_S)


def _shorten(token: str) -> str:
    return token if len(token) <= 32 else f"{token[:20]}...{token[-8:]}"


def _print_event(event: StoredEvent, out: TextIO) -> None:
    where = f" door {event.compartment}" if event.compartment else ""
    code = f" code {event.code_id}" if event.code_id else ""
    parcel = event.data.get("parcel_id")
    what = f" parcel {parcel}" if isinstance(parcel, str) else ""
    print(f"  event #{event.seq} {event.type}{where}{code}{what}", file=out)


class _Printer:
    """Prints what a person at the bank would notice, as it happens."""

    def __init__(self, app: App, out: TextIO) -> None:
        self.app = app
        self.out = out
        self.seen = app.events.last_seq()
        self.changes: asyncio.Queue[WorldChange] = asyncio.Queue()
        self._sources: list[Subscription] = []

    async def run(self, world: SimWorld, display: SimWorld) -> None:
        with world.subscribe(DisplayChanged, DoorMoved, LockChanged) as sub, \
                display.subscribe(DisplayChanged) as shown:

            async def forward(source: Subscription) -> None:
                while True:
                    self.changes.put_nowait(await source.get())

            self._sources = [sub] if display is world else [sub, shown]
            tasks = [asyncio.create_task(forward(s)) for s in self._sources]
            try:
                while True:
                    self._print(await self.changes.get())
            finally:
                for task in tasks:
                    task.cancel()

    def _print(self, change: WorldChange) -> None:
        if isinstance(change, DisplayChanged):
            if not change.message.lines[0].startswith("Code: "):
                # (one masked line per digit typed adds nothing here)
                print("  [display] " + " | ".join(change.message.lines), file=self.out)
        elif isinstance(change, DoorMoved):
            print(f"  [door {change.compartment}] {'opened' if change.open else 'closed'}",
                  file=self.out)
        self.catch_up()

    def catch_up(self) -> None:
        """Print the events recorded since the last ones printed."""
        for event in self.app.events.since(self.seen):
            _print_event(event, self.out)
            self.seen = event.seq
        self.out.flush()

    async def settle(self) -> None:
        """Print the changes already made before going on (a few loop turns at most)."""
        for _ in range(50):
            if self.changes.empty() and all(s.queue.empty() for s in self._sources):
                break
            await asyncio.sleep(0)
        while not self.changes.empty():
            self._print(self.changes.get_nowait())
        self.catch_up()
