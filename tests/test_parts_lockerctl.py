"""lockerctl parts: a codes file into a signed manifest and parts, and its input errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RunFn

from lockerd.cli.lockerctl_common import InputError
from lockerd.cli.lockerctl_parts import load_parts_set, part_file, wanted_parts, wants_all
from lockerd.dev.provision import BankKit
from lockerd.trust.dsse import RoleKeys
from lockerd.trust.parts import PartLimits, check_part, decode_part, verify_manifest

pytestmark = pytest.mark.unit

HEADER = "id,code,kind,compartment,parcel_id"


def csv_file(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def rows(n: int) -> list[str]:
    return [f"p-{i},{20_000_000 + i},pickup,{i % 8 + 1},PX{i}" for i in range(n)]


def parts_args(kit: BankKit, codes: Path, out: Path, *extra: str | Path) -> list[str | Path]:
    keys = kit.directory / "keys"
    return ["parts", "--locker", "L1", "--version", "3", "--code-key", keys / "code_key",
            "--codes", codes, "--not-after-in", "7d", "--expires-in", "2d",
            "--sign", keys / "codes.key", "--part-bytes", "4096", "-o", out, *extra]


def test_a_codes_file_becomes_a_manifest_and_parts_a_bank_accepts(
        make_kit: Callable[..., BankKit], run: RunFn, tmp_path: Path) -> None:
    kit = make_kit()
    out = tmp_path / "set"
    result = run(*parts_args(kit, csv_file(tmp_path / "c.csv", rows(500)), out,
                             "--revoke", "derived:PX9", "--keyring", kit.keyring_path))
    assert result.status == 0, result.err
    assert "500 code(s)" in result.out
    loaded = load_parts_set(out, locker_id="L1")
    role = RoleKeys.from_keys([kit.codes_key.public_key()], 1)
    manifest = verify_manifest(loaded.raw_manifest, codes_role=role,
                               keyring_expires_at=loaded.manifest.expires_at,
                               locker_id="L1", held_version=1,
                               now=loaded.manifest.issued_at, limits=PartLimits())
    assert manifest.entries == 500 and manifest.revoke == ("derived:PX9",)
    entries = []
    for index in range(manifest.part_count):
        raw = loaded.part(index)
        assert len(raw) <= 4096
        check_part(raw, manifest)
        entries.extend(decode_part(raw))
    assert [e.id for e in entries] == [f"p-{i}" for i in range(500)]
    assert entries[7].digest == kit.digest(str(20_000_007))
    assert not list(out.glob("*.sqlite")), "the scratch file is gone"


@pytest.mark.parametrize(("bad_rows", "extra", "words"), [
    (["p-1,11112222,pickup,1,PX1"], (), "id 'p-1' already used"),
    (["p-9,20000000,pickup,1,PX1"], (), "same code as"),
    ([f"{'x' * 300},11112222,pickup,1,PX1"], (), "id must be 1-255 bytes"),
    ([], ("--revoke", "p-3"), "also in --revoke"),
    (["p-x,12,pickup,1,PX1"], (), "4-64 decimal digits"),
])
def test_input_errors_name_the_row_and_leave_nothing_behind(
        make_kit: Callable[..., BankKit], run: RunFn, tmp_path: Path,
        bad_rows: list[str], extra: tuple[str, ...], words: str) -> None:
    kit = make_kit()
    out = tmp_path / "set"
    result = run(*parts_args(kit, csv_file(tmp_path / "c.csv", rows(5) + bad_rows), out,
                             *extra))
    assert result.status == 2 and words in result.err, result.err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["c.csv"]


def test_an_output_directory_in_use_is_refused(make_kit: Callable[..., BankKit], run: RunFn,
                                               tmp_path: Path) -> None:
    kit = make_kit()
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep").write_text("x")
    result = run(*parts_args(kit, csv_file(tmp_path / "c.csv", rows(2)), out))
    assert result.status == 2 and "new or empty directory" in result.err


def test_a_changed_part_file_is_found_before_anything_is_published(
        make_kit: Callable[..., BankKit], run: RunFn, tmp_path: Path) -> None:
    kit = make_kit()
    out = tmp_path / "set"
    assert run(*parts_args(kit, csv_file(tmp_path / "c.csv", rows(200)), out)).status == 0
    path = part_file(out, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="not the part the manifest names"):
        load_parts_set(out, locker_id="L1")
    with pytest.raises(InputError, match="not 'L2'"):
        load_parts_set(out, locker_id="L2")
    result = run("publish-parts", "--broker", "127.0.0.1:1", "--locker", "L1", out)
    assert result.status == 2 and "part-000001.bin" in result.err


def test_only_well_formed_requests_for_this_version_name_parts(
        make_kit: Callable[..., BankKit], run: RunFn, tmp_path: Path) -> None:
    kit = make_kit()
    out = tmp_path / "set"
    assert run(*parts_args(kit, csv_file(tmp_path / "c.csv", rows(200)), out)).status == 0
    manifest = load_parts_set(out, locker_id="L1").manifest
    last = manifest.part_count - 1
    assert wanted_parts({"parts": {"version": 3, "missing": [[0, 1], [last, last], [1, 1]]}},
                        manifest) == [0, 1, last]
    bodies: list[object] = [
        None, [], {"parts": {"version": 2, "missing": [[0, 0]]}},
        {"parts": {"version": 3, "missing": [[0, last + 1], [1, 0], [True, 1], "0-1", [0]]}},
        {"parts": {"version": 3, "missing": {"0": 1}}}]
    for body in bodies:
        assert wanted_parts(body, manifest) == []
    assert wants_all({"codes_version": 2, "keyring_version": 1}, manifest)
    for other in ({"codes_version": 3}, {"codes_version": 2, "parts": None},
                  {"codes_version": True}, {"codes_version": "1"}, None):
        assert not wants_all(other, manifest)


def test_publish_of_a_manifest_alone_points_at_publish_parts(
        make_kit: Callable[..., BankKit], run: RunFn, tmp_path: Path) -> None:
    kit = make_kit()
    out = tmp_path / "set"
    assert run(*parts_args(kit, csv_file(tmp_path / "c.csv", rows(3)), out)).status == 0
    result = run("publish", "--broker", "127.0.0.1:1", "--locker", "L1", out / "manifest.json")
    assert result.status == 1 and "publish-parts" in result.err


def test_a_json_codes_file_and_no_codes_at_all(make_kit: Callable[..., BankKit], run: RunFn,
                                               tmp_path: Path) -> None:
    kit = make_kit()
    codes = tmp_path / "c.json"
    codes.write_text('[{"id": "p-1", "code": "12345678", "kind": "deposit"}]')
    assert run(*parts_args(kit, codes, tmp_path / "one")).status == 0
    only = load_parts_set(tmp_path / "one", locker_id="L1")
    assert [e.kind for e in decode_part(only.part(0))] == ["deposit"]
    args = [a for a in parts_args(kit, codes, tmp_path / "none") if a not in ("--codes", codes)]
    result = run(*args)
    assert result.status == 0 and "0 code(s) in 0 part(s)" in result.out
    assert load_parts_set(tmp_path / "none", locker_id="L1").manifest.part_count == 0
