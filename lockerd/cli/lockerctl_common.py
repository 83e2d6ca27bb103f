"""lockerctl's shared pieces: exit statuses, the input error, argument types, file helpers."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TypeAlias

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lockerd.errors import TrustError
from lockerd.timeutil import format_time, parse_time
from lockerd.trust.bundle import is_locker_id
from lockerd.trust.digest import load_code_key
from lockerd.trust.keyring import (
    Keyring,
    load_stored_keyring,
)
from lockerd.trust.keys import load_private_key

PROG = "lockerctl"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


_DURATION = re.compile(r"([0-9]+)([smhdw])")
_DURATION_UNITS: Mapping[str, int] = MappingProxyType(
    {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
)


# argparse names no public type for the object add_subparsers returns.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class InputError(Exception):
    """The command line or an input file is wrong: exit status 2, nothing written."""


# --- argument types -------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s` or `2w` as a positive timedelta; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a positive duration like 30d, 12h, 90m or 3600s")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def time_arg(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def count_arg(minimum: int) -> Callable[[str], int]:
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


def locker_arg(text: str) -> str:
    if not is_locker_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a locker id (1-64 characters of A-Z a-z 0-9 _ -)"
        )
    return text


# --- input helpers --------------------------------------------------------------------


def load_signers(paths: Sequence[str]) -> list[Ed25519PrivateKey]:
    keys: list[Ed25519PrivateKey] = []
    for path in paths:
        try:
            keys.append(load_private_key(Path(path)))
        except ValueError as exc:
            raise InputError(f"--sign: {exc}") from exc
    return keys


def read_code_key(path: str) -> bytes:
    try:
        return load_code_key(Path(path))
    except ValueError as exc:
        raise InputError(f"--code-key: {exc}") from exc


def load_keyring_file(path: str, *, option: str) -> Keyring:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{option}: cannot read {path!r}: {exc.strerror}") from exc
    try:
        return load_stored_keyring(raw)
    except TrustError as exc:
        raise InputError(f"{option}: {path!r} is not a usable keyring: {exc}") from exc


def write_output(target: str, data: bytes) -> None:
    if target == "-":
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
        return
    Path(target).write_bytes(data)


def report(target: str, message: str) -> None:
    # When the document itself goes to stdout, the summary must not be mixed into it.
    print(message, file=sys.stderr if target == "-" else sys.stdout)


def expiry_of(args: argparse.Namespace, now: datetime) -> datetime:
    expires_in: timedelta | None = args.expires_in
    expires_at: datetime | None = args.expires_at
    if expires_in is not None:
        return now + expires_in
    if expires_at is None:
        raise InputError("give --expires-in or --expires-at")
    if expires_at <= now:
        raise InputError(f"--expires-at {format_time(expires_at)} is not in the future")
    return expires_at


# --- options several commands share ---------------------------------------------------


def add_expiry(p: argparse.ArgumentParser) -> None:
    """--expires-in or --expires-at, one of them required (read back with `expiry_of`)."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--expires-in",
        type=duration_arg,
        metavar="DURATION",
        help="lifetime from now: 30d, 12h, 90m, 3600s",
    )
    group.add_argument(
        "--expires-at",
        type=time_arg,
        metavar="TIME",
        help="expiry as RFC 3339 UTC, e.g. 2026-11-29T03:00:00Z",
    )


def add_sign(p: argparse.ArgumentParser) -> None:
    """--sign KEYFILE..., required (read back with `load_signers`)."""
    p.add_argument(
        "--sign",
        nargs="+",
        action="extend",
        required=True,
        metavar="KEYFILE",
        help="private key file to sign with (repeat for several signers)",
    )


def add_output(p: argparse.ArgumentParser) -> None:
    """-o/--output OUT, required (written with `write_output`)."""
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="file to write the signed envelope to, or - for stdout",
    )
