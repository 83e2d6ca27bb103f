"""lockerctl: the backend integrator's offline tool for keys, keyrings and codes bundles.

The parser is built from one piece per subject: each lockerctl_* module registers its
subcommands with `add_parsers`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, cast

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
from lockerd.cli.lockerctl_common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    PROG,
    InputError,
    parse_duration,
)
from lockerd.errors import LockerdError

__all__ = ["build_parser", "main", "parse_duration"]


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, handled by `main`."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "The backend integrator's tool for lockerd: make signing keys and code keys, "
            "sign keyrings and codes bundles, derive offline pickup codes, inspect signed "
            "envelopes, publish them to a locker over MQTT, and read and acknowledge its "
            "events."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # The order of these calls is the order of the commands in --help.
    for subject in (lockerctl_keys, lockerctl_codes, lockerctl_inspect, lockerctl_commands,
                    lockerctl_qr, lockerctl_broker, lockerctl_parts, lockerctl_help):
        subject.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run lockerctl; returns the exit status (0 ok, 2 bad input, 1 other failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        func = cast(Callable[[argparse.Namespace], int], args.func)
        return func(args)
    except SystemExit as exc:
        # --help exits through argparse; keep main() returning a status instead.
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except InputError as exc:
        message = str(exc)
        if not message.startswith(PROG):
            message = f"{PROG}: error: {message}"
        print(message, file=sys.stderr)
        return EXIT_USAGE
    except (OSError, LockerdError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
