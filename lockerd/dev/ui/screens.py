"""The help screen (every key) and the small question of which key sticks."""

from __future__ import annotations

from typing import ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from lockerd.dev.ui.widgets import KEYPAD_KEYS

KEYPAD_HELP = [
    ("0-9 * #", "press that key on the bank's keypad (or click the keypad)"),
    ("Enter", "the keypad's # (outside the scanner field)"),
    ("Backspace", "the keypad's * (clears what was typed)"),
    ("← → ↑ ↓", "select a compartment (or click it)"),
]


def help_text(bindings: list[tuple[str, str]]) -> str:
    """The keys, one line each: the keypad's first, then each binding's."""
    rows = KEYPAD_HELP + bindings
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {what}" for k, what in rows)


class HelpScreen(ModalScreen[None]):
    """Every key of the main screen; any of Escape, ? or q closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "Close", show=True)]

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__(id="help")
        self.rows = bindings

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box") as box:
            box.border_title = "Keys"
            box.border_subtitle = "Escape closes"
            yield Static(help_text(self.rows), markup=False, id="help-text")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(None)


class StuckKeyScreen(ModalScreen[str | None]):
    """Asks which key of the keypad sticks; Escape asks nothing."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel", show=True)]

    def compose(self) -> ComposeResult:
        with Vertical(id="stuck-box") as box:
            box.border_title = "Stuck key"
            yield Static(f"Which key sticks? Press one of {' '.join(KEYPAD_KEYS)}.",
                         markup=False)

    def on_key(self, event: events.Key) -> None:
        if event.character is not None and event.character in KEYPAD_KEYS:
            event.stop()
            self.dismiss(event.character)

    def action_cancel(self) -> None:
        self.dismiss(None)
