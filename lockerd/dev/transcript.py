"""The demo's transcript: what a person at the bank would notice, printed as lines as it happens."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import TextIO

from lockerd.app import App
from lockerd.store.events import StoredEvent
from sim.world import (
    DisplayChanged,
    DoorMoved,
    LockChanged,
    SimWorld,
    Subscription,
    WorldChange,
)

# Events that went as a person hoped, and those that say something went wrong or was refused.
_GOOD = frozenset({
    "pickup.opened", "pickup.completed", "deposit.opened", "deposit.confirmed",
    "session.started", "compartment.in_service", "help.answered", "code.extended",
    "hardware.recovered",
})
_BAD = frozenset({
    "code.rejected", "deposit.refused", "deposit.aborted", "pickup.incomplete", "door.jammed",
    "door.forced", "door.held_open", "compartment.out_of_service", "keypad.lockout", "tamper",
    "hardware.fault", "cache.rejected", "help.reply_rejected", "daemon.task_failed",
})

# SGR codes of each kind of line.
_COLOURS = {
    "display": "36", "door": "33", "good": "32", "bad": "31", "event": "0", "tour": "1;35",
    "backend": "34", "error": "31", "prompt": "1",
}


def use_colour(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Colour when `stream` is a terminal, NO_COLOR is unset or empty and TERM is not dumb."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


class Output:
    """The terminal the transcript writes to: colour when asked, a prompt kept below the lines
    printed while it waits, and nothing raised once the terminal is gone (a hangup)."""

    def __init__(self, stream: TextIO, *, colour: bool = False, prompt: str | None = None
                 ) -> None:
        self.stream = stream
        self.colour = colour
        self.prompt = prompt  # None: no prompt (input is not a terminal)
        self.waiting = False  # the prompt is on screen, the cursor after it
        self.gone = False

    def paint(self, text: str, kind: str) -> str:
        code = _COLOURS.get(kind, "0")
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code != "0" else text

    def line(self, text: str, kind: str = "") -> None:
        """One line; a prompt on screen is wiped first and shown again after it."""
        prefix = "\r\x1b[K" if self.waiting else ""
        suffix = self.paint(self.prompt, "prompt") if self.waiting and self.prompt else ""
        self._write(prefix + (self.paint(text, kind) if kind else text) + "\n" + suffix)

    def ask(self) -> None:
        """Show the prompt (when there is one): the next command is awaited."""
        if self.prompt is not None and not self.waiting:
            self.waiting = True
            self._write(self.paint(self.prompt, "prompt"))

    def answered(self) -> None:
        """The person pressed Enter: the cursor is at the start of a fresh line."""
        self.waiting = False

    def _write(self, text: str) -> None:
        if self.gone:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            # The terminal was closed (EIO, a broken pipe): the demo is being stopped.
            self.gone = True


def describe_event(event: StoredEvent, tokens: Mapping[str, str] | None = None) -> str:
    """`event #SEQ TYPE door N code ID token CTI (what) parcel P reason R`, the parts the
    event has. `tokens` maps the cti of the QR tokens scanned to what they are."""
    data = event.data
    parts = [f"event #{event.seq} {event.type}"]
    if event.compartment:
        parts.append(f"door {event.compartment}")
    if event.code_id:
        parts.append(f"code {event.code_id}")
    cti = data.get("cti")
    if isinstance(cti, str):
        known = (tokens or {}).get(cti)
        kind = data.get("kind")
        what = known or (f"{kind} token" if isinstance(kind, str) else None)
        parts.append(f"token {cti}" + (f" ({what})" if what else ""))
    parcel = data.get("parcel_id")
    if isinstance(parcel, str) and not parts[-1].endswith(f"for parcel {parcel})"):
        parts.append(f"parcel {parcel}")
    reason = data.get("reason")
    if isinstance(reason, str):
        parts.append(f"reason {reason}")
    return " ".join(parts)


def event_kind(event_type: str) -> str:
    """The colour of an event's line: good, bad or plain."""
    return "good" if event_type in _GOOD else "bad" if event_type in _BAD else "event"


class Printer:
    """Prints the display's changes, the doors' moves and the daemon's events as they come."""

    def __init__(self, app: App, out: Output) -> None:
        self.app = app
        self.out = out
        self.seen = app.events.last_seq()
        self.tokens: dict[str, str] = {}  # cti -> what the token is, for the event lines
        self.changes: asyncio.Queue[WorldChange] = asyncio.Queue()
        self._sources: list[Subscription] = []
        self._shown: tuple[str, ...] | None = None  # the display's last message

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

    def event(self, event: StoredEvent) -> None:
        self.out.line("  " + describe_event(event, self.tokens), event_kind(event.type))

    def _print(self, change: WorldChange) -> None:
        if isinstance(change, DisplayChanged):
            lines = tuple(change.message.lines)
            # The same message shown again (a key pressed in a lockout) is no change to see;
            # one masked line per digit typed adds nothing here.
            if lines != self._shown and not lines[0].startswith("Code: "):
                self.out.line("  [display] " + " | ".join(lines), "display")
            self._shown = lines
        elif isinstance(change, DoorMoved):
            self.out.line(f"  [door {change.compartment}] "
                          f"{'opened' if change.open else 'closed'}", "door")
        self.catch_up()

    def catch_up(self) -> None:
        """Print the events recorded since the last ones printed."""
        for event in self.app.events.since(self.seen):
            self.event(event)
            self.seen = event.seq

    async def settle(self) -> None:
        """Print the changes already made before going on (a few loop turns at most)."""
        for _ in range(50):
            if self.changes.empty() and all(s.queue.empty() for s in self._sources):
                break
            await asyncio.sleep(0)
        while not self.changes.empty():
            self._print(self.changes.get_nowait())
        self.catch_up()
