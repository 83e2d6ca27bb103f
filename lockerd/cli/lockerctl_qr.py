"""lockerctl's QR tokens: sign one as text or an image, and inspect one."""

from __future__ import annotations

import argparse
import io
import re
import secrets
import sys
from datetime import datetime
from pathlib import Path

from lockerd.cli.lockerctl_common import (
    EXIT_FAILURE,
    EXIT_OK,
    InputError,
    Subparsers,
    add_expiry,
    count_arg,
    expiry_of,
    load_keyring_file,
    load_signers,
    locker_arg,
    report,
    time_arg,
    write_output,
)
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, utcnow
from lockerd.trust.qrtoken import (
    CTI_MAX_BYTES,
    CTI_MIN_BYTES,
    QR_KINDS,
    QR_PREFIX,
    QrToken,
    decode_qr_token_with_signer,
    mint_qr_token,
    peek_qr_token,
)

_QR_FORMATS = ("text", "png", "svg")
_QR_DEFAULT_PNG_SCALE = 4


def _cti_arg(text: str) -> bytes:
    low, high = 2 * CTI_MIN_BYTES, 2 * CTI_MAX_BYTES
    if not re.fullmatch(r"[0-9a-fA-F]+", text) or not low <= len(text) <= high or len(text) % 2:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {low}-{high} hex characters ({CTI_MIN_BYTES}-{CTI_MAX_BYTES} bytes)"
        )
    return bytes.fromhex(text)


def _qr_format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    suffix = Path(args.output).suffix.lower() if args.output != "-" else ""
    return {".png": "png", ".svg": "svg"}.get(suffix, "text")


def _qr_image(token: str, fmt: str, scale: int | None) -> bytes:
    import segno  # only images need it: keep it out of every other command's start-up

    qr = segno.make(token, error="m", micro=False, boost_error=False)
    out = io.BytesIO()
    if scale is None:
        scale = _QR_DEFAULT_PNG_SCALE if fmt == "png" else 1
    qr.save(out, kind=fmt, scale=scale)
    return out.getvalue()


def cmd_qr(args: argparse.Namespace) -> int:
    sign: list[str] = args.sign
    if len(sign) != 1:
        raise InputError(
            f"--sign: a QR token carries exactly one signature; give one key of the qr role, "
            f"not {len(sign)}"
        )
    now = utcnow()
    expires_at = expiry_of(args, now)
    not_before: datetime | None = args.not_before
    if not_before is not None and not_before >= expires_at:
        raise InputError(
            f"--not-before {format_time(not_before)} must be earlier than the expiry "
            f"{format_time(expires_at)}"
        )
    cti: bytes = args.cti if args.cti is not None else secrets.token_bytes(16)
    signer = load_signers(sign)[0]
    try:
        token = mint_qr_token(
            signer=signer, locker_id=args.locker, kind=args.kind, cti=cti,
            expires_at=expires_at, not_before=not_before, compartment=args.compartment,
            parcel_id=args.parcel)
    except TrustError as exc:
        raise InputError(str(exc)) from exc
    fmt = _qr_format(args)
    target: str = args.output
    if fmt == "text":
        # write_output adds the newline itself on stdout.
        write_output(target, token.encode("ascii") + (b"" if target == "-" else b"\n"))
    else:
        image = _qr_image(token, fmt, args.scale)
        if target == "-":
            sys.stdout.buffer.write(image)
            sys.stdout.flush()
        else:
            Path(target).write_bytes(image)
    report(target, f"{args.kind} QR token for locker {args.locker}, cti {cti.hex()}, expires "
            f"{format_time(expires_at)}; wrote {fmt} to {target}")
    return EXIT_OK


def _read_qr_text(source: str) -> str:
    if source != "-" and source.startswith(QR_PREFIX):
        return source
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise InputError(
            f"{source!r} is neither a {QR_PREFIX} token nor a readable file: {exc.strerror}"
        ) from exc
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{source}: not a {QR_PREFIX} token in text (lockerctl does not read QR images)"
        ) from exc
    # Only line ends are stripped: a space is a base45 character and may end a token.
    return text.rstrip("\r\n")


