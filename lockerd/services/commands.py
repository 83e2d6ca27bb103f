"""Remote commands over MQTT: verified, journalled before they run, run at most once."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import aiomqtt

from lockerd.core.events import EventType
from lockerd.errors import TrustError
from lockerd.logs import get_logger
from lockerd.mqtt import Topics
from lockerd.services.cache import CodeCache
from lockerd.services.controller import Controller, OpenBudgetSpent, RequestRefused
from lockerd.services.diagnostics import Diagnostics
from lockerd.services.link import MqttLink, NotConnected
from lockerd.services.rejections import RejectionRecorder
from lockerd.services.sync import payload_bytes
from lockerd.store.commands import CommandJournal, CommandResult
from lockerd.store.events import EventLog
from lockerd.store.writer import InlineWriter, Writer
from lockerd.trust.command import Command, override_authorised, peek_cmd_id, verify_command

T = TypeVar("T")

log = get_logger("lockerd.commands")

FORGET_AFTER = timedelta(days=1)


class CommandService:
    """Each refusal is answered on cmd/result (status `rejected`, detail = reason) and
    evented (rate-limited); each accepted command is journalled `started` before it runs."""

    def __init__(
        self,
        *,
        link: MqttLink,
        topics: Topics,
        journal: CommandJournal,
        events: EventLog,
        cache: CodeCache,
        controller: Controller,
        diagnostics: Diagnostics,
        resync: Callable[[], Awaitable[None]],
        locker_id: str,
        now: Callable[[], datetime],
        monotonic: Callable[[], float],
        observe_signed_time: Callable[[datetime], None],
        writer: Writer | None = None,
    ) -> None:
        self._link = link
        self._writer: Writer = writer or InlineWriter(journal.db)
        self._topics = topics
        self._journal = journal
        self._events = events
        self._cache = cache
        self._controller = controller
        self._diagnostics = diagnostics
        self._resync = resync
        self._locker_id = locker_id
        self._now = now
        self._observe_time = observe_signed_time
        self._rejections = RejectionRecorder(
            per_minute=20, monotonic=monotonic,
            write=lambda type_, data: events.record(type=type_, at=now(), data=data))
        # Retain As Published: a retained command is seen as retained even when delivered
        # live, and none is sent because of the subscription (PROTOCOL section 5). Acked as
        # it starts: a crash mid-command is reported `unknown`, not delivered and refused again.
        link.handle(topics.cmd, self._on_command, publisher_retain=True, at_most_once=True)
        link.on_connect(self.send_unsent_results)

    def recover(self) -> list[CommandResult]:
        """At startup: commands a crash interrupted become `unknown` (sent on connect)."""
        results = self._journal.recover(at=self._now())
        for result in results:
            log.warning("command interrupted by a restart; reported unknown, not re-run",
                        cmd_id=result.cmd_id)
        self._journal.prune(before=self._now() - FORGET_AFTER)
        return results

    async def send_unsent_results(self) -> None:
        for result in self._journal.unsent_results():
            if not await self._send(result):
                return
            await self._write(functools.partial(CommandJournal.mark_sent, cmd_id=result.cmd_id),
                              durable=False)

    async def _write(self, fn: Callable[[CommandJournal], T], *, durable: bool) -> T:
        """A journal write through the writer (`started` durable before the command runs);
        the outbox is woken here, on the loop, once it is committed."""
        journal = self._journal
        result = await self._writer.run(lambda db: fn(journal.on(db)), durable=durable)
        self._events.notify()
        return result

    async def _on_command(self, message: aiomqtt.Message) -> None:
        raw = payload_bytes(message)
        if message.retain and not raw:
            # An empty retained message clears a retained one: it is no command to answer.
            log.info("retained command cleared on the broker", topic=str(message.topic))
            return
        if message.retain:
            # A retained command would run again for every bank that subscribes later.
            await self._reject(peek_cmd_id(raw), "retained",
                               "commands must not be published retained")
            return
        keyring = self._cache.keyring
        if keyring is None:
            await self._reject(peek_cmd_id(raw), "no_keyring", "no keyring is held yet")
            return
        try:
            cmd = verify_command(raw, commands_role=keyring.commands,
                                 keyring_expires_at=keyring.expires_at,
                                 locker_id=self._locker_id, now=self._now())
        except TrustError as exc:
            await self._reject(peek_cmd_id(raw), exc.reason, str(exc))
            return
        if self._journal.seen(cmd.cmd_id):
            await self._reject(cmd.cmd_id, "replay", "this cmd_id was already received")
            return
        self._observe_time(cmd.issued_at)
        at = self._now()
        await self._write(lambda journal: journal.start(cmd, at=at), durable=True)
        log.info("command started", cmd_id=cmd.cmd_id, action=cmd.action,
                 compartment=cmd.compartment, code_id=None)
        try:
            status, detail, data = await self._run(cmd)
        except OpenBudgetSpent as exc:
            status, detail, data = "rejected", "open_budget", {"reason": "open_budget",
                                                                "message": str(exc)}
        except RequestRefused as exc:
            status, detail, data = "error", str(exc), {}
        except Exception as exc:  # the journal must record how it ended, whatever happened
            log.exception("command failed", cmd_id=cmd.cmd_id)
            status, detail, data = "error", f"internal error: {exc!r}"[:300], {}
        at = self._now()
        result = await self._write(
            lambda journal: journal.finish(cmd, status, detail, at=at, data=data), durable=False)
        log.info("command finished", cmd_id=cmd.cmd_id, action=cmd.action, status=status,
                 detail=detail, compartment=cmd.compartment, code_id=None)
        if await self._send(result):
            await self._write(lambda journal: journal.mark_sent(cmd.cmd_id), durable=False)

    async def _run(self, cmd: Command) -> tuple[str, str, dict[str, Any]]:
        ref = {"cmd_id": cmd.cmd_id}
        if cmd.action == "open":
            assert cmd.compartment is not None
            keyring = self._cache.keyring
            override = keyring is not None and override_authorised(cmd, keyring.commands)
            outcome = await self._controller.open_for(cmd.compartment, kind="command",
                                                      source="mqtt", ref=ref, budgeted=True,
                                                      override=override)
            if outcome == "opened":
                return "ok", f"compartment {cmd.compartment} opened", {}
            return "error", (f"compartment {cmd.compartment} did not open (jammed); it is now "
                             "out of service"), {}
        if cmd.action == "set_service":
            assert cmd.compartment is not None
            in_service = bool(cmd.args["in_service"])
            changed = await self._controller.set_service(
                cmd.compartment, in_service, cmd.reason or f"command {cmd.cmd_id}")
            state = "in service" if in_service else "out of service"
            return "ok", (f"compartment {cmd.compartment} {state}"
                          + ("" if changed else " (it already was)")), {}
        if cmd.action == "selftest":
            return await self._selftest(cmd)
        if cmd.action == "resync":
            await self._resync()
            return "ok", "sync requested", {}
        if cmd.action == "clear_lockout":
            await self._controller.clear_lockout()
            return "ok", "keypad lockout cleared", {}
        raise RequestRefused(f"action {cmd.action!r} is not implemented")

    async def _selftest(self, cmd: Command) -> tuple[str, str, dict[str, Any]]:
        # The bus scan is the console's: the remote selftest reports device health and, for
        # a compartment known to be empty, its lock.
        result = await self._diagnostics.selftest(scan_bus=False, compartment=cmd.compartment,
                                                  source="mqtt", ref={"cmd_id": cmd.cmd_id})
        return result.command_result()

    async def _reject(self, cmd_id: str | None, reason: str, detail: str) -> None:
        log.warning("command refused", cmd_id=cmd_id, reason=reason, detail=detail)
        self._rejections.record(EventType.COMMAND_RESULT, {
            "cmd_id": cmd_id, "status": "rejected", "reason": reason, "detail": detail})
        await self._send(CommandResult(cmd_id or "", "rejected", reason))

    async def _send(self, result: CommandResult) -> bool:
        try:
            await self._link.publish_json(self._topics.cmd_result, result.wire(), qos=1)
            return True
        except NotConnected:
            return False
