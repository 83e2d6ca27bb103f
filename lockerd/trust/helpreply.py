"""Replies to help requests (PROTOCOL section 12): parse, verify and build a signed reply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import msgspec

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.dsse import (
    HELP_REPLY_PAYLOAD_TYPE,
    RoleKeys,
    count_valid_signers,
    parse_envelope,
    verify_role,
)

OUTCOMES = ("resent", "not_found", "support")
MAX_MESSAGE = 80
MAX_HELP_ID = 64


class _ReplyWire(msgspec.Struct, kw_only=True):
    type: str
    locker_id: str
    help_id: str
    issued_at: str
    expires_at: str
    outcome: str
    message: str


@dataclass(frozen=True, slots=True)
class HelpReply:
    locker_id: str
    help_id: str
    issued_at: datetime
    expires_at: datetime
    outcome: str
    message: str


def _malformed(message: str) -> TrustError:
    return TrustError(f"malformed help reply: {message}", reason="malformed")


def is_message(text: str) -> bool:
    """1-80 printable characters: what a customer display may be asked to show."""
    return 0 < len(text) <= MAX_MESSAGE and text.isprintable()


def parse_reply_payload(payload: bytes) -> HelpReply:
    try:
        wire = jsonsafe.decode(payload, type=_ReplyWire)
    except jsonsafe.JsonInputError as exc:
        raise _malformed(str(exc)) from exc
    if wire.type != "help_reply":
        raise _malformed(f"type is {wire.type!r}, expected 'help_reply'")
    if not 0 < len(wire.help_id) <= MAX_HELP_ID:
        raise _malformed(f"help_id must be 1-{MAX_HELP_ID} characters")
    if wire.outcome not in OUTCOMES:
        raise _malformed(f"outcome {wire.outcome!r} is not one of {', '.join(OUTCOMES)}")
    if not is_message(wire.message):
        raise _malformed(f"message must be 1-{MAX_MESSAGE} printable characters")
    try:
        issued, expires = parse_time(wire.issued_at), parse_time(wire.expires_at)
    except ValueError as exc:
        raise _malformed(str(exc)) from exc
    return HelpReply(locker_id=wire.locker_id, help_id=wire.help_id, issued_at=issued,
                     expires_at=expires, outcome=wire.outcome, message=wire.message)


def peek_help_id(raw: bytes) -> str | None:
    """The help_id of a reply that may not verify, only to name it in the refusal."""
    try:
        body = jsonsafe.loads(parse_envelope(raw).payload)
    except (TrustError, jsonsafe.JsonInputError):
        return None
    help_id = body.get("help_id") if isinstance(body, dict) else None
    return help_id if isinstance(help_id, str) and 0 < len(help_id) <= MAX_HELP_ID else None


def verify_reply(raw_envelope: bytes, *, commands_role: RoleKeys,
                 other_roles: Iterable[RoleKeys], locker_id: str, now: datetime) -> HelpReply:
    """Reasons: malformed, payload_type, unsigned, wrong_role (signed only by keys of another
    role), signature, wrong_locker, expired."""
    env = parse_envelope(raw_envelope)
    if not env.signatures:
        raise TrustError("help reply is not signed", reason="unsigned")
    try:
        payload = verify_role(env, expected_type=HELP_REPLY_PAYLOAD_TYPE, role=commands_role)
    except TrustError as exc:
        if exc.reason == "signature" and any(count_valid_signers(env, role.keys)
                                             for role in other_roles):
            raise TrustError("help reply is signed by a key of another role, not commands",
                             reason="wrong_role") from exc
        raise
    reply = parse_reply_payload(payload)
    if reply.locker_id != locker_id:
        raise TrustError(f"help reply is for locker {reply.locker_id!r}, this is {locker_id!r}",
                         reason="wrong_locker")
    if now >= reply.expires_at:
        raise TrustError(f"help reply expired at {format_time(reply.expires_at)}",
                         reason="expired")
    return reply


def build_reply_payload(*, locker_id: str, help_id: str, issued_at: datetime,
                        expires_at: datetime, outcome: str, message: str) -> bytes:
    payload = msgspec.json.encode({
        "type": "help_reply", "locker_id": locker_id, "help_id": help_id,
        "issued_at": format_time(issued_at), "expires_at": format_time(expires_at),
        "outcome": outcome, "message": message})
    parse_reply_payload(payload)
    return payload
