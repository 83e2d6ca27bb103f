"""lockerctl end to end: files it writes are accepted by the trust layer, errors are clear."""

from __future__ import annotations

import base64
import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Run, RunFn

from lockerd.cli.lockerctl_cmd import parse_duration
from lockerd.errors import TrustError
from lockerd.timeutil import utcnow
from lockerd.trust.bundle import CodesBundle, verify_bundle
from lockerd.trust.digest import code_digest, derived_pickup_code, load_code_key
from lockerd.trust.dsse import RoleKeys
from lockerd.trust.keyring import ROLE_NAMES, Keyring, accept_keyring
from lockerd.trust.keys import keyid_of, load_private_key, load_public_key, public_hex

pytestmark = pytest.mark.unit

SUBCOMMANDS = ["keygen", "code-key", "keyring", "bundle", "derive-code", "inspect"]

CSV_HEADER = "id,code,kind,compartment,parcel_id,not_before,not_after,max_uses\n"




def _keygen(run: RunFn, path: Path) -> Path:
    result = run("keygen", path)
    assert result.status == 0, result.err
    return path


def _single_error_line(result: Run) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    return lines[0]


@pytest.fixture
def pki(tmp_path: Path, run: RunFn) -> dict[str, Path]:
    """Root and role keys plus a code key, made with lockerctl itself."""
    paths = {name: _keygen(run, tmp_path / f"{name}.key") for name in ("root", "codes", "ops")}
    code_key = tmp_path / "L1.codekey"
    assert run("code-key", code_key).status == 0
    paths["code_key"] = code_key
    return paths


def _keyring_args(pki: dict[str, Path], out: Path, version: int = 1) -> list[str | Path]:
    ops_hex = public_hex(load_public_key(pki["ops"].with_suffix(".pub")))
    return [
        "keyring", "--version", str(version), "--expires-in", "30d",
        "--root", pki["root"].with_suffix(".pub"),
        "--codes", pki["codes"].with_suffix(".pub"),
        "--commands", ops_hex, "--technicians", ops_hex, "--qr", ops_hex,
        "--sign", pki["root"], "-o", out,
    ]  # fmt: skip


def _accept(path: Path, root_pub: Path, current_version: int = 0) -> Keyring:
    return accept_keyring(
        path.read_bytes(),
        trusted_root=RoleKeys.from_keys([load_public_key(root_pub)], 1),
        current_version=current_version,
        now=utcnow(),
    )


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_help_of_every_subcommand(run: RunFn, command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.status == 0
    assert "usage: lockerctl" in result.out
    for name in SUBCOMMANDS if not command else []:
        assert name in result.out


def test_keygen(run: RunFn, tmp_path: Path) -> None:
    result = run("keygen", tmp_path / "root.key")
    assert result.status == 0
    key = load_private_key(tmp_path / "root.key")
    assert stat.S_IMODE((tmp_path / "root.key").stat().st_mode) == 0o600
    pub_text = (tmp_path / "root.pub").read_text()
    assert pub_text == public_hex(key.public_key()) + "\n"
    assert public_hex(key.public_key()) in result.out
    assert keyid_of(key.public_key()) in result.out


def test_keygen_refuses_to_overwrite(run: RunFn, tmp_path: Path) -> None:
    path = _keygen(run, tmp_path / "root.key")
    before = path.read_bytes()
    result = run("keygen", path)
    assert result.status == 1
    assert "already exists" in _single_error_line(result)
    assert path.read_bytes() == before
    assert run("keygen", path, "--force").status == 0
    assert path.read_bytes() != before


def test_keygen_without_key_suffix(run: RunFn, tmp_path: Path) -> None:
    _keygen(run, tmp_path / "signer")
    assert (tmp_path / "signer.pub").is_file()


def test_code_key(run: RunFn, tmp_path: Path) -> None:
    path = tmp_path / "L1.codekey"
    assert run("code-key", path).status == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_code_key(path)) == 32
    assert run("code-key", path).status == 1


