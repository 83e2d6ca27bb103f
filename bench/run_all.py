"""Every benchmark in bench/ in one run, at the sizes docs/benchmarks.md uses (or small ones with
--quick): the machine, date and commit, each script's output, and a markdown file of the
RESULT lines (bench/results/<date>-<commit>.md) that docs/benchmarks.md quotes."""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import Result, exit_on_sigterm, filesystem_of, parse_result

BENCH_DIR = Path(__file__).resolve().parent
NOT_BENCHES = frozenset({"run_all", "wire_relay"})
"""Scripts of bench/ that are not benchmarks to run: this one, and the minimal keypad-to-lock
relay that keypress_to_unlock.py runs as its baseline. A module without a `__main__` guard
(benchlib.py, benchbroker.py, bundlepaths.py, ...) is shared code, not a benchmark."""


@dataclass(frozen=True)
class Bench:
    """One run of one script: the arguments of a full run (the sizes the docs use) and the
    candidates for a quick one (each used if the script's --help knows all its options)."""

    label: str
    script: str
    full: tuple[str, ...] = ()
    quick: tuple[tuple[str, ...], ...] = ((),)
    """Quick arguments to try in order; the first whose options --help lists is used, else
    none. Empty: the entry is left out of a quick run."""


PLAN: tuple[Bench, ...] = (
    Bench("help_keypress", "help_keypress", (), (("--rounds", "2000"),)),
    Bench("deadlines", "deadlines", (), (("--codes", "10000", "--repeat", "300"),)),
    Bench("credentials", "credentials", (), (("--quick",),)),
    Bench("keypress_to_unlock", "keypress_to_unlock", (),
          (("--quick",), ("--pickups", "50"))),
    Bench("idle_footprint", "idle_footprint", (),
          (("--quick",), ("--seconds", "5", "--settle", "2", "--codes", "10000"),
           ("--seconds", "5"))),
    Bench("startup_bundle_file", "startup_bundle_file", ("--codes", "100000", "--runs", "5"),
          (("--codes", "5000", "--runs", "2"),)),
    Bench("startup_bundle_file 1M", "startup_bundle_file", ("--codes", "1000000", "--runs", "3"),
          ()),
    Bench("inbox_flood", "inbox_flood", (),
          (("--messages", "50", "--size", "100000", "--idle", "1"),)),
    Bench("outbox_drain", "outbox_drain", ("--events", "100000"),
          (("--events", "5000", "--rounds", "2", "--sequential", "1000", "--commits", "200"),)),
    Bench("bundle_apply", "bundle_apply", (),
          (("--codes", "2000,10000", "--runs", "1", "--deltas", "3", "--lookups", "200",
            "--unknown", "20"),)),
    # Issue 14 part 3 states its target for a snapshot of 1M codes.
    Bench("parts_over_mqtt", "parts_over_mqtt", ("--codes", "1000000"),
          (("--quick",), ("--codes", "10000"))),
    Bench("import_while_serving", "import_while_serving", (),
          (("--quick",), ("--codes", "100000", "--pickups", "20", "--imports", "2"),
           ("--codes", "10000"))),
    Bench("loop_lag", "loop_lag", (), (("--quick",), ("--codes", "10000"))),
)
"""In this order (short in-process ones first). A script of bench/ with a main that is not
here runs after these with its defaults."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__ + " Exit status 1 if a bench failed or ran out of time (a bench "
        "that is not there is reported, not a failure).")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a few minutes in all: to see that every bench runs "
                        "(its figures are not the ones to quote)")
    parser.add_argument("--only", type=lambda t: [x for x in t.split(",") if x],
                        default=None, metavar="NAME,...",
                        help="run only these entries (labels or script names)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="the markdown results file (default: "
                        "bench/results/<date>-<commit>[-quick].md)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="stop a bench that runs longer than this (3600)")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, metavar="PATH",
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the plan ---------------------------------------------------------------------------------


def is_bench(path: Path) -> bool:
    """A script of bench/ that is a benchmark: it runs as a script (a `__main__` guard) and is
    not one of NOT_BENCHES."""
    if path.stem in NOT_BENCHES:
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    return "\nif __name__ == \"__main__\":" in text


def discover(bench_dir: Path) -> list[Bench]:
    """PLAN, then every other benchmark of `bench_dir`, with its defaults."""
    known = {b.script for b in PLAN}
    extra = [Bench(p.stem, p.stem) for p in sorted(bench_dir.glob("*.py"))
             if p.stem not in known and is_bench(p)]
    return [*PLAN, *extra]


def options_known(script: Path, args: Sequence[str]) -> bool:
    """Does the script's --help list every option in `args`?"""
    wanted = [a for a in args if a.startswith("--")]
    if not wanted:
        return True
    try:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                             text=True, timeout=120, cwd=script.parent.parent, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return all(option in out.stdout for option in wanted)


