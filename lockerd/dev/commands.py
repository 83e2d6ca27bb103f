"""The demo's typed commands: a person's hands on the simulated bank, plus the backend's tools."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TypeVar

from lockerd.core.deposit import is_parcel_id
from lockerd.core.help import Step
from lockerd.dev.demobank import DemoBank
from lockerd.dev.helpdesk import backend_answers
from lockerd.dev.provision import BankKit
from lockerd.dev.tour import TOUR_STEP_S, play_tour
from lockerd.dev.transcript import Output, Printer
from lockerd.errors import TrustError
from lockerd.trust.digest import support_code, support_window
from lockerd.trust.qrtoken import peek_qr_token
from sim.world import SimError

T = TypeVar("T")

HELP = """\
Commands (a compartment is named by its number):
  123456#        press keys on the keypad (* clears, # enters); digits alone get a # added
  scan TEXT      the scanner reads TEXT
  label PARCEL   the courier scans the label of parcel PARCEL (after typing the courier code)
  open N         open door N by hand (only works once it is unlocked)
  close N        close door N
  take N / put N take the parcel out of / put a parcel into compartment N (its door open)
  force N        force door N open (the daemon reports door.forced)
  jam N / unjam N  jam the lock of N so the door does not spring open / clear the jam
                 (after door.jammed: 'unjam N' then '#' is the customer's guided retry)
  service N [off]  a technician puts compartment N back in service (after a jam, say)
                 / takes it out of service
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

SERVICE_REASON = "technician at the bank (demo)"
_POLL_S = 0.02


def code_lines(kit: BankKit) -> list[str]:
    """The demo's codes, as printed at start and by `codes`."""
    lines = ["Pickup codes (the parcels are in their compartments):"]
    lines += [f"  compartment {code.compartment}: {code.code}   (code id {code.id})"
              for code in kit.codes if code.kind == "pickup"]
    courier = next((c for c in kit.codes if c.kind == "courier"), None)
    if courier is not None:
        lines.append(f"Courier code: {courier.code}   (code id {courier.id}): type it, then "
                     "'label PX200' scans a parcel, a digit picks the size, 'put N' and "
                     "'close N' deposit it, * ends the session.")
    return lines


class Commands:
    """Runs the lines a person types, printing what happened through the transcript."""

    def __init__(self, bank: DemoBank, *, out: Output, printer: Printer) -> None:
        self.bank = bank
        self.world = bank.world
        self.app = bank.app
        self.kit = bank.kit
        self.out = out
        self.printer = printer

    def say(self, text: str, kind: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.out.line(line, kind)

    async def tour(self) -> bool:
        """The guided tour, each step's line printed after what the last step made happen."""

        async def narrate(line: str) -> None:
            await self.printer.settle()
            self.say(f"[tour] {line}", "tour")

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
                await self._ask_for_help(arg)
            elif set(line) <= set("0123456789*#"):
                self.world.press(line if line.endswith(("#", "*")) else line + "#")
            else:
                handler = self._handlers().get(word)
                if handler is None:
                    self.say(f"unknown command {word!r}; type 'help'", "error")
                elif inspect.isawaitable(done := handler(arg)):
                    await done
        except SimError as exc:
            self.say(f"simulator: {exc}", "error")
        return True

    def _handlers(self) -> dict[str, Callable[[str], object]]:
        """The typed words besides keys, tour and quit, each with what it does to its argument."""
        world = self.world
        return {
            "help": lambda _: self.say(HELP),
            "scan": self.scan,
            "label": self._label,
            "open": world.open_door,
            "close": world.close_door,
            "take": lambda arg: self._parcel(arg, False),
            "put": lambda arg: self._parcel(arg, True),
            "force": world.force_door,
            "jam": lambda cid: self._jam(cid, True),
            "unjam": lambda cid: self._jam(cid, False),
            "service": self._service,
            "derive": self._derive,
            "support": self._support,
            "qr": self._qr,
            "state": lambda _: self._state(),
            "codes": lambda _: self.say("\n".join(code_lines(self.kit))),
            "events": self._events,
        }

    def scan(self, text: str) -> None:
        """The scanner reads `text`; a QR token's id is noted, so its events say what it is."""
        if text.startswith("LK1:"):
            try:
                token = peek_qr_token(text)
            except TrustError:
                pass
            else:
                target = (f" for door {token.compartment}" if token.compartment else "") + (
                    f" for parcel {token.parcel_id}" if token.parcel_id else "")
                self.printer.tokens[token.cti_hex] = f"{token.kind} QR token{target}"
        self.world.scan(text)

    def _label(self, arg: str) -> None:
        if not arg:
            self.say("usage: label PARCEL (the parcel id on its label, e.g. PX200)", "error")
        else:
            self.world.scan_label(arg)

    def _events(self, arg: str) -> None:
        n = int(arg) if arg.isdigit() else 10
        for event in self.app.events.recent(n):
            self.printer.event(event)

    def _compartment(self, arg: str, usage: str) -> str | None:
        """`arg` when it names a compartment of this bank; else None, after saying why."""
        if not arg or " " in arg:
            self.say(f"usage: {usage}", "error")
            return None
        if arg not in self.kit.compartments:
            self.say(f"no compartment {arg!r} in this bank (1-{len(self.kit.compartments)})",
                     "error")
            return None
        return arg

    def _parcel(self, arg: str, present: bool) -> None:
        """`put N` / `take N`: a hand through the open door, refused when it cannot be done."""
        verb = "put" if present else "take"
        cid = self._compartment(arg, f"{verb} N (a compartment number)")
        if cid is None:
            return
        view = self.world.compartment(cid)
        if not view.door_open:
            self.say(f"door {cid} is closed: a person cannot reach in. A code opens it (or "
                     f"'open {cid}' once it is unlocked, 'force {cid}')", "error")
        elif present and view.occupied:
            self.say(f"compartment {cid} already holds a parcel: 'take {cid}' first", "error")
        elif not present and not view.occupied:
            self.say(f"compartment {cid} is empty: there is nothing to take", "error")
        else:
            self.world.set_parcel(cid, present)
            self.say(f"a parcel is now in compartment {cid}; 'close {cid}' shuts the door"
                     if present else
                     f"the parcel is out of compartment {cid}; 'close {cid}' shuts the door")

    def _jam(self, arg: str, on: bool) -> None:
        self.world.set_fault(f"lock:{arg}", "jam", on)
        if not on:
            comp = self.app.controller.compartments.get(arg)
            out_of_service = comp is not None and not comp.in_service
            self.say(f"lock {arg} works again"
                     + (f"; compartment {arg} is still out of service: 'service {arg}' puts it "
                        "back" if out_of_service else ""))
            return
        retry_s = self.app.config.doors.jam_retry_s
        self.say(f"lock {arg} jammed: a pulse no longer opens door {arg}. 'unjam {arg}' clears "
                 "it; after door.jammed the display asks the customer to push the door and "
                 + (f"press #: 'unjam {arg}' then '#' within {retry_s:g} s is that guided retry"
                    if retry_s > 0 else "call support ([doors] jam_retry_s = 0)"))

    async def _service(self, arg: str) -> None:
        """`service N` / `service N off`: the technician's in-service switch (the console's
        `service N on|off REASON`)."""
        cid_arg, _, state = arg.partition(" ")
        state = state.strip()
        usage = "service N (back in service) | service N off (out of service)"
        if state not in ("", "on", "off"):
            self.say(f"usage: {usage}", "error")
            return
        cid = self._compartment(cid_arg, usage)
        if cid is None:
            return
        in_service = state != "off"
        changed = await self.app.controller.set_service(cid, in_service, SERVICE_REASON)
        await self.printer.settle()
        word = "in service" if in_service else "out of service"
        if not changed:
            self.say(f"compartment {cid} is already {word}")
            return
        jammed = self.world.compartment(cid).jammed
        self.say(f"compartment {cid} is {word} again" if in_service else
                 f"compartment {cid} is out of service: no code opens it until 'service {cid}'")
        if in_service and jammed:
            self.say(f"(its lock is still jammed: the next opening jams again; 'unjam {cid}' "
                     "repairs it)")

    def _derive(self, arg: str) -> None:
        if not arg or " " in arg:
            self.say("usage: derive PARCEL (the parcel id on its label, e.g. PX200)", "error")
            return
        if not is_parcel_id(arg):
            self.say(f"bad parcel id {arg!r}: 1-64 printable ASCII characters, no spaces",
                     "error")
            return
        self.say(f"derived pickup code of parcel {arg}: {self.bank.derived_code(arg)}   (the "
                 "daemon accepts it while that parcel lies here)")

    def _support(self, arg: str) -> None:
        if not arg or " " in arg or not is_parcel_id(arg):
            self.say("usage: support PARCEL (the parcel id the customer reads out, e.g. PX101)",
                     "error")
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
                         f"; {usage}", "error")
                return
            token = self.kit.qr_token("pickup", compartment=target)
        elif kind == "pickup-parcel" and target:
            if not is_parcel_id(target):
                self.say(f"bad parcel id {target!r}: 1-64 printable ASCII characters, no "
                         f"spaces; {usage}", "error")
                return
            token = self.kit.qr_token("pickup", parcel_id=target)
        else:
            self.say(usage, "error")
            return
        self.say(f"scanning a signed QR token: {_shorten(token)} ({len(token)} characters, "
                 f"token id {peek_qr_token(token).cti_hex})")
        self.scan(token)

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
        self.say("  display: " + " | ".join(self.bank.display.state()["display"].splitlines()))

    async def _ask_for_help(self, arg: str) -> None:
        """`help TRACKING PHONE4`: a customer asks for help at the bank; the demo plays the
        backend, which answers with a signed reply through the bank's own checks."""
        tracking, _, phone = arg.partition(" ")
        phone = phone.strip() or "1234"
        if not (len(phone) == 4 and phone.isdigit()):
            self.say("usage: help TRACKING PHONE4 (e.g. help PX200 9876)", "error")
            return
        app, world = self.app, self.world
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
            self.say("[backend] help did not start (see 'state')", "backend")
            return
        if tracking.isdigit():
            world.press(tracking + "#")
        else:
            world.scan(tracking)
        if await _wait_for(lambda: at(Step.PHONE)) is None:
            self.say("[backend] the tracking number was not taken (see 'state')", "backend")
            return
        world.press(phone)
        request = await _wait_for(lambda: next((e for e in app.events.since(mark)
                                                if e.type == "help.requested"), None))
        if request is None:
            self.say("[backend] no help request was recorded (see 'events')", "backend")
            return
        await self.printer.settle()

        async def tell(line: str) -> None:
            self.say(f"[backend] {line}", "backend")

        await backend_answers(self.bank, request, tell)
        await self.printer.settle()


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
