"""Composition root: builds stores, hal backends and services from the config, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from hal.base import (
    Device,
    DeviceKind,
    Display,
    DoorSensor,
    DoorState,
    Keypad,
    LockDriver,
    OccupancySensor,
    Scanner,
    Tamper,
)
from hal.errors import HalError
from hal.registry import BACKENDS, HalContext, build_device
from hal.serial_url import check_port_url
from lockerd import __version__
from lockerd.config import Config, ConsoleSection, DeviceSection
from lockerd.core.backoff import Backoff
from lockerd.core.bank import Bank
from lockerd.core.budget import OpenBudget
from lockerd.core.compartment import Compartment, DoorTimings
from lockerd.core.console import Registry
from lockerd.core.entry import CodeEntry
from lockerd.core.events import EventType
from lockerd.core.help import HelpLimit, HelpRules
from lockerd.core.lockout import Lockout, RateLimiter
from lockerd.core.loginthrottle import ThrottleSettings
from lockerd.errors import ConfigError, LockerdError, TrustError
from lockerd.logs import get_logger
from lockerd.mqtt import BrokerSettings, Topics, broker_from_config
from lockerd.services.banksetup import build_cache, open_bank_database
from lockerd.services.cache import CodeCache
from lockerd.services.clock import Clock, TrustedClock
from lockerd.services.commands import CommandService
from lockerd.services.console import ConsoleService
from lockerd.services.console_auth import ConsoleAuth, Session
from lockerd.services.controller import (
    Controller,
    DepositRules,
    load_budget_state,
    load_help_limit_state,
    load_lockout_state,
)
from lockerd.services.controller_console import register_door_commands
from lockerd.services.credentials import CredentialService
from lockerd.services.deadlines import DeadlineKeeper
from lockerd.services.diagnostics import Diagnostics, register_diagnostic_commands
from lockerd.services.help import HelpService
from lockerd.services.link import MqttLink
from lockerd.services.outbox import OutboxPublisher
from lockerd.services.parts import PartsService, PartsSettings, StagingWorker
from lockerd.services.records_console import register_codes_commands, register_event_commands
from lockerd.services.status_console import register_status_commands
from lockerd.services.sync import SyncService
from lockerd.services.systemd import SdNotifier
from lockerd.services.telemetry import TelemetryService
from lockerd.store.codes import CodeStore
from lockerd.store.commands import CommandJournal
from lockerd.store.db import Database
from lockerd.store.events import EventLog
from lockerd.store.outbox import Outbox
from lockerd.store.parcels import ParcelStore, SpentTokens
from lockerd.store.writer import DbWriter
from lockerd.timeutil import format_time
from lockerd.trust.digest import load_code_key, support_window
from lockerd.trust.parts import PartLimits

# A clean stop: events committed, outputs off, `state` offline (docs/events.md, daemon.stopping).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = get_logger("lockerd.app")

T = TypeVar("T")
# Restart backoff of a crashed task; a run this long counts as recovered.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_RUN_S = 60.0
# How long a clean stop waits for `daemon.stopping` and the offline state to reach the broker.
GOODBYE_S = 3.0


class ShutdownRequested(Exception):
    """Raised inside the task group to stop every task for a clean shutdown."""


@dataclass
class Devices:
    lock: LockDriver
    door_sensor: DoorSensor
    occupancy: OccupancySensor | None = None
    keypad: Keypad | None = None
    scanner: Scanner | None = None
    display: Display | None = None
    tamper: Tamper | None = None

    def all(self) -> list[Device]:
        found: list[Device | None] = [getattr(self, kind) for kind in DeviceKind]
        return [d for d in found if d is not None]

    def by_name(self) -> dict[str, Device]:
        return {kind.value: device for kind in DeviceKind
                if (device := getattr(self, kind)) is not None}


@dataclass
class App:
    """Everything the daemon runs, built from one validated config."""

    config: Config
    db: Database
    events: EventLog
    codes: CodeStore
    cache: CodeCache
    hal: HalContext
    devices: Devices
    controller: Controller
    clock: Clock
    outbox: Outbox
    notifier: SdNotifier
    diagnostics: Diagnostics
    writer: DbWriter | None = None
    link: MqttLink | None = None
    sync: SyncService | None = None
    parts: PartsService | None = None
    publisher: OutboxPublisher | None = None
    commands: CommandService | None = None
    # Network services run beside the hardware ones: name -> coroutine factory.
    services: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = field(default_factory=time.monotonic)
    # Supervised tasks that are running now (False while one waits to be restarted).
    task_up: dict[str, bool] = field(default_factory=dict)
    # The tasks the watchdog vouches for: the controller and the hardware's own tasks. A
    # console or network task that crash-loops is restarted with backoff, never the bank.
    watchdog_tasks: set[str] = field(default_factory=set)
    stopping_recorded: bool = False
    bundle_file_loaded: bool = False

    async def load_bundle_file(self) -> None:
        """Apply the codes bundle file named in the config (once), unless it is the file
        already applied: read, verified and applied in a worker thread (a snapshot beside
        the live codes, then one short swap), so the event loop never waits for it. `run`
        does it before the doors are served; a test driving the controller itself calls it."""
        name = self.config.codes.bundle_file
        if self.bundle_file_loaded or not name:
            return
        self.bundle_file_loaded = True
        path = self.config.path(name)
        try:
            await self.cache.load_bundle_file_off_loop(path)
        except (OSError, TrustError) as exc:
            _signed_file_refused("codes", path, exc)

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Run until SIGTERM/SIGINT/SIGHUP or `stop` is set; outputs are off before and after."""
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._stop_on, sig)
        frozen = False
        try:
            await self.load_bundle_file()
            await self._start_devices()
            if self.commands is not None:
                self.commands.recover()
            await self.controller.commit_event(EventType.DAEMON_STARTED, {
                "codes_version": self.codes.version(),
                "keyring_version": self.cache.keyring_version})
            inputs = self._input_runners()
            self.watchdog_tasks = {"controller", *inputs, *self.hal.services}
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._supervise("controller", self.controller.run),
                               name="controller")
                for name, runner in inputs.items():
                    tg.create_task(self._supervise(name, runner), name=name)
                for name, factory in {**self.services, **self.hal.services}.items():
                    tg.create_task(self._supervise(name, factory), name=name)
                if self.notifier.watchdog_s:
                    tg.create_task(self._watchdog(self.notifier.watchdog_s), name="watchdog")
                tg.create_task(self._wait_stop(), name="shutdown")
                _freeze_start_heap()
                frozen = True
                self.ready.set()
                self.notifier.notify("READY=1", "STATUS=running")
                log.info("lockerd running", locker_id=self.config.locker.id,
                         compartments=len(self.controller.compartments))
        except* ShutdownRequested:
            pass
        finally:
            if install_signal_handlers:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
            if frozen:
                _thaw_start_heap()
            await self._shutdown()

    def state(self) -> dict[str, Any]:
        """The retained `state` document (PROTOCOL section 5)."""
        return {
            "status": "online",
            "version": __version__,
            "codes_version": self.codes.version(),
            "keyring_version": self.cache.keyring_version,
            "compartments": {
                cid: {"door": "open" if c.door_open else "closed", "phase": c.phase.value,
                      "in_service": c.in_service, "occupied": c.occupied, "size": c.size,
                      "parcel_id": c.parcel_id}
                for cid, c in self.controller.compartments.items()
            },
        }

    async def telemetry(self) -> dict[str, Any]:
        """The heartbeat: uptime, outbox, versions, hardware and link health."""
        devices = await self.controller.health(self.device_map())
        link = self.link.status if self.link else None
        return {
            "at": format_time(self.clock.wall()),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "outbox_depth": self.outbox.depth(),
            "last_seq": self.events.last_seq(),
            "acked_upto": self.outbox.acked_upto(),
            "codes_version": self.codes.version(),
            "codes_count": self.codes.count(),
            "keyring_version": self.cache.keyring_version,
            "hardware": devices,
            "tasks_down": sorted(name for name, up in self.task_up.items() if not up),
            "link": None if link is None else {
                "connects": link.connects, "last_error": link.last_error,
                "refused_too_large": link.refused_too_large,
                "dropped_qos0": link.dropped_qos0, "deferred": link.deferred,
                "inbox_peak": link.inbox_peak},
            "out_of_service": {cid: c.service_reason
                               for cid, c in self.controller.compartments.items()
                               if not c.in_service},
        }

    def device_map(self) -> dict[str, Device]:
        return self.devices.by_name()

    def watchdog_tasks_down(self) -> list[str]:
        return sorted(n for n, up in self.task_up.items() if not up and n in self.watchdog_tasks)

    def alive(self, *, stuck_after_s: float = 30.0) -> bool:
        """What the watchdog vouches for: the controller and the hardware tasks running, and
        the controller not stuck in one input for long. (That this runs at all shows the loop
        is alive; the store is written on every controller turn, so a failing database stops
        the controller.) Console and network tasks do not count: a restart of the whole bank
        would not mend them and would take the doors down meanwhile."""
        if self.watchdog_tasks_down():
            return False
        busy = self.controller.busy_since
        return busy is None or time.monotonic() - busy < stuck_after_s

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            if self.alive():
                self.notifier.notify("WATCHDOG=1")
            else:
                log.error("not feeding the watchdog: a task is down or the controller is stuck",
                          tasks_down=self.watchdog_tasks_down())
            await asyncio.sleep(interval_s / 2)

    def request_stop(self) -> None:
        self.stop.set()

    def _stop_on(self, sig: signal.Signals) -> None:
        # SIGHUP too: the config is read at the start only, so there is nothing to reload;
        # a clean stop (not the signal's default, an abrupt death) and, under systemd
        # (Restart=always), a start with the config as it now is.
        log.info("stopping on a signal", signal=sig.name)
        self.request_stop()

    async def _wait_stop(self) -> None:
        await self.stop.wait()
        await self._goodbye()
        raise ShutdownRequested

    async def _goodbye(self) -> None:
        """While every service still runs: record `daemon.stopping`, let it reach the broker,
        then leave the retained state `offline` (a clean disconnect discards the will)."""
        seq = await self._record_stopping()
        link, publisher = self.link, self.publisher
        if link is None or not link.connected.is_set():
            return
        try:
            async with asyncio.timeout(GOODBYE_S):
                if publisher is not None and seq is not None:
                    await publisher.wait_delivered(seq)
        except TimeoutError:
            log.warning("daemon.stopping not confirmed by the broker before stopping; it "
                        "stays in the outbox for the next start")
        await link.close(timeout_s=GOODBYE_S)

    async def _record_stopping(self) -> int | None:
        """Commit `daemon.stopping` once; its seq, or None (already recorded, or it failed)."""
        if self.stopping_recorded:
            return None
        self.stopping_recorded = True
        try:
            return (await self.controller.commit_event(EventType.DAEMON_STOPPING, {})).seq
        except Exception:
            log.exception("could not record daemon.stopping")
            return None

    def _input_runners(self) -> dict[str, Callable[[], Awaitable[None]]]:
        emit = self.controller.emit
        runners: dict[str, Callable[[], Awaitable[None]]] = {
            "hal.door_sensor": functools.partial(self.devices.door_sensor.run, emit)}
        for name in ("occupancy", "keypad", "scanner", "tamper"):
            device = getattr(self.devices, name)
            if device is not None:
                runners[f"hal.{name}"] = functools.partial(device.run, emit)
        return runners

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run a task forever: a crash is logged, evented and restarted with capped backoff.

        The first crash after a stable run is also a `hardware.fault` naming the task; a run
        of `STABLE_RUN_S` or more starts the backoff and the count again."""
        delay = RESTART_MIN_S
        crashes = 0
        while True:
            self.task_up[name] = True
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await factory()
                log.warning("task ended by itself; restarting", task=name)
            except ShutdownRequested:
                raise
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # a real cancellation: the daemon is stopping
                # A CancelledError nobody asked for (a library's internal future leaking
                # out) must not silently end a service: treat it as a crash.
                log.error("task stopped by a stray cancellation; restarting", task=name)
                error = exc
            except Exception as exc:
                log.exception("task crashed; restarting", task=name,
                              watchdog=name in self.watchdog_tasks)
                error = exc
            self.task_up[name] = False
            if time.monotonic() - started >= STABLE_RUN_S:
                delay, crashes = RESTART_MIN_S, 0
            if error is not None:
                crashes += 1
                await self._task_failed(name, error, delay_s=delay, first=crashes == 1)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def _task_failed(self, name: str, error: BaseException, *, delay_s: float,
                           first: bool) -> None:
        gates = name in self.watchdog_tasks
        with contextlib.suppress(Exception):
            await self.controller.commit_event(EventType.DAEMON_TASK_FAILED, {
                "task": name, "error": repr(error)[:500], "delay_s": delay_s})
        if first:
            then = ("the watchdog is held until it runs again" if gates
                    else "the doors keep working meanwhile")
            with contextlib.suppress(Exception):
                await self.controller.commit_event(EventType.HARDWARE_FAULT, {
                    "device": f"task:{name}", "task": name,
                    "detail": f"task {name} crashed ({repr(error)[:200]}); restarting it with "
                              f"backoff; {then}"})

    async def _start_devices(self) -> None:
        for device in self.devices.all():
            await device.start()
        # Safety rule 3: all outputs off at startup, whatever state a crash left them in.
        await self.devices.lock.all_off()
        doors = await self.devices.door_sensor.read()
        occupied = await self.devices.occupancy.read() if self.devices.occupancy else {}
        now = self.clock.monotonic()
        for cid, comp in self.controller.compartments.items():
            comp.observe_initial(door_open=doors.get(cid) is DoorState.OPEN,
                                 occupied=occupied.get(cid), t=now)
            if not comp.in_service:
                await self.controller.announce_service(cid)

    async def _shutdown(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        await self._record_stopping()  # when the stop did not come through _wait_stop
        await self.controller.wait_pulses()
        try:
            await self.devices.lock.all_off()
        except HalError as exc:
            log.error("could not switch lock outputs off at shutdown", error=str(exc))
        for device in reversed(self.devices.all()):
            try:
                await device.close()
            except HalError as exc:
                log.warning("device did not close cleanly", error=str(exc))
        if self.writer is not None:
            # Runs what is queued, flushes the log, closes its connection.
            await asyncio.to_thread(self.writer.close)
        self.db.close()
        log.info("lockerd stopped")


# Apps running in this process whose start heap is frozen (tests and the UI run several).
_frozen_apps = 0


def _freeze_start_heap() -> None:
    """Move what start-up built (modules, config, the app and its services) out of the
    garbage collector's sight: it lives as long as the daemon, and a full collection walking
    it held the loop 35-50 ms in one tick while a snapshot in parts was applied
    (bench/parts_over_mqtt.py). What is built later is still collected as before."""
    global _frozen_apps
    # No gc.collect() first: a full collection here would stall start-up as long; the little
    # cyclic garbage of the start stays frozen with the rest until the stop.
    gc.freeze()
    _frozen_apps += 1


def _thaw_start_heap() -> None:
    """At the stop, give the frozen heap back to the collector (once no app in this
    process runs frozen any more), so an app built and stopped in a longer-lived process is
    freed."""
    global _frozen_apps
    _frozen_apps -= 1
    if _frozen_apps == 0:
        gc.unfreeze()


def _build_devices(config: Config, context: HalContext) -> Devices:
    def make(kind: str, section: DeviceSection | None) -> Any:
        if section is None:
            return None
        return build_device(kind, section.backend, options=section.options, context=context,
                            config_key=f"{config.source}: [hal.{kind}]")

    return Devices(**{kind.value: make(kind, getattr(config.hal, kind)) for kind in DeviceKind})


@dataclass
class Prepared:
    """What `prepare` checked and built; `build_app` goes on from here."""

    code_key: bytes
    context: HalContext
    devices: Devices
    broker: BrokerSettings | None


def prepare(config: Config) -> Prepared:
    """Every check `lockerd run` makes before it starts anything; `check-config` runs this too.

    Reads the code key file and the [mqtt] password file, and builds every hal backend with
    its options: a backend's constructor validates and opens nothing (no port, no GPIO line;
    a serial URL's scheme is only looked up), so this touches neither hardware nor the
    database. Raises ConfigError naming the file.
    """
    code_key_path = config.path(config.trust.code_key_file)
    try:
        code_key = load_code_key(code_key_path)
        if code_key_path.stat().st_mode & 0o077:
            log.warning("the code key file is readable by other users; run chmod 600 on it",
                        path=str(code_key_path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config.source}: [trust] code_key_file: {exc}") from exc
    broker = broker_from_config(config)
    _check_backend_sections(config)
    if config.console is not None and config.console.serial_port:
        _naming_file(config, functools.partial(check_port_url, key="serial_port"),
                     config.console.serial_port, "console")
    context = HalContext(
        compartments=config.compartment_ids, state_dir=config.state_dir,
        config_dir=config.path("."),
        backend_settings=config.backends,
        compartment_sizes=config.compartment_sizes,
    )
    devices = _naming_file(config, _build_devices, config, context)
    return Prepared(code_key=code_key, context=context, devices=devices, broker=broker)


def _check_backend_sections(config: Config) -> None:
    known = sorted({name for table in BACKENDS.values() for name in table})
    for name in config.backends:
        if name not in known:
            raise ConfigError(f"{config.source}: unknown section [backends.{name}]; "
                              f"backends are {', '.join(known)}")


def _naming_file(config: Config, fn: Callable[..., T], *args: Any) -> T:
    """Call `fn`; a hal error that does not name the configuration file yet is made to."""
    try:
        return fn(*args)
    except HalError as exc:
        text = str(exc)
        if text.startswith(f"{config.source}: "):
            raise
        raise ConfigError(f"{config.source}: {text}") from exc


SPENT_TOKEN_MARGIN = timedelta(days=7)
# Support code marks kept for the windows before the current one. A code is accepted in
# the current window and the one either side, so a mark of window w - 2 already guards
# nothing: it is kept as a margin, and older ones go.
SUPPORT_WINDOWS_KEPT = 2


def build_app(config: Config, *, clock: Clock | None = None,
              notifier: SdNotifier | None = None) -> App:
    """Build the whole object graph. Raises LockerdError/HalError with a message to act on."""
    state_dir = config.state_dir
    prepared = prepare(config)
    code_key, context, devices = prepared.code_key, prepared.context, prepared.devices
    db = open_bank_database(config)
    # The one writer of the daemon's commits: a thread with its own connection.
    writer = DbWriter(db.path)
    writer.start()
    # The writer's checkpointer checkpoints the log: not the loop's connection at a commit.
    db.conn.execute("PRAGMA wal_autocheckpoint=0")
    events = EventLog(db)
    codes = CodeStore(db)
    trusted = TrustedClock(db=db, mode=config.time.trust_system_clock)
    clock = clock or trusted
    cache = build_cache(config, db=db, codes=codes, events=events, clock=clock,
                        trusted=trusted)
    # A spent token past its expiry is refused as expired anyway; the margin covers a clock
    # that is set back a little while it is not synchronised.
    SpentTokens(db).prune(trusted.wall() - SPENT_TOKEN_MARGIN)
    # The windows are judged on the controller's clock (the trusted one, unless injected).
    codes.prune_support_uses(
        before_window=support_window(clock.wall().timestamp()) - SUPPORT_WINDOWS_KEPT)
    _import_keyring_file(config, cache)
    out_of_service = db.get_meta("out_of_service") or {}
    timings = DoorTimings(
        open_timeout_s=config.doors.open_timeout_s,
        held_open_after_s=config.doors.held_open_after_s,
        show_result_s=config.doors.show_result_s,
        jam_retry_s=config.doors.jam_retry_s,
    )
    parcels = ParcelStore(db)
    on_record = parcels.all()
    compartments = {}
    for cid, size in config.compartment_sizes.items():
        held = on_record.get(cid)
        comp = Compartment(cid, timings=timings, in_service=cid not in out_of_service,
                           size=size, parcel_id=held.parcel_id if held else None)
        if cid in out_of_service:
            comp.service_reason = str(out_of_service[cid])
        compartments[cid] = comp
    bank = Bank(
        compartments=compartments,
        entry=CodeEntry(timeout_s=config.entry.timeout_s, max_digits=config.entry.max_digits,
                        stuck_key_repeats=config.entry.stuck_key_repeats),
        lockout=Lockout(free_attempts=config.lockout.free_attempts, base_s=config.lockout.base_s,
                        max_s=config.lockout.max_s, state=load_lockout_state(db)),
        rejections=RateLimiter(per_minute=config.lockout.rejected_events_per_minute),
        rules=DepositRules(
            sizes=tuple(config.deposits.sizes), session_idle_s=config.deposits.session_idle_s,
            derived_digits=config.codes.derived_digits if config.codes.derived_pickup else None),
        open_budget=OpenBudget(per_hour=config.commands.max_opens_per_hour,
                               state=load_budget_state(db)),
        help_rules=HelpRules(support_text=config.help.support_text,
                             reply_timeout_s=config.help.reply_timeout_s,
                             max_per_hour=config.help.max_per_hour,
                             step_timeout_s=config.entry.timeout_s,
                             enabled=config.help.enabled),
        help_limit=HelpLimit(per_hour=config.help.max_per_hour,
                             state=load_help_limit_state(db)),
    )
    tokens = SpentTokens(db)
    credentials = CredentialService(locker_id=config.locker.id, codes=codes, code_key=code_key,
                                    tokens=tokens, keyring=lambda: cache.keyring,
                                    support_digits=(config.codes.derived_digits
                                                    if config.codes.support_codes else None))
    controller = Controller(
        bank=bank, credentials=credentials, db=db, events=events, codes=codes,
        lock=devices.lock, display=devices.display, pulse_s=config.doors.pulse_s, clock=clock,
        parcels=parcels, tokens=tokens,
        online=lambda: app.link is not None and app.link.connected.is_set(),
        writer=writer,
    )
    app = App(config=config, db=db, events=events, codes=codes, cache=cache, hal=context,
              devices=devices, controller=controller, clock=clock,
              outbox=Outbox(db, max_events=config.outbox.max_events,
                            keep_acked=config.outbox.keep_acked),
              notifier=notifier or SdNotifier(),
              diagnostics=Diagnostics(controller=controller, devices=devices.by_name()),
              writer=writer)
    keeper = DeadlineKeeper(db=db, codes=codes, events=events, clock=clock,
                            synchronised=trusted.synchronised,
                            compartments=lambda: controller.compartments,
                            cap_s=config.codes.max_extension_s, writer=writer)
    controller.service_listeners.append(keeper.service_changed)
    app.services["deadlines"] = keeper.run
    _build_network(app, trusted, prepared.broker)
    if (console := config.console) is not None:
        app.services["console"] = build_console(
            app, socket_path=state_dir / console.socket, serial_url=console.serial_port,
            section=console).run
    return app


def build_console(app: App, *, socket_path: Path, serial_url: str | None,
                  section: ConsoleSection | None = None, idle_timeout_s: float = 300.0,
                  free_attempts: int = 5, base_s: float = 30.0,
                  max_s: float = 3600.0) -> ConsoleService:
    """The technician console: its login, and each owner's commands registered by the owner.
    `section` (the [console] config) gives the idle timeout and login throttle."""
    if section is not None:
        idle_timeout_s, free_attempts = section.idle_timeout_s, section.free_attempts
        base_s, max_s = section.base_s, section.max_s
    locker_id, controller = app.config.locker.id, app.controller
    auth = ConsoleAuth(locker_id=locker_id, db=app.db, cache=app.cache, clock=app.clock,
                       record=controller.record_on_loop,
                       throttle=ThrottleSettings(free_attempts=free_attempts, base_s=base_s,
                                                 max_s=max_s))
    registry: Registry[Session] = Registry()
    console = ConsoleService(registry=registry, auth=auth, locker_id=locker_id,
                             socket_path=socket_path, serial_url=serial_url,
                             idle_timeout_s=idle_timeout_s)
    per_hour = app.config.commands.max_opens_per_hour
    register_door_commands(registry, controller=controller, opens_per_hour=per_hour,
                           clear_console_lockouts=console.clear_lockouts)
    register_diagnostic_commands(registry, diagnostics=app.diagnostics,
                                 compartments=controller.compartments, opens_per_hour=per_hour)
    register_status_commands(registry, locker_id=locker_id, telemetry=app.telemetry,
                             link=app.link)
    register_codes_commands(registry, codes=app.codes, cache=app.cache)
    register_event_commands(registry, events=app.events, locker_id=locker_id)
    return console


def _build_network(app: App, trusted: TrustedClock, broker: BrokerSettings | None) -> None:
    """The MQTT side: link, code sync, outbox, commands, telemetry (when [mqtt] is set)."""
    config, cache, clock, controller = app.config, app.cache, app.clock, app.controller
    mqtt = config.mqtt
    if broker is None or mqtt is None:
        return
    topics = Topics.for_locker(config.locker.id, mqtt.topic_prefix)

    async def too_large(topic: str, size: int) -> None:
        cache.refuse(topic.removeprefix(topics.prefix), "too_large",
                     f"payload of {size} bytes is over [mqtt] max_payload_bytes "
                     f"({mqtt.max_payload_bytes})",
                     source="mqtt")

    app.link = MqttLink(
        broker=broker, will_topic=topics.state,
        will_payload=b'{"status":"offline"}',
        max_payload_bytes=mqtt.max_payload_bytes,
        backoff=Backoff(min_s=mqtt.reconnect_min_s, max_s=mqtt.reconnect_max_s),
        now=clock.wall, on_too_large=too_large,
    )
    app.sync = SyncService(link=app.link, topics=topics, cache=cache, state=app.state)
    _build_parts(app, topics, mqtt.max_payload_bytes)

    async def outbox_full(depth: int) -> None:
        await controller.commit_event(EventType.HARDWARE_FAULT, {
            "device": "outbox", "detail": f"{depth} unacknowledged events, over "
            f"[outbox] max_events; none is dropped, the backend is not acknowledging"})

    async def outbox_shed(count: int, runs: tuple[tuple[int, int], ...]) -> None:
        # `seqs` names the gaps for good: a backend must not acknowledge past a gap otherwise.
        await controller.commit_event(EventType.OUTBOX_SHED, {
            "count": count, "seqs": [list(run) for run in runs]})

    app.publisher = OutboxPublisher(link=app.link, topics=topics, outbox=app.outbox,
                                    locker_id=config.locker.id, on_full=outbox_full,
                                    on_shed=outbox_shed, writer=app.writer)
    app.events.on_append(app.publisher.wake)
    sync = app.sync
    app.commands = CommandService(
        link=app.link, topics=topics, journal=CommandJournal(app.db, app.events),
        events=app.events, cache=cache, controller=controller, diagnostics=app.diagnostics,
        resync=lambda: sync.request_sync("command"), locker_id=config.locker.id,
        now=clock.wall, monotonic=clock.monotonic,
        observe_signed_time=trusted.observe_signed_time, writer=app.writer)
    telemetry = TelemetryService(link=app.link, topics=topics,
                                 interval_s=config.telemetry.interval_s,
                                 snapshot=app.telemetry)
    HelpService(link=app.link, topic=topics.help_reply, cache=cache,
                requests=controller.help_requests, events=app.events,
                answer=lambda help_id, outcome, message: controller.help_reply(
                    help_id, outcome=outcome, message=message),
                locker_id=config.locker.id, reply_valid_s=config.help.reply_valid_s,
                now=clock.wall, monotonic=clock.monotonic)
    app.services.update({"mqtt": app.link.run, "outbox": app.publisher.run,
                         "telemetry": telemetry.run})


def _build_parts(app: App, topics: Topics, max_payload_bytes: int) -> None:
    """Snapshots in parts: staged in a worker thread with a connection of its own."""
    codes_section, sync = app.config.codes, app.sync
    assert sync is not None and app.link is not None
    settings = PartsSettings(
        limits=PartLimits(max_parts=codes_section.max_parts,
                          max_entries=codes_section.max_entries,
                          max_part_bytes=min(codes_section.max_part_bytes, max_payload_bytes)),
        idle_s=codes_section.parts_idle_s, timeout_s=codes_section.parts_timeout_s)
    parts = PartsService(
        link=app.link, topics=topics, locker_id=app.config.locker.id, cache=app.cache,
        codes=app.codes, events=app.events, worker=StagingWorker(app.db.path),
        settings=settings, now=app.clock.wall, monotonic=app.clock.monotonic,
        applied=sync.publish_state, request_sync=sync.request_sync)
    sync.report("parts", parts.wanted)
    app.parts = parts
    app.services["parts"] = parts.run


def _import_keyring_file(config: Config, cache: CodeCache) -> None:
    """Load the keyring file named in the config, when it is not the keyring held.

    A refused file is logged and evented; the daemon keeps the keyring it has. (The codes
    bundle file is applied by `App.load_bundle_file`, off the event loop.)
    """
    # A file that is the one already held (byte for byte) is not verified again.
    if not config.trust.keyring_file:
        return
    path = config.path(config.trust.keyring_file)
    try:
        cache.load_keyring_file(path)
    except (OSError, TrustError) as exc:
        _signed_file_refused("keyring", path, exc)


def _signed_file_refused(what: str, path: Path, exc: OSError | TrustError) -> None:
    if isinstance(exc, OSError):
        log.error("cannot read signed file named in the config", what=what, path=str(path),
                  error=exc.strerror)
    elif exc.reason == "rollback":
        log.info("signed file is not newer than what is held; kept", what=what, path=str(path))
    else:
        log.error("signed file refused; keeping what is held", what=what,
                  path=str(path), reason=exc.reason, error=str(exc))


__all__ = ["App", "LockerdError", "build_app"]
