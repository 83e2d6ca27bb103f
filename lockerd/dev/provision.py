"""Provision a self-contained bank in one directory: keys, keyring, codes bundle and config.

Used by `lockerd demo`, the benchmarks and the test suite, so that all three run the daemon
exactly as an installation would: from files, verified with the real trust code.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hal.base import DeviceKind
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodeEntry, build_bundle_payload
from lockerd.trust.command import build_command_payload
from lockerd.trust.digest import code_digest, generate_code_key, save_code_key
from lockerd.trust.dsse import (
    CODES_PAYLOAD_TYPE,
    COMMAND_PAYLOAD_TYPE,
    HELP_REPLY_PAYLOAD_TYPE,
    KEYRING_PAYLOAD_TYPE,
    RoleKeys,
    sign_envelope,
)
from lockerd.trust.helpreply import build_reply_payload
from lockerd.trust.keyring import ROLE_NAMES, build_keyring_payload
from lockerd.trust.keys import generate_key, public_hex, save_private_key
from lockerd.trust.qrtoken import mint_qr_token


@dataclass(frozen=True)
class PlainCode:
    """A code as the backend knows it, before it is hashed into a bundle."""

    id: str
    code: str
    compartment: str | None
    kind: str = "pickup"
    parcel_id: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None  # default: a week from now
    max_uses: int = 1


@dataclass
class BankKit:
    """Everything a backend holds for one bank, plus the bank's config file."""

    directory: Path
    locker_id: str
    compartments: tuple[str, ...]
    root_key: Ed25519PrivateKey
    codes_key: Ed25519PrivateKey
    code_key: bytes
    config_path: Path
    keyring_path: Path
    bundle_path: Path
    socket_path: Path
    state_dir: Path
    codes: list[PlainCode] = field(default_factory=list)

    def digest(self, code: str) -> str:
        return code_digest(self.code_key, self.locker_id, code)

    def entries(self, codes: Sequence[PlainCode]) -> list[CodeEntry]:
        default_end = utcnow() + timedelta(days=7)
        return [
            CodeEntry(
                id=c.id, kind=c.kind, digest=self.digest(c.code),  # type: ignore[arg-type]
                not_after=c.not_after or default_end, compartment=c.compartment,
                parcel_id=c.parcel_id, not_before=c.not_before, max_uses=c.max_uses,
            )
            for c in codes
        ]

    def bundle(
        self,
        codes: Sequence[PlainCode],
        *,
        version: int,
        base_version: int | None = None,
        revoke: Sequence[str] = (),
        expires_at: datetime | None = None,
        locker_id: str | None = None,
        signer: Ed25519PrivateKey | None = None,
    ) -> bytes:
        """A signed codes bundle (snapshot unless base_version is given)."""
        now = utcnow()
        payload = build_bundle_payload(
            locker_id=locker_id or self.locker_id, version=version, base_version=base_version,
            issued_at=now, expires_at=expires_at or now + timedelta(days=7),
            upsert=self.entries(codes), revoke=revoke,
        )
        return sign_envelope(CODES_PAYLOAD_TYPE, payload, [signer or self.codes_key])

    def command(
        self,
        action: str,
        *,
        cmd_id: str | None = None,
        args: Mapping[str, Any] | None = None,
        expires_at: datetime | None = None,
        locker_id: str | None = None,
        signer: Ed25519PrivateKey | None = None,
        signers: Sequence[Ed25519PrivateKey] = (),
        override: bool = False,
    ) -> bytes:
        """A remote command signed by the commands role (the root key in this kit), or by each
        of `signers`; `override` asks to open past the open budget."""
        now = utcnow()
        payload = build_command_payload(
            cmd_id=cmd_id or str(uuid.uuid4()), locker_id=locker_id or self.locker_id,
            issued_at=now, expires_at=expires_at or now + timedelta(minutes=5), action=action,
            args=args, override=override)
        return sign_envelope(COMMAND_PAYLOAD_TYPE, payload,
                             list(signers) or [signer or self.root_key])

    def help_reply(
        self,
        help_id: str,
        *,
        outcome: str = "resent",
        message: str = "New code sent by SMS to ***67",
        expires_at: datetime | None = None,
        locker_id: str | None = None,
        signer: Ed25519PrivateKey | None = None,
    ) -> bytes:
        """A reply to a help request (PROTOCOL section 12), signed by the commands role (the
        root key in this kit) or by `signer`."""
        now = utcnow()
        payload = build_reply_payload(
            locker_id=locker_id or self.locker_id, help_id=help_id, issued_at=now,
            expires_at=expires_at or now + timedelta(minutes=5), outcome=outcome,
            message=message)
        return sign_envelope(HELP_REPLY_PAYLOAD_TYPE, payload, [signer or self.root_key])

    def qr_token(
        self,
        kind: str = "pickup",
        *,
        cti: bytes | None = None,
        compartment: str | None = None,
        parcel_id: str | None = None,
        not_before: datetime | None = None,
        expires_at: datetime | None = None,
        locker_id: str | None = None,
        signer: Ed25519PrivateKey | None = None,
    ) -> str:
        """A signed QR token (PROTOCOL section 9) of the qr role (the root key in this kit)."""
        return mint_qr_token(
            signer=signer or self.root_key, locker_id=locker_id or self.locker_id, kind=kind,
            cti=cti or secrets.token_bytes(16),
            expires_at=expires_at or utcnow() + timedelta(hours=1), not_before=not_before,
            compartment=compartment, parcel_id=parcel_id)

    def keyring(self, *, version: int = 1, expires_at: datetime | None = None,
                commands: RoleKeys | None = None) -> bytes:
        """A keyring signed by the root key naming the codes key (other roles: the root key,
        or `commands` for the commands role)."""
        now = utcnow()
        root = RoleKeys.from_keys([self.root_key.public_key()], 1)
        roles = {name: root for name in ROLE_NAMES}
        roles["codes"] = RoleKeys.from_keys([self.codes_key.public_key()], 1)
        if commands is not None:
            roles["commands"] = commands
        payload = build_keyring_payload(
            version=version, issued_at=now, expires_at=expires_at or now + timedelta(days=365),
            roles=roles,
        )
        return sign_envelope(KEYRING_PAYLOAD_TYPE, payload, [self.root_key])