def arguments(bench: Bench, script: Path, quick: bool) -> tuple[str, ...] | None:
    """The arguments of this run; None to leave it out (an empty quick entry)."""
    if not quick:
        return bench.full
    if not bench.quick:
        return None
    for candidate in bench.quick:
        if options_known(script, candidate):
            return candidate
    return ()


# -- running ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    bench: Bench
    args: tuple[str, ...] | None
    status: str
    """"ok", "missing", "skipped (quick)", "exit N", "timeout"."""
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)


def run_one(bench: Bench, bench_dir: Path, quick: bool, timeout_s: float) -> Outcome:
    script = bench_dir / f"{bench.script}.py"
    if not script.exists():
        return Outcome(bench, None, "missing")
    args = arguments(bench, script, quick)
    if args is None:
        return Outcome(bench, None, "skipped (quick)")
    outcome = Outcome(bench, args, "ok")
    cmd = [sys.executable, str(script), *args]
    print(f"\n=== {bench.label}: {' '.join(['bench/' + script.name, *args])}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            cwd=bench_dir.parent, env=env)
    timed_out = threading.Event()

    def out_of_time() -> None:
        # SIGTERM: the benches stop their daemons and brokers on it; reading goes on to EOF.
        timed_out.set()
        proc.send_signal(signal.SIGTERM)

    timer = threading.Timer(timeout_s, out_of_time)
    timer.start()
    stop_now = True
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            outcome.output.append(line.rstrip("\n"))
            result = parse_result(line)
            if result is not None:
                outcome.results.append(result)
        stop_now = False
    finally:
        timer.cancel()
        _finish(proc, stop_now=stop_now)
    if timed_out.is_set():
        outcome.status = "timeout"
    outcome.seconds = time.monotonic() - t0
    if outcome.status == "ok" and proc.returncode != 0:
        outcome.status = f"exit {proc.returncode}"
    return outcome


def _finish(proc: subprocess.Popen[str], *, stop_now: bool) -> None:
    """Wait for the bench to exit; with `stop_now` (a timeout, an interrupt) stop it first
    with SIGTERM, on which the benches stop their daemons and brokers. SIGKILL after 60 s."""
    if stop_now and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- the machine ------------------------------------------------------------------------------


def _first(path: str, prefix: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def commit_of(repo: Path) -> str:
    """The short commit, with "+changes" if tracked files differ from it."""
    commit = _git(repo, "rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return f"{commit}+changes" if dirty else commit


def mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "unknown"


def compile_project() -> str:
    """Compile the lockerd, hal and sim packages this Python imports to bytecode, as
    scripts/setup.sh leaves an install: a bench must not charge every `lockerd` process for
    compiling the sources (after an edit, or where PYTHONDONTWRITEBYTECODE is set, nothing
    else writes the bytecode)."""
    import hal
    import lockerd
    import sim

    dirs = [Path(package.__file__).parent for package in (lockerd, hal, sim)
            if package.__file__ is not None]
    ok = len(dirs) == 3 and all(compileall.compile_dir(d, quiet=1, workers=0) for d in dirs)
    return f"compiled ({', '.join(str(d) for d in dirs)})" if ok else "NOT all compiled"


def machine_facts(repo: Path) -> list[tuple[str, str]]:
    usage = shutil.disk_usage(repo)
    memory = _first("/proc/meminfo", "MemTotal")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 0
    return [
        ("CPUs (nproc)", f"{cpus} ({_first('/proc/cpuinfo', 'model name')})"),
        ("memory", f"{int(memory.split()[0]) / 2**20:.1f} GiB" if memory[0].isdigit()
         else memory),
        ("disk", f"{filesystem_of(repo)} holding {repo}, {usage.total / 2**30:.0f} GiB, "
                 f"{usage.free / 2**30:.0f} GiB free (work directories under "
                 f"{Path(os.environ.get('TMPDIR', '/tmp'))}, {filesystem_of(Path('/tmp'))})"),
        ("system", f"{platform.node()}, Linux {platform.release()}, Python "
                   f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
                   f"{mosquitto_version()}"),
    ]


# -- the results file -------------------------------------------------------------------------


def markdown(outcomes: Sequence[Outcome], *, facts: Sequence[tuple[str, str]], when: str,
             commit: str, command: str, quick: bool, loads: tuple[str, str]) -> str:
    kind = "quick run (small sizes: not the figures to quote)" if quick else "full run"
    lines = [
        f"# Benchmark results: {when}, commit {commit}, {kind}",
        "",
        f"- command: `{command}`",
        f"- date: {when}",
        f"- commit: {commit}",
        *(f"- {name}: {value}" for name, value in facts),
        f"- load average (1 min): {loads[0]} at the start, {loads[1]} at the end",
        "",
        "| bench | result | figure | ratio | target | |",
        "|---|---|---|---:|---|---|",
    ]
    for o in outcomes:
        if not o.results:
            note = {"ok": "printed no RESULT line"}.get(o.status, o.status)
            lines.append(f"| {o.bench.label} | | {note} | | | |")
        for r in o.results:
            lines.append(f"| {o.bench.label} | {_cell(r.name)} | {_cell(r.figure)} | "
                         f"{r.ratio_text} | {r.target_text} | {r.verdict} |")
    lines += ["", "## Runs", "", "| bench | arguments | status | seconds |",
              "|---|---|---|---:|"]
    for o in outcomes:
        args = "" if o.args is None else f"`{' '.join(o.args) or '(defaults)'}`"
        lines.append(f"| {o.bench.label} | {args} | {o.status} | {o.seconds:.0f} |")
    for o in outcomes:
        if not o.output:
            continue
        command = " ".join([f"bench/{o.bench.script}.py", *(o.args or ())])
        lines += ["", f"## {o.bench.label}", "", f"`{command}`", "", "```text", *o.output,
                  "```"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown(path: Path, repo: Path) -> str:
    """`path` relative to the repository when it is inside it (.venv/bin/python)."""
    try:
        return str(path.relative_to(repo))
    except ValueError:
        return str(path)


def default_out(bench_dir: Path, when: str, commit: str, quick: bool) -> Path:
    return bench_dir / "results" / f"{when[:10]}-{commit}{'-quick' if quick else ''}.md"


def summary(outcomes: Sequence[Outcome]) -> str:
    results = [r for o in outcomes for r in o.results]
    holds = sum(r.holds for r in results)
    bad = [f"{o.bench.label} ({o.status})" for o in outcomes
           if o.status not in ("ok", "skipped (quick)")]
    text = f"{holds} of {len(results)} targets hold"
    return text + (f"; not run or failed: {', '.join(bad)}" if bad else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    bench_dir: Path = args.bench_dir.resolve()
    repo = bench_dir.parent
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = commit_of(repo)
    facts = [*machine_facts(repo), ("lockerd bytecode", compile_project())]
    command = " ".join([_shown(Path(sys.executable), repo), "bench/run_all.py",
                        *(argv if argv is not None else sys.argv[1:])])
    print(f"run_all: {when}, commit {commit}{', quick' if args.quick else ''}")
    for name, value in facts:
        print(f"  {name}: {value}")
    load_start = f"{os.getloadavg()[0]:.2f}"
    plan = [b for b in discover(bench_dir)
            if args.only is None or b.label in args.only or b.script in args.only]
    outcomes: list[Outcome] = []
    status = 0
    try:
        for bench in plan:
            outcomes.append(run_one(bench, bench_dir, args.quick, args.timeout))
    except KeyboardInterrupt:
        print("run_all: interrupted; writing what ran", file=sys.stderr)
        status = 130
    out = args.out or default_out(bench_dir, when, commit, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(outcomes, facts=facts, when=when, commit=commit, command=command,
                            quick=args.quick, loads=(load_start, f"{os.getloadavg()[0]:.2f}")),
                   encoding="utf-8")
    print(f"\nrun_all: {summary(outcomes)}")
    print(f"run_all: results in {out}")
    for o in outcomes:
        for r in o.results:
            print(f"  {r.verdict:<6} {r.name}: {r.ratio_text} (target {r.target_text})")
        if o.status != "ok":
            print(f"  {o.status.upper():<6} {o.bench.label}")
    failed = any(o.status.startswith(("exit", "timeout")) for o in outcomes)
    return status or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
