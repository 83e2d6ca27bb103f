"""Idle memory and CPU of a `lockerd run` subprocess, beside bare-interpreter baselines."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import (
    CLK_TCK,
    Daemon,
    context_switches,
    cpu_seconds,
    exit_on_sigterm,
    machine_line,
    proc_status,
    provision,
    rss_kib,
    start_daemon,
    stop_process,
)

# Each baseline prints "ready" once its imports are done, then sleeps in asyncio.
FLOOR = "import asyncio, sys; print('ready', flush=True); asyncio.run(asyncio.sleep({s}))"
IMPORTS = (
    "import asyncio, sys, lockerd.app, lockerd.cli.lockerd_cmd, sim.backend; "
    "print('ready', flush=True); asyncio.run(asyncio.sleep({s}))"
)


@dataclass
class Watched:
    """One process measured over the window."""

    label: str
    pid: int
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    rss_max_kib: int = 0
    hwm_kib: int = 0
    cpu_start_s: float = 0.0
    cpu_end_s: float = 0.0
    switches_start: int = 0
    switches_end: int = 0
    threads: int = 0
    samples: list[int] = field(default_factory=list)

    def begin(self) -> None:
        self.cpu_start_s = cpu_seconds(self.pid)
        self.switches_start = context_switches(self.pid)
        self.rss_start_kib = self.rss_max_kib = rss_kib(self.pid)

    def sample(self) -> None:
        rss = rss_kib(self.pid)
        self.samples.append(rss)
        self.rss_max_kib = max(self.rss_max_kib, rss)

    def end(self) -> None:
        self.cpu_end_s = cpu_seconds(self.pid)
        self.switches_end = context_switches(self.pid)
        status = proc_status(self.pid)
        self.rss_end_kib = int(status["VmRSS"].split()[0])
        self.rss_max_kib = max(self.rss_max_kib, self.rss_end_kib)
        self.hwm_kib = int(status["VmHWM"].split()[0])
        self.threads = int(status["Threads"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` on a simulated bank as a subprocess, wait until it is "
        "up, then sample its RSS (/proc/PID/status VmRSS) and CPU time (/proc/PID/stat "
        "utime+stime) over an idle window. Baselines measured over the same window: a bare "
        "`python -c asyncio.sleep` process (the interpreter floor) and one that has also "
        "imported lockerd and the sim backend (import cost). Prints figures; asserts nothing."
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, metavar="S", help="length of the idle window (30)"
    )
    parser.add_argument(
        "--compartments", type=int, default=16, metavar="N", help="compartments of the bank (16)"
    )
    parser.add_argument(
        "--codes",
        type=int,
        default=16,
        metavar="N",
        help="pickup codes in the bank's cache (16: one per compartment)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="S",
        help="wait this long after start-up before the window opens (1)",
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, metavar="S", help="RSS sampling interval (0.5)"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.interval <= 0 or args.settle < 0:
        parser.error("--seconds and --interval must be positive, --settle not negative")
    if args.compartments < 1 or args.codes < 0:
        parser.error("--compartments must be at least 1, --codes at least 0")
    return args


def start_baseline(code: str, seconds: float, cwd: Path) -> subprocess.Popen[str]:
    # `python -c` puts its working directory first on sys.path: run it outside the checkout so
    # that it imports the same installed lockerd as the daemon.
    proc = subprocess.Popen(
        [sys.executable, "-c", code.format(s=seconds)],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        stop_process(proc)
        raise RuntimeError(f"baseline process did not start: {code!r}")
    return proc


def watch(processes: list[Watched], seconds: float, interval: float) -> float:
    """Sample every process until `seconds` have passed; returns the exact window length."""
    for w in processes:
        w.begin()
    t0 = time.monotonic()
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        time.sleep(min(interval, end - now))
        for w in processes:
            w.sample()
    for w in processes:
        w.end()
    return time.monotonic() - t0


def report(
    args: argparse.Namespace,
    daemon: Daemon,
    startup_cpu_s: float,
    watched: list[Watched],
    window_s: float,
) -> None:
    tick = 1 / CLK_TCK
    print(
        f"idle_footprint: {window_s:.1f} s idle window, daemon with {args.compartments} "
        f"compartments and {args.codes} codes on the simulator"
    )
    print(f"  {machine_line()}")
    print(
        f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; CPU time resolution {tick * 1000:.0f} ms "
        f"(SC_CLK_TCK {CLK_TCK}), i.e. {tick / window_s * 100:.3f} % of the window"
    )
    print(
        f"  daemon start-up: {daemon.started_s:.2f} s to an answering control socket, "
        f"{startup_cpu_s:.2f} s CPU"
    )
    print()
    head = (
        f"  {'process':<34}{'RSS start':>10}{'RSS end':>10}{'RSS max':>10}{'VmHWM':>10}"
        f"{'CPU s':>8}{'CPU %':>8}{'wakeups/s':>11}{'threads':>9}"
    )
    print(head)
    print(f"  {'':<34}{'(MiB)':>10}{'(MiB)':>10}{'(MiB)':>10}{'(MiB)':>10}")
    for w in watched:
        cpu = w.cpu_end_s - w.cpu_start_s
        wakeups = (w.switches_end - w.switches_start) / window_s
        print(
            f"  {w.label:<34}{w.rss_start_kib / 1024:>10.1f}{w.rss_end_kib / 1024:>10.1f}"
            f"{w.rss_max_kib / 1024:>10.1f}{w.hwm_kib / 1024:>10.1f}{cpu:>8.2f}"
            f"{cpu / window_s * 100:>8.2f}{wakeups:>11.1f}{w.threads:>9}"
        )
    floor, imports, lockerd = watched
    print()
    print(
        f"  lockerd idle CPU: {lockerd.cpu_end_s - lockerd.cpu_start_s:.2f} s over "
        f"{window_s:.1f} s ({(lockerd.cpu_end_s - lockerd.cpu_start_s) / window_s * 100:.2f} %)"
    )
    print(
        f"  RSS above the interpreter floor: imports "
        f"{(imports.rss_end_kib - floor.rss_end_kib) / 1024:+.1f} MiB, running daemon "
        f"{(lockerd.rss_end_kib - floor.rss_end_kib) / 1024:+.1f} MiB; daemon RSS change "
        f"over the window {(lockerd.rss_end_kib - lockerd.rss_start_kib):+d} KiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="lkbench-"))
    daemon: Daemon | None = None
    baselines: list[subprocess.Popen[str]] = []
    status = 0
    try:
        kit = provision(work / "bank", compartments=args.compartments, codes=args.codes)
        daemon = start_daemon(kit)
        startup_cpu_s = cpu_seconds(daemon.pid)
        # The baselines sleep past the end of the window; they are stopped when it closes.
        lifetime = args.seconds + args.settle + 60
        baselines = [start_baseline(FLOOR, lifetime, work), start_baseline(IMPORTS, lifetime, work)]
        time.sleep(args.settle)
        watched = [
            Watched("python, asyncio.sleep (floor)", baselines[0].pid),
            Watched("python + lockerd imports, sleep", baselines[1].pid),
            Watched("lockerd run (idle)", daemon.pid),
        ]
        window_s = watch(watched, args.seconds, args.interval)
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited during the window:\n{daemon.log_tail()}")
        report(args, daemon, startup_cpu_s, watched, window_s)
    except (RuntimeError, FileNotFoundError, ProcessLookupError) as exc:
        print(f"idle_footprint: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("idle_footprint: interrupted", file=sys.stderr)
        status = 130
    finally:
        for proc in baselines:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        if daemon is not None:
            code = stop_process(daemon.proc)
            if code != 0 and status == 0:
                print(
                    f"idle_footprint: the daemon exited with status {code}:\n{daemon.log_tail()}",
                    file=sys.stderr,
                )
                status = 1
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