def random_code(digits: int = 6) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(digits))


def make_bank(
    directory: Path,
    *,
    locker_id: str = "L1",
    compartments: int = 8,
    codes: Sequence[PlainCode] = (),
    parcels: Sequence[str] = (),
    sizes: Sequence[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    socket: bool = True,
    import_files: bool = True,
    wire: Path | None = None,
) -> BankKit:
    """Write keys, code key, keyring, a codes bundle (version 1) and a sim config into
    `directory`. `sizes` gives the compartments' sizes in order (default: all "M").
    `overrides` replaces keys of config sections, e.g. {"doors": {...}}.
    Without `import_files` the config names no keyring or bundle file: the bank starts empty
    and gets both over MQTT. With `wire` (the directory of a running `sim.wire` bank) the
    locks, doors and occupancy use the real `kerong` driver and the keypad and scanner the
    real `serial` drivers on that bank's pseudo-terminals; the display stays simulated."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "keys"
    keys.mkdir(exist_ok=True)
    root_key, codes_key = generate_key(), generate_key()
    save_private_key(root_key, keys / "root.key", overwrite=True)
    save_private_key(codes_key, keys / "codes.key", overwrite=True)
    code_key = generate_code_key()
    save_code_key(code_key, keys / "code_key", overwrite=True)
    ids = tuple(str(i) for i in range(1, compartments + 1))
    kit = BankKit(
        directory=directory, locker_id=locker_id, compartments=ids, root_key=root_key,
        codes_key=codes_key, code_key=code_key, config_path=directory / "lockerd.toml",
        keyring_path=directory / "keyring.json", bundle_path=directory / "codes.json",
        # Unix socket paths are limited to ~100 bytes; keep it short and beside the config.
        socket_path=directory / "sim.sock", state_dir=directory / "state",
        codes=list(codes),
    )
    kit.keyring_path.write_bytes(kit.keyring())
    kit.bundle_path.write_bytes(kit.bundle(codes, version=1))
    config: dict[str, Any] = {
        "locker": {"id": locker_id, "state_dir": "state", "name": "simulated bank"},
        "trust": {
            "root_keys": [public_hex(root_key.public_key())],
            "root_threshold": 1,
            "code_key_file": "keys/code_key",
            "keyring_file": "keyring.json",
        },
        "codes": {"bundle_file": "codes.json"},
        "hal": {kind.value: {"backend": "sim"} for kind in DeviceKind},
        "backends": {"sim": {"parcels": list(parcels)}},
        "compartments": [{"id": cid, "size": size}
                         for cid, size in zip(ids, list(sizes) or ["M"] * len(ids), strict=True)],
    }
    if socket:
        config["backends"]["sim"]["socket"] = str(kit.socket_path)
    if not import_files:
        del config["trust"]["keyring_file"]
        del config["codes"]
    if wire is not None:
        _wire_config(config, wire, ids)
    _merge(config, overrides or {})
    kit.config_path.write_text(to_toml(config), encoding="utf-8")
    return kit


def _wire_config(config: dict[str, Any], wire: Path, ids: Sequence[str]) -> None:
    """Point the hardware backends at a `sim.wire` bank's ports."""
    from sim.wire.bank import WirePaths, kerong_wiring

    paths = WirePaths(wire)
    wiring = kerong_wiring(ids)
    boards = sorted({int(place.split("/")[0]) for place in wiring.values()})
    hal = config["hal"]
    for kind in ("lock", "door_sensor", "occupancy"):
        hal[kind] = {"backend": "kerong"}
    hal["keypad"] = {"backend": "serial", "options": {"port": str(paths.keypad)}}
    hal["scanner"] = {"backend": "serial", "options": {"port": str(paths.scanner)}}
    del hal["tamper"]
    config["backends"]["kerong"] = {
        "port": str(paths.kerong), "poll_interval_s": 0.1,
        "boards": [{"address": b, "engaged_bit": 1} for b in boards],
        "compartments": wiring,
    }
    config["backends"]["sim"] = {}  # the display alone stays simulated


def _merge(into: dict[str, Any], changes: Mapping[str, Any]) -> None:
    """Deep-merge `changes` into `into`: tables merge key by key, anything else replaces."""
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def to_toml(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for configuration documents (tables, arrays of tables, scalars)."""
    lines: list[str] = []
    _emit_table(doc, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    if path and (scalars or not table):
        lines.append("")
        lines.append(f"[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            _emit_table(value, [*path, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join([*path, key])}]]")
                for k, v in item.items():
                    lines.append(f"{k} = {_value(v)}")


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
