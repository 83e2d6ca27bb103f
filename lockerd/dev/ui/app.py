"""The simulator UI: a Textual app that drives a bank through its control socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar

from rich.text import Text
from textual import events, on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import Footer, Header, Input, RichLog, Static

from lockerd.dev.ui.feed import FeedError
from lockerd.dev.ui.link import BankLink
from lockerd.dev.ui.meaning import EventRow, describe
from lockerd.dev.ui.model import Snapshot
from lockerd.dev.ui.screens import HelpScreen, StuckKeyScreen
from lockerd.dev.ui.widgets import KEYPAD_KEYS, BankGrid, CompartmentCell, DisplayPanel, Keypad
from sim.world import SimError

CSS = """
#narration { height: auto; padding: 0 1; background: $accent-darken-2; color: $text; }
#top { height: auto; max-height: 75vh; }
#left { width: 1fr; height: auto; }
#right { width: 26; height: auto; }
#bank { grid-size: 4; grid-rows: 6; grid-gutter: 0 1; height: auto; max-height: 50vh;
        overflow-y: auto; border: round $primary; padding: 0 1; }
.cell { height: 6; border-left: tall $panel-lighten-2; padding: 0 1; }
.cell.open { background: $success-darken-3; }
.cell.out { background: $warning-darken-3; }
.cell.jammed { background: $error-darken-3; }
.cell.latest { border-left: tall $success; }
.cell.selected { border-left: tall $accent; text-style: none; background-tint: $accent 15%; }
#selection { height: 1; padding: 0 1; }
#codes { height: auto; padding: 0 1; color: $text-muted; }
#display { width: 24; height: 6; border: round $primary; background: #1d3b1d;
           color: #b6f5a6; text-style: bold; padding: 0 1; }
#keypad { grid-size: 3; grid-gutter: 0 1; width: 24; height: 6; border: round $primary;
          padding: 0 1; }
.key { width: 100%; min-width: 5; }
#scanner { width: 26; border: round $primary; }
#scanner:focus { border: round $accent; }
#events { height: 1fr; min-height: 8; border: round $primary; }
#status { height: 1; padding: 0 1; }
#status.error { color: $error; }
HelpScreen, StuckKeyScreen { align: center middle; }
#help-box { width: 100; height: auto; max-height: 90%; border: round $accent;
            background: $surface; padding: 0 1; }
#stuck-box { width: 64; height: auto; border: round $accent; background: $surface;
             padding: 1 2; }
