"""Configuration edge cases: each broken file is one ConfigError naming the file and the key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from lockerd.config import load_config
from lockerd.dev.provision import BankKit
from lockerd.errors import ConfigError

pytestmark = pytest.mark.unit


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


# Each case edits the provisioned file; a new table goes in front, so that it is not read as
# part of the last [[compartments]] table.
CASES: list[tuple[str, Callable[[str], str], str]] = [
    ("locker id with a trailing newline",
     lambda t: t.replace('id = "L1"', 'id = "L1\\n"'),
     "[locker] 'id': must be 1-64 characters of A-Z a-z 0-9 _ -"),
    ("compartment id with a trailing newline",
     lambda t: t.replace('id = "3"', 'id = "3\\n"'),
     "[compartments #3] 'id': must be 1-16 characters of A-Z a-z 0-9 -"),
    ("size label with a trailing newline",
     lambda t: t.replace('size = "M"', 'size = "M\\n"', 1),
     "[compartments #1] 'size': must be 1-8 characters of A-Z a-z 0-9"),
    ("root key with a trailing newline",
     lambda t: re.sub(r'(root_keys = \["[0-9a-f]{64})"', r'\1\\n"', t),
     "[trust.root_keys] item 1: must be 64 characters of 0-9 a-f"),
    ("infinite time",
     lambda t: t.replace("open_timeout_s = 0.3", "open_timeout_s = inf"),
     "[doors] 'open_timeout_s': must be a finite number, not inf"),
    ("infinite idle limit",
     lambda t: "[deposits]\nsession_idle_s = inf\n" + t,
     "[deposits] 'session_idle_s': must be a finite number, not inf"),
    ("nan time",
     lambda t: "[entry]\ntimeout_s = nan\n" + t,
     "[entry] 'timeout_s': must be a finite number, not nan"),
    ("infinite interval with only a lower bound",
     lambda t: "[telemetry]\ninterval_s = +inf\n" + t,
     "[telemetry] 'interval_s': must be a finite number, not inf"),
    ("infinite time in a backend table",
     lambda t: t.replace("parcels = []", "parcels = []\nspring_delay_s = -inf"),
     "[backends.sim] 'spring_delay_s': must be a finite number, not -inf"),
    ("an empty help support text",
     lambda t: '[help]\nsupport_text = ""\n' + t,
     "[help] 'support_text'"),
    ("a negative help limit",
     lambda t: "[help]\nmax_per_hour = -1\n" + t,
     "[help] 'max_per_hour'"),
    ("an infinite help reply timeout",
     lambda t: "[help]\nreply_timeout_s = inf\n" + t,
     "[help] 'reply_timeout_s': must be a finite number, not inf"),
    ("a 5,000-digit integer",
     lambda t: "[outbox]\nkeep_acked = " + "9" * 5000 + "\n" + t,
     "not valid TOML: an integer has far too many digits"),
    ("an integer beyond 64 bits",
     lambda t: "[outbox]\nkeep_acked = " + "9" * 30 + "\n" + t,
     "[outbox] 'keep_acked': integer out of range (it must fit in 64 bits)"),
    ("an array nested past the TOML reader's stack",
     lambda t: f"x = {_nest(5000)}\n" + t,
     "not valid TOML: arrays or tables are nested too deeply"),
    ("an array nested past what any setting uses",
     lambda t: t.replace("parcels = []", f"parcels = {_nest(40)}"),
     "[backends.sim] 'parcels': nested more than 32 levels deep"),
    ("a negative extension cap",
     lambda t: t.replace('bundle_file = "codes.json"',
                         'bundle_file = "codes.json"\nmax_extension_s = -1'),
     "[codes] 'max_extension_s': Expected `int` >= 0"),
    ("unknown section",
     lambda t: "[dorrs]\npulse_s = 1\n" + t,
     "unknown section [dorrs] (check the spelling"),
    ("unknown section inside [hal]",
     lambda t: "[hal.lcok]\nbackend = \"sim\"\n" + t,
     "unknown section [hal.lcok]"),
    ("unknown top-level key",
     lambda t: "pulse_s = 1\n" + t,
     "'pulse_s': unknown key"),
]


@pytest.mark.parametrize(("mutation", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_broken_files_are_one_config_error_naming_file_and_key(
    make_kit: Callable[..., BankKit], mutation: Callable[[str], str], message: str,
) -> None:
    kit = make_kit([])
    kit.config_path.write_text(mutation(kit.config_path.read_text()))
    with pytest.raises(ConfigError) as info:
        load_config(kit.config_path)
    text = str(info.value)
    assert text.startswith(f"{kit.config_path}: "), text
    assert message in text, text
    # What is allowed is said in words, never as the schema's regular expression.
    assert "regex" not in text and "\\Z" not in text and "{1," not in text, text


def test_an_id_without_trailing_newline_still_loads(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([])
    config = load_config(kit.config_path)
    assert config.locker.id == "L1" and config.compartment_ids[2] == "3"


def test_ids_and_labels_of_the_bundle_code_refuse_a_trailing_newline() -> None:
    from lockerd.trust.bundle import is_compartment_id, is_locker_id

    assert is_locker_id("L1") and not is_locker_id("L1\n")
    assert is_compartment_id("3") and not is_compartment_id("3\n")


def test_an_unreadable_file_still_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "lockerd.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"lockerd\.toml: the file is not UTF-8 text"):
        load_config(path)
