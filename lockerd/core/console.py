"""Technician console core: line editing, the command registry, argument parsing, idle timer.

Pure and synchronous: no I/O, the time is passed in. The service feeds it raw bytes.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

MAX_LINE = 256
# A login token (a signed envelope in base64url) is longer than any command: only a line that
# starts with "login " may grow to this length.
MAX_LOGIN_LINE = 4096
BACKSPACES = (0x08, 0x7F)


class ConsoleError(Exception):
    """A console line cannot be run: the message is shown to the technician as is."""


class Level(enum.IntEnum):
    """Who may run a command: anybody, a logged-in viewer, or an operator."""

    NONE = 0
    VIEWER = 1
    OPERATOR = 2

    @classmethod
    def of_role(cls, role: str | None) -> Level:
        return {"viewer": cls.VIEWER, "operator": cls.OPERATOR}.get(role or "", cls.NONE)


@dataclass
class Edited:
    """What one chunk of input produced: bytes to echo, complete lines, discarded lines."""

    echo: bytes = b""
    lines: list[str] = field(default_factory=list)
    too_long: int = 0


class LineEditor:
    """Printable ASCII goes into the line, backspace/DEL removes the last character, CR or LF
    ends it. Every other byte (controls, escape sequences, binary) is dropped. A line past its
    limit is thrown away up to its end, and counted."""

    def __init__(self, *, max_line: int = MAX_LINE, max_login_line: int = MAX_LOGIN_LINE) -> None:
        self._max = max_line
        self._max_login = max_login_line
        self._buf = bytearray()
        self._discarding = False
        self._last_cr = False
        self._esc = 0  # 1 after ESC, 2 inside a CSI sequence (arrow keys and the like)

    def _limit(self) -> int:
        return self._max_login if self._buf.startswith(b"login ") else self._max

    def feed(self, data: bytes) -> Edited:
        out = Edited()
        echo = bytearray()
        for b in data:
            was_cr, self._last_cr = self._last_cr, b == 0x0D
            if self._in_escape(b):
                continue
            if b == 0x1B:
                self._esc = 1
            elif b in (0x0D, 0x0A):
                if b == 0x0A and was_cr:
                    continue  # the LF of a CRLF
                echo += b"\r\n"
                self._end_line(out)
            elif self._discarding:
                continue
            elif b in BACKSPACES:
                if self._buf:
                    self._buf.pop()
                    echo += b"\b \b"
            elif 0x20 <= b < 0x7F:
                if len(self._buf) >= self._limit():
                    self._discarding = True
                    self._buf.clear()
                    continue
                self._buf.append(b)
                echo.append(b)
        out.echo = bytes(echo)
        return out

    def _in_escape(self, b: int) -> bool:
        """Whether `b` is part of an escape sequence, and so dropped; a CR or LF ends a CSI
        sequence and is still a line end."""
        if self._esc == 1:
            self._esc = 2 if b == 0x5B else 0
            return True
        if self._esc == 2:
            if 0x40 <= b <= 0x7E or b in (0x0D, 0x0A):
                self._esc = 0
            return b not in (0x0D, 0x0A)
        return False

    def _end_line(self, out: Edited) -> None:
        if self._discarding:
            out.too_long += 1
            self._discarding = False
        else:
            out.lines.append(self._buf.decode("ascii"))
        self._buf.clear()


@dataclass(frozen=True, slots=True)
class Args:
    """A parsed command line: positional words, `--json`, and `--force REASON`."""

    words: tuple[str, ...]
    json: bool = False
    force: str | None = None

    def get(self, i: int) -> str | None:
        return self.words[i] if i < len(self.words) else None

    def int_at(self, i: int, *, default: int, lo: int, hi: int, what: str) -> int:
        word = self.get(i)
        if word is None:
            return default
        try:
            n = int(word)
        except ValueError:
            raise ConsoleError(f"{what} must be a whole number, got {word!r}") from None
        if not lo <= n <= hi:
            raise ConsoleError(f"{what} must be from {lo} to {hi}")
        return n


def split_line(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise ConsoleError(f"cannot read that line: {exc}") from None


def parse_args(words: list[str]) -> Args:
    rest: list[str] = []
    as_json = False
    force: str | None = None
    it = iter(words)
    for word in it:
        if word == "--json":
            as_json = True
        elif word == "--force":
            reason = next(it, None)
            if not reason or reason.startswith("--"):
                raise ConsoleError("--force needs a reason, e.g. --force \"parcel stuck\"")
            force = reason
        elif word.startswith("--"):
            raise ConsoleError(f"unknown option {word}")
        else:
            rest.append(word)
    return Args(tuple(rest), json=as_json, force=force)


@dataclass(frozen=True, slots=True)
class Reply:
    """A command's answer: lines for a person, data for `--json`."""

    text: list[str]
    data: dict[str, Any] = field(default_factory=dict)


