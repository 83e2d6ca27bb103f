"""Ed25519 keys: key ids, public-key hex, and the private-key file format."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

_LOWER_HEX_64 = re.compile(r"[0-9a-f]{64}")
_ANY_HEX_64 = re.compile(r"[0-9a-fA-F]{64}")


def public_raw(public: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def keyid_of(public: Ed25519PublicKey) -> str:
    """Lowercase hex SHA-256 of the key's 32 raw bytes (PROTOCOL section 1)."""
    return hashlib.sha256(public_raw(public)).hexdigest()


def public_hex(public: Ed25519PublicKey) -> str:
    """The key as 64 lowercase hex characters, its wire form."""
    return public_raw(public).hex()


def parse_public_hex(text: str) -> Ed25519PublicKey:
    """Parse a public key written as 64 lowercase hex characters; ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"public key must be a string of 64 hex characters, got {text!r}")
    if not _LOWER_HEX_64.fullmatch(text):
        if _ANY_HEX_64.fullmatch(text):
            raise ValueError(f"public key must be lowercase hex: {text!r}")
        raise ValueError(
            f"public key must be 64 lowercase hex characters (32 bytes), "
            f"got {len(text)} characters: {text[:80]!r}"
        )
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError as exc:
        raise ValueError(f"not a valid Ed25519 public key: {text!r}") from exc


def generate_key() -> Ed25519PrivateKey:
    """A fresh random Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def private_seed(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte seed a private key is made from."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def read_hex_secret(path: Path, *, what: str) -> bytes:
    """Read a file holding 64 hex characters (32 bytes) and an optional trailing newline.

    `what` names the file's role in error messages ("private key", "code key").
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ValueError(f"{what} file {str(path)!r} does not exist") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {str(path)!r}: {exc.strerror}") from exc
    # One trailing newline is what editors and `echo` leave; anything more is suspicious.
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what} file {str(path)!r} must hold 64 hex characters, found non-ASCII bytes"
        ) from exc
    if not _ANY_HEX_64.fullmatch(text):
        raise ValueError(
            f"{what} file {str(path)!r} must hold exactly 64 hex characters (32 bytes) "
            f"and an optional newline, found {len(text)} characters"
            + ("" if len(text) != 64 else " that are not all hex digits")
        )
    return bytes.fromhex(text)


def write_secret_file(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write `data` to `path` with mode 0600, created atomically.

    Refuses (FileExistsError) when the file exists, unless `overwrite`: a secret
    overwritten by mistake cannot be recovered.
    """
    if overwrite:
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise FileExistsError(
            f"{str(path)!r} already exists; refusing to overwrite a secret"
        ) from exc
    with os.fdopen(fd, "wb") as out:
        # The umask may have removed bits but never adds any; fchmod makes it exact.
        os.fchmod(out.fileno(), 0o600)
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load a private key file: 64 hex characters of the 32-byte seed, optional newline."""
    seed = read_hex_secret(path, what="private key")
    return Ed25519PrivateKey.from_private_bytes(seed)


def save_private_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> None:
    """Write a private key file (seed hex + newline, mode 0600); never overwrite silently."""
    write_secret_file(path, private_seed(key).hex().encode("ascii") + b"\n", overwrite=overwrite)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a .pub file: 64 lowercase hex characters, optional trailing newline."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError as exc:
        raise ValueError(f"public key file {str(path)!r} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read public key file {str(path)!r}: {exc}") from exc
    try:
        return parse_public_hex(text.removesuffix("\n").removesuffix("\r"))
    except ValueError as exc:
        raise ValueError(f"public key file {str(path)!r}: {exc}") from exc


def save_public_key(public: Ed25519PublicKey, path: Path, *, overwrite: bool = False) -> None:
    """Write a .pub file (public hex + newline). Not secret, but never clobbered silently."""
    data = (public_hex(public) + "\n").encode("ascii")
    if not overwrite and path.exists():
        raise FileExistsError(f"{str(path)!r} already exists; refusing to overwrite it")
    path.write_bytes(data)
