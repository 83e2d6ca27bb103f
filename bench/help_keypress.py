"""The keypad's cost in the bank core with help at the bank in it: a code typed through
`Bank.key`, beside the bare `CodeEntry.press` of the same keys, and the keys of a whole help
request. In-process, pure core, no I/O. Prints figures; asserts nothing.

The gap between the bare entry and `Bank.key` is all of the bank's routing of a key (session,
help, lockout, the screen built for each key), not help's part alone: help adds two tests and
a comparison to a key's way through the bank."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from benchlib import Summary, machine_line, report

from lockerd.core.bank import AskHelp, Bank
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.entry import CodeEntry
from lockerd.core.help import HelpLimit, HelpRules
from lockerd.core.lockout import Lockout, RateLimiter

CODE_KEYS = "48291377#"
HELP_KEYS = "#123456789#9876"
TIMINGS = DoorTimings(open_timeout_s=2.0, held_open_after_s=60.0, show_result_s=3.0)
WALL = 1_800_000_000.0
TARGET = 1.1  # a keypress with help on within 1.1x of the same keypress with help off


def _entry() -> CodeEntry:
    return CodeEntry(timeout_s=20.0, max_digits=16, stuck_key_repeats=24)


def _bank(*, help_on: bool = True) -> Bank:
    return Bank(
        compartments={str(i): Compartment(str(i), timings=TIMINGS, size="M")
                      for i in range(1, 17)},
        entry=_entry(), lockout=Lockout(free_attempts=5, base_s=30.0, max_s=3600.0),
        rejections=RateLimiter(per_minute=20), open_budget=OpenBudget(per_hour=10),
        # No hourly limit in the way: every round is a full request.
        help_rules=HelpRules(max_per_hour=10**9, enabled=help_on),
        help_limit=HelpLimit(per_hour=10**9))


def _per_key(keys: str, rounds: int, run: Callable[[str, float], object]) -> Summary:
    """Nanoseconds per key of `run(key, t)` over `rounds` runs of `keys`."""
    samples = []
    t = 0.0
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for key in keys:
            t += 0.1
            run(key, t)
        samples.append((time.perf_counter_ns() - start) / len(keys))
    return Summary.of(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20000, metavar="N",
                        help="runs of each key sequence (20000)")
    args = parser.parse_args(argv)
    entry = _entry()
    bank = _bank()
    bank_off = _bank(help_on=False)

    def bank_key(key: str, t: float) -> None:
        bank.key(key, t=t, wall=WALL)

    def bank_key_off(key: str, t: float) -> None:
        bank_off.key(key, t=t, wall=WALL)

    def help_key(key: str, t: float) -> None:
        for action in bank.key(key, t=t, wall=WALL):
            if isinstance(action, AskHelp):
                # What the executor does with the ids it names; ends the request at once.
                bank.help_sent(action, help_id="h", reference="ACDEFG", online=False, t=t)

    rows = [
        ("CodeEntry.press, a code and #", _per_key(CODE_KEYS, args.rounds,
                                                    entry.press)),
        ("Bank.key, a code and #, help off", _per_key(CODE_KEYS, args.rounds, bank_key_off)),
        ("Bank.key, a code and #", _per_key(CODE_KEYS, args.rounds, bank_key)),
        ("Bank.key, a whole help request", _per_key(HELP_KEYS, args.rounds, help_key)),
    ]
    print(machine_line())
    print(f"{args.rounds} rounds each; ns per key (median, p99)")
    base = rows[0][1].median
    for name, s in rows:
        print(f"  {name:34s} {s.median:8.0f} {s.p99:8.0f}   x{s.median / base:.2f} of the "
              "bare entry")
    on, off = rows[2][1].median, rows[1][1].median
    report("help_keypress", f"a code typed with help on {on:.0f} ns per key against "
           f"{off:.0f} ns with help off", on / off, TARGET)


if __name__ == "__main__":
    main()
