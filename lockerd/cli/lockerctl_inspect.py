"""lockerctl inspect: show a signed envelope's type, signers and payload."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path

from lockerd.cli.lockerctl_common import (
    EXIT_OK,
    InputError,
    Subparsers,
    load_keyring_file,
)
from lockerd.errors import TrustError
from lockerd.trust.dsse import (
    Envelope,
    count_valid_signers,
    parse_envelope,
)
from lockerd.trust.keyring import (
    ROLE_NAMES,
    Keyring,
)


def _read_envelope_bytes(source: str) -> bytes:
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source!r}: {exc.strerror}") from exc
    data = data.strip()
    if data.startswith(b"{"):
        return data
    # Technician tokens travel as base64url (no padding) of the envelope's JSON.
    try:
        decoded = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{source}: neither envelope JSON nor base64url of it") from exc
    return decoded


def cmd_inspect(args: argparse.Namespace) -> int:
    source: str = args.file
    try:
        env = parse_envelope(_read_envelope_bytes(source))
    except TrustError as exc:
        raise InputError(f"{source}: {exc}") from exc
    keyring = None if args.keyring is None else load_keyring_file(args.keyring, option="--keyring")
    print(f"payloadType: {env.payload_type}")
    print(f"signatures:  {len(env.signatures)}")
    for keyid, _sig in env.signatures:
        note = ""
        if keyring is not None:
            note = "  " + _describe_signer(env, keyid, keyring)
        print(f"  keyid {keyid or '(none)'}{note}")
    print("payload:")
    try:
        print(json.dumps(json.loads(env.payload), indent=2, ensure_ascii=False))
    except (ValueError, UnicodeDecodeError):
        print(f"  (not JSON, {len(env.payload)} bytes) {env.payload.hex()}")
    return EXIT_OK


def _describe_signer(env: Envelope, keyid: str, keyring: Keyring) -> str:
    roles = [name for name in ROLE_NAMES if keyid in keyring.roles[name].keys]
    if not roles:
        return "[not in the keyring]"
    key = next(keyring.roles[name].keys[keyid] for name in roles)
    valid = keyid in count_valid_signers(env, {keyid: key})
    return f"[{', '.join(roles)}; signature {'valid' if valid else 'INVALID'}]"


def add_parsers(sub: Subparsers) -> None:
    """Register inspect."""
    p = sub.add_parser(
        "inspect",
        help="show a signed envelope's type, signers and payload",
        description="Print a DSSE envelope's payload type, the keyids of its signatures and "
        "its decoded payload. FILE may also hold a base64url technician token; '-' reads "
        "stdin. Nothing is verified unless --keyring is given.",
    )
    p.add_argument("file", metavar="FILE", help="envelope file, or - for stdin")
    p.add_argument(
        "--keyring",
        metavar="FILE",
        help="keyring to name each signer's role and check its signature",
    )
    p.set_defaults(func=cmd_inspect)
