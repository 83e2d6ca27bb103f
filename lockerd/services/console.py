"""The technician console: line sessions on a Unix socket and a serial port, token login,
commands from a registry its owners fill, every login, refusal and action evented and logged."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from hal.errors import HalError
from lockerd.core.console import (
    Args,
    Command,
    ConsoleError,
    IdleTimer,
    Level,
    LineEditor,
    Registry,
    Reply,
    fit,
    parse_args,
    split_line,
)
from lockerd.core.events import EventType
from lockerd.core.loginthrottle import ConnectionThrottle
from lockerd.logs import get_logger
from lockerd.services.console_auth import ConsoleAuth, Session
from lockerd.services.controller import RequestRefused
from lockerd.timeutil import format_time

log = get_logger("lockerd.console")

POLL_S = 0.2


class ConsoleService:
    """Runs sessions over the registry's commands; knows no command but help, login, logout.

    The owners of the other commands register them into `registry` (see lockerd/app.py)."""

    def __init__(
        self,
        *,
        registry: Registry[Session],
        auth: ConsoleAuth,
        locker_id: str,
        socket_path: Path,
        serial_url: str | None = None,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.registry = registry
        self._auth = auth
        self._locker_id = locker_id
        self.socket_path = socket_path
        self.serial_url = serial_url
        self._idle_s = idle_timeout_s
        N, V = Level.NONE, Level.VIEWER
        registry.register_command("help", self._help, "list the commands", level=N)
        registry.register_command("login", self._login_cmd, "log in with a technician token",
                                  level=N, usage="login TOKEN")
        registry.register_command("logout", self._logout_cmd, "log out", level=V)
        self.listening = asyncio.Event()
        self.sessions: set[Session] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- the console's own commands -----------------------------------------------------------

    async def _help(self, s: Session, a: Args) -> Reply:
        text = self.registry.help_lines()
        text.append("Add --json to any command for machine-readable output.")
        return Reply(text, {"commands": self.registry.help_data()})

    async def _login_cmd(self, s: Session, a: Args) -> Reply:
        return Reply(self._auth.login(s, a.words[0]).split("\r\n"))

    async def _logout_cmd(self, s: Session, a: Args) -> Reply:
        self._auth.logout(s, "requested")
        return Reply(["logged out"], {"logged_out": True})

    def clear_lockouts(self) -> None:
        """The console's part of `lockout clear`: every issuer and every connection."""
        self._auth.clear_lockouts()
        for session in self.sessions:
            session.throttle.clear()

    # -- sessions -----------------------------------------------------------------------------

    def prompt(self, s: Session) -> str:
        bank = self._locker_id
        return f"{bank} {s.tech.tech_id}({s.tech.role})> " if s.tech else f"{bank}> "

    async def _say(self, s: Session, lines: list[str]) -> None:
        await s.write("".join(f"{line}\r\n" for line in fit(lines)).encode("ascii", "replace"))

    async def handle_line(self, s: Session, line: str) -> None:
        """Run one complete line and write its answer (never raises for bad input)."""
        line = line.strip()
        if not line:
            return
        try:
            words = split_line(line)
        except ConsoleError as exc:
            await self._say(s, [str(exc)])
            return
        if s.tech is not None and words[0] != "login" and self._auth.expired(s.tech):
            # A session has the rights of its token only while the token is valid: checked
            # on every command by the trusted clock, not only at login.
            until = format_time(s.tech.expires_at)
            found = self.registry.find(words)
            await self._refuse(s, found[0].name if found else words[0][:32], "expired",
                               f"your token expired at {until}; log in again (login TOKEN)")
            self._auth.logout(s, "expired")
            return
        if words[0] == "login":
            # Before the option parsing and the level check: a token is one opaque word.
            if len(words) != 2:
                await self._say(s, ["usage: login TOKEN"])
                return
            await self._say(s, (await self._login_cmd(s, Args((words[1],)))).text)
            return
        found = self.registry.find(words)
        if found is None:
            await self._say(s, [f"unknown command {words[0][:32]!r}; type help"])
            return
        cmd, rest = found
        tech_id = s.tech_id
        if s.level < cmd.level:
            need = "log in first (login TOKEN)" if s.tech is None else "operator role needed"
            await self._refuse(s, cmd.name, "not_logged_in" if s.tech is None else "role", need)
            return
        ran = await self._run(s, cmd, rest)
        if ran is None:
            return
        args, reply = ran
        if cmd.is_action(args):
            log.info("console action", command=line[:200], tech_id=tech_id, ok=True)
            self._auth.event(EventType.CONSOLE_ACTION, {"tech_id": tech_id, "command": cmd.name,
                                                "args": list(args.words)[:8], "ok": True,
                                                "force": args.force, "result": reply.data})
        if args.json:
            # One JSON line for scripts: never cut to the terminal width.
            await s.write(json.dumps(reply.data, default=str).encode("ascii") + b"\r\n")
        else:
            await self._say(s, reply.text)

    async def _run(self, s: Session, cmd: Command[Session],
                   rest: list[str]) -> tuple[Args, Reply] | None:
        """Parse the options and run the handler; None once a refusal or error is written."""
        try:
            args = parse_args(rest)
            return args, await cmd.handler(s, args)
        except ConsoleError as exc:
            await self._say(s, [str(exc)])
        except PermissionError as exc:
            await self._refuse(s, cmd.name, "role", str(exc))
        except RequestRefused as exc:
            await self._refuse(s, cmd.name, "refused", str(exc))
        except HalError as exc:
            await self._refuse(s, cmd.name, "hardware", f"hardware error: {exc}")
        return None

    async def _refuse(self, s: Session, command: str, reason: str, message: str) -> None:
        tech_id = s.tech_id
        log.warning("console command refused", command=command, tech_id=tech_id, reason=reason)
        data: dict[str, object] = {"tech_id": tech_id, "command": command, "ok": False,
                                   "refused": True, "reason": reason}
        if tech_id is None:
            self._auth.refusal_event(EventType.CONSOLE_ACTION, data)
        else:
            self._auth.event(EventType.CONSOLE_ACTION, data)
        await self._say(s, [f"refused: {message}"])

    async def serve(self, channel: str, read: Callable[[], Awaitable[bytes | None]],
                    write: Callable[[bytes], Awaitable[None]]) -> None:
        """One session: `read` returns b"" when nothing came within a poll, None at EOF."""
        loop = asyncio.get_running_loop()
        s = Session(channel=channel, write=write, editor=LineEditor(),
                    throttle=ConnectionThrottle.new(self._auth.throttle),
                    idle=IdleTimer(timeout_s=self._idle_s, now=loop.time()))
        self.sessions.add(s)
        try:
            await write(f"lockerd console, bank {self._locker_id}. Type help.\r\n".encode())
            await write(self.prompt(s).encode())
            while True:
                data = await read()
                if data is None:
                    break
                now = loop.time()
                if not data:
                    if s.tech is not None and s.idle.expired(now):
                        self._auth.logout(s, "idle")
                        await write(b"\r\nidle timeout: logged out\r\n")
                        await write(self.prompt(s).encode())
                    continue
                s.idle.touch(now)
                edited = s.editor.feed(data)
                if edited.echo:
                    await write(edited.echo)
                for _ in range(edited.too_long):
                    await self._say(s, ["line too long: discarded"])
                for line in edited.lines:
                    await self.handle_line(s, line)
                if edited.lines or edited.too_long:
                    await write(self.prompt(s).encode())
        finally:
            self._auth.logout(s, "disconnect")
            self.sessions.discard(s)

    # -- transports ---------------------------------------------------------------------------

    async def _on_socket(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        async def read() -> bytes | None:
            try:
                # asyncio.timeout: wait_for (3.11) can swallow a cancellation racing the read.
                async with asyncio.timeout(POLL_S * 5):
                    data = await reader.read(4096)
            except TimeoutError:
                return b""
            except OSError:
                return None
            return data or None

        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        self._writers.add(writer)
        try:
            await self.serve("socket", read, write)
        except (ConnectionError, OSError) as exc:
            log.info("console connection lost", channel="socket", error=str(exc))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serial(self, url: str) -> None:
        import serial  # type: ignore[import-untyped]

        port = await asyncio.to_thread(serial.serial_for_url, url, baudrate=115200,
                                       timeout=POLL_S, write_timeout=2.0)
        lock = asyncio.Lock()

        async def read() -> bytes | None:
            data: bytes = await asyncio.to_thread(port.read, 1024)
            return data

        async def write(data: bytes) -> None:
            async with lock:
                await asyncio.to_thread(port.write, data)

        try:
            while True:
                # A serial line never ends: a session runs until the port fails.
                await self.serve(f"serial:{url}", read, write)
        finally:
            await asyncio.to_thread(port.close)

    async def run(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = await asyncio.start_unix_server(self._on_socket, path=str(self.socket_path))
        self.socket_path.chmod(0o600)
        log.info("console listening", socket=str(self.socket_path), serial=self.serial_url)
        try:
            async with server:
                self.listening.set()
                if self.serial_url:
                    await self._serial(self.serial_url)
                else:
                    await server.serve_forever()
        finally:
            self.listening.clear()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

