"""What a terminal shows: the rows of a screen that a full-screen program's output is fed to."""

from __future__ import annotations

import codecs
import re

from rich.cells import cell_len

# A control sequence (CSI), an operating-system command (OSC, ended by BEL or ST), or another
# two-byte escape; an unfinished one at the end of a chunk waits for the next chunk.
_ESCAPE = re.compile(r"\x1b(?:\[([0-9;?<>=$]*)([A-Za-z~])|\][^\x07\x1b]*(?:\x07|\x1b\\)|[^\[\]])")
_UNFINISHED = re.compile(r"\x1b(?:\[[0-9;?<>=$]*|\][^\x07\x1b]*\x1b?)?\Z")


class Screen:
    """A screen of `rows` x `columns` cells. It follows what a Textual app writes: cursor
    positioning, text, carriage return and line feed; colours and modes change no cell.

    A redraw may rewrite only the cells that changed since the last frame, so a text on the
    screen need not be anywhere in the output as one run of characters: look for it here."""

    def __init__(self, rows: int, columns: int) -> None:
        self.columns = columns
        self._cells = [[" "] * columns for _ in range(rows)]
        self._row = 0
        self._col = 0
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        text = self._pending + self._decoder.decode(data)
        unfinished = _UNFINISHED.search(text)
        cut = unfinished.start() if unfinished else len(text)
        text, self._pending = text[:cut], text[cut:]
        at = 0
        for m in _ESCAPE.finditer(text):
            self._write(text[at:m.start()])
            if m.group(2) in ("H", "f"):
                row, _, col = (m.group(1) or "").partition(";")
                self._row = max(int(row or 1), 1) - 1
                self._col = max(int(col or 1), 1) - 1
            at = m.end()
        self._write(text[at:])

    def _write(self, text: str) -> None:
        for ch in text:
            if ch == "\r":
                self._col = 0
            elif ch == "\n":
                self._row += 1
            elif ch >= " " and 0 <= self._row < len(self._cells):
                width = cell_len(ch)
                if width and self._col < self.columns:
                    self._cells[self._row][self._col] = ch
                    for pad in range(self._col + 1, min(self._col + width, self.columns)):
                        self._cells[self._row][pad] = ""  # the right half of a wide character
                self._col += width

    def lines(self) -> list[str]:
        return ["".join(row) for row in self._cells]

    def text(self) -> str:
        """The rows that show something, for a failure message."""
        return "\n".join(line.rstrip() for line in self.lines() if line.strip())

    def shows(self, text: str) -> bool:
        return any(text in line for line in self.lines())