class Caller(Protocol):
    """What a command handler sees of the session that runs it."""

    @property
    def tech_id(self) -> str | None: ...

    @property
    def level(self) -> Level: ...

    @property
    def write(self) -> Callable[[bytes], Awaitable[None]]: ...


C = TypeVar("C")
Handler = Callable[[C, Args], Awaitable[Reply]]
# Which runs of a command are console actions (evented and logged); by default operator ones.
Audited = Callable[[Args], bool]


@dataclass(frozen=True, slots=True)
class Command(Generic[C]):
    name: str
    handler: Handler[C]
    help: str
    level: Level
    usage: str = ""
    audited: Audited | None = None

    def is_action(self, args: Args) -> bool:
        """A run that changes something a technician answers for: evented and logged."""
        if self.audited is not None:
            return self.audited(args)
        return self.level is Level.OPERATOR


class Registry(Generic[C]):
    """Console commands by name (Klipper's register_command); names may be two words. Each
    owner registers its own commands; the help is generated from what is registered."""

    def __init__(self) -> None:
        self._commands: dict[str, Command[C]] = {}

    def register_command(self, name: str, handler: Handler[C], desc: str, *, level: Level,
                         usage: str = "", audited: Audited | None = None) -> None:
        if name in self._commands:
            raise ValueError(f"console command {name!r} registered twice")
        if len(desc) > 50:
            raise ValueError(f"help for {name!r} is over 50 characters")
        self._commands[name] = Command(name, handler, desc, level, usage, audited)

    def __iter__(self) -> Iterator[Command[C]]:
        return iter(sorted(self._commands.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted(self._commands)

    def find(self, words: list[str]) -> tuple[Command[C], list[str]] | None:
        """The command named by the first two words or the first one, and the rest."""
        if len(words) >= 2 and (cmd := self._commands.get(f"{words[0]} {words[1]}")):
            return cmd, words[2:]
        if words and (cmd := self._commands.get(words[0])):
            return cmd, words[1:]
        return None

    def help_lines(self) -> list[str]:
        width = max((len(c.usage or c.name) for c in self), default=0)
        out = []
        for c in self:
            tag = {Level.NONE: "", Level.VIEWER: "", Level.OPERATOR: " [operator]"}[c.level]
            out.append(f"{(c.usage or c.name):<{width}}  {c.help}{tag}")
        return out

    def help_data(self) -> list[dict[str, str]]:
        """The commands for `help --json`."""
        return [{"name": c.name, "usage": c.usage or c.name, "help": c.help,
                 "role": c.level.name.lower()} for c in self]


class IdleTimer:
    def __init__(self, *, timeout_s: float, now: float) -> None:
        self._timeout = timeout_s
        self._last = now

    def touch(self, now: float) -> None:
        self._last = now

    def expired(self, now: float) -> bool:
        return now - self._last >= self._timeout


def fit(lines: list[str], width: int = 80) -> list[str]:
    """Cut lines to the terminal width, marking the cut."""
    return [line if len(line) < width else line[: width - 2] + "~" for line in lines]
