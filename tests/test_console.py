"""The technician console over a real pty (the console serves the pty slave through a pyserial
URL) and its Unix socket: login, refusals, roles, throttling across restarts, line noise."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import running
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from waiting import until

from lockerd.app import build_app, build_console
from lockerd.config import load_config
from lockerd.core.console import LineEditor
from lockerd.dev.provision import BankKit
from lockerd.services.console import ConsoleService
from lockerd.store import EventLog
from lockerd.timeutil import utcnow
from lockerd.trust.dsse import TECHNICIAN_PAYLOAD_TYPE, sign_envelope
from lockerd.trust.keys import generate_key
from lockerd.trust.technician import build_technician_payload, encode_token

pytestmark = pytest.mark.e2e


def token(kit: BankKit, *, role: str = "operator", tech_id: str = "t-17",
          lockers: tuple[str, ...] = ("L1",), expires_in: timedelta = timedelta(hours=8),
          signer: Ed25519PrivateKey | None = None,
          issued_at: datetime | None = None) -> str:
    now = utcnow()
    payload = build_technician_payload(
        tech_id=tech_id, name="A. Tech", locker_ids=lockers, role=role,
        issued_at=issued_at or now - timedelta(hours=1), expires_at=now + expires_in)
    return encode_token(sign_envelope(TECHNICIAN_PAYLOAD_TYPE, payload,
                                      [signer or kit.root_key]))


class Tech:
    """The technician's side: raw bytes in and out, output collected for assertions."""

    def __init__(self, send: Callable[[bytes], None], recv: Callable[[], bytes]) -> None:
        self._send = send
        self._recv = recv
        self.out = b""

    def send(self, data: bytes) -> None:
        self._send(data)

    async def until(self, pattern: str, timeout: float = 5.0) -> str:
        """Wait for `pattern` (a regex) in the output; return and consume it up to the match."""
        deadline = time.monotonic() + timeout
        while True:
            self.out += self._recv()
            text = self.out.decode("ascii", "replace")
            m = re.search(pattern, text)
            if m:
                self.out = text[m.end():].encode()
                return text[: m.end()]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in console output: {text[-600:]!r}")
            await asyncio.sleep(0.01)

    async def run(self, line: str, prompt: str = r"> $", timeout: float = 5.0) -> str:
        self.send(line.encode() + b"\r")
        return await self.until(prompt, timeout)


