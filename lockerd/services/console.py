"""The technician console: line sessions on a Unix socket and a serial port, token login,
commands from a registry, every login, refusal and action evented and logged."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hal.errors import HalError
from lockerd import __version__
from lockerd.config import ConsoleSection
from lockerd.core.access import may_hold_parcel
from lockerd.core.console import (
    Args,
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
from lockerd.core.loginthrottle import ConnectionThrottle, IssuerLockouts, ThrottleSettings
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.services.controller import OpenBudgetSpent, RequestRefused
from lockerd.services.rejections import RejectionRecorder
from lockerd.timeutil import format_time
from lockerd.trust.bundle import is_compartment_id
from lockerd.trust.dsse import Envelope
from lockerd.trust.technician import (
    Technician,
    parse_token,
    token_issuer,
    verify_technician_envelope,
)

if TYPE_CHECKING:
    from lockerd.app import App

log = get_logger("lockerd.console")

LOCKOUT_META = "console_lockout"
MAX_ECHO_S = 60
POLL_S = 0.2


def _short(issuer: str) -> str:
    """An issuer for an 80-column line: a keyid is 64 hex characters, its start is enough."""
    return issuer if len(issuer) <= 28 else issuer[:25] + "..."


def _no_override(per_hour: int) -> OpenBudgetSpent:
    # One line that fits the terminal; docs/console.md says how the backend overrides it.
    return OpenBudgetSpent(f"open budget spent ({per_hour} opens/hour); the console has no "
                           "override")


@dataclass(eq=False)
class Session:
    """One connection: its line editor, who is logged in, and how to write to it."""

    channel: str
    write: Callable[[bytes], Awaitable[None]]
    editor: LineEditor
    idle: IdleTimer
    throttle: ConnectionThrottle
    tech: Technician | None = None
    closed: bool = False

    @property
    def level(self) -> Level:
        return Level.of_role(self.tech.role if self.tech else None)


class ConsoleService:
    def __init__(
        self,
        *,
        app: App,
        socket_path: Path,
        serial_url: str | None = None,
        idle_timeout_s: float = 300.0,
        free_attempts: int = 5,
        base_s: float = 30.0,
        max_s: float = 3600.0,
        events_per_minute: int = 20,
    ) -> None:
        self._app = app
        self.socket_path = socket_path
        self.serial_url = serial_url
        self._idle_s = idle_timeout_s
        self._throttle = ThrottleSettings(free_attempts=free_attempts, base_s=base_s,
                                          max_s=max_s)
        self._issuers = IssuerLockouts.from_meta(self._throttle,
                                                 app.db.get_meta(LOCKOUT_META))
        self._rejections = RejectionRecorder(per_minute=events_per_minute,
                                             monotonic=app.clock.monotonic, write=self._event)
        self.registry: Registry[Session] = Registry()
        self._register()
        self.listening = asyncio.Event()
        self.sessions: set[Session] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- commands ---------------------------------------------------------------------------

    def _register(self) -> None:
        r, V, OP, N = self.registry, Level.VIEWER, Level.OPERATOR, Level.NONE
        r.register("help", self._help, "list the commands", level=N)
        r.register("login", self._login_cmd, "log in with a technician token", level=N,
                   usage="login TOKEN")
        r.register("logout", self._logout_cmd, "log out", level=V)
        r.register("status", self._status, "bank, versions, link, outbox, faults", level=V)
        r.register("doors", self._doors, "lock, door, parcel, service per door", level=V)
        r.register("open", self._open, "open a door", level=OP, usage="open ID [--force R]")
        r.register("pulse", self._pulse, "pulse-test a lock", level=OP,
                   usage="pulse ID [--force R]")
        r.register("selftest", self._selftest, "hardware check; with ID pulses it", level=V,
                   usage="selftest [ID]")
        r.register("bus scan", self._bus_scan, "which lock boards answer", level=V)
        r.register("sensors", self._sensors, "sensor readings, device health", level=V)
        r.register("keypad test", self._keypad_test, "echo keys for S seconds", level=V,
                   usage="keypad test [S]")
        r.register("scanner test", self._scanner_test, "echo scans for S seconds", level=V,
                   usage="scanner test [S]")
        r.register("codes", self._codes, "code cache version, count, expiry", level=V)
        r.register("net", self._net, "broker, last connect, last error", level=V)
        r.register("events", self._events, "the last N events", level=V, usage="events [N]")
        r.register("log", self._log, "the last N log entries", level=V, usage="log [N]")
        r.register("service", self._service, "take a door out of/into service", level=OP,
                   usage="service ID on|off REASON")
        r.register("lockout clear", self._lockout_clear, "clear keypad+console lockout",
                   level=OP)

    async def _help(self, s: Session, a: Args) -> Reply:
        cmds = [{"name": c.name, "usage": c.usage or c.name, "help": c.help,
                 "role": c.level.name.lower()} for c in self.registry]
        text = self.registry.help_lines()
        text.append("Add --json to any command for machine-readable output.")
        return Reply(text, {"commands": cmds})

    async def _login_cmd(self, s: Session, a: Args) -> Reply:
        raise AssertionError("login is handled before dispatch")  # pragma: no cover

    async def _logout_cmd(self, s: Session, a: Args) -> Reply:
        self._logout(s, "requested")
        return Reply(["logged out"], {"logged_out": True})

    async def _status(self, s: Session, a: Args) -> Reply:
        app = self._app
        t = await app.telemetry()
        faults = [f"{name}: {h['detail']}" for name, h in t["hardware"].items() if not h["ok"]]
        faults += [f"task down: {name}" for name in t["tasks_down"]]
        link = app.link.status if app.link else None
        data = {"locker_id": app.config.locker.id, "version": __version__,
                "uptime_s": t["uptime_s"], "codes_version": t["codes_version"],
                "keyring_version": t["keyring_version"],
                "link": None if link is None else ("connected" if link.connected else "down"),
                "outbox_depth": t["outbox_depth"], "faults": faults,
                "out_of_service": t["out_of_service"]}
        text = [f"bank {data['locker_id']}  lockerd {__version__}  up {t['uptime_s']:.0f} s",
                f"codes v{t['codes_version']}  keyring v{t['keyring_version']}",
                f"link: {data['link'] or 'not configured'}  outbox: {t['outbox_depth']} "
                "unacknowledged",
                f"out of service: {', '.join(t['out_of_service']) or 'none'}",
                f"faults: {'none' if not faults else len(faults)}"]
        text += [f"  {f}" for f in faults]
        return Reply(text, data)

    async def _doors(self, s: Session, a: Args) -> Reply:
        locks: dict[str, Any] = {}
        with contextlib.suppress(HalError, AttributeError, NotImplementedError):
            read = getattr(self._app.devices.lock, "read", None)
            if read is not None:
                locks = dict(await read())
        rows: dict[str, dict[str, Any]] = {}
        for cid, c in self._app.controller.compartments.items():
            lock = locks.get(cid)
            rows[cid] = {
                "lock": getattr(lock, "value", lock) if lock is not None else c.phase.value,
                "door": "open" if c.door_open else "closed",
                "occupied": c.occupied, "in_service": c.in_service,
                "service_reason": c.service_reason, "last_event": c.last_event,
                "size": c.size, "parcel_id": c.parcel_id}
        text = [f"{'ID':<6} {'SIZE':<5} {'LOCK':<10} {'DOOR':<7} {'PARCEL':<7} {'SERVICE':<22} "
                "LAST"]
        for cid, r in rows.items():
            parcel = {True: "yes", False: "no", None: "?"}[r["occupied"]]
            service = "in" if r["in_service"] else f"out: {r['service_reason']}"[:22]
            on_record = f"  (parcel {r['parcel_id']})" if r["parcel_id"] else ""
            text.append(f"{cid:<6} {r['size'] or '-':<5} {str(r['lock'])[:10]:<10} "
                        f"{r['door']:<7} {parcel:<7} {service:<22} {r['last_event']}"
                        f"{on_record}")
        return Reply(text, {"compartments": rows})

    def _compartment(self, a: Args, usage: str) -> str:
        cid = a.get(0)
        if cid is None or not is_compartment_id(cid):
            raise ConsoleError(f"usage: {usage}")
        if cid not in self._app.controller.compartments:
            raise ConsoleError(f"no compartment {cid!r}; see `doors`")
        return cid

    async def _open(self, s: Session, a: Args) -> Reply:
        cid = self._compartment(a, "open ID [--force REASON]")
        comp = self._app.controller.compartments[cid]
        if may_hold_parcel(comp.view()) and a.force is None:
            raise RequestRefused(f"compartment {cid} may hold a parcel; add --force REASON "
                                 "to open it anyway")
        assert s.tech is not None
        ref = {"tech_id": s.tech.tech_id}
        if a.force:
            ref["reason"] = a.force
        try:
            outcome = await self._app.controller.open_for(cid, kind="console", source="console",
                                                          ref=ref, budgeted=True)
        except OpenBudgetSpent as exc:
            raise _no_override(self._app.controller.open_budget.per_hour) from exc
        return Reply([f"compartment {cid}: {outcome}"], {"compartment": cid, "result": outcome})

    async def _pulse(self, s: Session, a: Args) -> Reply:
        cid = self._compartment(a, "pulse ID [--force REASON]")
        assert s.tech is not None
        try:
            outcome = await self._app.diagnostics.pulse_test(cid, tech_id=s.tech.tech_id,
                                                             force=a.force is not None)
        except OpenBudgetSpent as exc:
            raise _no_override(self._app.controller.open_budget.per_hour) from exc
        return Reply([f"compartment {cid}: {outcome}"], {"compartment": cid, "result": outcome})

    async def _selftest(self, s: Session, a: Args) -> Reply:
        if a.get(0) is not None:
            if s.level < Level.OPERATOR:
                raise PermissionError("selftest of a compartment pulses its lock: operator only")
            return await self._pulse(s, a)
        diag = self._app.diagnostics
        bus = await diag.bus_scan()
        health = await self._app.controller.health(self._app.device_map())
        ok = all(bus.values()) and all(bool(h["ok"]) for h in health.values())
        text = [f"selftest: {'PASS' if ok else 'FAIL'}"]
        text += [f"  {n:<12} {'ok' if h['ok'] else 'FAULT'}  {h['detail']}"
                 for n, h in health.items()]
        text += [f"  board {b:<6} {'answers' if up else 'NO ANSWER'}" for b, up in bus.items()]
        return Reply(text, {"ok": ok, "health": health, "bus": bus})

    async def _bus_scan(self, s: Session, a: Args) -> Reply:
        bus = await self._app.diagnostics.bus_scan()
        text = [f"{b:<8} {'answers' if up else 'NO ANSWER'}" for b, up in bus.items()]
        return Reply(text or ["no lock bus on this bank"], {"bus": bus})

    async def _sensors(self, s: Session, a: Args) -> Reply:
        data = await self._app.diagnostics.sensors()
        text = []
        for name, value in data.items():
            if name == "health":
                continue
            if isinstance(value, dict):
                text.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
            else:
                text.append(f"{name}: {value}")
        text += [f"health {n}: {'ok' if h['ok'] else 'FAULT'} {h['detail']}"
                 for n, h in data.get("health", {}).items()]
        return Reply(text, data)

    async def _echo(self, device: str, s: Session, a: Args) -> Reply:
        seconds = a.int_at(0, default=10, lo=1, hi=MAX_ECHO_S, what="seconds")
        await s.write(f"{device} test: listening for {seconds} s\r\n".encode())
        seen = await self._app.diagnostics.echo(device, seconds)
        text = [f"{e.device}: {e.value}" for e in seen] or [f"nothing from the {device}"]
        return Reply(text, {"device": device, "seconds": seconds,
                            "seen": [asdict(e) for e in seen]})

    async def _keypad_test(self, s: Session, a: Args) -> Reply:
        return await self._echo("keypad", s, a)

    async def _scanner_test(self, s: Session, a: Args) -> Reply:
        return await self._echo("scanner", s, a)

    async def _codes(self, s: Session, a: Args) -> Reply:
        codes = self._app.codes
        expires = codes.expires_at()
        data = {"version": codes.version(), "count": codes.count(),
                "expires_at": format_time(expires) if expires else None,
                "keyring_version": self._app.cache.keyring_version}
        text = [f"codes cache v{data['version']}: {data['count']} codes, expires "
                f"{data['expires_at'] or 'never (no bundle)'}",
                f"keyring v{data['keyring_version']}"]
        return Reply(text, data)

    async def _net(self, s: Session, a: Args) -> Reply:
        link = self._app.link
        if link is None:
            return Reply(["no [mqtt] section: this bank runs offline"], {"broker": None})
        st = link.status
        data = {"broker": st.broker, "connected": st.connected, "connects": st.connects,
                "last_connect": format_time(st.last_connect) if st.last_connect else None,
                "last_error": st.last_error,
                "last_error_at": format_time(st.last_error_at) if st.last_error_at else None}
        text = [f"broker {st.broker}: {'connected' if st.connected else 'NOT connected'}",
                f"connects: {st.connects}  last: {data['last_connect'] or 'never'}",
                f"last error: {st.last_error or 'none'}"
                + (f" at {data['last_error_at']}" if data["last_error_at"] else "")]
        return Reply(text, data)

    def _event_rows(self, n: int) -> Reply:
        events = self._app.events.recent(n)
        text = [f"{e.seq:>6} {e.at} {e.type} {e.compartment or ''} "
                + json.dumps(dict(e.data), separators=(",", ":")) for e in events]
        return Reply(text or ["no events"], {"events": [e.wire(self._app.config.locker.id)
                                                       for e in events]})

    async def _events(self, s: Session, a: Args) -> Reply:
        return self._event_rows(a.int_at(0, default=10, lo=1, hi=200, what="N"))

    async def _log(self, s: Session, a: Args) -> Reply:
        reply = self._event_rows(a.int_at(0, default=20, lo=1, hi=200, what="N"))
        note = "lockerd keeps no log buffer (logs go to the journal); recent events instead:"
        return Reply([note, *reply.text], {"note": note, **reply.data})

    async def _service(self, s: Session, a: Args) -> Reply:
        usage = "service ID on|off REASON"
        cid = self._compartment(a, usage)
        state = a.get(1)
        reason = " ".join(a.words[2:])
        if state not in ("on", "off") or not reason or len(reason) > 200:
            raise ConsoleError(f"usage: {usage} (a reason of at most 200 characters)")
        assert s.tech is not None
        changed = await self._app.controller.set_service(
            cid, state == "on", f"{reason} (console {s.tech.tech_id})")
        word = "in service" if state == "on" else "out of service"
        return Reply([f"compartment {cid}: {word}" + ("" if changed else " (unchanged)")],
                     {"compartment": cid, "in_service": state == "on", "changed": changed})

    async def _lockout_clear(self, s: Session, a: Args) -> Reply:
        self._app.controller.clear_lockout()
        self._issuers.clear()
        for session in self.sessions:
            session.throttle.clear()
        self._save_lockout()
        return Reply(["keypad and console lockouts cleared"], {"cleared": True})

    # -- events -----------------------------------------------------------------------------

    def _event(self, type_: str, data: dict[str, object]) -> None:
        try:
            self._app.controller.commit_event(type_, data)
        except Exception:  # an event store failure must not end a session
            log.exception("could not record console event", type=type_)

    def _refusal_event(self, type_: str, data: dict[str, object]) -> None:
        """Rejections are rate-limited: line noise or a brute force must not flood the log."""
        self._rejections.record(type_, data)

    def _save_lockout(self) -> None:
        self._app.db.set_meta(LOCKOUT_META, self._issuers.to_meta())

    # -- login --------------------------------------------------------------------------------

    def _login(self, s: Session, token: str) -> str:
        """Failures count per connection and per issuer: a line that is not even a token
        throttles only such lines on its connection, so it never keeps a valid token out."""
        wall = self._app.clock.wall()
        now = wall.timestamp()
        try:
            env = parse_token(token)
        except TrustError as exc:
            left = s.throttle.junk.remaining(now)
            if left > 0:
                return self._locked_out(s, "connection", left)
            started = s.throttle.junk.record_failure(now)
            return self._login_refused(s, exc, started=started, scope="connection")
        left = s.throttle.refused.remaining(now)
        if left > 0:
            return self._locked_out(s, "connection", left)
        keyring = self._app.cache.keyring
        try:
            tech = self._verify(env, wall)
        except TrustError as exc:
            issuer = ("key:unknown" if keyring is None
                      else token_issuer(env, technicians_role=keyring.technicians))
            left = self._issuers.remaining(issuer, now)
            if left > 0:
                return self._locked_out(s, "issuer", left, issuer=issuer)
            started = self._issuers.record_failure(issuer, now)
            self._save_lockout()
            started_here = s.throttle.refused.record_failure(now)
            return self._login_refused(s, exc, started=started or started_here,
                                       scope="issuer" if started else "connection",
                                       issuer=issuer)
        issuer = f"tech:{tech.tech_id}"
        left = self._issuers.remaining(issuer, now)
        if left > 0:
            return self._locked_out(s, "issuer", left, issuer=issuer)
        if s.tech is not None:
            self._logout(s, "relogin")
        s.tech = tech
        s.throttle.clear()
        if self._issuers.record_success(issuer):
            self._save_lockout()
        # A verified token is signed time, like a bundle's issued_at (safety rule 7).
        self._app.cache.observe_signed_time(tech.issued_at)
        log.info("console login", channel=s.channel, tech_id=tech.tech_id, role=tech.role)
        self._event("console.login", {"ok": True, "tech_id": tech.tech_id, "role": tech.role,
                                      "channel": s.channel})
        return (f"welcome {tech.name or tech.tech_id} ({tech.role}); token valid until "
                f"{format_time(tech.expires_at)}")

    def _locked_out(self, s: Session, scope: str, left: float, *,
                    issuer: str | None = None) -> str:
        log.warning("console login refused: locked out", channel=s.channel, scope=scope,
                    issuer=issuer, seconds=round(left))
        data: dict[str, object] = {"ok": False, "reason": "locked_out", "scope": scope,
                                   "channel": s.channel}
        if issuer is not None:
            data["issuer"] = issuer
        self._refusal_event("console.login", data)
        who = "this connection" if issuer is None else _short(issuer)
        return (f"login refused: too many failed logins from {who}; try again in "
                f"{left:.0f} s")

    def _login_refused(self, s: Session, exc: TrustError, *, started: float | None,
                       scope: str, issuer: str | None = None) -> str:
        log.warning("console login refused", channel=s.channel, reason=exc.reason,
                    issuer=issuer, error=str(exc))
        data: dict[str, object] = {"ok": False, "reason": exc.reason, "channel": s.channel}
        if issuer is not None:
            data["issuer"] = issuer
        self._refusal_event("console.login", data)
        msg = f"login refused ({exc.reason}): {exc}"
        if started and issuer is None:
            msg += (f"\r\nnon-tokens refused here for {started:.0f} s; a valid token is still "
                    "accepted")
        elif started:
            who = "this connection" if scope == "connection" else _short(issuer or "")
            msg += f"\r\nlogin locked for {started:.0f} s after repeated failures ({who})"
        return msg

    def _verify(self, env: Envelope, wall: Any) -> Technician:
        keyring = self._app.cache.keyring
        if keyring is None:
            raise TrustError("this bank holds no keyring yet: no token can be checked",
                             reason="no_keyring")
        return verify_technician_envelope(env, technicians_role=keyring.technicians,
                                          keyring_expires_at=keyring.expires_at,
                                          locker_id=self._app.config.locker.id, now=wall)

    def _expired(self, tech: Technician) -> bool:
        return self._app.clock.wall() >= tech.expires_at

    def _logout(self, s: Session, reason: str) -> None:
        if s.tech is None:
            return
        log.info("console logout", channel=s.channel, tech_id=s.tech.tech_id, reason=reason)
        self._event("console.logout", {"tech_id": s.tech.tech_id, "reason": reason,
                                       "channel": s.channel})
        s.tech = None

    # -- sessions -----------------------------------------------------------------------------

    def prompt(self, s: Session) -> str:
        bank = self._app.config.locker.id
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
        if s.tech is not None and words[0] != "login" and self._expired(s.tech):
            # A session has the rights of its token only while the token is valid: checked
            # on every command by the trusted clock, not only at login.
            until = format_time(s.tech.expires_at)
            found = self.registry.find(words)
            await self._refuse(s, found[0].name if found else words[0][:32], "expired",
                               f"your token expired at {until}; log in again (login TOKEN)")
            self._logout(s, "expired")
            return
        if words[0] == "login":
            if len(words) != 2:
                await self._say(s, ["usage: login TOKEN"])
                return
            await self._say(s, self._login(s, words[1]).split("\r\n"))
            return
        found = self.registry.find(words)
        if found is None:
            await self._say(s, [f"unknown command {words[0][:32]!r}; type help"])
            return
        cmd, rest = found
        tech_id = s.tech.tech_id if s.tech else None
        if s.level < cmd.level:
            need = "log in first (login TOKEN)" if s.tech is None else "operator role needed"
            await self._refuse(s, cmd.name, "not_logged_in" if s.tech is None else "role", need)
            return
        try:
            args = parse_args(rest)
            reply = await cmd.handler(s, args)
        except ConsoleError as exc:
            await self._say(s, [str(exc)])
            return
        except PermissionError as exc:
            await self._refuse(s, cmd.name, "role", str(exc))
            return
        except RequestRefused as exc:
            await self._refuse(s, cmd.name, "refused", str(exc))
            return
        except HalError as exc:
            await self._refuse(s, cmd.name, "hardware", f"hardware error: {exc}")
            return
        if cmd.level is Level.OPERATOR or (cmd.name == "selftest" and args.words):
            log.info("console action", command=line[:200], tech_id=tech_id, ok=True)
            self._event("console.action", {"tech_id": tech_id, "command": cmd.name,
                                           "args": list(args.words)[:8], "ok": True,
                                           "force": args.force, "result": reply.data})
        if args.json:
            # One JSON line for scripts: never cut to the terminal width.
            await s.write(json.dumps(reply.data, default=str).encode("ascii") + b"\r\n")
        else:
            await self._say(s, reply.text)

    async def _refuse(self, s: Session, command: str, reason: str, message: str) -> None:
        tech_id = s.tech.tech_id if s.tech else None
        log.warning("console command refused", command=command, tech_id=tech_id, reason=reason)
        data: dict[str, object] = {"tech_id": tech_id, "command": command, "ok": False,
                                   "refused": True, "reason": reason}
        if tech_id is None:
            self._refusal_event("console.action", data)
        else:
            self._event("console.action", data)
        await self._say(s, [f"refused: {message}"])

    async def serve(self, channel: str, read: Callable[[], Awaitable[bytes | None]],
                    write: Callable[[bytes], Awaitable[None]]) -> None:
        """One session: `read` returns b"" when nothing came within a poll, None at EOF."""
        loop = asyncio.get_running_loop()
        s = Session(channel=channel, write=write, editor=LineEditor(),
                    throttle=ConnectionThrottle.new(self._throttle),
                    idle=IdleTimer(timeout_s=self._idle_s, now=loop.time()))
        self.sessions.add(s)
        try:
            await write(f"lockerd console, bank {self._app.config.locker.id}. Type help.\r\n"
                        .encode())
            await write(self.prompt(s).encode())
            while True:
                data = await read()
                if data is None:
                    break
                now = loop.time()
                if not data:
                    if s.tech is not None and s.idle.expired(now):
                        self._logout(s, "idle")
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
            self._logout(s, "disconnect")
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


def console_service(app: App, *, socket_path: Path, serial_url: str | None,
                    section: ConsoleSection | None = None) -> ConsoleService:
    """The console as configured; `section` gives the idle timeout and login throttle."""
    extra: dict[str, Any] = {}
    if section is not None:
        extra = {"idle_timeout_s": section.idle_timeout_s,
                 "free_attempts": section.free_attempts, "base_s": section.base_s,
                 "max_s": section.max_s}
    return ConsoleService(app=app, socket_path=socket_path, serial_url=serial_url, **extra)
