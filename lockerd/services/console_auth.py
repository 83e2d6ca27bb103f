"""Who is at the console: sessions, token login with its throttle, logout, and their events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from lockerd.core.console import IdleTimer, Level, LineEditor
from lockerd.core.events import EventType
from lockerd.core.loginthrottle import ConnectionThrottle, IssuerLockouts, ThrottleSettings
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.services.cache import CodeCache
from lockerd.services.clock import Clock
from lockerd.services.rejections import RejectionRecorder
from lockerd.store.db import Database
from lockerd.timeutil import format_time
from lockerd.trust.dsse import Envelope
from lockerd.trust.technician import (
    Technician,
    parse_token,
    token_issuer,
    verify_technician_envelope,
)

log = get_logger("lockerd.console")

LOCKOUT_META = "console_lockout"


def _short(issuer: str) -> str:
    """An issuer for an 80-column line: a keyid is 64 hex characters, its start is enough."""
    return issuer if len(issuer) <= 28 else issuer[:25] + "..."


@dataclass(eq=False)
class Session:
    """One connection: its line editor, who is logged in, and how to write to it."""

    channel: str
    write: Callable[[bytes], Awaitable[None]]
    editor: LineEditor
    idle: IdleTimer
    throttle: ConnectionThrottle
    tech: Technician | None = None

    @property
    def level(self) -> Level:
        return Level.of_role(self.tech.role if self.tech else None)

    @property
    def tech_id(self) -> str | None:
        return self.tech.tech_id if self.tech else None


class ConsoleAuth:
    """Technician tokens checked offline against the held keyring, by the trusted clock.

    Every login, refusal and logout is logged and evented through `record`; refusals that can
    come from line noise are rate-limited."""

    def __init__(
        self,
        *,
        locker_id: str,
        db: Database,
        cache: CodeCache,
        clock: Clock,
        record: Callable[[str, dict[str, object]], object],
        throttle: ThrottleSettings,
        events_per_minute: int = 20,
    ) -> None:
        self._locker_id = locker_id
        self._db = db
        self._cache = cache
        self._clock = clock
        self._record = record
        self.throttle = throttle
        self._issuers = IssuerLockouts.from_meta(throttle, db.get_meta(LOCKOUT_META))
        self._rejections = RejectionRecorder(per_minute=events_per_minute,
                                             monotonic=clock.monotonic, write=self.event)

    # -- events -----------------------------------------------------------------------------

    def event(self, type_: str, data: dict[str, object]) -> None:
        try:
            self._record(type_, data)
        except Exception:  # an event store failure must not end a session
            log.exception("could not record console event", type=type_)

    def refusal_event(self, type_: str, data: dict[str, object]) -> None:
        """Rejections are rate-limited: line noise or a brute force must not flood the log."""
        self._rejections.record(type_, data)

    def _save_lockout(self) -> None:
        self._db.set_meta(LOCKOUT_META, self._issuers.to_meta())

    def clear_lockouts(self) -> None:
        """Every issuer's login lockout ends (an operator's `lockout clear`)."""
        self._issuers.clear()
        self._save_lockout()

    # -- login --------------------------------------------------------------------------------

    def login(self, s: Session, token: str) -> str:
        """Failures count per connection and per issuer: a line that is not even a token
        throttles only such lines on its connection, so it never keeps a valid token out."""
        wall = self._clock.wall()
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
        keyring = self._cache.keyring
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
            self.logout(s, "relogin")
        s.tech = tech
        s.throttle.clear()
        if self._issuers.record_success(issuer):
            self._save_lockout()
        # A verified token is signed time, like a bundle's issued_at (safety rule 7).
        self._cache.observe_signed_time(tech.issued_at)
        log.info("console login", channel=s.channel, tech_id=tech.tech_id, role=tech.role)
        self.event(EventType.CONSOLE_LOGIN, {"ok": True, "tech_id": tech.tech_id, "role": tech.role,
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
        self.refusal_event(EventType.CONSOLE_LOGIN, data)
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
        self.refusal_event(EventType.CONSOLE_LOGIN, data)
        msg = f"login refused ({exc.reason}): {exc}"
        if started and issuer is None:
            msg += (f"\r\nnon-tokens refused here for {started:.0f} s; a valid token is still "
                    "accepted")
        elif started:
            who = "this connection" if scope == "connection" else _short(issuer or "")
            msg += f"\r\nlogin locked for {started:.0f} s after repeated failures ({who})"
        return msg

    def _verify(self, env: Envelope, wall: datetime) -> Technician:
        keyring = self._cache.keyring
        if keyring is None:
            raise TrustError("this bank holds no keyring yet: no token can be checked",
                             reason="no_keyring")
        return verify_technician_envelope(env, technicians_role=keyring.technicians,
                                          keyring_expires_at=keyring.expires_at,
                                          locker_id=self._locker_id, now=wall)

    def expired(self, tech: Technician) -> bool:
        return self._clock.wall() >= tech.expires_at

    def logout(self, s: Session, reason: str) -> None:
        if s.tech is None:
            return
        log.info("console logout", channel=s.channel, tech_id=s.tech.tech_id, reason=reason)
        self.event(EventType.CONSOLE_LOGOUT, {"tech_id": s.tech.tech_id, "reason": reason,
                                      "channel": s.channel})
        s.tech = None
