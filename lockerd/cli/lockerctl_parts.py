"""lockerctl's snapshots in parts: sign a manifest and write its parts, publish and re-publish."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiomqtt

from lockerd.cli.lockerctl_broker import _run, _settings, add_broker_arguments
from lockerd.cli.lockerctl_codes import (
    CodeRow,
    CodesInput,
    check_codes_signers,
    entry_from_row,
    iter_rows,
)
from lockerd.cli.lockerctl_common import (
    EXIT_OK,
    InputError,
    Subparsers,
    add_expiry,
    add_sign,
    count_arg,
    duration_arg,
    expiry_of,
    load_keyring_file,
    load_signers,
    locker_arg,
    read_code_key,
)
from lockerd.errors import TrustError
from lockerd.mqtt import Topics
from lockerd.timeutil import format_time, utcnow
from lockerd.trust.bundle import CodeEntry
from lockerd.trust.dsse import CODES_MANIFEST_PAYLOAD_TYPE, parse_envelope, sign_envelope
from lockerd.trust.parts import (
    DEFAULT_PART_BYTES,
    MIN_PART_BYTES,
    CodesManifest,
    PartRef,
    PartWriter,
    build_manifest_payload,
    parse_manifest_payload,
    sha256_hex,
)

MANIFEST_FILE = "manifest.json"
_HASH_CHUNK = 1 << 20


def part_file(directory: Path, index: int) -> Path:
    return directory / f"part-{index:06d}.bin"


class _Uniques:
    """Ids and codes seen so far, in a scratch SQLite file: memory stays bounded by a part."""

    def __init__(self, directory: Path) -> None:
        self._conn = sqlite3.connect(directory / "seen.sqlite", isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=OFF")
        self._conn.execute("PRAGMA synchronous=OFF")
        self._conn.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, at TEXT) WITHOUT ROWID")
        self._conn.execute("CREATE TABLE codes (digest BLOB PRIMARY KEY, at TEXT) WITHOUT ROWID")
        self._conn.execute("BEGIN")

    def add(self, entry: CodeEntry, row: CodeRow) -> None:
        for table, key, what in (("ids", entry.id, f"id {entry.id!r} already used"),
                                 ("codes", bytes.fromhex(entry.digest), "same code as")):
            try:
                self._conn.execute(f"INSERT INTO {table} VALUES (?, ?)", (key, row.where))
            except sqlite3.IntegrityError:
                (first,) = self._conn.execute(
                    f"SELECT at FROM {table} WHERE {'id' if table == 'ids' else 'digest'} = ?",
                    (key,)).fetchone()
                if table == "ids":
                    raise InputError(f"{row.where}: {what} at {first}") from None
                raise InputError(f"{row.where}, column 'code': {what} {first}; a locker "
                                 "could not tell the two apart") from None

    def close(self) -> None:
        self._conn.close()


def _write_parts(rows: Iterator[CodeRow], ctx: CodesInput, revoke: set[str], *, version: int,
                 part_bytes: int, out: Path) -> tuple[list[PartRef], int]:
    """Stream the rows into part files in `out`; the refs and the number of entries."""
    writer = PartWriter(version=version, max_bytes=part_bytes)
    refs: list[PartRef] = []

    def save(part: bytes | None) -> None:
        if part is not None:
            part_file(out, len(refs)).write_bytes(part)
            refs.append(PartRef(sha256=sha256_hex(part), size=len(part)))

    uniques = _Uniques(out)
    try:
        for row in rows:
            entry, _code = entry_from_row(row, ctx)
            if entry.id in revoke:
                raise InputError(f"{row.where}: id {entry.id!r} is also in --revoke")
            uniques.add(entry, row)
            try:
                save(writer.add(entry))
            except ValueError as exc:
                raise InputError(f"{row.where}: {exc}") from exc
        save(writer.finish())
    finally:
        uniques.close()
        (out / "seen.sqlite").unlink(missing_ok=True)
    return refs, writer.entries


def cmd_parts(args: argparse.Namespace) -> int:
    now = utcnow()
    expires_at = expiry_of(args, now)
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"-o {str(out)!r}: must be a new or empty directory")
    not_after_in: timedelta | None = args.not_after_in
    ctx = CodesInput(code_key=read_code_key(args.code_key), locker_id=args.locker,
                     default_not_after=None if not_after_in is None else now + not_after_in)
    revoke = list(dict.fromkeys(args.revoke or []))
    if "" in revoke:
        raise InputError("--revoke: empty id")
    signers = load_signers(args.sign)
    keyring = (None if args.keyring is None
               else load_keyring_file(args.keyring, option="--keyring"))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: a failed run leaves no half set.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = iter_rows(args.codes) if args.codes is not None else iter(())
        refs, count = _write_parts(rows, ctx, set(revoke), version=args.version,
                                   part_bytes=args.part_bytes, out=work)
        payload = build_manifest_payload(
            locker_id=args.locker, version=args.version, issued_at=now, expires_at=expires_at,
            entries=count, parts=refs, revoke=revoke)
        raw = sign_envelope(CODES_MANIFEST_PAYLOAD_TYPE, payload, signers)
        if keyring is not None:
            check_codes_signers(parse_envelope(raw), keyring, now, args.keyring,
                                payload_type=CODES_MANIFEST_PAYLOAD_TYPE)
        (work / MANIFEST_FILE).write_bytes(raw)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = sum(ref.size for ref in refs)
    print(f"wrote codes manifest for locker {args.locker} version {args.version} ({count} "
          f"code(s) in {len(refs)} part(s), {size} bytes, {len(revoke)} revoked, expires "
          f"{format_time(expires_at)}) to {out}")
    return EXIT_OK


@dataclass(frozen=True)
class PartsSet:
    """A directory written by `lockerctl parts`: the signed manifest and its part files."""

    directory: Path
    raw_manifest: bytes
    manifest: CodesManifest

    def part(self, index: int) -> bytes:
        return part_file(self.directory, index).read_bytes()


def _file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def load_parts_set(directory: Path, *, locker_id: str) -> PartsSet:
    """Read and check a parts directory: every part file the manifest names, as it names it."""
    try:
        raw = (directory / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise InputError(f"{directory}: no readable {MANIFEST_FILE} ({exc.strerror}); "
                         "write one with lockerctl parts") from exc
    try:
        env = parse_envelope(raw)
        if env.payload_type != CODES_MANIFEST_PAYLOAD_TYPE:
            raise InputError(f"{directory / MANIFEST_FILE}: payloadType {env.payload_type!r} "
                             f"is not {CODES_MANIFEST_PAYLOAD_TYPE!r}")
        manifest = parse_manifest_payload(env.payload)
    except TrustError as exc:
        raise InputError(f"{directory / MANIFEST_FILE}: {exc}") from exc
    if manifest.locker_id != locker_id:
        raise InputError(f"{directory}: the manifest is for locker {manifest.locker_id!r}, "
                         f"not {locker_id!r}")
    for index, ref in enumerate(manifest.parts):
        path = part_file(directory, index)
        try:
            digest, size = _file_sha256(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot read it ({exc.strerror})") from exc
        if (digest, size) != (ref.sha256, ref.size):
            raise InputError(f"{path}: not the part the manifest names (size or SHA-256 "
                             "differ)")
    return PartsSet(directory=directory, raw_manifest=raw, manifest=manifest)


def wants_all(body: Any, manifest: CodesManifest) -> bool:
    """A bank below this version that receives no snapshot in parts (it restarted, or the
    broker lost the retained manifest): it needs the manifest and every part again."""
    if not isinstance(body, dict) or "parts" in body:
        return False
    held = body.get("codes_version")
    return isinstance(held, int) and not isinstance(held, bool) and held < manifest.version


def wanted_parts(body: Any, manifest: CodesManifest) -> list[int]:
    """The part indexes a bank's sync/request asks for again, for this manifest's version."""
    parts = body.get("parts") if isinstance(body, dict) else None
    if not isinstance(parts, dict) or parts.get("version") != manifest.version:
        return []
    wanted: list[int] = []
    runs = parts.get("missing")
    for run in runs if isinstance(runs, list) else []:
        if (isinstance(run, list) and len(run) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in run)
                and 0 <= run[0] <= run[1] < manifest.part_count):
            wanted.extend(range(run[0], run[1] + 1))
    return list(dict.fromkeys(wanted))


async def _publish_parts(client: aiomqtt.Client, topics: Topics, parts: PartsSet,
                         indexes: list[int]) -> None:
    for index in indexes:
        await client.publish(topics.codes_part, parts.part(index), qos=1)


async def _serve(client: aiomqtt.Client, topics: Topics, parts: PartsSet,
                 seconds: float, *, retain: bool) -> int:
    """Answer the bank's sync/requests for missing parts for `seconds`; parts re-published."""
    again = 0
    deadline = time.monotonic() + seconds
    stream = aiter(client.messages)
    while (left := deadline - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(left):
                message = await anext(stream)
        except TimeoutError:
            break
        payload = message.payload
        try:
            body = json.loads(payload if isinstance(payload, bytes | str) else b"")
        except ValueError:
            continue
        if wants_all(body, parts.manifest):
            print(f"lockerctl: the bank holds codes version {body['codes_version']} and "
                  f"receives no parts; publishing the manifest and every part again",
                  file=sys.stderr)
            await client.publish(topics.codes_manifest, parts.raw_manifest, qos=1,
                                 retain=retain)
            indexes = list(range(parts.manifest.part_count))
        else:
            indexes = wanted_parts(body, parts.manifest)
        if indexes:
            print(f"lockerctl: the bank asks for {len(indexes)} part(s) of version "
                  f"{parts.manifest.version} again; publishing them", file=sys.stderr)
            await _publish_parts(client, topics, parts, indexes)
            again += len(indexes)
    return again


def cmd_publish_parts(args: argparse.Namespace) -> int:
    settings, topics = _settings(args)
    parts = load_parts_set(Path(args.directory), locker_id=args.locker)
    manifest = parts.manifest

    async def go() -> int:
        async with settings.client(clean_session=True, timeout_s=args.timeout) as client:
            if args.serve > 0:
                await client.subscribe(topics.sync_request, qos=1)
            # Retained, like a snapshot bundle, so a bank that connects later learns of it.
            await client.publish(topics.codes_manifest, parts.raw_manifest, qos=1,
                                 retain=not args.no_retain)
            await _publish_parts(client, topics, parts, list(range(manifest.part_count)))
            print(f"published codes manifest version {manifest.version} to "
                  f"{topics.codes_manifest} and its {manifest.part_count} part(s) to "
                  f"{topics.codes_part}", flush=True)
            if args.serve <= 0:
                return 0
            return await _serve(client, topics, parts, args.serve, retain=not args.no_retain)

    again = _run(go(), settings)
    if args.serve > 0:
        print(f"lockerctl: {again} part(s) published again on request", file=sys.stderr)
    return EXIT_OK


def add_parsers(sub: Subparsers) -> None:
    """Register parts and publish-parts."""
    p = sub.add_parser(
        "parts", help="sign a snapshot too large for one message as a manifest and parts",
        description="Hash plain codes with the locker's code key (the input of lockerctl "
        "bundle) and write a full snapshot in parts to a new directory: manifest.json, a "
        "signed manifest naming each part's SHA-256 and size, and part-NNNNNN.bin, the "
        "entries in a compact binary encoding, each part at most --part-bytes. A .csv input "
        "is read one row at a time, so memory is bounded by a part, not the set. Publish "
        "the directory with lockerctl publish-parts.")
    p.add_argument("--locker", type=locker_arg, required=True, metavar="ID",
                   help="locker id the snapshot is for")
    p.add_argument("--version", type=count_arg(1), required=True, metavar="N",
                   help="snapshot version, greater than the one the locker holds")
    p.add_argument("--code-key", required=True, metavar="FILE", help="the locker's code key")
    p.add_argument("--codes", metavar="FILE", help="the codes: a .csv (streamed) or .json file")
    p.add_argument("--revoke", nargs="+", action="extend", metavar="ID",
                   help="code ids to revoke (derived:<parcel_id> disables a derived code)")
    p.add_argument("--not-after-in", type=duration_arg, metavar="DURATION",
                   help="not_after for rows that leave it empty, counted from now")
    p.add_argument("--part-bytes", type=count_arg(MIN_PART_BYTES), default=DEFAULT_PART_BYTES,
                   metavar="BYTES", help="largest part, at most the bank's [codes] "
                   f"max_part_bytes (default {DEFAULT_PART_BYTES})")
    add_expiry(p)
    add_sign(p)
    p.add_argument("--keyring", metavar="FILE",
                   help="keyring to check the signers against (codes role)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory to write, new or empty")
    p.set_defaults(func=cmd_parts)

    p = sub.add_parser(
        "publish-parts", help="publish a snapshot in parts to a locker, and serve re-requests",
        description="Publish the manifest written by lockerctl parts to lockers/<id>/"
        "codes/manifest (retained, QoS 1), then each part to lockers/<id>/codes/part (QoS 1, "
        "not retained), one part in memory at a time. With --serve SECONDS, stay connected "
        "and publish again the parts a bank names in its sync/request (\"parts\": "
        "{\"version\", \"missing\"}), and the manifest and every part to a bank whose "
        "sync/request shows an older codes version and no parts under way.")
    add_broker_arguments(p)
    p.add_argument("directory", help="the directory written by lockerctl parts")
    p.add_argument("--serve", type=float, default=0.0, metavar="SECONDS",
                   help="answer requests for missing parts this long (default 0: do not)")
    p.add_argument("--no-retain", action="store_true", help="do not retain the manifest")
    p.set_defaults(func=cmd_publish_parts)

