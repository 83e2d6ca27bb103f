"""The console built from a command registry and a login service, without the App: each owner
registers its commands, help lists what is registered, a name is registered once; and the one
selftest behind the console's `selftest` and the remote command."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from conftest import running
from test_console import pty_console, token

from lockerd.core.console import Args, Level, Registry, Reply
from lockerd.core.loginthrottle import ThrottleSettings
from lockerd.dev.provision import BankKit
from lockerd.services.console import ConsoleService
from lockerd.services.console_auth import ConsoleAuth, Session
from lockerd.services.controller import Controller
from lockerd.services.controller_console import register_door_commands
from lockerd.services.diagnostics import NOT_PULSED

pytestmark = pytest.mark.e2e


async def _nothing(s: Session, a: Args) -> Reply:
    return Reply(["nothing"])


def test_registering_a_command_name_twice_is_an_error() -> None:
    registry: Registry[Session] = Registry()
    registry.register_command("doors", _nothing, "a command of another owner",
                              level=Level.VIEWER)
    with pytest.raises(ValueError, match="'doors' registered twice"):
        registry.register_command("doors", _nothing, "the same name again", level=Level.VIEWER)
    assert registry.names() == ["doors"]
    assert [c.help for c in registry] == ["a command of another owner"]


async def test_an_owner_clashing_with_a_registered_name_is_refused(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    async with running(kit) as r:
        registry: Registry[Session] = Registry()
        registry.register_command("open", _nothing, "a second open", level=Level.OPERATOR)
        with pytest.raises(ValueError, match="'open' registered twice"):
            register_door_commands(registry, controller=r.app.controller, opens_per_hour=10,
                                   clear_console_lockouts=lambda: None)


def _console(kit: BankKit, controller: Controller, auth: ConsoleAuth, tty: str,
             cleared: list[str]) -> ConsoleService:
    """The console as an owner's test builds it: a registry, a login, the door commands."""
    registry: Registry[Session] = Registry()
    console = ConsoleService(registry=registry, auth=auth, locker_id="L1",
                             socket_path=kit.state_dir / "console.sock", serial_url=tty)

    def clear() -> None:
        cleared.append("console")
        console.clear_lockouts()

    register_door_commands(registry, controller=controller, opens_per_hour=10,
                           clear_console_lockouts=clear)
    return console


async def test_a_console_of_door_commands_alone_over_a_pty(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit(parcels=["3"])
    async with running(kit) as r:
        # The parts the console needs, and not the App: the real controller on the sim bank,
        # the real database and keyring for the login.
        controller = r.app.controller
        auth = ConsoleAuth(locker_id="L1", db=r.app.db, cache=r.app.cache, clock=r.app.clock,
                           record=controller.record_on_loop,
                           throttle=ThrottleSettings(free_attempts=5, base_s=30.0,
                                                     max_s=3600.0))
        cleared: list[str] = []
        consoles: list[ConsoleService] = []

        def factory(tty: str) -> ConsoleService:
            consoles.append(_console(kit, controller, auth, tty, cleared))
            return consoles[-1]

        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            out = await t.run("help")
            listed = [re.split(r"  +", ln)[0] for ln in out.splitlines()[1:-1]
                      if not ln.startswith("Add --json")]
            assert listed == ["doors", "help", "lockout clear", "login TOKEN", "logout",
                              "open ID [--force R]", "service ID on|off REASON"]
            out = await t.run("help --json")
            names = [c["name"] for c in json.loads(out.splitlines()[1])["commands"]]
            assert names == consoles[0].registry.names()
            await t.run(f"login {token(kit)}", prompt=r"t-17\(operator\)> $")
            out = await t.run("status", prompt=r"\(operator\)> $")
            assert "unknown command 'status'; type help" in out
            out = await t.run("doors", prompt=r"\(operator\)> $")
            assert re.search(r"\n3\s+M\s+\S+\s+closed\s+yes\s+in", out), out
            out = await t.run("open 3", prompt=r"\(operator\)> $")
            assert "may hold a parcel" in out
            out = await t.run("open 2", prompt=r"\(operator\)> $")
            assert "compartment 2: opened" in out
            out = await t.run("lockout clear", prompt=r"\(operator\)> $")
            assert "keypad and console lockouts cleared" in out
        assert cleared == ["console"]
        pulse = r.events("lock.pulse")[-1]
        assert (pulse.compartment, pulse.data["kind"], pulse.data["tech_id"]) == (
            "2", "console", "t-17")
        actions = [(e.data["command"], e.data["ok"]) for e in r.events("console.action")]
        assert actions == [("open", False), ("open", True), ("lockout clear", True)]
        assert [e.data["ok"] for e in r.events("console.login")] == [True]


async def test_console_and_remote_selftest_report_one_result(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit(parcels=["3"])
    async with running(kit) as r:
        r.world.set_fault("scanner", "dead", True)
        result = await r.app.diagnostics.selftest(scan_bus=True)
        assert not result.ok and result.faults and result.faults[0].startswith("scanner: ")
        reply = result.console_reply()
        assert reply.text[0] == "selftest: FAIL"
        assert any(re.match(r"  scanner\s+FAULT", line) for line in reply.text)
        assert reply.data == {"ok": False, "health": result.health, "bus": {}}
        status, detail, data = result.command_result()
        assert status == "error" and detail.startswith(
            f"{len(result.health) - 1}/{len(result.health)} devices ok; scanner: ")
        assert data == {"devices": result.health}
        # A compartment that may hold a parcel is reported, never pulsed.
        full = await r.app.diagnostics.selftest(scan_bus=False, compartment="3",
                                                ref={"cmd_id": "c-1"})
        assert full.lock == NOT_PULSED and f"lock 3: {NOT_PULSED}" in full.command_result()[1]
        assert r.world.pulses == []
        r.world.set_fault("scanner", "dead", False)
        empty = await r.app.diagnostics.selftest(scan_bus=False, compartment="4",
                                                 ref={"cmd_id": "c-2"})
        assert empty.ok and empty.command_result()[0] == "ok"
        assert empty.command_result()[2]["lock"] == "opened"
        assert r.world.pulses == ["4"]
        assert r.events("lock.pulse")[-1].data["kind"] == "selftest"
