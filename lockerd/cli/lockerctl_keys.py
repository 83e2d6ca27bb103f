"""lockerctl's key commands: keygen, code-key and signed keyrings."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lockerd.cli.lockerctl_common import (
    EXIT_OK,
    InputError,
    Subparsers,
    add_expiry,
    add_output,
    add_sign,
    count_arg,
    expiry_of,
    load_keyring_file,
    load_signers,
    report,
    write_output,
)
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, utcnow
from lockerd.trust.digest import (
    generate_code_key,
    save_code_key,
)
from lockerd.trust.dsse import (
    KEYRING_PAYLOAD_TYPE,
    RoleKeys,
    count_valid_signers,
    parse_envelope,
    sign_envelope,
)
from lockerd.trust.keyring import (
    ROLE_NAMES,
    accept_keyring,
    build_keyring_payload,
)
from lockerd.trust.keys import (
    generate_key,
    keyid_of,
    load_public_key,
    parse_public_hex,
    public_hex,
    save_private_key,
    save_public_key,
)

_HEX_KEY = re.compile(r"[0-9a-f]{64}")


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
    expires_at = expiry_of(args, now)
    roles: dict[str, RoleKeys] = {}
    for name in ROLE_NAMES:
        option = f"--{name}"
        keys = [resolve_public_key(text, option=option) for text in getattr(args, name)]
        threshold: int = getattr(args, f"{name}_threshold")
        try:
            roles[name] = RoleKeys.from_keys(keys, threshold)
        except ValueError as exc:
            raise InputError(f"{option}: {exc}") from exc
    signers = load_signers(args.sign)
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
        previous = load_keyring_file(args.previous, option="--previous")
        try:
            accept_keyring(
                raw, trusted_root=previous.root, current_version=previous.version, now=now
            )
        except TrustError as exc:
            raise InputError(
                f"a locker holding {args.previous!r} (version {previous.version}) would "
                f"refuse this keyring: {exc}"
            ) from exc
    write_output(args.output, raw)
    report(
        args.output,
        f"wrote keyring version {args.version} (expires {format_time(expires_at)}) to "
        f"{args.output}, signed by {len(signers)} key(s)",
    )
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Register keygen, code-key and keyring."""
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
        type=count_arg(1),
        required=True,
        metavar="N",
        help="keyring version, greater than the one the lockers hold",
    )
    add_expiry(p)
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
            type=count_arg(1),
            default=1,
            metavar="K",
            help=f"signatures needed for the {name} role (default 1)",
        )
    add_sign(p)
    p.add_argument(
        "--previous",
        metavar="FILE",
        help="keyring the lockers hold now: check that they would accept the new one",
    )
    add_output(p)
    p.set_defaults(func=cmd_keyring)
