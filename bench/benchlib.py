"""Shared helpers of the benchmarks: provisioning, the daemon subprocess, /proc, statistics."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from lockerd.dev.provision import BankKit, PlainCode, make_bank, to_toml
from lockerd.logs import configure_logging
from sim.client import request_sync

LOCKERD = [sys.executable, "-m", "lockerd.cli.lockerd_cmd"]
"""The daemon command: the installed package's CLI run by this interpreter (`lockerd run`)."""

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the daemon and remove temp dirs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_in_work_directory(name: str, directory: Path | None,
                          run: Callable[[Path], None]) -> int:
    """A benchmark's main: `run(work)` in its work directory; the exit status (1 for a
    RuntimeError it reports, 130 for an interrupt), each with one line on stderr."""
    exit_on_sigterm()
    try:
        with work_directory(directory) as work:
            run(work)
    except RuntimeError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0


@contextmanager
def work_directory(directory: Path | None) -> Iterator[Path]:
    """Where a benchmark works: `directory`, which must be empty, or a temporary directory
    removed afterwards. The logs of a daemon run in-process go to `lockerd.log` in it (JSON
    lines at info, as an installation logs to journald). Raises RuntimeError to report."""
    temp = directory is None
    work = Path(tempfile.mkdtemp(prefix="lkbench-")) if directory is None else directory
    try:
        work.mkdir(parents=True, exist_ok=True)
        if not temp and any(work.iterdir()):
            raise RuntimeError(f"{work} is not empty: give --dir a fresh directory")
        with (work / "lockerd.log").open("w", encoding="utf-8") as log_file:
            configure_logging("info", "json", stream=log_file)
            yield work
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def unique_codes(count: int, digits: int = 8) -> list[str]:
    """`count` distinct random codes of `digits` digits."""
    import secrets

    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        code = "".join(secrets.choice("0123456789") for _ in range(digits))
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out


def provision(
    directory: Path,
    *,
    compartments: int,
    codes: int,
    doors: dict[str, float] | None = None,
    sim: dict[str, Any] | None = None,
) -> BankKit:
    """A bank with a parcel in every compartment and `codes` pickup codes spread over them.

    `sim` keys are merged into `[backends.sim]` (make_bank's overrides replace whole tables,
    so the written file is read back, changed and written again).
    """
    ids = [str(i) for i in range(1, compartments + 1)]
    plain = [
        PlainCode(
            id=f"p-{n}",
            code=code,
            compartment=ids[n % compartments],
            parcel_id=f"PX{n}",
            max_uses=1,
        )
        for n, code in enumerate(unique_codes(codes))
    ]
    overrides: dict[str, Any] = {"logging": {"level": "info", "format": "json"}}
    if doors:
        overrides["doors"] = doors
    kit = make_bank(
        directory, compartments=compartments, codes=plain, parcels=ids, overrides=overrides
    )
    if sim:
        config = tomllib.loads(kit.config_path.read_text(encoding="utf-8"))
        config["backends"]["sim"].update(sim)
        kit.config_path.write_text(to_toml(config), encoding="utf-8")
    return kit


@dataclass
class Daemon:
    """`lockerd run -c CONFIG` as a child process; its log goes to a file beside the config."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started_s: float
    """Wall seconds from spawning the process to its control socket answering."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_daemon(kit: BankKit, *, timeout_s: float = START_TIMEOUT_S) -> Daemon:
    """Start the daemon and wait (up to `timeout_s`) until its control socket answers and the
    display shows idle.

    The log (JSON lines on stderr) goes to a file, never to a pipe nobody reads: a full pipe
    would block the daemon's event loop in the middle of a measurement.
    """
    log_path = kit.directory / "lockerd.log"
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*LOCKERD, "run", "-c", str(kit.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=kit.directory,
            # Its own session: a Ctrl-C at the terminal reaches the benchmark only, which then
            # stops the daemon itself (SIGTERM, wait, SIGKILL) once the measurement has unwound.
            start_new_session=True,
        )
    daemon = Daemon(proc=proc, log_path=log_path, started_s=0.0)
    try:
        deadline = t0 + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited with status {proc.returncode}:\n{daemon.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the daemon did not come up in {timeout_s:.0f} s:\n{daemon.log_tail()}"
                )
            if kit.socket_path.exists():
                try:
                    state = request_sync(kit.socket_path, {"op": "state"}, timeout=2.0)
                except OSError:
                    state = {}
                if state.get("display"):
                    break
            time.sleep(0.01)
    except BaseException:
        stop_process(proc)
        raise
    daemon.started_s = time.monotonic() - t0
    return daemon


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait, SIGKILL if it has not gone; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# -- /proc ------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status, values as written (e.g. "12345 kB")."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


