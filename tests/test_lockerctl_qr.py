"""lockerctl qr and qr-inspect: tokens and images a locker accepts, and clear refusals."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import segno
from conftest import Run, RunFn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lockerd.cli.lockerctl_cmd import main
from lockerd.errors import TrustError
from lockerd.timeutil import format_time, utcnow
from lockerd.trust.dsse import RoleKeys
from lockerd.trust.keyring import Keyring, accept_keyring
from lockerd.trust.keys import keyid_of, load_private_key, public_hex, save_private_key
from lockerd.trust.qrtoken import QR_PREFIX, QrToken, verify_qr_token

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Pki:
    root: Path
    qr: Path
    codes: Path
    keyring_file: Path
    keyring: Keyring


@pytest.fixture
def pki(tmp_path: Path, run: RunFn) -> Pki:
    """Keys written with save_private_key and a keyring signed by lockerctl itself."""
    paths: dict[str, Path] = {}
    for name in ("root", "qr", "codes"):
        key = Ed25519PrivateKey.generate()
        paths[name] = tmp_path / f"{name}.key"
        save_private_key(key, paths[name])
    hexes = {name: public_hex(load_private_key(p).public_key()) for name, p in paths.items()}
    keyring_file = tmp_path / "keyring.json"
    result = run(
        "keyring", "--version", "1", "--expires-in", "30d", "--root", hexes["root"],
        "--codes", hexes["codes"], "--commands", hexes["codes"],
        "--technicians", hexes["codes"], "--qr", hexes["qr"],
        "--sign", paths["root"], "-o", keyring_file,
    )  # fmt: skip
    assert result.status == 0, result.err
    keyring = accept_keyring(
        keyring_file.read_bytes(),
        trusted_root=RoleKeys.from_hex([hexes["root"]], 1),
        current_version=0,
        now=utcnow(),
    )
    return Pki(paths["root"], paths["qr"], paths["codes"], keyring_file, keyring)


def _error_line(result: Run) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    return lines[0]


def _qr_args(pki: Pki, out: Path | str, *extra: str | Path) -> list[str | Path]:
    return ["qr", "--locker", "L1", "--kind", "pickup", "--compartment", "7",
            "--expires-in", "1h", "--sign", pki.qr, "-o", out, *extra]


def _verify(text: str, pki: Pki, locker_id: str = "L1") -> QrToken:
    return verify_qr_token(text, qr_role=pki.keyring.qr,
                           keyring_expires_at=pki.keyring.expires_at, locker_id=locker_id,
                           now=utcnow())


def test_help_of_the_qr_commands(run: RunFn) -> None:
    for command in ("qr", "qr-inspect"):
        result = run(command, "--help")
        assert result.status == 0
        assert f"usage: lockerctl {command}" in result.out
    assert "qr-inspect" in run("--help").out


def test_text_token_is_accepted_by_the_locker(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "token.txt"
    before = utcnow()
    result = run(*_qr_args(pki, out, "--parcel", "PX123"))
    assert result.status == 0, result.err
    content = out.read_text()
    assert content.endswith("\n") and content.count("\n") == 1
    text = content[:-1]
    assert text.startswith(QR_PREFIX)
    token = _verify(text, pki)
    assert (token.kind, token.locker_id, token.compartment, token.parcel_id) == (
        "pickup", "L1", "7", "PX123")
    assert len(token.cti) == 16
    assert token.not_before is None
    assert before + timedelta(minutes=59) < token.expires_at <= utcnow() + timedelta(hours=1)
    # The summary names kind, locker, cti and expiry.
    assert token.cti_hex in result.out
    assert "pickup" in result.out and "L1" in result.out
    assert format_time(token.expires_at) in result.out
    # Another locker refuses it.
    with pytest.raises(TrustError) as info:
        _verify(text, pki, locker_id="L2")
    assert info.value.reason == "wrong_locker"


def test_every_kind_and_not_before(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    nbf = utcnow() + timedelta(minutes=5)
    for kind in ("deposit", "courier"):
        out = tmp_path / f"{kind}.txt"
        result = run("qr", "--locker", "L1", "--kind", kind, "--not-before", format_time(nbf),
                     "--expires-at", format_time(nbf + timedelta(hours=2)), "--sign", pki.qr,
                     "-o", out)
        assert result.status == 0, result.err
        with pytest.raises(TrustError) as info:
            _verify(out.read_text().strip("\n"), pki)
        assert info.value.reason == "not_yet_valid"
        inspected = run("qr-inspect", out)
        assert f"kind:        {kind}" in inspected.out
        assert f"nbf:         {format_time(nbf)}" in inspected.out


def test_stdout_text(run: RunFn, pki: Pki) -> None:
    result = run(*_qr_args(pki, "-"))
    assert result.status == 0
    assert result.out.endswith("\n") and result.out.count("\n") == 1
    assert _verify(result.out[:-1], pki)
    assert "QR token" in result.err


def test_cti_given(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    for cti in ("0102030405060708", "AABBCCDDEEFF00112233445566778899"):
        result = run(*_qr_args(pki, "-", "--cti", cti))
        assert result.status == 0, result.err
        token = _verify(result.out.strip("\n"), pki)
        assert token.cti == bytes.fromhex(cti)


def test_default_cti_is_fresh(run: RunFn, pki: Pki) -> None:
    first = run(*_qr_args(pki, "-")).out
    second = run(*_qr_args(pki, "-")).out
    assert _verify(first.strip("\n"), pki).cti != _verify(second.strip("\n"), pki).cti


@pytest.mark.parametrize("cti", ["abc", "01020304050607", "01" * 17, "0102030405060708z0",
                                 "010203040506070809"[:-1]])
def test_bad_cti_is_refused(run: RunFn, pki: Pki, tmp_path: Path, cti: str) -> None:
    out = tmp_path / "t.txt"
    result = run(*_qr_args(pki, out, "--cti", cti))
    assert result.status == 2
    assert "--cti" in _error_line(result)
    assert not out.exists()


def test_two_signing_keys_are_refused(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    result = run(*_qr_args(pki, out, "--sign", pki.codes))
    assert result.status == 2
    assert "one signature" in _error_line(result)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--compartment", "7/8"], "compartment"),
        (["--parcel", "x" * 65], "parcel id"),
        (["--locker", "L 1"], "locker id"),
        (["--kind", "admin"], "invalid choice"),
        (["--expires-at", "2001-01-01T00:00:00Z"], "not in the future"),
        (["--not-before", "2999-01-01T00:00:00Z"], "earlier than the expiry"),
        (["--format", "gif"], "invalid choice"),
        (["--scale", "0"], "at least 1"),
    ],
)
def test_bad_arguments(run: RunFn, pki: Pki, tmp_path: Path, extra: list[str],
                       words: str) -> None:
    args = _qr_args(pki, tmp_path / "t.txt")
    if "--expires-at" in extra:
        index = args.index("--expires-in")
        del args[index:index + 2]
    result = run(*args, *extra)
    assert result.status == 2
    assert words in _error_line(result)
    assert not (tmp_path / "t.txt").exists()


def test_pickup_needs_a_compartment_or_parcel(run: RunFn, pki: Pki) -> None:
    result = run("qr", "--locker", "L1", "--kind", "pickup", "--expires-in", "1h",
                 "--sign", pki.qr, "-o", "-")
    assert result.status == 2
    assert "compartment or its parcel id" in _error_line(result)


def _fixed(pki: Pki, out: Path | str, *extra: str) -> list[str | Path]:
    # With a fixed cti and expiry the token is the same on every run (Ed25519 is
    # deterministic), so an image can be compared with the text.
    expires = format_time(utcnow() + timedelta(days=1))
    return ["qr", "--locker", "L1", "--kind", "pickup", "--compartment", "7",
            "--expires-at", expires, "--cti", "00112233445566778899aabbccddeeff",
            "--sign", pki.qr, "-o", out, *extra]


def test_png_image_encodes_the_token(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    args = _fixed(pki, tmp_path / "t.txt")
    assert run(*args).status == 0
    text = (tmp_path / "t.txt").read_text().strip("\n")
    png = tmp_path / "t.png"
    args[args.index("-o") + 1] = png
    result = run(*args)
    assert result.status == 0, result.err
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    expected = io.BytesIO()
    segno.make(text, error="m", micro=False, boost_error=False).save(expected, kind="png",
                                                                     scale=4)
    assert data == expected.getvalue()
    assert "png" in result.out


def test_svg_inferred_from_suffix_and_scale(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    svg = tmp_path / "t.SVG"
    assert run(*_fixed(pki, svg)).status == 0
    assert "<svg" in svg.read_text()
    big = tmp_path / "big.png"
    small = tmp_path / "small.png"
    assert run(*_fixed(pki, big, "--scale", "8")).status == 0
    assert run(*_fixed(pki, small, "--scale", "1")).status == 0
    assert big.read_bytes().startswith(PNG_MAGIC)
    assert len(big.read_bytes()) > len(small.read_bytes())


def test_format_option_overrides_the_suffix(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    as_text = tmp_path / "token.png"
    assert run(*_fixed(pki, as_text, "--format", "text")).status == 0
    assert as_text.read_text().startswith(QR_PREFIX)
    as_png = tmp_path / "token.txt"
    assert run(*_fixed(pki, as_png, "--format", "png")).status == 0
    assert as_png.read_bytes().startswith(PNG_MAGIC)
    other = tmp_path / "token.qr"
    assert run(*_fixed(pki, other)).status == 0
    assert other.read_text().startswith(QR_PREFIX)


def test_images_to_stdout(pki: Pki, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    outputs: dict[str, bytes] = {}
    for fmt in ("png", "svg"):
        # A binary stdout of our own: capsys would try to decode a PNG as text.
        raw = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, write_through=True))
        assert main([str(a) for a in _fixed(pki, "-", "--format", fmt)]) == 0
        outputs[fmt] = raw.getvalue()
        assert "QR token" in capsys.readouterr().err
    assert outputs["png"].startswith(PNG_MAGIC)
    assert b"<svg" in outputs["svg"]


def test_qr_inspect_without_keyring(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    assert run(*_fixed(pki, out, "--parcel", "PX123")).status == 0
    text = out.read_text().strip("\n")
    token = _verify(text, pki)
    for source in (out, text):
        result = run("qr-inspect", source)
        assert result.status == 0, result.err
        kid = bytes.fromhex(keyid_of(load_private_key(pki.qr).public_key()))[:8].hex()
        assert f"kid:         {kid}" in result.out
        assert "kind:        pickup" in result.out
        assert "sub:         L1" in result.out
        assert "nbf:         (none)" in result.out
        assert f"exp:         {format_time(token.expires_at)}" in result.out
        assert "cti:         00112233445566778899aabbccddeeff" in result.out
        assert "compartment: 7" in result.out
        assert "parcel_id:   PX123" in result.out
        assert "not checked" in result.out


def test_qr_inspect_with_keyring(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    assert run(*_qr_args(pki, out)).status == 0
    result = run("qr-inspect", out, "--keyring", pki.keyring_file)
    assert result.status == 0, result.err
    qr_keyid = keyid_of(load_private_key(pki.qr).public_key())
    assert f"signature:   valid (qr key {qr_keyid})" in result.out


def test_qr_inspect_refuses_a_token_of_another_role(run: RunFn, pki: Pki, tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    args = _qr_args(pki, out)
    args[args.index("--sign") + 1] = pki.codes
    assert run(*args).status == 0
    result = run("qr-inspect", out, "--keyring", pki.keyring_file)
    assert result.status == 1
    assert "kind:        pickup" in result.out  # the claims are still shown
    assert "unknown_key" in result.out
    assert "valid (" not in result.out


def test_qr_inspect_reads_stdin(run: RunFn, pki: Pki, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "t.txt"
    assert run(*_qr_args(pki, out)).status == 0
    stdin = io.TextIOWrapper(io.BytesIO(out.read_bytes()))
    monkeypatch.setattr(sys, "stdin", stdin)
    result = run("qr-inspect", "-", "--keyring", pki.keyring_file)
    assert result.status == 0, result.err
    assert "signature:   valid" in result.out


@pytest.mark.parametrize(
    ("content", "reason"),
    [("LK1:abc!!", "not_base45"), ("LK1:" + "0" * 1100, "too_large"), ("LK1:AAA", "malformed")],
)
def test_qr_inspect_of_garbage(run: RunFn, tmp_path: Path, content: str, reason: str) -> None:
    result = run("qr-inspect", content)
    assert result.status == 2
    assert reason in _error_line(result)
    assert result.out == ""
    path = tmp_path / "garbage.txt"
    path.write_text(content + "\n")
    result = run("qr-inspect", path)
    assert result.status == 2
    assert reason in _error_line(result)


def test_qr_inspect_of_something_that_is_neither(run: RunFn, tmp_path: Path) -> None:
    result = run("qr-inspect", tmp_path / "missing.txt")
    assert result.status == 2
    assert "neither" in _error_line(result)
    binary = tmp_path / "t.png"
    binary.write_bytes(PNG_MAGIC + b"\xff\x00")
    result = run("qr-inspect", binary)
    assert result.status == 2
    assert "QR images" in _error_line(result)
