"""lockerctl's signed orders: remote commands and technician login tokens."""

from __future__ import annotations

import argparse
import uuid

from lockerd.cli.lockerctl_common import (
    EXIT_OK,
    InputError,
    Subparsers,
    add_expiry,
    add_output,
    add_sign,
    expiry_of,
    load_signers,
    locker_arg,
    report,
    write_output,
)
from lockerd.errors import TrustError
from lockerd.timeutil import utcnow
from lockerd.trust.command import ACTIONS as COMMAND_ACTIONS
from lockerd.trust.command import build_command_payload
from lockerd.trust.dsse import (
    COMMAND_PAYLOAD_TYPE,
    TECHNICIAN_PAYLOAD_TYPE,
    sign_envelope,
)
from lockerd.trust.technician import build_technician_payload, encode_token


def cmd_command(args: argparse.Namespace) -> int:
    now = utcnow()
    cmd_args: dict[str, object] = {}
    if args.compartment is not None:
        cmd_args["compartment"] = args.compartment
    if args.reason:
        cmd_args["reason"] = args.reason
    if args.action == "set_service":
        if args.in_service is None:
            raise InputError("set_service needs --in-service yes|no")
        cmd_args["in_service"] = args.in_service == "yes"
    if args.action in ("open", "set_service") and args.compartment is None:
        raise InputError(f"{args.action} needs --compartment")
    if args.override and args.action != "open":
        raise InputError("--override is for --action open only")
    cmd_id = args.cmd_id or str(uuid.uuid4())
    try:
        payload = build_command_payload(
            cmd_id=cmd_id, locker_id=args.locker, issued_at=now, expires_at=expiry_of(args, now),
            action=args.action, args=cmd_args, override=args.override)
    except TrustError as exc:
        raise InputError(str(exc)) from exc
    envelope = sign_envelope(COMMAND_PAYLOAD_TYPE, payload, load_signers(args.sign))
    write_output(args.output, envelope)
    report(args.output, f"signed command {cmd_id} ({args.action}) for locker {args.locker}")
    return EXIT_OK


def cmd_technician(args: argparse.Namespace) -> int:
    now = utcnow()
    try:
        payload = build_technician_payload(
            tech_id=args.tech_id, name=args.name, locker_ids=args.locker, role=args.role,
            issued_at=now, expires_at=expiry_of(args, now))
    except TrustError as exc:
        raise InputError(str(exc)) from exc
    token = encode_token(sign_envelope(TECHNICIAN_PAYLOAD_TYPE, payload,
                                       load_signers(args.sign)))
    write_output(args.output, token.encode("ascii"))
    report(args.output, f"technician token for {args.tech_id} ({args.role}) on "
            f"{', '.join(args.locker)}; type `login <token>` at the console")
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Register command and technician."""
    p = sub.add_parser(
        "command",
        help="sign a remote command for one locker",
        description="Sign a remote command (PROTOCOL section 7) with keys of the commands "
        "role: open a compartment, take it out of or back into service, run a self-test, "
        "ask for a resync, or clear the keypad lockout. Publish it with `lockerctl publish` "
        "(never retained); the result comes back on lockers/<id>/cmd/result. Keep "
        "--expires-in short: a command is only accepted until then.",
    )
    p.add_argument("--locker", type=locker_arg, required=True, metavar="ID")
    p.add_argument("--action", required=True, choices=COMMAND_ACTIONS)
    p.add_argument("--compartment", metavar="ID", help="for open, set_service, selftest")
    p.add_argument("--in-service", choices=("yes", "no"), help="for set_service")
    p.add_argument("--reason", default="", help="why (a ticket number): kept in the events")
    p.add_argument("--cmd-id", default="", help="the command's id (default: a new UUID)")
    p.add_argument("--override", action="store_true",
                   help="open past the bank's open budget ([commands] max_opens_per_hour); "
                   "the bank accepts it only when --sign gives more distinct commands keys "
                   "than the commands threshold")
    add_expiry(p)
    add_sign(p)
    add_output(p)
    p.set_defaults(func=cmd_command)

    p = sub.add_parser(
        "technician",
        help="sign a technician's console login token",
        description="Sign a technician token (PROTOCOL section 8) with keys of the technicians "
        "role and write it as the base64url text the technician types after `login` at a "
        "bank's console. A viewer may read status and run read-only tests; an operator may "
        "also open doors, run actuator self-tests and change service state.",
    )
    p.add_argument("--tech-id", required=True, help="the technician's id, e.g. t-17")
    p.add_argument("--name", required=True, help="the technician's name")
    p.add_argument("--locker", nargs="+", required=True, metavar="ID",
                   help="locker ids the token is good for, or * for every locker")
    p.add_argument("--role", choices=("viewer", "operator"), default="viewer")
    add_expiry(p)
    add_sign(p)
    add_output(p)
    p.set_defaults(func=cmd_technician)
