"""lockerctl: the backend integrator's offline tool for keys, keyrings and codes bundles."""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import json
import re
import secrets
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from lockerd.cli.lockerctl_broker import add_commands as add_broker_commands
from lockerd.errors import LockerdError, TrustError
from lockerd.timeutil import format_time, parse_time, utcnow
from lockerd.trust.bundle import (
    CODE_KINDS,
    CodeEntry,
    CodeKind,
    build_bundle_payload,
    is_compartment_id,
    is_locker_id,
)
from lockerd.trust.command import ACTIONS as COMMAND_ACTIONS
from lockerd.trust.command import build_command_payload
from lockerd.trust.digest import (
    DEFAULT_DERIVED_DIGITS,
    code_digest,
    derived_pickup_code,
    generate_code_key,
    load_code_key,
    save_code_key,
)
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    TECHNICIAN_PAYLOAD_TYPE,
    Envelope,
    RoleKeys,
    count_valid_signers,
    parse_envelope,
    sign_envelope,
    verify_role,
)
from lockerd.trust.keyring import (
    ROLE_NAMES,
    Keyring,
    accept_keyring,
    build_keyring_payload,
    load_stored_keyring,
)
from lockerd.trust.keys import (
    generate_key,
    keyid_of,
    load_private_key,
    load_public_key,
    parse_public_hex,
    public_hex,
    save_private_key,
    save_public_key,
)
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
from lockerd.trust.technician import build_technician_payload, encode_token

PROG = "lockerctl"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