@contextlib.asynccontextmanager
async def pty_console(service_factory: Callable[[str], ConsoleService]) -> AsyncIterator[Tech]:
    """The console serving a pty's slave by its pyserial URL; the test holds the master."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    service = service_factory(os.ttyname(slave))
    task = asyncio.create_task(service.run())

    def recv() -> bytes:
        try:
            return os.read(master, 65536)
        except BlockingIOError:
            return b""

    def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(master, view):]
            except BlockingIOError:
                time.sleep(0.001)

    try:
        await asyncio.wait_for(service.listening.wait(), 5)
        yield Tech(send, recv)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        os.close(master)
        os.close(slave)


def make_service(r_app: object, kit: BankKit, serial: str | None, **kw: float) -> ConsoleService:
    from lockerd.app import App

    assert isinstance(r_app, App)
    return build_console(r_app, socket_path=kit.state_dir / "console.sock",
                         serial_url=serial, **kw)  # type: ignore[arg-type]


async def test_login_and_refusals_over_a_pty(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    async with running(kit) as r:
        factory = lambda url: make_service(r.app, kit, url, free_attempts=50)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            out = await t.run("status")
            assert "log in first" in out
            for bad, why in [
                (token(kit, expires_in=timedelta(seconds=-5)), "expired"),
                (token(kit, lockers=("L9",)), "wrong_locker"),
                (token(kit, signer=generate_key()), "signature"),
                ("not-a-token!!", "malformed"),
                ("eyJmb28iOiAxfQ", "malformed"),
            ]:
                out = await t.run(f"login {bad}")
                assert f"login refused ({why})" in out, out
                assert "L1> " in out
            out = await t.run(f"login {token(kit)}", prompt=r"L1 t-17\(operator\)> $")
            assert "welcome A. Tech (operator)" in out
            out = await t.run("status", prompt=r"\(operator\)> $")
            assert "bank L1" in out and "faults: none" in out
            assert all(len(line) <= 80 for line in out.splitlines())
            out = await t.run("logout", prompt=r"L1> $")
            assert "logged out" in out
        failed = [e.data for e in r.events("console.login") if not e.data["ok"]]
        assert [d["reason"] for d in failed] == [
            "expired", "wrong_locker", "signature", "malformed", "malformed"]
        assert [e.data["reason"] for e in r.events("console.logout")] == ["requested"]


async def test_a_login_raises_the_trusted_time_floor(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    issued = utcnow().replace(microsecond=0) + timedelta(minutes=30)
    async with running(kit) as r:
        factory = lambda url: make_service(r.app, kit, url)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            await t.run(f"login {token(kit, issued_at=issued)}", prompt=r"t-17\(operator\)> $")
        assert r.app.db.get_meta("time_floor") == issued.timestamp()


async def test_viewer_cannot_open_operator_can(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit(parcels=["3"])
    async with running(kit) as r:
        factory = lambda url: make_service(r.app, kit, url)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            await t.run(f"login {token(kit, role='viewer', tech_id='t-1')}",
                        prompt=r"t-1\(viewer\)> $")
            out = await t.run("open 2", prompt=r"\(viewer\)> $")
            assert "refused: operator role needed" in out
            out = await t.run("doors", prompt=r"\(viewer\)> $")
            assert re.search(r"\n3\s+M\s+\S+\s+closed\s+yes\s+in", out), out
            await t.run(f"login {token(kit)}", prompt=r"t-17\(operator\)> $")
            out = await t.run("open 3", prompt=r"\(operator\)> $")
            assert "may hold a parcel" in out
            out = await t.run("open 2", prompt=r"\(operator\)> $")
            assert "compartment 2: opened" in out
            out = await t.run('open 3 --force "parcel stuck" --json', prompt=r"\(operator\)> $")
            assert '"result": "opened"' in out
        actions = [e.data for e in r.events("console.action")]
        assert actions[0] == {"tech_id": "t-1", "command": "open", "ok": False,
                              "refused": True, "reason": "role"}
        assert actions[1]["reason"] == "refused"
        assert actions[2]["ok"] is True and actions[2]["tech_id"] == "t-17"
        assert actions[3]["force"] == "parcel stuck"
        pulses = r.events("lock.pulse")
        assert [(p.compartment, p.data["tech_id"]) for p in pulses] == [
            ("2", "t-17"), ("3", "t-17")]
        assert [e.data["reason"] for e in r.events("console.logout")] == ["relogin",
                                                                         "disconnect"]


async def socket_client(path: Path) -> tuple[Tech, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    buf: list[bytes] = []

    async def pump() -> None:
        while data := await reader.read(65536):
            buf.append(data)

    task = asyncio.create_task(pump())
    writer.transport.set_write_buffer_limits(high=1 << 20)

    def recv() -> bytes:
        out = b"".join(buf)
        buf.clear()
        return out

    tech = Tech(writer.write, recv)
    tech.pump = task  # type: ignore[attr-defined]
    return tech, writer


async def test_lockout_survives_a_restart(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    sock = kit.state_dir / "console.sock"
    async with running(kit) as r:
        assert build_console(r.app, socket_path=sock, serial_url=None).serial_url is None
        svc = make_service(r.app, kit, None, free_attempts=2, base_s=600.0)
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(svc.listening.wait(), 5)
        t, w = await socket_client(sock)
        await t.until(r"L1> $")
        stale = token(kit, expires_in=timedelta(seconds=-5))
        await t.run(f"login {stale}")
        out = await t.run(f"login {stale}")
        assert "login locked for 600 s" in out and "tech:t-17" in out
        out = await t.run(f"login {token(kit)}")
        assert "too many failed logins" in out and "L1> " in out
        w.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    async with running(kit) as r:
        svc = make_service(r.app, kit, None, free_attempts=2, base_s=600.0)
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(svc.listening.wait(), 5)
        t, w = await socket_client(sock)
        await t.until(r"L1> $")
        out = await t.run(f"login {token(kit)}")
        assert "too many failed logins from tech:t-17" in out
        refused = r.events("console.login")[-1].data
        assert refused["reason"] == "locked_out" and refused["issuer"] == "tech:t-17"
        # The lockout is t-17's: another technician, even on the same connection, gets in.
        out = await t.run(f"login {token(kit, tech_id='t-18')}", prompt=r"t-18\(operator\)> $")
        assert "welcome" in out
        w.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_junk_logins_do_not_keep_a_valid_token_out(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    async with running(kit) as r:
        factory = lambda url: make_service(r.app, kit, url, free_attempts=5)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            for i in range(5):
                out = await t.run(f"login junk{i}!!")
                assert "login refused (malformed)" in out
            assert "non-tokens refused here for 30 s; a valid token is still accepted" in out
            out = await t.run("login more-junk!!")
            assert "too many failed logins from this connection" in out
            out = await t.run(f"login {token(kit)}", prompt=r"t-17\(operator\)> $")
            assert "welcome A. Tech (operator)" in out
        assert r.events("console.login")[-1].data["ok"] is True
        assert r.app.db.get_meta("console_lockout") in (None, {"issuers": {}})


async def test_forged_tokens_lock_their_connection_not_the_bank(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    sock = kit.state_dir / "console.sock"
    async with running(kit) as r:
        svc = make_service(r.app, kit, None, free_attempts=3, base_s=600.0)
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(svc.listening.wait(), 5)
        attacker, wa = await socket_client(sock)
        await attacker.until(r"L1> $")
        forged = token(kit, signer=generate_key())
        for _ in range(3):
            out = await attacker.run(f"login {forged}")
            assert "login refused (signature)" in out
        assert "login locked for 600 s" in out
        out = await attacker.run(f"login {token(kit)}")
        assert "too many failed logins from this connection" in out
        tech, wt = await socket_client(sock)
        await tech.until(r"L1> $")
        out = await tech.run(f"login {token(kit)}", prompt=r"t-17\(operator\)> $")
        assert "welcome" in out
        issuers = [e.data.get("issuer") for e in r.events("console.login")
                   if e.data.get("reason") == "signature"]
        assert issuers == ["key:unknown"] * 3
        wa.close()
        wt.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ShiftedClock:
    """The system clock, with wall time moved on by the test (monotonic time is real)."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> datetime:
        return utcnow() + self.ahead


