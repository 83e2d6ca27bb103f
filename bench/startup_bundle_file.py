"""Start to READY of `lockerd run` with an unchanged `[codes] bundle_file`, beside none."""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from benchlib import (
    LOCKERD,
    START_TIMEOUT_S,
    machine_line,
    proc_status,
    provision,
    report,
    run_in_work_directory,
    stop_process,
)

from lockerd.dev.provision import to_toml

TARGET_RATIO = 1.5
"""The target: a start with an unchanged bundle file within 1.5x of a start without one."""
START_S_PER_CODE = 0.001
"""Time a start is given per code of the bundle file, beside benchlib's START_TIMEOUT_S (as
bench/import_while_serving.py): the first start applies the file, about 2 min at 1M codes."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--codes", type=int, default=100_000,
                        help="codes in the bundle file (default 100000)")
    parser.add_argument("--runs", type=int, default=5,
                        help="starts of each kind, alternating (default 5)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="an empty directory to work in (default: a temporary one)")
    return parser.parse_args(argv)


def without_bundle_file(config_path: Path) -> Path:
    """The same bank's config without `[codes] bundle_file`, beside it (same state dir)."""
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    config.get("codes", {}).pop("bundle_file", None)
    if not config.get("codes"):
        config.pop("codes", None)
    path = config_path.with_name("lockerd-nofile.toml")
    path.write_text(to_toml(config), encoding="utf-8")
    return path


def start_timeout_s(codes: int) -> float:
    """How long a start of a bank with `codes` codes in its bundle file is given to be READY."""
    return START_TIMEOUT_S + codes * START_S_PER_CODE


def start_to_ready(config_path: Path, work: Path, *, timeout_s: float) -> tuple[float, int]:
    """Spawn `lockerd run`, wait for READY=1 on a NOTIFY_SOCKET (`timeout_s` at most), stop it.

    Returns the seconds from spawn to READY and the peak RSS (VmHWM, KiB) at READY."""
    notify_path = work / "notify.sock"
    notify_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    log_path = work / f"{config_path.stem}.log"
    try:
        with log_path.open("ab") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [*LOCKERD, "run", "-c", str(config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=config_path.parent, start_new_session=True,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )
        try:
            while True:
                left = t0 + timeout_s - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    raise RuntimeError(f"no READY=1 from the daemon in {timeout_s:.0f} s "
                                       f"(see {log_path})")
                sock.settimeout(min(left, 0.5))
                try:
                    message = sock.recv(4096)
                except TimeoutError:
                    continue
                if b"READY=1" in message.split(b"\n"):
                    elapsed = time.monotonic() - t0
                    break
            hwm = int(proc_status(proc.pid)["VmHWM"].split()[0])
        finally:
            stop_process(proc)
    finally:
        sock.close()
        notify_path.unlink(missing_ok=True)
    return elapsed, hwm


def run(args: argparse.Namespace, work: Path) -> None:
    print(machine_line())
    print(f"provisioning a bank with a signed snapshot of {args.codes} codes ...", flush=True)
    kit = provision(work / "bank", compartments=16, codes=args.codes)
    size = kit.bundle_path.stat().st_size
    print(f"bundle file: {kit.bundle_path.name}, {size / 2**20:.1f} MiB")
    nofile = without_bundle_file(kit.config_path)
    timeout_s = start_timeout_s(args.codes)
    first, first_hwm = start_to_ready(kit.config_path, work, timeout_s=timeout_s)
    print(f"first start, applies the file: {first * 1000:8.0f} ms to READY, "
          f"peak RSS {first_hwm / 1024:.0f} MiB")
    with_file: list[float] = []
    bare: list[float] = []
    with_hwm: list[int] = []
    bare_hwm: list[int] = []
    for _ in range(args.runs):
        seconds, hwm = start_to_ready(kit.config_path, work, timeout_s=timeout_s)
        with_file.append(seconds)
        with_hwm.append(hwm)
        seconds, hwm = start_to_ready(nofile, work, timeout_s=timeout_s)
        bare.append(seconds)
        bare_hwm.append(hwm)
    log_text = (work / f"{kit.config_path.stem}.log").read_text(encoding="utf-8")
    skipped = log_text.count("codes bundle file unchanged since it was applied")
    w, b = statistics.median(with_file), statistics.median(bare)
    wh, bh = statistics.median(with_hwm), statistics.median(bare_hwm)
    print(f"medians of {args.runs} alternating starts, {args.codes} codes held:")
    print(f"  unchanged bundle_file: {w * 1000:8.0f} ms to READY, peak RSS {wh / 1024:.0f} MiB"
          f"  (file skipped in {skipped} of {args.runs + 1} starts)")
    print(f"  no bundle_file:        {b * 1000:8.0f} ms to READY, peak RSS {bh / 1024:.0f} MiB")
    print(f"  peak RSS ratio {wh / bh:.2f}x")
    report(f"startup_bundle_file {args.codes} codes",
           f"start to READY {w * 1000:.0f} ms with the unchanged file against {b * 1000:.0f} ms "
           "without", w / b, TARGET_RATIO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_in_work_directory("startup_bundle_file", args.dir, lambda work: run(args, work))


if __name__ == "__main__":
    sys.exit(main())