def hwm_kib(pid: int) -> int:
    """VmHWM of the process: its peak RSS so far (0 once it is gone)."""
    try:
        return int(proc_status(pid)["VmHWM"].split()[0])
    except (OSError, KeyError):
        return 0


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc/*/stat: the kernel may not have
    /proc/PID/task/TID/children)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process from /proc/PID/stat, in seconds (SC_CLK_TCK resolution)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        text = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of the main thread: its wake-ups, roughly."""
    status = proc_status(pid)
    return int(status["voluntary_ctxt_switches"]) + int(status["nonvoluntary_ctxt_switches"])


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path`, from /proc/self/mounts (longest mount prefix)."""
    best, fstype = "", "unknown"
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def machine_line() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    return (
        f"{platform.node()}: {cpus} CPUs{' (' + model + ')' if model else ''}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


# -- statistics -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        s = sorted(values)
        return cls(
            n=len(s),
            median=percentile(s, 50),
            p99=percentile(s, 99),
            min=s[0] if s else math.nan,
            max=s[-1] if s else math.nan,
        )


# -- the result line --------------------------------------------------------------------------

RESULT_PREFIX = "RESULT "
"""Every benchmark prints one line per target it checks, starting with this, in one format:
`RESULT <name>: <figure>; ratio 1.23x (target <= 1.5x) HOLDS` (or MISSES). `bench/run_all.py`
collects these lines into the table of docs/benchmarks.md."""

_RESULT_LINE = re.compile(
    r"^RESULT (?P<name>[^:]+): (?P<figure>.*); (?P<kind>ratio|value) (?P<value>\S+?)"
    r"(?P<unit>x| \S+) \(target (?P<op><=|>=) (?P<target>\S+?)(?:x| \S+)\) "
    r"(?P<verdict>HOLDS|MISSES)$"
)


@dataclass(frozen=True)
class Result:
    """One parsed RESULT line."""

    name: str
    figure: str
    value: float
    unit: str
    """"x" for a ratio to a baseline, else the unit of an absolute figure (" ms", " %")."""
    target: float
    lower_is_better: bool
    holds: bool

    @property
    def ratio_text(self) -> str:
        return f"{self.value:.2f}{self.unit}"

    @property
    def target_text(self) -> str:
        return f"{'<=' if self.lower_is_better else '>='} {self.target:g}{self.unit}"

    @property
    def verdict(self) -> str:
        return "HOLDS" if self.holds else "MISSES"


def result_line(name: str, figure: str, ratio: float, target: float, *,
                lower_is_better: bool = True, unit: str = "x") -> str:
    """The RESULT line of one target: `ratio` (a figure over its same-run baseline, or with
    `unit` another than "x" an absolute figure, e.g. " ms") against `target`. A ratio that
    is not a number (nothing measured) misses."""
    if ":" in name or ";" in figure or "\n" in name + figure:
        raise ValueError(f"a result's name holds no ':' and its figure no ';': {name!r}")
    finite = math.isfinite(ratio)
    holds = finite and (ratio <= target if lower_is_better else ratio >= target)
    kind = "ratio" if unit == "x" else "value"
    shown = f"{ratio:.2f}" if finite else "nan"
    op = "<=" if lower_is_better else ">="
    return (f"{RESULT_PREFIX}{name}: {figure}; {kind} {shown}{unit} (target {op} {target:g}"
            f"{unit}) {'HOLDS' if holds else 'MISSES'}")


def report(name: str, figure: str, ratio: float, target: float, *,
           lower_is_better: bool = True, unit: str = "x") -> Result:
    """Print the RESULT line of one target (see `result_line`) and return it parsed."""
    line = result_line(name, figure, ratio, target, lower_is_better=lower_is_better, unit=unit)
    print(line, flush=True)
    parsed = parse_result(line)
    assert parsed is not None
    return parsed


def parse_result(line: str) -> Result | None:
    """The Result of a RESULT line, or None for any other line."""
    match = _RESULT_LINE.match(line.rstrip("\n"))
    if match is None:
        return None
    unit = match["unit"]
    value = float(match["value"])
    return Result(
        name=match["name"], figure=match["figure"], value=value, unit=unit,
        target=float(match["target"]), lower_is_better=match["op"] == "<=",
        holds=match["verdict"] == "HOLDS",
    )