def test_keyring_is_accepted_by_a_locker(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "keyring.json"
    result = run(*_keyring_args(pki, out, version=5))
    assert result.status == 0, result.err
    keyring = _accept(out, pki["root"].with_suffix(".pub"))
    assert keyring.version == 5
    assert keyring.codes.keyids == {keyid_of(load_private_key(pki["codes"]).public_key())}
    assert set(keyring.roles) == set(ROLE_NAMES)
    assert timedelta(days=29) < keyring.expires_at - utcnow() <= timedelta(days=30)


def test_keyring_root_rotation(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    first = tmp_path / "k1.json"
    assert run(*_keyring_args(pki, first)).status == 0
    new_root = _keygen(run, tmp_path / "root2.key")
    args = _keyring_args(pki, tmp_path / "k2.json", version=2)
    args[args.index("--root") + 1] = new_root.with_suffix(".pub")

    only_new = [*args[:-2], "--previous", first, "-o", tmp_path / "k2.json"]
    only_new[only_new.index("--sign") + 1] = new_root
    result = run(*only_new)
    assert result.status == 2
    assert "would refuse" in _single_error_line(result)
    assert not (tmp_path / "k2.json").exists()

    only_old = list(args)
    result = run(*only_old)
    assert result.status == 2
    assert "--root-threshold" in _single_error_line(result)

    both = [*args[:-2], "--sign", new_root, "--previous", first, "-o", tmp_path / "k2.json"]
    result = run(*both)
    assert result.status == 0, result.err
    held = _accept(first, pki["root"].with_suffix(".pub"))
    rotated = accept_keyring(
        (tmp_path / "k2.json").read_bytes(),
        trusted_root=held.root,
        current_version=held.version,
        now=utcnow(),
    )
    assert rotated.root.keyids == {keyid_of(load_private_key(new_root).public_key())}


def test_keyring_threshold_above_key_count(
    run: RunFn, pki: dict[str, Path], tmp_path: Path
) -> None:
    args = _keyring_args(pki, tmp_path / "k.json")
    result = run(*args, "--codes-threshold", "2")
    assert result.status == 2
    assert "--codes" in _single_error_line(result)


def test_keyring_bad_public_key_argument(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    args = _keyring_args(pki, tmp_path / "k.json")
    args[args.index("--qr") + 1] = "nope.pub"
    result = run(*args)
    assert result.status == 2
    line = _single_error_line(result)
    assert "--qr" in line and "nope.pub" in line


@pytest.mark.parametrize("duration", ["30x", "0d", "-1h", "d"])
def test_bad_duration(run: RunFn, pki: dict[str, Path], tmp_path: Path, duration: str) -> None:
    args = _keyring_args(pki, tmp_path / "k.json")
    at = args.index("--expires-in")
    args[at : at + 2] = [f"--expires-in={duration}"]
    result = run(*args)
    assert result.status == 2
    assert "duration" in _single_error_line(result)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def _bundle_setup(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> Keyring:
    keyring_path = tmp_path / "keyring.json"
    assert run(*_keyring_args(pki, keyring_path)).status == 0
    return _accept(keyring_path, pki["root"].with_suffix(".pub"))


def _verify(path: Path, keyring: Keyring, held_version: int = 0) -> CodesBundle:
    return verify_bundle(
        path.read_bytes(),
        codes_role=keyring.codes,
        keyring_expires_at=keyring.expires_at,
        locker_id="L1",
        held_version=held_version,
        now=utcnow(),
    )


def test_bundle_from_csv_is_accepted(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    keyring = _bundle_setup(run, pki, tmp_path)
    codes = tmp_path / "codes.csv"
    codes.write_text(
        CSV_HEADER
        + "p-1,12345678,pickup,7,PX1,2026-01-01T00:00:00Z,2030-01-01T00:00:00Z,1\n"
        + "d-1,00424242,deposit,,,,,3\n"
        + "\n"
        + "c-1,99990000,courier,,,,2030-01-01T00:00:00Z,\n"
    )
    out = tmp_path / "bundle.json"
    result = run(
        "bundle", "--locker", "L1", "--version", "3", "--code-key", pki["code_key"],
        "--codes", codes, "--sign", pki["codes"], "--expires-in", "2d",
        "--not-after-in", "7d", "--revoke", "p-0", "derived:PX0",
        "--keyring", tmp_path / "keyring.json", "-o", out,
    )  # fmt: skip
    assert result.status == 0, result.err
    raw = out.read_bytes()
    for plain in (b"12345678", b"00424242", b"99990000"):
        assert plain not in raw
    bundle = _verify(out, keyring)
    code_key = load_code_key(pki["code_key"])
    by_id = {entry.id: entry for entry in bundle.upsert}
    assert by_id["p-1"].digest == code_digest(code_key, "L1", "12345678")
    assert by_id["p-1"].compartment == "7" and by_id["p-1"].parcel_id == "PX1"
    assert by_id["d-1"].digest == code_digest(code_key, "L1", "00424242")
    assert by_id["d-1"].compartment is None and by_id["d-1"].max_uses == 3
    assert timedelta(days=6) < by_id["d-1"].not_after - utcnow() <= timedelta(days=7)
    assert by_id["c-1"].max_uses == 1
    assert bundle.revoke == ("p-0", "derived:PX0")
    assert bundle.is_snapshot


def test_bundle_delta_from_json(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    keyring = _bundle_setup(run, pki, tmp_path)
    codes = tmp_path / "codes.json"
    codes.write_text(
        json.dumps(
            [
                {"id": "p-9", "code": "5555", "kind": "pickup", "parcel_id": "PX9",
                 "not_after": "2030-01-01T00:00:00Z", "max_uses": 2},
            ]
        )
    )  # fmt: skip
    out = tmp_path / "delta.json"
    result = run(
        "bundle", "--locker", "L1", "--version", "8", "--base-version", "7",
        "--code-key", pki["code_key"], "--codes", codes, "--sign", pki["codes"],
        "--expires-at", "2099-01-01T00:00:00Z", "-o", out,
    )  # fmt: skip
    assert result.status == 0, result.err
    bundle = _verify(out, keyring, held_version=7)
    assert bundle.base_version == 7
    [entry] = bundle.upsert
    assert entry.max_uses == 2 and entry.parcel_id == "PX9"
    with pytest.raises(TrustError) as err:
        _verify(out, keyring, held_version=6)
    assert err.value.reason == "gap"


def test_bundle_signed_by_a_key_outside_the_codes_role(
    run: RunFn, pki: dict[str, Path], tmp_path: Path
) -> None:
    _bundle_setup(run, pki, tmp_path)
    out = tmp_path / "b.json"
    result = run(
        "bundle", "--locker", "L1", "--version", "1", "--code-key", pki["code_key"],
        "--sign", pki["root"], "--expires-in", "1d", "--keyring", tmp_path / "keyring.json",
        "-o", out,
    )  # fmt: skip
    assert result.status == 2
    assert "codes role" in _single_error_line(result)
    assert not out.exists()


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ("p-1,1234,pikup,7,,,2030-01-01T00:00:00Z,1\n", "line 2, column 'kind'"),
        ("p-1,12ab34,pickup,7,,,2030-01-01T00:00:00Z,1\n", "line 2, column 'code'"),
        ("p-1,123,pickup,7,,,2030-01-01T00:00:00Z,1\n", "line 2, column 'code'"),
        ("p-1,,pickup,7,,,2030-01-01T00:00:00Z,1\n", "line 2, column 'code'"),
        (",1234,pickup,7,,,2030-01-01T00:00:00Z,1\n", "line 2, column 'id'"),
        ("p-1,1234,pickup,A_7,,,2030-01-01T00:00:00Z,1\n", "line 2, column 'compartment'"),
        ("p-1,1234,pickup,7,,,2030-01-01,1\n", "line 2, column 'not_after'"),
        ("p-1,1234,pickup,7,,,,1\n", "line 2, column 'not_after'"),
        ("p-1,1234,pickup,7,,yesterday,2030-01-01T00:00:00Z,1\n", "line 2, column 'not_before'"),
        ("p-1,1234,pickup,7,,,2030-01-01T00:00:00Z,0\n", "line 2, column 'max_uses'"),
        ("p-1,1234,pickup,7,,,2030-01-01T00:00:00Z,many\n", "line 2, column 'max_uses'"),
        ("p-1,1234,pickup,7\n", "line 2: expected 8 cells"),
        (
            "p-1,1234,pickup,7,,,2030-01-01T00:00:00Z,1\n\np-1,5678,pickup,8,,,2030-01-01T00:00:00Z,1\n",
            "line 4: id 'p-1' already used at",
        ),
        (
            "p-1,1234,pickup,7,,,2030-01-01T00:00:00Z,1\np-2,1234,pickup,8,,,2030-01-01T00:00:00Z,1\n",
            "line 3, column 'code': same code as",
        ),
    ],
)
def test_bad_csv_rows(
    run: RunFn, pki: dict[str, Path], tmp_path: Path, rows: str, needle: str
) -> None:
    codes = tmp_path / "codes.csv"
    codes.write_text(CSV_HEADER + rows)
    out = tmp_path / "bundle.json"
    result = run(
        "bundle", "--locker", "L1", "--version", "1", "--code-key", pki["code_key"],
        "--codes", codes, "--sign", pki["codes"], "--expires-in", "1d", "-o", out,
    )  # fmt: skip
    assert result.status == 2
    line = _single_error_line(result)
    assert str(codes) in line
    assert needle in line
    message = line.replace(str(tmp_path), "")
    assert "1234" not in message and "5678" not in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("id,code\np-1,1234\n", "lacks required column(s) kind"),
        ("id,code,kind,expiry\n", "unknown column(s) 'expiry'"),
        ("", "empty file"),
    ],
)
def test_bad_csv_header(
    run: RunFn, pki: dict[str, Path], tmp_path: Path, content: str, needle: str
) -> None:
    codes = tmp_path / "codes.csv"
    codes.write_text(content)
    result = run(
        "bundle", "--locker", "L1", "--version", "1", "--code-key", pki["code_key"],
        "--codes", codes, "--sign", pki["codes"], "--expires-in", "1d", "-o", tmp_path / "b",
    )  # fmt: skip
    assert result.status == 2
    assert needle in _single_error_line(result)


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"not": "a list"}, "expected a JSON list"),
        ([{"id": "p-1", "code": 1234, "kind": "pickup"}], "item 1, column 'code'"),
        ([{"id": "p-1", "code": "1234", "kind": "pickup", "colour": "red"}], "'colour'"),
        ([{"id": "p-1", "code": "1234", "kind": "pickup"}], "item 1, column 'not_after'"),
        (["p-1"], "item 1: expected an object"),
    ],
)
def test_bad_json_codes(
    run: RunFn, pki: dict[str, Path], tmp_path: Path, doc: object, needle: str
) -> None:
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps(doc))
    result = run(
        "bundle", "--locker", "L1", "--version", "1", "--code-key", pki["code_key"],
        "--codes", codes, "--sign", pki["codes"], "--expires-in", "1d", "-o", tmp_path / "b",
    )  # fmt: skip
    assert result.status == 2
    assert needle in _single_error_line(result)


