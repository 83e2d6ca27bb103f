"""Remote commands (PROTOCOL section 7): parse, verify and check a signed command."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import msgspec

from lockerd import jsonsafe
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.bundle import is_compartment_id
from lockerd.trust.dsse import (
    COMMAND_PAYLOAD_TYPE,
    RoleKeys,
    count_valid_signers,
    parse_envelope,
    verify_role,
)

ACTIONS = ("open", "set_service", "selftest", "resync", "clear_lockout")
MAX_CMD_ID = 128
MAX_REASON = 200


class _CommandWire(msgspec.Struct, kw_only=True):
    type: str
    cmd_id: str
    locker_id: str
    issued_at: str
    expires_at: str
    action: str
    args: dict[str, Any] = {}
    # Asks to open past the open budget (PROTOCOL section 7); honoured only with more
    # distinct commands signatures than the role's threshold.
    override: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    cmd_id: str
    locker_id: str
    issued_at: datetime
    expires_at: datetime
    action: str
    args: Mapping[str, Any] = field(default_factory=dict)
    override: bool = False
    signers: frozenset[str] = frozenset()  # the commands keyids whose signature verified

    @property
    def compartment(self) -> str | None:
        value = self.args.get("compartment")
        return value if isinstance(value, str) else None

    @property
    def reason(self) -> str:
        value = self.args.get("reason", "")
        return value if isinstance(value, str) else ""


def _malformed(message: str) -> TrustError:
    return TrustError(f"malformed command: {message}", reason="malformed")


def parse_command_payload(payload: bytes) -> Command:
    try:
        wire = jsonsafe.decode(payload, type=_CommandWire)
    except jsonsafe.JsonInputError as exc:
        raise _malformed(str(exc)) from exc
    if wire.type != "command":
        raise _malformed(f"type is {wire.type!r}, expected 'command'")
    if not wire.cmd_id or len(wire.cmd_id) > MAX_CMD_ID:
        raise _malformed(f"cmd_id must be 1-{MAX_CMD_ID} characters")
    try:
        issued, expires = parse_time(wire.issued_at), parse_time(wire.expires_at)
    except ValueError as exc:
        raise _malformed(str(exc)) from exc
    if wire.action not in ACTIONS:
        raise TrustError(f"unknown action {wire.action!r}; known: {', '.join(ACTIONS)}",
                         reason="unknown_action")
    _check_args(wire.action, wire.args)
    return Command(cmd_id=wire.cmd_id, locker_id=wire.locker_id, issued_at=issued,
                   expires_at=expires, action=wire.action, args=dict(wire.args),
                   override=wire.override)


def _check_args(action: str, args: Mapping[str, Any]) -> None:
    compartment = args.get("compartment")
    needs = action in ("open", "set_service") or (action == "selftest" and compartment is not None)
    if needs and not (isinstance(compartment, str) and is_compartment_id(compartment)):
        raise _malformed(f"{action}: args.compartment must be a compartment id")
    if action == "set_service" and not isinstance(args.get("in_service"), bool):
        raise _malformed("set_service: args.in_service must be true or false")
    reason = args.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise _malformed(f"args.reason must be text of at most {MAX_REASON} characters")


def peek_cmd_id(raw: bytes) -> str | None:
    """The cmd_id of a command that may not verify, only to address the refusal to it."""
    try:
        body = jsonsafe.loads(parse_envelope(raw).payload)
    except (TrustError, jsonsafe.JsonInputError):
        return None
    cmd_id = body.get("cmd_id") if isinstance(body, dict) else None
    return cmd_id if isinstance(cmd_id, str) and 0 < len(cmd_id) <= MAX_CMD_ID else None


def verify_command(
    raw_envelope: bytes,
    *,
    commands_role: RoleKeys,
    keyring_expires_at: datetime,
    locker_id: str,
    now: datetime,
) -> Command:
    """Reasons: malformed, payload_type, signature, keyring_expired, unknown_action,
    wrong_locker, expired. The command names the commands keys that signed it."""
    env = parse_envelope(raw_envelope)
    payload = verify_role(env, expected_type=COMMAND_PAYLOAD_TYPE, role=commands_role)
    if now >= keyring_expires_at:
        raise TrustError("the keyring has expired: no command is accepted until a fresh "
                         "keyring arrives", reason="keyring_expired")
    cmd = parse_command_payload(payload)
    if cmd.locker_id != locker_id:
        raise TrustError(f"command is for locker {cmd.locker_id!r}, this is {locker_id!r}",
                         reason="wrong_locker")
    if now >= cmd.expires_at:
        raise TrustError(f"command expired at {format_time(cmd.expires_at)}", reason="expired")
    return replace(cmd, signers=count_valid_signers(env, commands_role.keys))


def override_authorised(cmd: Command, commands_role: RoleKeys) -> bool:
    """An open past the budget: asked for, and signed by more distinct commands keys than the
    threshold, so that no single stolen key (nor a threshold's worth) can empty a bank."""
    return cmd.override and len(cmd.signers & commands_role.keyids) > commands_role.threshold


def build_command_payload(
    *, cmd_id: str, locker_id: str, issued_at: datetime, expires_at: datetime, action: str,
    args: Mapping[str, Any] | None = None, override: bool = False,
) -> bytes:
    doc: dict[str, Any] = {"type": "command", "cmd_id": cmd_id, "locker_id": locker_id,
                           "issued_at": format_time(issued_at),
                           "expires_at": format_time(expires_at), "action": action,
                           "args": dict(args or {})}
    if override:
        doc["override"] = True
    payload = msgspec.json.encode(doc)
    parse_command_payload(payload)
    return payload