"""

POLL_S = 0.25  # a person sees a change within a quarter second; actions show at once
EVENTS_KEPT = 5000  # the event pane keeps the newest; the database has them all
TOUR_PAUSE_S = 4.0  # how long a step of the tour is shown before it runs (space: at once)
ROW = 4  # compartments per row of the grid
LOCKS_PER_BOARD = 16  # the wire bank's Kerong wiring: compartment i on board i // 16


class LockerUi(App[None]):
    """The bank, its display, keypad, scanner and events; faults on the selected compartment."""

    CSS = CSS
    TITLE = "lockerd simulator"
    AUTO_FOCUS = None  # typing goes to the keypad until the scanner field is chosen
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help", tooltip="this list of keys"),
        Binding("o", "door('open')", "Open", tooltip="a person opens the selected door "
                "(refused while it is latched)"),
        Binding("c", "door('close')", "Close", tooltip="a person closes the selected door"),
        Binding("f", "door('force')", "Force", tooltip="the selected door is forced open "
                "whatever the latch (door.forced)"),
        Binding("p", "parcel(True)", "Put", tooltip="a parcel goes into the selected "
                "compartment"),
        Binding("t", "parcel(False)", "Take", tooltip="the parcel comes out of the selected "
                "compartment"),
        Binding("j", "jam", "Jam", tooltip="jam the selected lock, or clear its jam: a pulse "
                "no longer opens the door"),
        Binding("y", "sensor('stuck_open')", "Stuck open", tooltip="the selected door "
                "sensor says open whatever the door does (again: clear)"),
        Binding("n", "sensor('stuck_closed')", "Stuck closed", tooltip="the selected door "
                "sensor says closed whatever the door does (again: clear)"),
        Binding("i", "in_service", "In service", tooltip="put the selected compartment back "
                "into service (after a jam), as a technician would"),
        Binding("k", "stuck_key", "Stuck key", tooltip="a keypad key sticks: asks which "
                "(again: clear)"),
        Binding("d", "scanner('dead')", "Scanner dead", tooltip="the scanner swallows every "
                "scan (again: clear)"),
        Binding("g", "scanner('garbage')", "Garbage", tooltip="the scanner reads random "
                "bytes instead of each scan (again: clear)"),
        Binding("b", "board", "Board off", tooltip="the lock board of the selected "
                "compartment goes silent (with --wire; again: clear)"),
        Binding("a", "tamper", "Tamper", tooltip="the enclosure is opened (again: closed)"),
        Binding("s", "focus_scanner", "Scan",
                tooltip="type a label or paste a QR token, Enter scans it, Escape leaves "
                "the field"),
        Binding("r", "qr", "QR", tooltip="scan a signed pickup QR token for the selected "
                "compartment"),
        Binding("space", "next_step", "Next step", tooltip="the tour's next step, at once"),
        Binding("q", "quit", "Quit", tooltip="stop the daemon and leave (Ctrl-C too)"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("left", "select(-1)", "Previous", show=False),
        Binding("right", "select(1)", "Next", show=False),
        Binding("up", f"select(-{ROW})", "Row up", show=False),
        Binding("down", f"select({ROW})", "Row down", show=False),
    ]

    def __init__(self, link: BankLink, compartments: list[str], *, tour: bool = False,
                 tour_pause_s: float = TOUR_PAUSE_S) -> None:
        super().__init__()
        self.link = link
        self.ids = compartments
        self.selected = compartments[0] if compartments else ""
        self.latest: str | None = None  # the compartment whose door opened last
        self.snapshot: Snapshot | None = None
        self.polls = 0  # snapshots taken: a test waits for the next one
        self.events_seen: deque[EventRow] = deque(maxlen=EVENTS_KEPT)
        self.play_tour = tour
        self.tour_result: bool | None = None
        self.tour_pause_s = tour_pause_s
        self._next_step = asyncio.Event()
        self.sub_title = link.title
        self._codes_shown = ""
        self._unreachable = False  # the last poll failed: say so until one works
        self._refreshing = asyncio.Lock()  # one poll at a time: each event is read once

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="narration", markup=False)
        with Horizontal(id="top"):
            with Vertical(id="left"):
                yield BankGrid(self.ids)
                yield Static("", id="selection", markup=False)
                yield Static("", id="codes", markup=False)
            with Vertical(id="right"):
                yield DisplayPanel()
                yield Keypad()
                scanner = Input(placeholder="label or QR token, Enter scans", id="scanner")
                scanner.border_title = "Scanner (s)"
                yield scanner
        log = RichLog(id="events", wrap=True, markup=False, min_width=40,
                      max_lines=EVENTS_KEPT)
        log.border_title = "Events"
        log.can_focus = False
        yield log
        yield Static("", id="status", markup=False)
        yield Footer(compact=True)

    async def on_ready(self) -> None:
        """The main screen is up: start polling the bank (and the tour)."""
        narration = self.query_one("#narration", Static)
        narration.display = self.play_tour
        self.run_worker(self._poll_forever(), name="poll", exclusive=True, group="poll")
        if self.play_tour:
            self.run_worker(self._tour(), name="tour", group="tour")

    # -- reading the bank ------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await self.refresh_bank()
            await asyncio.sleep(POLL_S)

    async def refresh_bank(self) -> None:
        """One poll: the simulator's state and the events recorded since the last."""
        async with self._refreshing:
            try:
                snapshot = await self.link.snapshot()
                rows = await self.link.feed.poll()
            except (SimError, OSError, TimeoutError, FeedError) as exc:
                self.status(f"cannot reach the bank: {exc}", error=True)
                self._unreachable = True
                await asyncio.sleep(1.0)
                return
            if self._unreachable:
                self._unreachable = False
                self.status("the bank answers again")
            try:
                self._show(snapshot)
                for row in rows:
                    self._log_event(row)
                if rows:
                    self._show_codes()  # a deposit confirmed gives a parcel its code
            except NoMatches:
                return  # the screen is being taken down: the app is leaving
            self.polls += 1

    def _show(self, snapshot: Snapshot, *, force: bool = False) -> None:
        before = self.snapshot
        if snapshot == before and not force:
            return  # nothing moved: redraw nothing (an idle bank costs no CPU)
        for cell in snapshot.cells:
            was = before.cell(cell.id) if before is not None else None
            if cell.door_open and (was is None or not was.door_open) and before is not None:
                # The door that opened is where the hands go next (put, take, close).
                self.latest = self.selected = cell.id
        self.snapshot = snapshot
        for cell in snapshot.cells:
            widget = self.query_one(f"#cell-{cell.id}", CompartmentCell)
            widget.show(cell, selected=cell.id == self.selected, latest=cell.id == self.latest)
        self.query_one(DisplayPanel).show("\n".join(snapshot.display))
        self._show_selection()
        self._show_codes()

    def _show_codes(self) -> None:
        codes = self.link.hooks.codes
        if codes is not None:
            text = "\n".join(codes())
            if text != self._codes_shown:  # a new line changes the layout: only then
                self._codes_shown = text
                self.query_one("#codes", Static).update(text)

    def _show_selection(self) -> None:
        snapshot = self.snapshot
        cell = snapshot.cell(self.selected) if snapshot is not None else None
        faults = ", ".join(_fault_words(f) for f in snapshot.faults) if snapshot else ""
        text = f"Selected: compartment {self.selected}" if cell else "No compartment"
        self.query_one("#selection", Static).update(
            f"{text}   faults on: {faults or 'none'}", layout=False)

    def _log_event(self, row: EventRow) -> None:
        self.events_seen.append(row)
        meaning = describe(row)
        kind, _, words = meaning.partition(" — ")
        line = Text.assemble((f"#{row.seq} ", "dim"), (kind, "bold"),
                             (f" — {words}" if words else ""))
        self.query_one("#events", RichLog).write(line)

    def status(self, text: str, *, error: bool = False) -> None:
        widget = self.query_one("#status", Static)
        widget.update(text, layout=False)
        widget.set_class(error, "error")

    # -- the person's hands ----------------------------------------------------------------

    async def _act(self, what: str, request: Callable[[], Awaitable[object]]) -> None:
        """Send one request; a refusal is shown, never raised."""
        try:
            await request()
        except SimError as exc:
            self.status(f"simulator: {exc}", error=True)
            return
        except (OSError, TimeoutError) as exc:
            self.status(f"cannot reach the simulator: {exc}", error=True)
            return
        self.status(what)
        await self.refresh_bank()

    async def press(self, keys: str) -> None:
        await self._act(f"pressed {keys}", lambda: self.link.control.press(keys))

    async def on_key(self, event: events.Key) -> None:
        if isinstance(self.focused, Input):
            await self._in_flight(self.focused, event)
            return
        if self.screen is not self.screen_stack[0]:
            return
        key = {"enter": "#", "backspace": "*"}.get(event.key, event.character or "")
        if len(key) == 1 and key in KEYPAD_KEYS:
            event.stop()
            await self.press(key)

    async def _in_flight(self, field: Input, event: events.Key) -> None:
        """A key that reached the app while the scanner field has the focus: Escape leaves
        the field; a character or Enter typed so fast after `s` that it was on its way
        before the field took the focus belongs to the field."""
        if event.key == "escape":  # keys go to the keypad again
            event.stop()
            self.set_focus(None)
        elif event.key == "enter":
            event.stop()
            await field.action_submit()
        elif event.is_printable and event.character is not None:
            event.stop()
            field.insert_text_at_cursor(event.character)

    @on(Keypad.Pressed)
    async def _keypad(self, message: Keypad.Pressed) -> None:
        await self.press(message.key)

    @on(CompartmentCell.Selected)
    def _clicked(self, message: CompartmentCell.Selected) -> None:
        self._select(message.cid)

    @on(Input.Submitted, "#scanner")
    async def _scanned(self, message: Input.Submitted) -> None:
        message.input.value = ""
        self.set_focus(None)  # what comes next is a key: a size, * or another code
        await self.scan(message.value.strip())

    async def scan(self, data: str) -> None:
        """The scanner reads `data` (a label, a QR token, anything)."""
        if not data:
            self.status("the scanner reads nothing: type a label or paste a QR token")
            return
        shown = data if len(data) <= 32 else f"{data[:20]}...{data[-8:]}"
        await self._act(f"scanned {shown}", lambda: self.link.control.scan(data))

    def _select(self, cid: str) -> None:
        self.selected = cid
        self.query_one(f"#cell-{cid}", CompartmentCell).scroll_visible()  # a large bank
        if self.snapshot is not None:
            self._show(self.snapshot, force=True)

    def action_select(self, step: int) -> None:
        if not self.ids:
            return
        index = self.ids.index(self.selected) if self.selected in self.ids else 0
        self._select(self.ids[max(0, min(len(self.ids) - 1, index + step))])

    def action_focus_scanner(self) -> None:
        # At once, not later as Widget.focus() does: the keys typed right after `s` (all in
        # one read from a fast terminal) are the label's.
        self.set_focus(self.query_one("#scanner", Input))

    async def on_paste(self, event: events.Paste) -> None:
        """A QR token or a label pasted outside the scanner field is scanned as it is."""
        if isinstance(self.focused, Input):
            return
        event.stop()
        await self.scan(event.text.strip())

    def on_input_blurred(self) -> None:
        self.set_focus(None)

    async def action_door(self, action: str) -> None:
        cid = self.selected
        await self._act(f"door {cid}: {action}", lambda: self.link.control.door(cid, action))

    async def action_parcel(self, present: bool) -> None:
        cid = self.selected
        what = f"a parcel put into {cid}" if present else f"the parcel taken out of {cid}"
        await self._act(what, lambda: self.link.control.parcel(cid, present))

    async def _toggle(self, target: str, kind: str, words: str) -> None:
        on = not (self.snapshot is not None and self.snapshot.has_fault(target, kind))
        await self._act(f"{words}: {'on' if on else 'cleared'}",
                        lambda: self.link.control.fault(target, kind, on))

    async def action_jam(self) -> None:
        await self._toggle(f"lock:{self.selected}", "jam", f"lock {self.selected} jammed")

    async def action_sensor(self, kind: str) -> None:
        await self._toggle(f"door_sensor:{self.selected}", kind,
                           f"door sensor {self.selected} {kind.replace('_', ' ')}")

    async def action_scanner(self, kind: str) -> None:
        await self._toggle("scanner", kind, f"scanner {kind}")

    async def action_tamper(self) -> None:
        await self._toggle("tamper", "open", "enclosure open (tamper)")

    async def action_board(self) -> None:
        index = self.ids.index(self.selected) if self.selected in self.ids else 0
        board = index // LOCKS_PER_BOARD
        await self._toggle(f"board:{board}", "offline", f"lock board {board} offline")

    async def action_stuck_key(self) -> None:
        stuck = self.snapshot.stuck_key if self.snapshot is not None else None
        if stuck is not None:
            await self._act(f"key {stuck} no longer sticks",
                            lambda: self.link.control.fault("keypad", "stuck_key", False))
            return

        async def chosen(key: str | None) -> None:
            if key is not None:
                await self._act(f"key {key} sticks",
                                lambda: self.link.control.fault("keypad", "stuck_key", True,
                                                                key=key))

        self.push_screen(StuckKeyScreen(), chosen)

    async def action_in_service(self) -> None:
        put = self.link.hooks.put_in_service
        if put is None:
            self.status("putting a compartment back into service needs the daemon in this "
                        "process (the technician console's 'service ID on' otherwise)",
                        error=True)
            return
        cid = self.selected
        changed = await put(cid)
        self.status(f"compartment {cid} put back into service" if changed
                    else f"compartment {cid} is already in service")
        await self.refresh_bank()

    async def action_qr(self) -> None:
        mint = self.link.hooks.qr_token
        if mint is None:
            self.status("signed QR tokens need the demo's keys (the daemon in this process)",
                        error=True)
            return
        token = mint(self.selected)
        await self._act(f"scanned a signed pickup QR token for {self.selected} "
                        f"({len(token)} characters)", lambda: self.link.control.scan(token))

    def action_help(self) -> None:
        rows = [(_key_name(b.key), b.tooltip or b.description)
                for b in self._bindings_list() if b.show]
        self.push_screen(HelpScreen(rows))

    def _bindings_list(self) -> list[Binding]:
        return [b for b in self.BINDINGS if isinstance(b, Binding)]

    # -- the guided tour -------------------------------------------------------------------

    async def narrate(self, text: str) -> None:
        """Show one step of the tour, then give the person time to read it (space: go on)
        before the step acts on the bank."""
        await self.refresh_bank()  # what the last step did comes before this step's line
        self.query_one("#narration", Static).update(
            f"Tour: {text}" + ("" if text.startswith("FAILED") else "   (space: go on)"))
        self.query_one("#events", RichLog).write(Text(f"[tour] {text}", style="italic"))
        self._next_step.clear()
        if self.tour_pause_s > 0 and not text.startswith("FAILED"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._next_step.wait(), self.tour_pause_s)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_step":  # only while a tour plays
            return self.play_tour and self.tour_result is None
        return True

    def action_next_step(self) -> None:
        self._next_step.set()

    async def _tour(self) -> None:
        tour = self.link.hooks.tour
        if tour is None:
            await self.narrate("the guided tour needs the daemon in this process")
            return
        self.tour_result = ok = await tour(self.narrate)
        self.refresh_bindings()
        self.query_one("#narration", Static).update(
            "Tour over: drive the bank yourself, or press q to leave" if ok
            else "The tour stopped (the events say why): press q to leave")


def _key_name(key: str) -> str:
    return {"question_mark": "?", "space": "Space"}.get(key, key)


def _fault_words(fault: Mapping[str, str]) -> str:
    words = f"{fault.get('target')} {fault.get('kind')}"
    return words + (f" {fault['key']}" if "key" in fault else "")

