"""Help requests on the network side: their ids, their record, and the signed replies."""

from __future__ import annotations

import secrets
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from lockerd import jsonsafe
from lockerd.core.actions import HelpMark
from lockerd.core.events import EventType
from lockerd.core.help import REFERENCE_ALPHABET, REFERENCE_LENGTH
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.services.rejections import RejectionRecorder
from lockerd.services.sync import payload_bytes
from lockerd.store.db import Database
from lockerd.store.events import EventLog
from lockerd.trust.helpreply import peek_help_id, verify_reply

if TYPE_CHECKING:
    import aiomqtt

    from lockerd.services.cache import CodeCache
    from lockerd.services.link import MqttLink

log = get_logger("lockerd.help")

HELP_REQUESTS_META = "help_requests"
# A request is remembered this long past its time, so a reply to it is refused by name
# (already answered, too late) rather than as an unknown help_id.
FORGET_AFTER = timedelta(days=1)


def new_help_ids() -> tuple[str, str]:
    """A fresh help_id (uuid4) and the reference shown as H-XXXXXX."""
    reference = "".join(secrets.choice(REFERENCE_ALPHABET) for _ in range(REFERENCE_LENGTH))
    return str(uuid.uuid4()), reference


@dataclass(frozen=True, slots=True)
class HelpRequest:
    at: float  # wall-clock seconds since the epoch when it was recorded
    answered: bool


class HelpRequests:
    """The recent help requests of this bank (a setting, written in the transaction of the
    event that reports each change)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _read(self, conn: sqlite3.Connection) -> dict[str, object]:
        row = conn.execute("SELECT value FROM meta WHERE key = ?",
                           (HELP_REQUESTS_META,)).fetchone()
        try:
            raw = jsonsafe.loads(row[0]) if row is not None else {}
        except jsonsafe.JsonInputError:
            raw = {}
        return raw if isinstance(raw, dict) else {}

    def mark(self, conn: sqlite3.Connection, mark: HelpMark, at: datetime) -> None:
        known = self._read(conn)
        horizon = (at - FORGET_AFTER).timestamp()
        kept: dict[str, object] = {}
        for help_id, entry in known.items():
            when = entry.get("at") if isinstance(entry, dict) else None
            if isinstance(when, int | float) and when >= horizon:
                kept[help_id] = entry
        previous = known.get(mark.help_id)
        when = previous.get("at") if isinstance(previous, dict) else None
        kept[mark.help_id] = {"at": when if isinstance(when, int | float) else at.timestamp(),
                              "answered": mark.answered or (isinstance(previous, dict)
                                                            and previous.get("answered") is True)}
        self._db.set_meta(HELP_REQUESTS_META, kept, conn=conn)

    def get(self, help_id: str) -> HelpRequest | None:
        entry = self._read(self._db.conn).get(help_id)
        if not isinstance(entry, dict):
            return None
        at = entry.get("at")
        if not isinstance(at, int | float):
            return None
        return HelpRequest(at=float(at), answered=entry.get("answered") is True)


class HelpService:
    """Takes signed replies on `help/reply`. A reply that does not verify, or is not for a
    request of this bank still open, changes nothing on the display and is recorded as
    `help.reply_rejected` (rate-limited); an accepted one goes to the controller."""

    def __init__(
        self,
        *,
        link: MqttLink | None,
        topic: str,
        cache: CodeCache,
        requests: HelpRequests,
        events: EventLog,
        answer: Callable[[str, str, str], Awaitable[None]],
        locker_id: str,
        reply_valid_s: float,
        now: Callable[[], datetime],
        monotonic: Callable[[], float],
    ) -> None:
        self._cache = cache
        self._requests = requests
        self._answer = answer
        self._locker_id = locker_id
        self._valid_s = reply_valid_s
        self._now = now
        self._rejections = RejectionRecorder(
            per_minute=20, monotonic=monotonic,
            write=lambda type_, data: events.record(type=type_, at=now(), data=data))
        if link is not None:
            link.handle(topic, self._on_reply)

    async def _on_reply(self, message: aiomqtt.Message) -> None:
        raw = payload_bytes(message)
        if message.retain and not raw:
            return  # clearing a retained message is no reply
        await self.receive(raw)

    async def receive(self, raw: bytes) -> None:
        """Check one reply as it came off the wire, and act on it or refuse it."""
        keyring = self._cache.keyring
        if keyring is None:
            self._reject(peek_help_id(raw), "no_keyring", "no keyring is held yet")
            return
        now = self._now()
        try:
            reply = verify_reply(raw, commands_role=keyring.commands,
                                 other_roles=(keyring.root, keyring.codes, keyring.technicians,
                                              keyring.qr),
                                 locker_id=self._locker_id, now=now)
        except TrustError as exc:
            self._reject(peek_help_id(raw), exc.reason, str(exc))
            return
        request = self._requests.get(reply.help_id)
        if request is None:
            self._reject(reply.help_id, "unknown_help_id", "no help request of this bank "
                         "has this help_id")
            return
        if request.answered:
            self._reject(reply.help_id, "already_answered", "this help request was answered")
            return
        if now.timestamp() - request.at > self._valid_s:
            self._reject(reply.help_id, "too_late", f"the request is older than [help] "
                         f"reply_valid_s ({self._valid_s:g} s)")
            return
        log.info("help reply accepted", help_id=reply.help_id, outcome=reply.outcome)
        await self._answer(reply.help_id, reply.outcome, reply.message)

    def _reject(self, help_id: str | None, reason: str, detail: str) -> None:
        log.warning("help reply refused", reason=reason, detail=detail, help_id=help_id)
        data: dict[str, object] = {"reason": reason, "detail": detail}
        if help_id is not None:
            data["help_id"] = help_id
        self._rejections.record(EventType.HELP_REPLY_REJECTED, data)