def test_bundle_usage_errors(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    common: list[str | Path] = [
        "--code-key",
        pki["code_key"],
        "--sign",
        pki["codes"],
        "--expires-in",
        "1d",
    ]
    cases: list[tuple[list[str | Path], str]] = [
        (["--locker", "L 1", "--version", "1"], "--locker"),
        (["--locker", "L1", "--version", "x"], "--version"),
        (["--locker", "L1", "--version", "3", "--base-version", "3"], "--base-version"),
        (["--locker", "L1", "--version", "3", "--codes", tmp_path / "codes.txt"], ".csv or .json"),
        (["--locker", "L1", "--version", "3", "--codes", tmp_path / "absent.csv"], "absent.csv"),
    ]
    for extra, needle in cases:
        result = run("bundle", *common, *extra, "-o", tmp_path / "b")
        assert result.status == 2, extra
        assert needle in _single_error_line(result)
    bad_key = tmp_path / "short.codekey"
    bad_key.write_text("00" * 16)
    result = run(
        "bundle", "--locker", "L1", "--version", "1", "--code-key", bad_key,
        "--sign", pki["codes"], "--expires-in", "1d", "-o", tmp_path / "b",
    )  # fmt: skip
    assert result.status == 2
    assert "short.codekey" in _single_error_line(result)


def test_derive_code(run: RunFn, pki: dict[str, Path]) -> None:
    result = run(
        "derive-code", "--code-key", pki["code_key"], "--locker", "L1", "--parcel", "PX123"
    )
    assert result.status == 0
    expected = derived_pickup_code(load_code_key(pki["code_key"]), "L1", "PX123", 8)
    assert result.out.strip() == expected
    result = run(
        "derive-code", "--code-key", pki["code_key"], "--locker", "L1", "--parcel", "PX123",
        "--digits", "6",
    )  # fmt: skip
    assert result.out.strip() == derived_pickup_code(
        load_code_key(pki["code_key"]), "L1", "PX123", 6
    )


def test_derive_code_digits_range(run: RunFn, pki: dict[str, Path]) -> None:
    for digits in ("3", "13", "x"):
        result = run(
            "derive-code", "--code-key", pki["code_key"], "--locker", "L1", "--parcel", "P",
            "--digits", digits,
        )  # fmt: skip
        assert result.status == 2
        assert "--digits" in _single_error_line(result)


def test_expiry_in_the_past(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    args = _keyring_args(pki, tmp_path / "k.json")
    at = args.index("--expires-in")
    args[at : at + 2] = ["--expires-at", "2020-01-01T00:00:00Z"]
    result = run(*args)
    assert result.status == 2
    assert "not in the future" in _single_error_line(result)


def test_output_to_stdout(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    args = _keyring_args(pki, tmp_path / "unused.json")
    args[-1] = "-"
    result = run(*args)
    assert result.status == 0, result.err
    assert json.loads(result.out)["payloadType"] == "application/vnd.lockerd.keyring+json"
    assert "wrote keyring" in result.err


def test_inspect(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    keyring_path = tmp_path / "keyring.json"
    assert run(*_keyring_args(pki, keyring_path, version=4)).status == 0
    result = run("inspect", keyring_path, "--keyring", keyring_path)
    assert result.status == 0, result.err
    root_keyid = keyid_of(load_private_key(pki["root"]).public_key())
    assert "application/vnd.lockerd.keyring+json" in result.out
    assert root_keyid in result.out
    assert "[root; signature valid]" in result.out
    assert '"version": 4' in result.out


def test_inspect_base64url_token(run: RunFn, pki: dict[str, Path], tmp_path: Path) -> None:
    keyring_path = tmp_path / "keyring.json"
    assert run(*_keyring_args(pki, keyring_path)).status == 0
    token = base64.urlsafe_b64encode(keyring_path.read_bytes()).rstrip(b"=")
    token_path = tmp_path / "token.txt"
    token_path.write_bytes(token + b"\n")
    result = run("inspect", token_path)
    assert result.status == 0, result.err
    assert "keyring+json" in result.out


def test_inspect_malformed(run: RunFn, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"payloadType": "x"}')
    result = run("inspect", path)
    assert result.status == 2
    assert "malformed" in _single_error_line(result)
    result = run("inspect", tmp_path / "absent.json")
    assert result.status == 2


def test_unknown_subcommand(run: RunFn) -> None:
    result = run("frobnicate")
    assert result.status == 2
    assert "frobnicate" in _single_error_line(result)