async def test_a_session_loses_its_rights_when_its_token_expires(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    clock = ShiftedClock()
    app = build_app(load_config(kit.config_path), clock=clock)
    run = asyncio.create_task(app.run(install_signal_handlers=False))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        factory = lambda url: make_service(app, kit, url)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            await t.run(f"login {token(kit, expires_in=timedelta(seconds=30))}",
                        prompt=r"t-17\(operator\)> $")
            out = await t.run("status", prompt=r"t-17\(operator\)> $")
            assert "bank L1" in out
            clock.ahead = timedelta(seconds=31)
            out = await t.run("open 2", prompt=r"L1> $")
            assert "refused: your token expired at" in out and "log in again" in out
            assert "compartment 2" not in out
            out = await t.run("status", prompt=r"L1> $")
            assert "log in first" in out
        events = EventLog(app.db)
        action = events.recent(100, type_prefix="console.action")[0].data
        assert action["reason"] == "expired" and action["tech_id"] == "t-17"
        assert action["command"] == "open"
        logouts = [e.data["reason"] for e in events.recent(100, type_prefix="console.logout")]
        assert logouts == ["expired"]
        assert not events.recent(100, type_prefix="lock.pulse")
    finally:
        app.request_stop()
        await asyncio.wait_for(run, 10)


async def test_noise_long_lines_and_binary_do_not_crash(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    async with running(kit) as r:
        factory = lambda url: make_service(r.app, kit, url)  # noqa: E731
        async with pty_console(factory) as t:
            await t.until(r"L1> $")
            t.send(bytes(range(256)) * 4)
            t.send(b"\x1b[A\x1b[2J\x00\xff\xfe'\"\\\r\n")
            t.send(b"x" * 10_000 + b"\r")
            await t.until("line too long: discarded")
            t.send(b"login " + b"A" * 10_000 + b"\r")
            await t.until("line too long: discarded")
            t.send(os.urandom(4096).replace(b"\r", b"").replace(b"\n", b"") + b"\r")
            await t.until("line too long: discarded")
            await t.until(r"L1> $")
            out = await t.run("help")
            assert "login TOKEN" in out
            await t.run(f"login {token(kit)}", prompt=r"\(operator\)> $")
            out = await t.run("events 3 --json", prompt=r"\(operator\)> $")
            assert '"events"' in out
        assert all(r.app.task_up.values())
        assert not r.events("daemon.task_failed")


async def test_help_lists_exactly_the_registered_commands(
        make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    sock = kit.state_dir / "console.sock"
    async with running(kit) as r:
        svc = make_service(r.app, kit, None)
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(svc.listening.wait(), 5)
        t, w = await socket_client(sock)
        await t.until(r"L1> $")
        out = await t.run("help")
        lines = [ln for ln in out.splitlines()[1:-1] if not ln.startswith("Add --json")]
        usages = sorted(c.usage or c.name for c in svc.registry)
        assert sorted(re.split(r"  +", ln)[0] for ln in lines) == usages
        assert all(len(ln) <= 80 for ln in lines)
        out = await t.run("help --json")
        assert sorted(re.findall(r'"name": "([^"]+)"', out)) == svc.registry.names()
        assert svc.registry.names() == sorted([
            "help", "login", "logout", "status", "doors", "open", "pulse", "selftest",
            "bus scan", "sensors", "keypad test", "scanner test", "codes", "net", "events",
            "log", "service", "lockout clear"])
        await t.run(f"login {token(kit)}", prompt=r"\(operator\)> $")
        for cmd in ["codes", "net", "sensors", "bus scan", "selftest", "log 2",
                    "service 4 off broken hinge", "doors", "service 4 on fixed",
                    "lockout clear", "keypad test 1", "events 5"]:
            out = await t.run(cmd, prompt=r"\(operator\)> $")
            assert "refused" not in out and "unknown" not in out, out
            assert all(len(ln) <= 80 for ln in out.splitlines()), out
        w.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_line_editor_backspace_and_limits() -> None:
    ed = LineEditor(max_line=8)
    out = ed.feed(b"helq\x7fp\r\nst\x08\x08doors\r")
    assert out.lines == ["help", "doors"]
    assert ed.feed(b"123456789abc\rok\n").lines == ["ok"]
    assert ed.feed(b"\x00\xff\x1b[A\n").lines == [""]


async def test_idle_session_is_logged_out(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit()
    sock = kit.state_dir / "console.sock"
    async with running(kit) as r:
        svc = make_service(r.app, kit, None, idle_timeout_s=0.3)
        task = asyncio.create_task(svc.run())
        await asyncio.wait_for(svc.listening.wait(), 5)
        t, w = await socket_client(sock)
        await t.until(r"L1> $")
        await t.run(f"login {token(kit)}", prompt=r"\(operator\)> $")
        out = await t.until(r"L1> $", timeout=5)
        assert "idle timeout: logged out" in out
        assert r.events("console.logout")[-1].data["reason"] == "idle"
        w.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_configured_console_accepts_a_lockerctl_token(
    make_kit: Callable[..., BankKit],
) -> None:
    from lockerd.cli.lockerctl_cmd import main as lockerctl

    kit = make_kit(overrides={"console": {"socket": "console.sock"}})
    out = kit.directory / "t-21.token"
    status = await asyncio.to_thread(lockerctl, [
        "technician", "--tech-id", "t-21", "--name", "A. Tech", "--locker", "L1",
        "--role", "viewer", "--expires-in", "8h",
        "--sign", str(kit.directory / "keys" / "root.key"), "-o", str(out)])
    assert status == 0
    async with running(kit) as r:
        sock = kit.state_dir / "console.sock"
        await until(sock.exists, 5, what="the configured console socket", interval=0.02)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        buffer = b""

        async def read_until(pattern: str) -> str:
            nonlocal buffer
            async with asyncio.timeout(5):
                while not re.search(pattern, buffer.decode("ascii", "replace")):
                    buffer += await reader.read(4096)
            text = buffer.decode("ascii", "replace")
            buffer = b""
            return text

        await read_until(r"L1> $")
        writer.write(b"login " + out.read_bytes().strip() + b"\r")
        await read_until(r"L1 t-21\(viewer\)> $")
        writer.write(b"open 2\r")
        refused = await read_until(r"> $")
        assert "operator" in refused
        writer.close()
        login = await r.wait_event("console.login")
        assert login.data["tech_id"] == "t-21"
