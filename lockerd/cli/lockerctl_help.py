"""lockerctl's side of help at the bank: sign a reply, and a reference responder."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lockerd.cli.lockerctl_broker import _run, _settings, add_broker_arguments
from lockerd.cli.lockerctl_common import (
    EXIT_OK,
    InputError,
    Subparsers,
    add_expiry,
    add_output,
    add_sign,
    duration_arg,
    expiry_of,
    load_signers,
    locker_arg,
    report,
    write_output,
)
from lockerd.core.help import is_tracking
from lockerd.errors import TrustError
from lockerd.timeutil import utcnow
from lockerd.trust.dsse import HELP_REPLY_PAYLOAD_TYPE, sign_envelope
from lockerd.trust.helpreply import OUTCOMES, build_reply_payload, is_message

NOT_FOUND_MESSAGE = "No parcel found for these details. Please call support"


def sign_reply(*, locker_id: str, help_id: str, outcome: str, message: str,
               expires_in: timedelta, keys: list[Ed25519PrivateKey]) -> bytes:
    now = utcnow()
    try:
        payload = build_reply_payload(locker_id=locker_id, help_id=help_id, issued_at=now,
                                      expires_at=now + expires_in, outcome=outcome,
                                      message=message)
    except TrustError as exc:
        raise InputError(str(exc)) from exc
    return sign_envelope(HELP_REPLY_PAYLOAD_TYPE, payload, keys)


def cmd_help_reply(args: argparse.Namespace) -> int:
    now = utcnow()
    envelope = sign_reply(locker_id=args.locker, help_id=args.help_id, outcome=args.outcome,
                          message=args.message, expires_in=expiry_of(args, now) - now,
                          keys=load_signers(args.sign))
    write_output(args.output, envelope)
    report(args.output, f"signed help reply ({args.outcome}) to {args.help_id} for locker "
           f"{args.locker}; publish it with `lockerctl publish`")
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class Answer:
    outcome: str
    message: str


def load_codes_file(path: Path) -> dict[tuple[str, str], str]:
    """Rows `tracking,phone_last4,message` (a header row with those names is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--codes-file {path}: cannot read it: {exc}") from exc
    rows: dict[tuple[str, str], str] = {}
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or row == ["tracking", "phone_last4", "message"]:
            continue
        if len(row) != 3:
            raise InputError(f"--codes-file {path} line {number}: expected "
                             "tracking,phone_last4,message")
        tracking, phone, message = (cell.strip() for cell in row)
        if not is_tracking(tracking):
            raise InputError(f"--codes-file {path} line {number}: tracking must be 1-64 "
                             "printable ASCII characters")
        if not (len(phone) == 4 and phone.isascii() and phone.isdigit()):
            raise InputError(f"--codes-file {path} line {number}: phone_last4 must be 4 digits")
        if not is_message(message):
            raise InputError(f"--codes-file {path} line {number}: message must be 1-80 "
                             "printable characters")
        rows[(tracking, phone)] = message
    return rows


def answer_for(request: Mapping[str, Any], rows: Mapping[tuple[str, str], str],
               not_found: str) -> Answer:
    message = rows.get((str(request.get("tracking")), str(request.get("phone_last4"))))
    return Answer("resent", message) if message is not None else Answer("not_found", not_found)


def cmd_respond_help(args: argparse.Namespace) -> int:
    settings, topics = _settings(args)
    rows = load_codes_file(args.codes_file)
    keys = load_signers(args.sign)
    if not is_message(args.not_found_message):
        raise InputError("--not-found-message must be 1-80 printable characters")
    answered = 0

    async def go() -> None:
        nonlocal answered
        async with settings.client(clean_session=True, timeout_s=args.timeout) as client:
            await client.subscribe(topics.events, qos=1)
            print(f"lockerctl: answering help requests of {args.locker} from "
                  f"{len(rows)} row(s) of {args.codes_file}", file=sys.stderr, flush=True)
            seen: set[str] = set()
            try:
                async with asyncio.timeout(args.wait if args.wait > 0 else None):
                    async for message in client.messages:
                        request = _help_request(message.payload)
                        if request is None or request["help_id"] in seen:
                            continue  # another event, or a re-publish of one answered
                        seen.add(request["help_id"])
                        answer = answer_for(request, rows, args.not_found_message)
                        reply = sign_reply(
                            locker_id=args.locker, help_id=request["help_id"],
                            outcome=answer.outcome, message=answer.message,
                            expires_in=args.reply_expires_in, keys=keys)
                        await client.publish(topics.help_reply, reply, qos=1)
                        answered += 1
                        print(f"H-{request.get('reference')} tracking "
                              f"{request.get('tracking')}: {answer.outcome}", flush=True)
                        if args.count and answered >= args.count:
                            break
            except TimeoutError:
                pass

    _run(go(), settings)
    print(f"lockerctl: {answered} help request(s) answered", file=sys.stderr)
    return EXIT_OK


def _help_request(payload: object) -> dict[str, Any] | None:
    try:
        event = json.loads(payload if isinstance(payload, bytes | str) else b"")
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != "help.requested":
        return None
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("help_id"), str):
        return None
    return data


def add_parsers(sub: Subparsers) -> None:
    """Register help-reply and respond-help."""
    p = sub.add_parser(
        "help-reply", help="sign a reply to a customer's help request at a bank",
        description="Sign a reply (PROTOCOL section 12) to a help.requested event with keys "
        "of the commands role. The bank shows MESSAGE (1-80 characters) to a customer still "
        "waiting; a late reply is recorded but not shown. Publish it with `lockerctl publish` "
        "(it goes to lockers/<id>/help/reply).")
    p.add_argument("--locker", type=locker_arg, required=True, metavar="ID")
    p.add_argument("--help-id", required=True, help="data.help_id of the help.requested event")
    p.add_argument("--outcome", choices=OUTCOMES, required=True)
    p.add_argument("--message", required=True,
                   help='what the display shows, e.g. "New code sent by SMS to ***67"')
    add_expiry(p)
    add_sign(p)
    add_output(p)
    p.set_defaults(func=cmd_help_reply)

    p = sub.add_parser(
        "respond-help", help="answer a bank's help requests from a CSV file (a reference "
        "responder)",
        description="Subscribe to lockers/<id>/events and answer each help.requested event "
        "with a signed reply on lockers/<id>/help/reply: a row of --codes-file "
        "(tracking,phone_last4,message) whose tracking number and phone ending match gives "
        "outcome resent and its message; otherwise outcome not_found. It acknowledges no "
        "event, so it runs beside the backend's event consumer. A reference to build the "
        "real responder on, and the way to try the whole loop against a real broker.")
    add_broker_arguments(p)
    p.add_argument("--codes-file", type=Path, required=True, metavar="CSV")
    p.add_argument("--not-found-message", default=NOT_FOUND_MESSAGE,
                   help="what the display shows when no row matches")
    p.add_argument("--reply-expires-in", type=duration_arg, default=timedelta(minutes=10),
                   metavar="DURATION", help="lifetime of each reply (default 10m)")
    add_sign(p)
    p.add_argument("--count", type=int, default=0, help="stop after N answers (default: never)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="stop after this many seconds (default: never)")
    p.set_defaults(func=cmd_respond_help)
