"""lockerctl's parser is assembled from one piece per subject, in the order --help lists them."""

from __future__ import annotations

import argparse
from types import ModuleType

import pytest

from lockerd.cli import (
    lockerctl_broker,
    lockerctl_codes,
    lockerctl_commands,
    lockerctl_help,
    lockerctl_inspect,
    lockerctl_keys,
    lockerctl_parts,
    lockerctl_qr,
)
from lockerd.cli.lockerctl_cmd import build_parser

pytestmark = pytest.mark.unit

SUBJECTS: list[tuple[ModuleType, list[str]]] = [
    (lockerctl_keys, ["keygen", "code-key", "keyring"]),
    (lockerctl_codes, ["bundle", "derive-code", "support-code"]),
    (lockerctl_inspect, ["inspect"]),
    (lockerctl_commands, ["command", "technician"]),
    (lockerctl_qr, ["qr", "qr-inspect"]),
    (lockerctl_broker, ["publish", "events", "state"]),
    (lockerctl_parts, ["parts", "publish-parts"]),
    (lockerctl_help, ["help-reply", "respond-help"]),
]


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return list(actions[0].choices)


@pytest.mark.parametrize(("subject", "names"), SUBJECTS, ids=[m.__name__ for m, _ in SUBJECTS])
def test_each_subject_registers_its_own_commands(subject: ModuleType, names: list[str]) -> None:
    parser = argparse.ArgumentParser()
    subject.add_parsers(parser.add_subparsers())
    assert subcommands(parser) == names


def test_the_full_parser_is_the_subjects_in_order() -> None:
    expected = [name for _subject, names in SUBJECTS for name in names]
    assert subcommands(build_parser()) == expected
