"""The benchmarks in bench/: every script imports and has a main; the RESULT line format."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_path() -> Iterator[None]:
    """bench/ first on sys.path, as `python bench/x.py` has it; the modules it imported are
    forgotten afterwards so no other test sees them."""
    before = set(sys.modules)
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))
        for name in set(sys.modules) - before:
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCH)):
                del sys.modules[name]


def bench_module(name: str) -> ModuleType:
    return importlib.import_module(name)


def modules() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py"))


@pytest.mark.parametrize("name", modules())
def test_every_module_of_bench_imports(bench_path: None, name: str) -> None:
    module = bench_module(name)
    assert module.__doc__ and module.__doc__.strip(), f"bench/{name}.py has no docstring"
    if bench_module("run_all").is_bench(BENCH / f"{name}.py"):
        assert callable(getattr(module, "main", None)), f"bench/{name}.py has no main()"


def test_run_all_knows_every_benchmark(bench_path: None) -> None:
    run_all = bench_module("run_all")
    benches = {p.stem for p in BENCH.glob("*.py") if run_all.is_bench(p)}
    assert {"bundle_apply", "outbox_drain", "deadlines", "credentials"} <= benches
    assert not {"benchlib", "benchbroker", "bundlepaths", "run_all"} & benches
    assert benches <= {b.script for b in run_all.discover(BENCH)}


def test_a_ratio_under_its_target_holds(bench_path: None) -> None:
    benchlib = bench_module("benchlib")
    line = benchlib.result_line("bundle_apply 1M import-bundle", "41.0 s against 20.5 s",
                                2.0, 2.0)
    assert line == ("RESULT bundle_apply 1M import-bundle: 41.0 s against 20.5 s; "
                    "ratio 2.00x (target <= 2x) HOLDS")
    parsed = benchlib.parse_result(line)
    assert parsed.name == "bundle_apply 1M import-bundle"
    assert parsed.figure == "41.0 s against 20.5 s"
    assert (parsed.value, parsed.target, parsed.unit) == (2.0, 2.0, "x")
    assert parsed.holds and parsed.lower_is_better
    assert (parsed.ratio_text, parsed.target_text, parsed.verdict) == ("2.00x", "<= 2x", "HOLDS")


def test_a_rate_under_a_higher_is_better_target_misses(bench_path: None) -> None:
    benchlib = bench_module("benchlib")
    line = benchlib.result_line("outbox_drain", "2100 ev/s against 5000 ev/s", 0.42, 0.5,
                                lower_is_better=False)
    assert line.endswith("ratio 0.42x (target >= 0.5x) MISSES")
    parsed = benchlib.parse_result(line)
    assert not parsed.holds and not parsed.lower_is_better


def test_an_absolute_figure_carries_its_unit(bench_path: None) -> None:
    benchlib = bench_module("benchlib")
    line = benchlib.result_line("loop_lag", "longest stall during an apply", 12.5, 20,
                                unit=" ms")
    assert line.endswith("value 12.50 ms (target <= 20 ms) HOLDS")
    parsed = benchlib.parse_result(line)
    assert (parsed.value, parsed.unit, parsed.target) == (12.5, " ms", 20.0)
    assert parsed.ratio_text == "12.50 ms"


def test_nothing_measured_misses(bench_path: None) -> None:
    benchlib = bench_module("benchlib")
    line = benchlib.result_line("x", "no samples", math.nan, 1.5)
    assert line.endswith("ratio nanx (target <= 1.5x) MISSES")
    parsed = benchlib.parse_result(line)
    assert math.isnan(parsed.value) and not parsed.holds


def test_other_lines_are_not_results(bench_path: None) -> None:
    benchlib = bench_module("benchlib")
    assert benchlib.parse_result("  ratio 1.09x (target <= 1.5x: holds)") is None
    assert benchlib.parse_result("RESULT nothing after the name") is None


def test_a_name_with_a_colon_is_refused(bench_path: None) -> None:
    benchlib = bench_module("benchlib")
    with pytest.raises(ValueError, match="no ':'"):
        benchlib.result_line("a: b", "figure", 1.0, 2.0)
    with pytest.raises(ValueError, match="no ';'"):
        benchlib.result_line("a", "figure; more", 1.0, 2.0)


def test_startup_bundle_file_gives_a_big_file_time_to_apply(bench_path: None) -> None:
    bench = bench_module("startup_bundle_file")
    benchlib = bench_module("benchlib")
    assert bench.start_timeout_s(0) == benchlib.START_TIMEOUT_S
    # The first start applies the file: about 2 min at 1M codes.
    assert bench.start_timeout_s(1_000_000) >= 600
    assert bench.start_timeout_s(100_000) > bench.start_timeout_s(10_000)


def test_bundle_apply_can_run_the_process_path_alone(bench_path: None) -> None:
    args = bench_module("bundle_apply").parse_args(["--process-only", "--codes", "10000"])
    assert args.process_only and args.sizes == [10_000]
