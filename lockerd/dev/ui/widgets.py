"""The pieces of the main screen: compartments, the customer display, the keypad, events."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid
from textual.markup import escape
from textual.message import Message
from textual.widgets import Button, Static

from lockerd.dev.ui.model import Cell, display_lines

KEYPAD_KEYS = "123456789*0#"


def cell_text(cell: Cell) -> str:
    """A compartment's lines: id and size, door, latch, parcel, service, a stuck sensor."""
    door = "[b]OPEN[/b]" if cell.door_open else "closed"
    sensor = f"\n[i]sensor stuck {cell.sensor_stuck}[/i]" if cell.sensor_stuck else ""
    latch = "[b]JAMMED[/b]" if cell.jammed else ("latched" if cell.locked else "released")
    parcel = "[b]parcel[/b]" if cell.occupied else "empty"
    service = "in service" if cell.in_service else "[b]OUT of service[/b]"
    return (f"[b]{escape(cell.id)}[/b]  size {escape(cell.size or '-')}\n"
            f"door  {door}\nlock  {latch}\n{parcel}\n{service}{sensor}")


class CompartmentCell(Static):
    """One compartment; a click selects it."""

    class Selected(Message):
        def __init__(self, cid: str) -> None:
            self.cid = cid
            super().__init__()

    def __init__(self, cid: str) -> None:
        super().__init__(id=f"cell-{cid}", classes="cell", markup=True)
        self.cid = cid
        self._shown: tuple[Cell, bool, bool] | None = None

    def show(self, cell: Cell, *, selected: bool, latest: bool) -> None:
        shown = (cell, selected, latest)
        if shown == self._shown:
            return  # unchanged: no redraw (a key typed changes the display, not the cells)
        self._shown = shown
        self.update(cell_text(cell), layout=False)  # a cell's size is fixed
        self.set_class(cell.door_open, "open")
        self.set_class(cell.jammed, "jammed")
        self.set_class(not cell.in_service, "out")
        self.set_class(selected, "selected")
        self.set_class(latest, "latest")

    def on_click(self) -> None:
        self.post_message(self.Selected(self.cid))


class BankGrid(Grid):
    """The compartments in rows of four, in the configured order."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(id="bank")
        self.ids = ids
        self.border_title = "Bank"

    def compose(self) -> ComposeResult:
        for cid in self.ids:
            yield CompartmentCell(cid)


class DisplayPanel(Static):
    """The customer display: exactly its 4 rows of 20 characters."""

    def __init__(self) -> None:
        super().__init__(id="display", markup=False)
        self.border_title = "Display"
        self.show("")

    def show(self, text: str) -> None:
        self.update("\n".join(display_lines(text)), layout=False)  # always 4 x 20


def _key_id(key: str) -> str:
    return "key-" + {"*": "star", "#": "hash"}.get(key, key)


class Keypad(Grid):
    """The 12 keys; a click presses one. The buttons take no focus: typing stays with the
    main screen."""

    class Pressed(Message):
        def __init__(self, key: str) -> None:
            self.key = key
            super().__init__()

    def __init__(self) -> None:
        super().__init__(id="keypad")
        self.border_title = "Keypad"

    def compose(self) -> ComposeResult:
        for key in KEYPAD_KEYS:
            button = Button(key, id=_key_id(key), classes="key", compact=True)
            button.can_focus = False
            # A Button ignores clicks during its 0.2 s press effect: "11" clicked quickly
            # would be one 1. Every click of a keypad key is a key press.
            button.active_effect_duration = 0
            yield button

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Pressed(str(event.button.label)))