def _qr_claims(token: QrToken) -> list[tuple[str, str]]:
    def when(dt: datetime | None) -> str:
        return "(none)" if dt is None else format_time(dt)

    return [
        ("kid", token.kid.hex()),
        ("kind", token.kind),
        ("sub", token.locker_id),
        ("nbf", when(token.not_before)),
        ("exp", when(token.expires_at)),
        ("cti", token.cti_hex),
        ("compartment", token.compartment or "(none)"),
        ("parcel_id", token.parcel_id or "(none)"),
    ]


def cmd_qr_inspect(args: argparse.Namespace) -> int:
    source: str = args.token
    label = "token" if source.startswith(QR_PREFIX) else source
    text = _read_qr_text(source)
    keyring = None if args.keyring is None else load_keyring_file(args.keyring, option="--keyring")
    try:
        token = peek_qr_token(text)
    except TrustError as exc:
        raise InputError(f"{label}: refused ({exc.reason}): {exc}") from exc
    for name, value in _qr_claims(token):
        print(f"{name + ':':<13}{value}")
    if keyring is None:
        print(f"{'signature:':<13}not checked (give --keyring to verify it)")
        return EXIT_OK
    try:
        _token, keyid = decode_qr_token_with_signer(text, qr_role=keyring.qr)
    except TrustError as exc:
        print(f"{'signature:':<13}refused ({exc.reason}): {exc}")
        return EXIT_FAILURE
    print(f"{'signature:':<13}valid (qr key {keyid})")
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Register qr and qr-inspect."""
    p = sub.add_parser(
        "qr",
        help="sign a QR token (pickup, deposit or courier) for one locker",
        description="Sign a QR token (PROTOCOL section 9) with ONE key of the qr role and write "
        "it as text (LK1: + base45) or as a QR image. The format is --format, else OUT's "
        "suffix: .png, .svg, anything else text. A locker accepts a token once (its cti is "
        "spent when the door is seen open), only between --not-before and the expiry, and "
        "only if it is the locker named.",
    )
    p.add_argument("--locker", type=locker_arg, required=True, metavar="ID",
                   help="the locker that accepts the token (claim sub)")
    p.add_argument("--kind", required=True, choices=QR_KINDS)
    p.add_argument("--compartment", metavar="ID",
                   help="compartment to open (a pickup names it or --parcel)")
    p.add_argument("--parcel", metavar="PARCEL_ID", help="parcel id (1-64 printable characters)")
    p.add_argument("--not-before", type=time_arg, metavar="TIME",
                   help="not valid before this RFC 3339 UTC time")
    add_expiry(p)
    p.add_argument("--sign", nargs="+", action="extend", required=True, metavar="KEYFILE",
                   help="private key file of the qr role (exactly one)")
    p.add_argument("--cti", type=_cti_arg, metavar="HEX",
                   help="token id, 16-32 hex characters (default: 16 random bytes)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file to write the token or image to, or - for stdout")
    p.add_argument("--format", choices=_QR_FORMATS,
                   help="text, png or svg (default: from OUT's suffix, else text)")
    p.add_argument("--scale", type=count_arg(1), metavar="N",
                   help=f"size of one QR module in pixels (default {_QR_DEFAULT_PNG_SCALE} for "
                   "png, 1 for svg)")
    p.set_defaults(func=cmd_qr)

    p = sub.add_parser(
        "qr-inspect",
        help="show a QR token's claims, and check its signature with --keyring",
        description="Print the claims of an LK1: token given as TEXT, as a file holding it, or "
        "- for stdin. Nothing is verified unless --keyring is given: then the signature is "
        "checked against the keyring's qr role (exit 1 when it is refused). Times and the "
        "spent state of the cti are not checked: only a locker knows them.",
    )
    p.add_argument("token", metavar="TEXT_OR_FILE", help="the token, a file holding it, or -")
    p.add_argument("--keyring", metavar="FILE",
                   help="keyring whose qr role must have signed the token")
    p.set_defaults(func=cmd_qr_inspect)
