"""bench/run_all.py over a directory of small stand-in scripts: RESULT lines collected into the
markdown file, a failing script and a missing one reported, a script with a main discovered."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parent.parent / "bench"

HOLDS = '''"""Stand-in."""
import argparse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"rounds {args.rounds}")
    print("RESULT help_keypress: 700 ns against 690 ns; ratio 1.01x (target <= 1.1x) HOLDS")


if __name__ == "__main__":
    main()
'''

FAILS = '''"""Stand-in."""
import sys


def main() -> None:
    print("RESULT deadlines lookup: 30 us against 10 us; ratio 3.00x (target <= 1.1x) MISSES")
    sys.exit(3)


if __name__ == "__main__":
    main()
'''

EXTRA = '''"""Stand-in."""


def main() -> None:
    print("an extra bench, no target")


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def run_all() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run_all")
    finally:
        sys.path.remove(str(BENCH))


def test_results_of_every_bench_in_one_file(run_all: ModuleType, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "help_keypress.py").write_text(HOLDS, encoding="utf-8")
    (bench / "deadlines.py").write_text(FAILS, encoding="utf-8")
    (bench / "extra_one.py").write_text(EXTRA, encoding="utf-8")
    (bench / "startup_bundle_file.py").write_text(EXTRA, encoding="utf-8")
    # Shared code: no __main__ guard, so not a benchmark, main or not.
    (bench / "benchlib.py").write_text('"""Not a bench."""\n\n\ndef main() -> None: ...\n',
                                       encoding="utf-8")
    out = tmp_path / "results.md"
    status = run_all.main(["--quick", "--bench-dir", str(bench), "--out", str(out)])
    assert status == 1  # a bench failed
    text = out.read_text(encoding="utf-8")
    assert "quick run" in text and "- CPUs (nproc): " in text and "- memory: " in text
    assert "- lockerd bytecode: compiled (" in text
    assert ("| help_keypress | help_keypress | 700 ns against 690 ns | 1.01x | <= 1.1x | HOLDS |"
            in text)
    assert "| deadlines | deadlines lookup | 30 us against 10 us | 3.00x | <= 1.1x | MISSES |" \
        in text
    assert "| help_keypress | `--rounds 2000` | ok |" in text
    # Quick options its --help does not list are not passed.
    assert "| deadlines | `(defaults)` | exit 3 |" in text
    assert "| keypress_to_unlock | | missing |" in text
    assert "| startup_bundle_file 1M | | skipped (quick) |" in text
    assert "| startup_bundle_file | `(defaults)` | ok |" in text
    assert "| extra_one | | printed no RESULT line | | | |" in text
    assert "rounds 2000" in text  # each bench's output is kept
    assert "| benchlib |" not in text
    printed = capsys.readouterr().out
    assert "1 of 2 targets hold" in printed
    assert "MISSING keypress_to_unlock" in printed


SILENT = '''"""Stand-in: says one line, then nothing for a long time."""
import time


def main() -> None:
    print("started", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
'''


def test_a_bench_past_its_time_is_stopped(run_all: ModuleType, tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "help_keypress.py").write_text(SILENT, encoding="utf-8")
    out = tmp_path / "results.md"
    status = run_all.main(["--bench-dir", str(bench), "--out", str(out), "--only",
                           "help_keypress", "--timeout", "1"])
    assert status == 1
    text = out.read_text(encoding="utf-8")
    assert "| help_keypress | `(defaults)` | timeout |" in text
    assert "started" in text


def test_the_project_is_compiled_before_the_benches(run_all: ModuleType) -> None:
    import lockerd.core.access as module

    cached = Path(importlib.util.cache_from_source(module.__file__))
    cached.unlink(missing_ok=True)
    assert run_all.compile_project().startswith("compiled (")
    assert cached.stat().st_mtime_ns >= Path(module.__file__).stat().st_mtime_ns