CODE_COLUMNS: tuple[str, ...] = (
    "id",
    "code",
    "kind",
    "compartment",
    "parcel_id",
    "not_before",
    "not_after",
    "max_uses",
)
REQUIRED_CODE_COLUMNS: tuple[str, ...] = ("id", "code", "kind")
# Keypads send digits; below 4 a code is guessable, and 64 is the longest entry a
# locker can be configured to take ([entry] max_digits, 16 by default).
_CODE_PATTERN = re.compile(r"[0-9]{4,64}")
# The range a locker accepts for [codes] derived_digits.
_DERIVED_DIGITS = range(4, 13)
_DURATION = re.compile(r"([0-9]+)([smhdw])")
_DURATION_UNITS: Mapping[str, int] = MappingProxyType(
    {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
)
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


class InputError(Exception):
    """The command line or an input file is wrong: exit status 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, handled by `main`."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see '{self.prog} --help')")


# --- argument types -------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s` or `2w` as a positive timedelta; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a positive duration like 30d, 12h, 90m or 3600s")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _time_arg(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _count_arg(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if value > 2**63 - 1:
            raise argparse.ArgumentTypeError(f"{value} is too large")
        return value

    return convert


def _locker_arg(text: str) -> str:
    if not is_locker_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a locker id (1-64 characters of A-Z a-z 0-9 _ -)"
        )
    return text


# --- input helpers --------------------------------------------------------------------


def _load_signers(paths: Sequence[str]) -> list[Ed25519PrivateKey]:
    keys: list[Ed25519PrivateKey] = []
    for path in paths:
        try:
            keys.append(load_private_key(Path(path)))
        except ValueError as exc:
            raise InputError(f"--sign: {exc}") from exc
    return keys


def _load_code_key(path: str) -> bytes:
    try:
        return load_code_key(Path(path))
    except ValueError as exc:
        raise InputError(f"--code-key: {exc}") from exc


def resolve_public_key(text: str, *, option: str) -> Ed25519PublicKey:
    """A public key given as 64 lowercase hex characters or as the path of a .pub file."""
    if _HEX_KEY.fullmatch(text):
        try:
            return parse_public_hex(text)
        except ValueError as exc:
            raise InputError(f"{option}: {exc}") from exc
    path = Path(text)
    if not path.is_file():
        raise InputError(
            f"{option}: {text!r} is neither 64 lowercase hex characters nor an existing .pub file"
        )
    try:
        return load_public_key(path)
    except ValueError as exc:
        raise InputError(f"{option}: {exc}") from exc


def _load_keyring_file(path: str, *, option: str) -> Keyring:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{option}: cannot read {path!r}: {exc.strerror}") from exc
    try:
        return load_stored_keyring(raw)
    except TrustError as exc:
        raise InputError(f"{option}: {path!r} is not a usable keyring: {exc}") from exc


def _write_output(target: str, data: bytes) -> None:
    if target == "-":
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
        return
    Path(target).write_bytes(data)


def _report(target: str, message: str) -> None:
    # When the document itself goes to stdout, the summary must not be mixed into it.
    print(message, file=sys.stderr if target == "-" else sys.stdout)


def _expiry(args: argparse.Namespace, now: datetime) -> datetime:
    expires_in: timedelta | None = args.expires_in
    expires_at: datetime | None = args.expires_at
    if expires_in is not None:
        return now + expires_in
    if expires_at is None:
        raise InputError("give --expires-in or --expires-at")
    if expires_at <= now:
        raise InputError(f"--expires-at {format_time(expires_at)} is not in the future")
    return expires_at


# --- keygen / code-key ----------------------------------------------------------------


def _pub_path(key_path: Path) -> Path:
    if key_path.suffix == ".key":
        return key_path.with_suffix(".pub")
    return key_path.with_name(key_path.name + ".pub")


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pub = _pub_path(out)
    force: bool = args.force
    if not force:
        for path in (out, pub):
            if path.exists():
                raise FileExistsError(f"{str(path)!r} already exists; use --force to replace it")
    key = generate_key()
    save_private_key(key, out, overwrite=force)
    save_public_key(key.public_key(), pub, overwrite=force)
    print(f"public key: {public_hex(key.public_key())}")
    print(f"keyid:      {keyid_of(key.public_key())}")
    print(f"wrote {out} (private, mode 0600) and {pub} (public)")
    return EXIT_OK


def cmd_code_key(args: argparse.Namespace) -> int:
    out = Path(args.out)
    save_code_key(generate_code_key(), out, overwrite=args.force)
    print(f"wrote {out} (32-byte code key, mode 0600); install it on the locker it belongs to")
    return EXIT_OK


# --- keyring --------------------------------------------------------------------------


def cmd_keyring(args: argparse.Namespace) -> int:
    now = utcnow()
    expires_at = _expiry(args, now)
    roles: dict[str, RoleKeys] = {}
    for name in ROLE_NAMES:
        option = f"--{name}"
        keys = [resolve_public_key(text, option=option) for text in getattr(args, name)]
        threshold: int = getattr(args, f"{name}_threshold")
        try:
            roles[name] = RoleKeys.from_keys(keys, threshold)
        except ValueError as exc:
            raise InputError(f"{option}: {exc}") from exc
    signers = _load_signers(args.sign)
    payload = build_keyring_payload(
        version=args.version, issued_at=now, expires_at=expires_at, roles=roles
    )
    raw = sign_envelope(KEYRING_PAYLOAD_TYPE, payload, signers)
    env = parse_envelope(raw)
    new_root = roles["root"]
    signed_by = count_valid_signers(env, new_root.keys)
    if len(signed_by) < new_root.threshold:
        # Rule (b) and rule (a) alike need the new root's threshold; catch it here.
        raise InputError(
            f"--sign: {len(signed_by)} of the signing keys are in --root but "
            f"--root-threshold is {new_root.threshold}; a locker would refuse this keyring"
        )
    if args.previous is not None:
        previous = _load_keyring_file(args.previous, option="--previous")
        try:
            accept_keyring(
                raw, trusted_root=previous.root, current_version=previous.version, now=now
            )
        except TrustError as exc:
            raise InputError(
                f"a locker holding {args.previous!r} (version {previous.version}) would "
                f"refuse this keyring: {exc}"
            ) from exc
    _write_output(args.output, raw)
    _report(
        args.output,
        f"wrote keyring version {args.version} (expires {format_time(expires_at)}) to "
        f"{args.output}, signed by {len(signers)} key(s)",
    )
    return EXIT_OK


# --- bundle ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRow:
    """One code read from the input file, before hashing; `where` names file and line."""

    where: str
    fields: Mapping[str, str | int | None]


def read_codes_csv(path: Path) -> list[CodeRow]:
    """Rows of a codes CSV with a header line; empty cells become None."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(f"--codes: cannot read {str(path)!r}: {exc.strerror}") from exc
    rows: list[CodeRow] = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty file, expected a header line")
            columns = [cell.strip() for cell in header]
            unknown = [c for c in columns if c not in CODE_COLUMNS]
            if unknown:
                raise InputError(
                    f"{path} line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
                    f"known columns are {', '.join(CODE_COLUMNS)}"
                )
            missing = [c for c in REQUIRED_CODE_COLUMNS if c not in columns]
            if missing:
                raise InputError(
                    f"{path} line 1: header lacks required column(s) {', '.join(missing)}"
                )
            duplicated = {c for c in columns if columns.count(c) > 1}
            if duplicated:
                raise InputError(f"{path} line 1: column(s) {', '.join(duplicated)} repeated")
            for cells in reader:
                where = f"{path} line {reader.line_num}"
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(columns):
                    raise InputError(
                        f"{where}: expected {len(columns)} cells like the header, "
                        f"found {len(cells)}"
                    )
                fields: dict[str, str | int | None] = {
                    column: (cell.strip() or None)
                    for column, cell in zip(columns, cells, strict=True)
                }
                rows.append(CodeRow(where=where, fields=fields))
        except csv.Error as exc:
            raise InputError(f"{path} line {reader.line_num}: bad CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    return rows


def read_codes_json(path: Path) -> list[CodeRow]:
    """Items of a codes JSON file: a list of objects keyed like the CSV columns."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"--codes: cannot read {str(path)!r}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise InputError(f"{path}: expected a JSON list of code objects")
    rows: list[CodeRow] = []
    for index, item in enumerate(doc, start=1):
        where = f"{path} item {index}"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object, got {type(item).__name__}")
        unknown = [key for key in item if key not in CODE_COLUMNS]
        if unknown:
            raise InputError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(CODE_COLUMNS)}"
            )
        fields: dict[str, str | int | None] = {}
        for key, value in item.items():
            if key == "code" and isinstance(value, int) and not isinstance(value, bool):
                raise InputError(
                    f"{where}, column 'code': write the code as a JSON string, "
                    "a number would lose leading zeros"
                )
            if isinstance(value, bool) or not isinstance(value, str | int | None):
                raise InputError(
                    f"{where}, column {key!r}: expected a string or null, "
                    f"got {type(value).__name__}"
                )
            fields[key] = value
        rows.append(CodeRow(where=where, fields=fields))
    return rows


def _text_field(row: CodeRow, column: str) -> str | None:
    value = row.fields.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{row.where}, column {column!r}: expected a string")
    return value or None


def _time_field(row: CodeRow, column: str) -> datetime | None:
    value = _text_field(row, column)
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise InputError(f"{row.where}, column {column!r}: {exc}") from exc


@dataclass(frozen=True)
class CodesInput:
    """What `bundle` needs to turn plain codes into entries."""

    code_key: bytes
    locker_id: str
    default_not_after: datetime | None


def entry_from_row(row: CodeRow, ctx: CodesInput) -> tuple[CodeEntry, str]:
    """Validate a row and hash its code; returns the entry and the plain code."""
    code_id = _text_field(row, "id")
    if code_id is None:
        raise InputError(f"{row.where}, column 'id': required")
    code = _text_field(row, "code")
    if code is None:
        raise InputError(f"{row.where}, column 'code': required")
    if not _CODE_PATTERN.fullmatch(code):
        # The code itself is a secret: describe it, never echo it.
        raise InputError(
            f"{row.where}, column 'code': must be 4-64 decimal digits (got {len(code)} characters)"
        )
    kind = _text_field(row, "kind")
    if kind not in CODE_KINDS:
        raise InputError(
            f"{row.where}, column 'kind': must be one of {', '.join(CODE_KINDS)}, got {kind!r}"
        )
    compartment = _text_field(row, "compartment")
    if compartment is not None and not is_compartment_id(compartment):
        raise InputError(
            f"{row.where}, column 'compartment': {compartment!r} is not 1-16 characters "
            "of A-Z a-z 0-9 -"
        )
    not_after = _time_field(row, "not_after") or ctx.default_not_after
    if not_after is None:
        raise InputError(
            f"{row.where}, column 'not_after': required (or give --not-after-in for a default)"
        )
    raw_uses = row.fields.get("max_uses")
    if raw_uses is None:
        max_uses = 1
    else:
        try:
            max_uses = raw_uses if isinstance(raw_uses, int) else int(raw_uses, 10)
        except ValueError as exc:
            raise InputError(
                f"{row.where}, column 'max_uses': {raw_uses!r} is not an integer"
            ) from exc
        if max_uses < 1:
            raise InputError(f"{row.where}, column 'max_uses': must be at least 1")
    try:
        entry = CodeEntry(
            id=code_id,
            kind=cast(CodeKind, kind),
            digest=code_digest(ctx.code_key, ctx.locker_id, code),
            compartment=compartment,
            parcel_id=_text_field(row, "parcel_id"),
            not_before=_time_field(row, "not_before"),
            not_after=not_after,
            max_uses=max_uses,
        )
    except ValueError as exc:
        raise InputError(f"{row.where}: {exc}") from exc
    return entry, code


def entries_from_rows(rows: Sequence[CodeRow], ctx: CodesInput) -> list[CodeEntry]:
    """Entries of all rows; an id or a code used twice is an error naming both rows."""
    entries: list[CodeEntry] = []
    by_id: dict[str, str] = {}
    by_digest: dict[str, str] = {}
    for row in rows:
        entry, _code = entry_from_row(row, ctx)
        if entry.id in by_id:
            raise InputError(f"{row.where}: id {entry.id!r} already used at {by_id[entry.id]}")
        if entry.digest in by_digest:
            raise InputError(
                f"{row.where}, column 'code': same code as {by_digest[entry.digest]}; "
                "a locker could not tell the two apart"
            )
        by_id[entry.id] = row.where
        by_digest[entry.digest] = row.where
        entries.append(entry)
    return entries


def _read_rows(path_text: str) -> list[CodeRow]:
    path = Path(path_text)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_codes_csv(path)
    if suffix == ".json":
        return read_codes_json(path)
    raise InputError(f"--codes: {path_text!r} must end in .csv or .json")


def cmd_bundle(args: argparse.Namespace) -> int:
    now = utcnow()
    expires_at = _expiry(args, now)
    locker_id: str = args.locker
    version: int = args.version
    base_version: int | None = args.base_version
    if base_version is not None and base_version >= version:
        raise InputError(f"--base-version {base_version} must be lower than --version {version}")
    not_after_in: timedelta | None = args.not_after_in
    ctx = CodesInput(
        code_key=_load_code_key(args.code_key),
        locker_id=locker_id,
        default_not_after=None if not_after_in is None else now + not_after_in,
    )
    rows = [] if args.codes is None else _read_rows(args.codes)
    entries = entries_from_rows(rows, ctx)
    revoke: list[str] = list(dict.fromkeys(args.revoke or []))
    upsert_ids = {entry.id for entry in entries}
    for code_id in revoke:
        if not code_id:
            raise InputError("--revoke: empty id")
        if code_id in upsert_ids:
            raise InputError(f"--revoke {code_id!r}: that id is also in --codes")
    signers = _load_signers(args.sign)
    payload = build_bundle_payload(
        locker_id=locker_id,
        version=version,
        base_version=base_version,
        issued_at=now,
        expires_at=expires_at,
        upsert=entries,
        revoke=revoke,
    )
    raw = sign_envelope(CODES_PAYLOAD_TYPE, payload, signers)
    if args.keyring is not None:
        keyring = _load_keyring_file(args.keyring, option="--keyring")
        _check_codes_signers(parse_envelope(raw), keyring, now, args.keyring)
    _write_output(args.output, raw)
    shape = "snapshot" if base_version is None else f"delta on version {base_version}"
    _report(
        args.output,
        f"wrote codes bundle for locker {locker_id} version {version} ({shape}, "
        f"{len(entries)} code(s), {len(revoke)} revoked, expires {format_time(expires_at)}) "
        f"to {args.output}",
    )
    return EXIT_OK


def _check_codes_signers(env: Envelope, keyring: Keyring, now: datetime, path: str) -> None:
    try:
        verify_role(env, expected_type=CODES_PAYLOAD_TYPE, role=keyring.codes)
    except TrustError as exc:
        raise InputError(
            f"--sign: the codes role of {path!r} does not accept these signers: {exc}"
        ) from exc
    if keyring.is_expired(now):
        raise InputError(
            f"--keyring: {path!r} expired at {format_time(keyring.expires_at)}; a locker "
            "accepts no new bundle under it"
        )


# --- derive-code / inspect ------------------------------------------------------------


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
            cmd_id=cmd_id, locker_id=args.locker, issued_at=now, expires_at=_expiry(args, now),
            action=args.action, args=cmd_args, override=args.override)
    except TrustError as exc:
        raise InputError(str(exc)) from exc
    envelope = sign_envelope(COMMAND_PAYLOAD_TYPE, payload, _load_signers(args.sign))
    _write_output(args.output, envelope)
    _report(args.output, f"signed command {cmd_id} ({args.action}) for locker {args.locker}")
    return EXIT_OK


def cmd_technician(args: argparse.Namespace) -> int:
    now = utcnow()
    try:
        payload = build_technician_payload(
            tech_id=args.tech_id, name=args.name, locker_ids=args.locker, role=args.role,
            issued_at=now, expires_at=_expiry(args, now))
    except TrustError as exc:
        raise InputError(str(exc)) from exc
    token = encode_token(sign_envelope(TECHNICIAN_PAYLOAD_TYPE, payload,
                                       _load_signers(args.sign)))
    _write_output(args.output, token.encode("ascii"))
    _report(args.output, f"technician token for {args.tech_id} ({args.role}) on "
            f"{', '.join(args.locker)}; type `login <token>` at the console")
    return EXIT_OK


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
    expires_at = _expiry(args, now)
    not_before: datetime | None = args.not_before
    if not_before is not None and not_before >= expires_at:
        raise InputError(
            f"--not-before {format_time(not_before)} must be earlier than the expiry "
            f"{format_time(expires_at)}"
        )
    cti: bytes = args.cti if args.cti is not None else secrets.token_bytes(16)
    signer = _load_signers(sign)[0]
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
        # _write_output adds the newline itself on stdout.
        _write_output(target, token.encode("ascii") + (b"" if target == "-" else b"\n"))
    else:
        image = _qr_image(token, fmt, args.scale)
        if target == "-":
            sys.stdout.buffer.write(image)
            sys.stdout.flush()
        else:
            Path(target).write_bytes(image)
    _report(target, f"{args.kind} QR token for locker {args.locker}, cti {cti.hex()}, expires "
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
    keyring = None if args.keyring is None else _load_keyring_file(args.keyring, option="--keyring")
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


def cmd_derive_code(args: argparse.Namespace) -> int:
    parcel: str = args.parcel
    if not parcel:
        raise InputError("--parcel: empty parcel id")
    code_key = _load_code_key(args.code_key)
    print(derived_pickup_code(code_key, args.locker, parcel, args.digits))
    return EXIT_OK


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
    keyring = None if args.keyring is None else _load_keyring_file(args.keyring, option="--keyring")
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


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "The backend integrator's tool for lockerd: make signing keys and code keys, "
            "sign keyrings and codes bundles, derive offline pickup codes, inspect signed "
            "envelopes, publish them to a locker over MQTT, and read and acknowledge its "
            "events."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "keygen",
        help="make an Ed25519 signing key pair",
        description="Write a new Ed25519 private key (64 hex characters of the seed, mode 0600) "
        "to OUT and its public key hex to OUT with the suffix .pub; print the public key "
        "and its keyid.",
    )
    p.add_argument("out", metavar="OUT.key", help="private key file to create")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "code-key",
        help="make a locker's 32-byte code key",
        description="Write a random 32-byte code key (64 hex characters, mode 0600). The "
        "backend keeps a copy; the locker reads it to hash entered codes.",
    )
    p.add_argument("out", metavar="OUT", help="code key file to create")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_code_key)

    p = sub.add_parser(
        "keyring",
        help="sign a keyring naming the keys of every role",
        description="Build and sign a keyring (PROTOCOL section 3). PUB is a public key as "
        "64 lowercase hex characters or the path of a .pub file. To rotate the root keys, "
        "sign with the threshold of the old root keys AND of the new ones.",
    )
    p.add_argument(
        "--version",
        type=_count_arg(1),
        required=True,
        metavar="N",
        help="keyring version, greater than the one the lockers hold",
    )
    _add_expiry(p)
    for name in ROLE_NAMES:
        p.add_argument(
            f"--{name}",
            nargs="+",
            action="extend",
            required=True,
            metavar="PUB",
            help=f"public key(s) of the {name} role",
        )
        p.add_argument(
            f"--{name}-threshold",
            type=_count_arg(1),
            default=1,
            metavar="K",
            help=f"signatures needed for the {name} role (default 1)",
        )
    _add_sign(p)
    p.add_argument(
        "--previous",
        metavar="FILE",
        help="keyring the lockers hold now: check that they would accept the new one",
    )
    _add_output(p)
    p.set_defaults(func=cmd_keyring)

    p = sub.add_parser(
        "bundle",
        help="sign a codes bundle for one locker",
        description="Hash plain codes with the locker's code key and sign a codes bundle "
        "(PROTOCOL section 4). Without --base-version it is a snapshot that replaces every "
        "code; with it, a delta. CSV columns: " + ",".join(CODE_COLUMNS) + " (header line "
        "required; id, code, kind mandatory; empty cells mean null). JSON: a list of objects "
        "with the same keys. Plain codes never appear in the output.",
    )
    p.add_argument(
        "--locker",
        type=_locker_arg,
        required=True,
        metavar="ID",
        help="locker id the bundle is for",
    )
    p.add_argument(
        "--version",
        type=_count_arg(1),
        required=True,
        metavar="N",
        help="bundle version, greater than the one the locker holds",
    )
    p.add_argument(
        "--base-version",
        type=_count_arg(0),
        metavar="M",
        help="make a delta that applies only to a locker holding version M",
    )
    p.add_argument("--code-key", required=True, metavar="FILE", help="the locker's code key")
    p.add_argument("--codes", metavar="FILE", help="codes to upsert: a .csv or .json file")
    p.add_argument(
        "--revoke",
        nargs="+",
        action="extend",
        metavar="ID",
        help="code ids to revoke (derived:<parcel_id> disables a derived code)",
    )
    p.add_argument(
        "--not-after-in",
        type=_duration_arg,
        metavar="DURATION",
        help="not_after for rows that leave it empty, counted from now",
    )
    _add_expiry(p)
    _add_sign(p)
    p.add_argument(
        "--keyring", metavar="FILE", help="keyring to check the signers against (codes role)"
    )
    _add_output(p)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser(
        "derive-code",
        help="print the derived pickup code of a parcel",
        description="Print the pickup code a locker accepts for a parcel it holds, derived "
        "from its code key (PROTOCOL section 4, derived pickup codes).",
    )
    p.add_argument("--code-key", required=True, metavar="FILE", help="the locker's code key")
    p.add_argument("--locker", type=_locker_arg, required=True, metavar="ID", help="locker id")
    p.add_argument("--parcel", required=True, metavar="PARCEL", help="parcel id")
    p.add_argument(
        "--digits",
        type=_count_arg(1),
        choices=_DERIVED_DIGITS,
        default=DEFAULT_DERIVED_DIGITS,
        metavar="N",
        help="code length, 4-12, as [codes] derived_digits in the locker's configuration "
        f"(default {DEFAULT_DERIVED_DIGITS})",
    )
    p.set_defaults(func=cmd_derive_code)

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
    p = sub.add_parser(
        "command",
        help="sign a remote command for one locker",
        description="Sign a remote command (PROTOCOL section 7) with keys of the commands "
        "role: open a compartment, take it out of or back into service, run a self-test, "
        "ask for a resync, or clear the keypad lockout. Publish it with `lockerctl publish` "
        "(never retained); the result comes back on lockers/<id>/cmd/result. Keep "
        "--expires-in short: a command is only accepted until then.",
    )
    p.add_argument("--locker", type=_locker_arg, required=True, metavar="ID")
    p.add_argument("--action", required=True, choices=COMMAND_ACTIONS)
    p.add_argument("--compartment", metavar="ID", help="for open, set_service, selftest")
    p.add_argument("--in-service", choices=("yes", "no"), help="for set_service")
    p.add_argument("--reason", default="", help="why (a ticket number): kept in the events")
    p.add_argument("--cmd-id", default="", help="the command's id (default: a new UUID)")
    p.add_argument("--override", action="store_true",
                   help="open past the bank's open budget ([commands] max_opens_per_hour); "
                   "the bank accepts it only when --sign gives more distinct commands keys "
                   "than the commands threshold")
    _add_expiry(p)
    _add_sign(p)
    _add_output(p)
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
    _add_expiry(p)
    _add_sign(p)
    _add_output(p)
    p.set_defaults(func=cmd_technician)

    p = sub.add_parser(
        "qr",
        help="sign a QR token (pickup, deposit or courier) for one locker",
        description="Sign a QR token (PROTOCOL section 9) with ONE key of the qr role and write "
        "it as text (LK1: + base45) or as a QR image. The format is --format, else OUT's "
        "suffix: .png, .svg, anything else text. A locker accepts a token once (its cti is "
        "spent when the door is seen open), only between --not-before and the expiry, and "
        "only if it is the locker named.",
    )
    p.add_argument("--locker", type=_locker_arg, required=True, metavar="ID",
                   help="the locker that accepts the token (claim sub)")
    p.add_argument("--kind", required=True, choices=QR_KINDS)
    p.add_argument("--compartment", metavar="ID",
                   help="compartment to open (a pickup names it or --parcel)")
    p.add_argument("--parcel", metavar="PARCEL_ID", help="parcel id (1-64 printable characters)")
    p.add_argument("--not-before", type=_time_arg, metavar="TIME",
                   help="not valid before this RFC 3339 UTC time")
    _add_expiry(p)
    p.add_argument("--sign", nargs="+", action="extend", required=True, metavar="KEYFILE",
                   help="private key file of the qr role (exactly one)")
    p.add_argument("--cti", type=_cti_arg, metavar="HEX",
                   help="token id, 16-32 hex characters (default: 16 random bytes)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="file to write the token or image to, or - for stdout")
    p.add_argument("--format", choices=_QR_FORMATS,
                   help="text, png or svg (default: from OUT's suffix, else text)")
    p.add_argument("--scale", type=_count_arg(1), metavar="N",
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

    add_broker_commands(sub, InputError)
    return parser


def _add_expiry(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--expires-in",
        type=_duration_arg,
        metavar="DURATION",
        help="lifetime from now: 30d, 12h, 90m, 3600s",
    )
    group.add_argument(
        "--expires-at",
        type=_time_arg,
        metavar="TIME",
        help="expiry as RFC 3339 UTC, e.g. 2026-11-29T03:00:00Z",
    )


def _add_sign(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sign",
        nargs="+",
        action="extend",
        required=True,
        metavar="KEYFILE",
        help="private key file to sign with (repeat for several signers)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="file to write the signed envelope to, or - for stdout",
    )


def main(argv: list[str] | None = None) -> int:
    """Run lockerctl; returns the exit status (0 ok, 2 bad input, 1 other failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        func = cast(Callable[[argparse.Namespace], int], args.func)
        return func(args)
    except SystemExit as exc:
        # --help exits through argparse; keep main() returning a status instead.
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except InputError as exc:
        message = str(exc)
        if not message.startswith(PROG):
            message = f"{PROG}: error: {message}"
        print(message, file=sys.stderr)
        return EXIT_USAGE
    except (OSError, LockerdError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
