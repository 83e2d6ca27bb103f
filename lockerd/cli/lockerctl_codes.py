"""lockerctl's codes input: plain codes into signed bundles; derived and support codes."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from lockerd.cli.lockerctl_common import (
    EXIT_OK,
    InputError,
    Subparsers,
    add_expiry,
    add_output,
    add_sign,
    count_arg,
    duration_arg,
    expiry_of,
    load_keyring_file,
    load_signers,
    locker_arg,
    read_code_key,
    report,
    time_arg,
    write_output,
)
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, parse_time, utcnow
from lockerd.trust.bundle import (
    CODE_KINDS,
    CodeEntry,
    CodeKind,
    build_bundle_payload,
    is_compartment_id,
)
from lockerd.trust.digest import (
    DEFAULT_DERIVED_DIGITS,
    SUPPORT_WINDOW_S,
    code_digest,
    derived_pickup_code,
    support_code,
    support_window,
)
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    Envelope,
    parse_envelope,
    sign_envelope,
    verify_role,
)
from lockerd.trust.keyring import Keyring

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


@dataclass(frozen=True)
class CodeRow:
    """One code read from the input file, before hashing; `where` names file and line."""

    where: str
    fields: Mapping[str, str | int | None]


def read_codes_csv(path: Path) -> list[CodeRow]:
    """Rows of a codes CSV with a header line; empty cells become None."""
    return list(iter_codes_csv(path))


def iter_codes_csv(path: Path) -> Iterator[CodeRow]:
    """`read_codes_csv` one row at a time: memory holds a row, not the file."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(f"--codes: cannot read {str(path)!r}: {exc.strerror}") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            columns = _csv_columns(path, next(reader, None))
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
                yield CodeRow(where=where, fields=fields)
        except csv.Error as exc:
            raise InputError(f"{path} line {reader.line_num}: bad CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _csv_columns(path: Path, header: list[str] | None) -> list[str]:
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
    return columns


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
    return list(iter_rows(path_text))


def iter_rows(path_text: str) -> Iterator[CodeRow]:
    """The rows of a codes file: a .csv one at a time, a .json read whole."""
    path = Path(path_text)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return iter_codes_csv(path)
    if suffix == ".json":
        return iter(read_codes_json(path))
    raise InputError(f"--codes: {path_text!r} must end in .csv or .json")


def cmd_bundle(args: argparse.Namespace) -> int:
    now = utcnow()
    expires_at = expiry_of(args, now)
    locker_id: str = args.locker
    version: int = args.version
    base_version: int | None = args.base_version
    if base_version is not None and base_version >= version:
        raise InputError(f"--base-version {base_version} must be lower than --version {version}")
    not_after_in: timedelta | None = args.not_after_in
    ctx = CodesInput(
        code_key=read_code_key(args.code_key),
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
    signers = load_signers(args.sign)
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
        keyring = load_keyring_file(args.keyring, option="--keyring")
        check_codes_signers(parse_envelope(raw), keyring, now, args.keyring,
                            payload_type=CODES_PAYLOAD_TYPE)
    write_output(args.output, raw)
    shape = "snapshot" if base_version is None else f"delta on version {base_version}"
    report(
        args.output,
        f"wrote codes bundle for locker {locker_id} version {version} ({shape}, "
        f"{len(entries)} code(s), {len(revoke)} revoked, expires {format_time(expires_at)}) "
        f"to {args.output}",
    )
    return EXIT_OK


def check_codes_signers(env: Envelope, keyring: Keyring, now: datetime, path: str, *,
                        payload_type: str) -> None:
    """InputError unless the codes role of the keyring at `path` accepts the envelope."""
    try:
        verify_role(env, expected_type=payload_type, role=keyring.codes)
    except TrustError as exc:
        raise InputError(
            f"--sign: the codes role of {path!r} does not accept these signers: {exc}"
        ) from exc
    if keyring.is_expired(now):
        raise InputError(
            f"--keyring: {path!r} expired at {format_time(keyring.expires_at)}; a locker "
            "accepts no new bundle under it"
        )


def cmd_derive_code(args: argparse.Namespace) -> int:
    parcel: str = args.parcel
    if not parcel:
        raise InputError("--parcel: empty parcel id")
    code_key = read_code_key(args.code_key)
    print(derived_pickup_code(code_key, args.locker, parcel, args.digits))
    return EXIT_OK


def cmd_support_code(args: argparse.Namespace) -> int:
    parcel: str = args.parcel
    if not parcel:
        raise InputError("--parcel: empty parcel id")
    code_key = read_code_key(args.code_key)
    at: datetime = args.at if args.at is not None else datetime.now(UTC)
    window = support_window(at.timestamp())
    print(support_code(code_key, args.locker, parcel, window, args.digits))
    # The bank takes it while its own window is w-1, w or w+1: until the end of w+1.
    until = datetime.fromtimestamp((window + 2) * SUPPORT_WINDOW_S, UTC)
    print(f"valid once, until {format_time(until)} on the bank's trusted clock "
          f"(window {window})", file=sys.stderr)
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Register bundle, derive-code and support-code."""
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
        type=locker_arg,
        required=True,
        metavar="ID",
        help="locker id the bundle is for",
    )
    p.add_argument(
        "--version",
        type=count_arg(1),
        required=True,
        metavar="N",
        help="bundle version, greater than the one the locker holds",
    )
    p.add_argument(
        "--base-version",
        type=count_arg(0),
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
        type=duration_arg,
        metavar="DURATION",
        help="not_after for rows that leave it empty, counted from now",
    )
    add_expiry(p)
    add_sign(p)
    p.add_argument(
        "--keyring", metavar="FILE", help="keyring to check the signers against (codes role)"
    )
    add_output(p)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser(
        "derive-code",
        help="print the derived pickup code of a parcel",
        description="Print the pickup code a locker accepts for a parcel it holds, derived "
        "from its code key (PROTOCOL section 4, derived pickup codes).",
    )
    p.add_argument("--code-key", required=True, metavar="FILE", help="the locker's code key")
    p.add_argument("--locker", type=locker_arg, required=True, metavar="ID", help="locker id")
    p.add_argument("--parcel", required=True, metavar="PARCEL", help="parcel id")
    p.add_argument(
        "--digits",
        type=count_arg(1),
        choices=_DERIVED_DIGITS,
        default=DEFAULT_DERIVED_DIGITS,
        metavar="N",
        help="code length, 4-12, as [codes] derived_digits in the locker's configuration "
        f"(default {DEFAULT_DERIVED_DIGITS})",
    )
    p.set_defaults(func=cmd_derive_code)
    _add_support_code_parser(sub)


def _add_support_code_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "support-code",
        help="print a support code for a parcel, to read out over the phone",
        description="Print the short-lived code a locker with [codes] support_codes = true "
        "accepts once for a parcel it holds (PROTOCOL section 13). It stays valid until the "
        "end of the next 10-minute window (10 to 20 minutes); when, is printed on stderr.",
    )
    p.add_argument("--code-key", required=True, metavar="FILE", help="the locker's code key")
    p.add_argument("--locker", type=locker_arg, required=True, metavar="ID", help="locker id")
    p.add_argument("--parcel", required=True, metavar="PARCEL", help="parcel id")
    p.add_argument("--at", type=time_arg, metavar="TIME",
                   help="issue time, RFC 3339 UTC like 2026-12-01T10:00:00Z (default: now)")
    p.add_argument(
        "--digits",
        type=count_arg(1),
        choices=_DERIVED_DIGITS,
        default=DEFAULT_DERIVED_DIGITS,
        metavar="N",
        help="code length, 4-12, as [codes] derived_digits in the locker's configuration "
        f"(default {DEFAULT_DERIVED_DIGITS})",
    )
    p.set_defaults(func=cmd_support_code)
