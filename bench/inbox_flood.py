"""Peak RSS of a `lockerd run` subprocess under a flood of large `cmd` messages, beside idle."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import aiomqtt
from benchbroker import Broker
from benchlib import (
    exit_on_sigterm,
    machine_line,
    proc_status,
    provision,
    report,
    rss_kib,
    start_daemon,
    stop_process,
)

from lockerd.dev.provision import to_toml

TARGET_RATIO = 2.0
# aiomqtt warns about every pending publish past ten, which a pipelined flood is made of.
QUIET = logging.getLogger("inbox_flood.mqtt")
QUIET.setLevel(logging.ERROR)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start `lockerd run` on a simulated bank against a mosquitto of its own, "
        "measure its RSS idle, then publish N messages of S bytes (garbage, refused as "
        "malformed) at QoS 1 on lockers/<id>/cmd as fast as the broker takes them, and sample "
        "its RSS until it has answered every one on cmd/result. Prints idle RSS, flood peak "
        "RSS (sampled and VmHWM) and their ratio beside the 2x target; asserts nothing."
    )
    parser.add_argument("--messages", type=int, default=1000, metavar="N",
                        help="messages in the flood (1000)")
    parser.add_argument("--size", type=int, default=1024 * 1024, metavar="BYTES",
                        help="payload size of each (1048576)")
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1),
                        help="QoS of the flood (1); at 0 the daemon may drop some")
    parser.add_argument("--idle", type=float, default=3.0, metavar="S",
                        help="idle window before the flood (3)")
    parser.add_argument("--interval", type=float, default=0.02, metavar="S",
                        help="RSS sampling interval (0.02)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="give up waiting for the answers after this long (600)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.size < 1 or args.idle <= 0 or args.interval <= 0:
        parser.error("--messages, --size, --idle and --interval must be positive")
    return args


class Sampler(threading.Thread):
    """Samples VmRSS of one process until stopped; keeps the maximum."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.max_kib = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.max_kib = max(self.max_kib, rss_kib(self.pid))
                self.samples += 1
            except (OSError, KeyError, ValueError):
                return
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


async def wait_online(broker: Broker, state_topic: str, within_s: float) -> None:
    async with aiomqtt.Client(broker.host, broker.port, logger=QUIET) as client:
        await client.subscribe(state_topic, qos=1)
        async with asyncio.timeout(within_s):
            async for message in client.messages:
                body = json.loads(message.payload)
                if body.get("status") == "online":
                    return


async def flood(broker: Broker, prefix: str, args: argparse.Namespace) -> tuple[float, int]:
    """Publish the flood and wait for the answers; returns (seconds, answers counted)."""
    payload = b"\x00" + b"x" * (args.size - 1)  # not JSON: refused as malformed
    answered = 0
    async with aiomqtt.Client(broker.host, broker.port, logger=QUIET) as watcher:
        await watcher.subscribe(prefix + "cmd/result", qos=1)
        t0 = time.monotonic()
        async with aiomqtt.Client(broker.host, broker.port, max_inflight_messages=100,
                                  logger=QUIET) as pub:
            # Pipelined: every publish is handed to the client before the PUBACKs are awaited.
            await asyncio.gather(*(pub.publish(prefix + "cmd", payload, qos=args.qos)
                                   for _ in range(args.messages)))
        try:
            async with asyncio.timeout(args.timeout if args.qos else 10.0):
                async for _ in watcher.messages:
                    answered += 1
                    if answered >= args.messages:
                        break
        except TimeoutError:
            pass
        return time.monotonic() - t0, answered


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="lkbench-"))
    (work / "broker").mkdir()
    # The broker must hold the whole flood for the daemon: it queues, the daemon pulls.
    broker = Broker(work / "broker", extra_config=f"max_queued_messages {args.messages + 100}\n"
                    "max_queued_bytes 0")
    daemon = None
    status = 0
    try:
        broker.start()
        kit = provision(work / "bank", compartments=8, codes=8)
        config = tomllib.loads(kit.config_path.read_text(encoding="utf-8"))
        config["mqtt"] = {"host": broker.host, "port": broker.port,
                          "max_payload_bytes": max(args.size * 2, 16 * 1024 * 1024)}
        kit.config_path.write_text(to_toml(config), encoding="utf-8")
        prefix = f"lockers/{kit.locker_id}/"
        daemon = start_daemon(kit)
        asyncio.run(wait_online(broker, prefix + "state", 30.0))
        idle = Sampler(daemon.pid, args.interval)
        idle.start()
        time.sleep(args.idle)
        idle.stop()
        idle_kib = rss_kib(daemon.pid)
        busy = Sampler(daemon.pid, args.interval)
        busy.start()
        seconds, answered = asyncio.run(flood(broker, prefix, args))
        busy.stop()
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited during the flood:\n{daemon.log_tail()}")
        hwm_kib = int(proc_status(daemon.pid)["VmHWM"].split()[0])
        peak_kib = max(busy.max_kib, idle.max_kib)
        print(f"inbox_flood: {args.messages} messages of {args.size} bytes at QoS {args.qos} "
              f"on {prefix}cmd, a `lockerd run` subprocess on the simulator")
        print(f"  {machine_line()}")
        print(f"  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        print()
        print(f"  {'':<40}{'RSS (MiB)':>10}")
        print(f"  {'idle, same daemon, before the flood':<40}{idle_kib / 1024:>10.1f}")
        print(f"  {'flood peak, sampled every ' + f'{args.interval * 1000:.0f} ms':<40}"
              f"{busy.max_kib / 1024:>10.1f}")
        print(f"  {'VmHWM after the flood (whole life)':<40}{hwm_kib / 1024:>10.1f}")
        print()
        ratio = max(peak_kib, hwm_kib) / idle_kib
        report(f"inbox_flood {args.messages} x {args.size} bytes",
               f"peak RSS {max(peak_kib, hwm_kib) / 1024:.1f} MiB against "
               f"{idle_kib / 1024:.1f} MiB idle", ratio, TARGET_RATIO)
        print(f"  answered on cmd/result: {answered} of {args.messages} in {seconds:.1f} s "
              f"({answered / seconds:.0f} messages/s, {busy.samples} RSS samples)")
    except (RuntimeError, OSError) as exc:
        print(f"inbox_flood: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("inbox_flood: interrupted", file=sys.stderr)
        status = 130
    finally:
        if daemon is not None:
            code = stop_process(daemon.proc)
            if code != 0 and status == 0:
                print(f"inbox_flood: the daemon exited with status {code}:\n"
                      f"{daemon.log_tail()}", file=sys.stderr)
                status = 1
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
