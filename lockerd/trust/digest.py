"""Code digests and derived pickup codes: HMAC-SHA256 under the locker's code key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from lockerd.trust.keys import read_hex_secret, write_secret_file

CODE_KEY_BYTES = 32
DEFAULT_DERIVED_DIGITS = 8
SUPPORT_WINDOW_S = 600  # a support code's window: w = floor(unix_seconds / 600)


def _check_code_key(code_key: bytes) -> None:
    # A 64-byte key is almost always the hex text of the file passed by mistake.
    if len(code_key) != CODE_KEY_BYTES:
        raise ValueError(f"code key must be {CODE_KEY_BYTES} raw bytes, got {len(code_key)} bytes")


def code_digest(code_key: bytes, locker_id: str, code: str) -> str:
    """hex(HMAC-SHA256(code_key, UTF-8(locker_id + "\\n" + code))), PROTOCOL section 4."""
    _check_code_key(code_key)
    message = (locker_id + "\n" + code).encode("utf-8")
    return hmac.new(code_key, message, hashlib.sha256).hexdigest()


def derived_pickup_code(
    code_key: bytes, locker_id: str, parcel_id: str, digits: int = DEFAULT_DERIVED_DIGITS
) -> str:
    """The pickup code the backend can issue offline for a parcel (PROTOCOL section 4)."""
    _check_code_key(code_key)
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive integer, got {digits!r}")
    message = ("pickup\n" + locker_id + "\n" + parcel_id).encode("utf-8")
    mac = hmac.new(code_key, message, hashlib.sha256).digest()
    value = int.from_bytes(mac[:8], "big") % 10**digits
    return str(value).zfill(digits)


def support_window(unix_seconds: float) -> int:
    """The support code window `w` a moment falls in (PROTOCOL section 13)."""
    return int(unix_seconds // SUPPORT_WINDOW_S)


def support_code(
    code_key: bytes, locker_id: str, parcel_id: str, window: int,
    digits: int = DEFAULT_DERIVED_DIGITS,
) -> str:
    """The code support reads out for a parcel in window `window` (PROTOCOL section 13)."""
    _check_code_key(code_key)
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive integer, got {digits!r}")
    message = ("support\n" + locker_id + "\n" + parcel_id + "\n" + str(window)).encode("utf-8")
    mac = hmac.new(code_key, message, hashlib.sha256).digest()
    value = int.from_bytes(mac[:8], "big") % 10**digits
    return str(value).zfill(digits)


def generate_code_key() -> bytes:
    """A fresh random 32-byte code key."""
    return secrets.token_bytes(CODE_KEY_BYTES)


def load_code_key(path: Path) -> bytes:
    """Read a code key file: 64 hex characters (32 bytes), optional trailing newline."""
    return read_hex_secret(path, what="code key")


def save_code_key(key: bytes, path: Path, overwrite: bool = False) -> None:
    """Write a code key file (hex + newline, mode 0600); never overwrite silently."""
    _check_code_key(key)
    write_secret_file(path, key.hex().encode("ascii") + b"\n", overwrite=overwrite)
