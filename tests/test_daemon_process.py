"""The daemon as a separate process: `lockerd run`, driven through the simulator's Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import stored_events
from waiting import until_sync, until_value

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.timeutil import utcnow
from sim.client import SimClient

pytestmark = pytest.mark.e2e

CODE = "482913"
LOCKERD = [sys.executable, "-m", "lockerd.cli.lockerd_cmd"]


def lockerd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOCKERD, *args], capture_output=True, text=True, timeout=60)


@contextmanager
def daemon(kit: BankKit) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([*LOCKERD, "run", "-c", str(kit.config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until_sync(lambda: kit.socket_path.exists() or proc.poll() is not None, 20,
                   what="the daemon's simulator socket", interval=0.02)
        if not kit.socket_path.exists():
            proc.kill()
            raise AssertionError(f"daemon did not start: {proc.communicate()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


async def wait_state(client: SimClient, cond: Callable[[dict], bool], what: str) -> dict:  # type: ignore[type-arg]
    return await until_value(client.state, cond, 5, what=what, interval=0.02)


async def test_pickup_through_the_sim_socket(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([PlainCode("p-1", CODE, "2", parcel_id="PX9")], parcels=["2"])
    with daemon(kit) as proc:
        async with SimClient(kit.socket_path) as sim:
            await sim.press(CODE + "#")
            await wait_state(sim, lambda s: s["compartments"]["2"]["door_open"], "door 2 open")
            await wait_state(sim, lambda s: "Take your parcel" in s["display"], "open message")
            await sim.parcel("2", False)
            await sim.door("2", "close")
            await wait_state(sim, lambda s: s["display"].startswith("Thank you"), "thanks")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    types = [e.type for e in stored_events(kit)]
    assert types[-1] == "daemon.stopping"
    for expected in ("lock.pulse", "door.opened", "pickup.opened", "door.closed",
                     "pickup.completed"):
        assert expected in types
    assert not kit.socket_path.exists(), "the control socket is removed at shutdown"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
async def test_sigint_and_sighup_also_stop_cleanly(make_kit: Callable[..., BankKit],
                                                   sig: signal.Signals) -> None:
    """SIGHUP too (its default would kill the daemon abruptly): nothing to reload, the
    config is read at the start."""
    kit = make_kit([])
    with daemon(kit) as proc:
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        err = proc.stderr.read() if proc.stderr else ""
    assert stored_events(kit)[-1].type == "daemon.stopping"
    assert sig.name in err and "stopping on a signal" in err


def test_bad_bundle_files_are_refused_and_previous_codes_stay(
    make_kit: Callable[..., BankKit], tmp_path: Path
) -> None:
    kit = make_kit([PlainCode("p-1", CODE, "2", parcel_id="PX9")], parcels=["2"])
    kit.bundle_path.write_bytes(kit.bundle(kit.codes, version=5))
    ok = lockerd("import-bundle", "-c", str(kit.config_path), str(kit.bundle_path))
    assert ok.returncode == 0, ok.stderr
    assert "codes bundle version 5 (snapshot, 1 codes, 0 revoked) applied" in ok.stdout
    now = utcnow()
    other_key = __import__("lockerd.trust.keys", fromlist=["x"]).generate_key()
    new_codes = [PlainCode("p-2", "777777", "2", parcel_id="PX9")]
    cases = {
        "signature": kit.bundle(new_codes, version=6, signer=other_key),
        "wrong_locker": kit.bundle(new_codes, version=6, locker_id="L2"),
        "expired": kit.bundle(new_codes, version=6, expires_at=now - timedelta(seconds=1)),
        "malformed": b'{"payloadType": "application/vnd.lockerd.codes+json", "payload": 12',
        "rollback": kit.bundle(new_codes, version=4),
        "gap": kit.bundle(new_codes, version=7, base_version=3),
    }
    for reason, raw in cases.items():
        path = tmp_path / f"{reason}.json"
        path.write_bytes(raw)
        res = lockerd("import-bundle", "-c", str(kit.config_path), str(path))
        assert res.returncode == 1, (reason, res.stdout, res.stderr)
        assert f"refused ({reason})" in res.stderr, (reason, res.stderr)
        assert "nothing was changed" in res.stderr
    rejected = [e for e in stored_events(kit) if e.type == "cache.rejected"]
    assert [e.data["reason"] for e in rejected] == list(cases)
    # The very version already held, again (a file read at every start): refused quietly.
    res = lockerd("import-bundle", "-c", str(kit.config_path), str(kit.bundle_path))
    assert res.returncode == 1 and "refused (rollback)" in res.stderr
    assert len([e for e in stored_events(kit) if e.type == "cache.rejected"]) == len(cases)
    # The old code still opens its door; the refused bundles' code does not.
    db_uses = __import__("lockerd.store", fromlist=["x"])
    db = db_uses.open_database(kit.state_dir / "lockerd.db")
    try:
        codes = db_uses.CodeStore(db)
        assert codes.version() == 5
        assert codes.lookup(kit.digest(CODE)) is not None
        assert codes.lookup(kit.digest("777777")) is None
    finally:
        db.close()


def test_bad_bundle_at_startup_keeps_daemon_and_codes(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([PlainCode("p-1", CODE, "2", parcel_id="PX9")], parcels=["2"])
    assert lockerd("import-bundle", "-c", str(kit.config_path),
                   str(kit.bundle_path)).returncode == 0
    kit.bundle_path.write_bytes(b"\x00\xffnot json at all")
    with daemon(kit) as proc:
        asyncio.run(_pickup_opens(kit))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        err = proc.stderr.read() if proc.stderr else ""
    assert "signed file refused" in err
    assert any(e.type == "cache.rejected" for e in stored_events(kit))


async def _pickup_opens(kit: BankKit) -> None:
    async with SimClient(kit.socket_path) as sim:
        await sim.press(CODE + "#")
        await wait_state(sim, lambda s: s["compartments"]["2"]["door_open"], "door 2 open")


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda t: t.replace('id = "L1"', 'idd = "L1"'), "[locker] 'idd': unknown key"),
        (lambda t: t.replace("[locker]\n", "[locker]\nextra = 1\n"), "'extra': unknown key"),
        (lambda t: t.replace('backend = "sim"', 'backend = "nosuch"', 1),
         "unknown lock backend 'nosuch'"),
        (lambda t: t.replace('state_dir = "state"', "state_dir = 5"),
         "[locker] 'state_dir': Expected `str`, got `int`"),
        (lambda t: t + "\n[doors]\npulse_s = -1\n", "not valid TOML"),
        (lambda t: t.replace('name = "simulated bank"\n', 'name = "x"\n[entry]\ntimeout_s = "x"\n'),
         "[entry] 'timeout_s': Expected `float`, got `str`"),
        (lambda t: t.replace('code_key_file = "keys/code_key"\n', ""),
         "[trust] 'code_key_file': missing required key"),
        (lambda t: t.replace('code_key_file = "keys/code_key"', 'code_key_file = "nope"'),
         "[trust] code_key_file"),
    ],
)
def test_config_errors_name_file_section_and_key(
    make_kit: Callable[..., BankKit],
    mutation: Callable[[str], str],
    message: str,
) -> None:
    kit = make_kit([])
    kit.config_path.write_text(mutation(kit.config_path.read_text()))
    res = lockerd("run", "-c", str(kit.config_path))
    assert res.returncode == 1
    assert str(kit.config_path) in res.stderr
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_check_config_and_events_commands(make_kit: Callable[..., BankKit]) -> None:
    kit = make_kit([])
    res = lockerd("check-config", "-c", str(kit.config_path))
    assert res.returncode == 0 and "OK (8 compartments, locker L1)" in res.stdout
    res = lockerd("import-keyring", "-c", str(kit.config_path), str(kit.keyring_path))
    assert res.returncode == 0 and "keyring version 1 accepted" in res.stdout
    res = lockerd("events", "-c", str(kit.config_path), "-n", "5")
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines[-1]["type"] == "keyring.updated" and lines[-1]["locker_id"] == "L1"


@pytest.mark.parametrize("args", [[], ["run"], ["demo"], ["check-config"], ["import-bundle"],
                                  ["import-keyring"], ["events"]])
def test_every_command_has_help(args: list[str]) -> None:
    res = lockerd(*args, "--help")
    assert res.returncode == 0
    assert "usage: lockerd" in res.stdout
    assert len(res.stdout.splitlines()) > 3


def test_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    res = lockerd("run", "-c", str(tmp_path / "absent.toml"))
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"lockerd: {tmp_path / 'absent.toml'}: cannot read the configuration file: "
        "No such file or directory"
    )
    assert os.path.exists(tmp_path) and not (tmp_path / "absent.toml").exists()


REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_validate(tmp_path: Path) -> None:
    for name in ("sim.toml", "wire.toml"):
        res = lockerd("check-config", "-c", str(REPO / "config" / name))
        assert res.returncode == 0, res.stderr
        assert res.stdout.rstrip().endswith("locker L1)")
    # The example names the files of an installation; where they are missing `run` would
    # refuse to start, and so does the check.
    example = REPO / "config" / "lockerd.example.toml"
    res = lockerd("check-config", "-c", str(example))
    assert res.returncode == 1
    assert "[trust] code_key_file: code key file '/etc/lockerd/code_key' does not exist" in (
        res.stderr)
    # With those files in place it passes.
    from lockerd.trust.digest import save_code_key

    save_code_key(bytes(range(32)), tmp_path / "code_key")
    (tmp_path / "mqtt_password").write_text("secret\n")
    installed = tmp_path / "lockerd.toml"
    installed.write_text(example.read_text().replace("/etc/lockerd/", f"{tmp_path}/"))
    res = lockerd("check-config", "-c", str(installed))
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("locker L1)")


def test_shipped_sim_config_runs_a_pickup(bank_dir: Path) -> None:
    import shutil

    # A copy, so the test neither needs nor touches the checkout's config/sim/state.
    shutil.copy(REPO / "config" / "sim.toml", bank_dir / "sim.toml")
    shutil.copytree(REPO / "config" / "sim", bank_dir / "sim",
                    ignore=shutil.ignore_patterns("state", "sim.sock"))
    socket = bank_dir / "sim" / "sim.sock"
    proc = subprocess.Popen([*LOCKERD, "run", "-c", str(bank_dir / "sim.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    async def pickup() -> None:
        async with SimClient(socket) as sim:
            await sim.press("111111#")
            await wait_state(sim, lambda s: s["compartments"]["1"]["door_open"], "door 1 open")

    try:
        until_sync(lambda: socket.exists() or proc.poll() is not None, 20,
                   what="the daemon's simulator socket", interval=0.02)
        assert proc.poll() is None, proc.communicate()
        asyncio.run(pickup())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)  # waits, and closes the output pipes
        assert proc.returncode == 0


KERONG = ('[backends.kerong]\n{port}boards = [{{ address = 0, engaged_bit = 1 }}]\n'
          'compartments = {{ ' + ", ".join(f'"{i}" = "0/{i - 1}"' for i in range(1, 9))
          + ' }}\n\n[backends.sim]')


def _edit(kit: BankKit, old: str, new: str) -> None:
    text = kit.config_path.read_text()
    assert old in text, old
    kit.config_path.write_text(text.replace(old, new, 1))


def _kerong_lock(port: str) -> Callable[[BankKit], None]:
    def edit(kit: BankKit) -> None:
        _edit(kit, '[hal.lock]\nbackend = "sim"', '[hal.lock]\nbackend = "kerong"')
        _edit(kit, "[backends.sim]", KERONG.format(port=port))
    return edit


def _prepend(text: str) -> Callable[[BankKit], None]:
    def edit(kit: BankKit) -> None:
        kit.config_path.write_text(text + kit.config_path.read_text())
    return edit


def _code_key(content: bytes | None) -> Callable[[BankKit], None]:
    def edit(kit: BankKit) -> None:
        path = kit.directory / "keys" / "code_key"
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    return edit


# Configurations `run` refuses before it starts anything: `check-config` must refuse them too,
# with the same line, or the unit's ExecStartPre passes and the daemon restarts in a loop.
REFUSED: dict[str, tuple[Callable[[BankKit], None], str]] = {
    "code key file missing": (_code_key(None), "[trust] code_key_file:"),
    "code key file malformed": (_code_key(b"not hex\n"), "[trust] code_key_file:"),
    "kerong without port": (_kerong_lock(""), "[backends.kerong]: missing required key 'port'"),
    "kerong port scheme unknown": (
        _kerong_lock('port = "nosuch:///dev/ttyUSB0"\n'),
        "[backends.kerong]: port 'nosuch:///dev/ttyUSB0': pyserial has no handler for nosuch://"),
    "serial scanner port scheme unknown": (
        lambda kit: _edit(kit, '[hal.scanner]\nbackend = "sim"',
                          '[hal.scanner]\nbackend = "serial"\noptions = { port = "nosuch://x" }'),
        "pyserial has no handler for nosuch://"),
    "console serial port scheme unknown": (
        _prepend('[console]\nsocket = "console.sock"\nserial_port = "nosuch://x"\n'),
        "[console]: port 'nosuch://x': pyserial has no handler for nosuch:// (key 'serial_port')"),
    "sim parcel in an unknown compartment": (
        lambda kit: _edit(kit, "parcels = []", 'parcels = ["99"]'),
        "[backends.sim]: parcels names unknown compartment '99'"),
    "mqtt password file missing": (
        _prepend('[mqtt]\nhost = "127.0.0.1"\nusername = "bank"\npassword_file = "absent"\n'),
        "[mqtt] password_file: cannot read"),
    "unknown section": (_prepend("[foo]\nbar = 1\n"), "unknown section [foo]"),
    "unknown backend section": (_prepend('[backends.nosuch]\nport = "x"\n'),
                                "unknown section [backends.nosuch]"),
    "locker id with a newline": (lambda kit: _edit(kit, 'id = "L1"', 'id = "L1\\n"'),
                                 "[locker] 'id': must be 1-64 characters of A-Z a-z 0-9 _ -"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_check_config_refuses_what_run_refuses_with_the_same_line(
    make_kit: Callable[..., BankKit], case: str
) -> None:
    kit = make_kit([])
    edit, message = REFUSED[case]
    edit(kit)
    lines = {}
    for command in ("check-config", "run"):
        res = lockerd(command, "-c", str(kit.config_path))
        assert res.returncode == 1, (command, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and "OK" not in res.stdout, (command, res)
        errors = [line for line in res.stderr.splitlines() if line.startswith("lockerd: ")]
        assert len(errors) == 1, (command, res.stderr)
        lines[command] = errors[0]
    assert lines["check-config"] == lines["run"]
    assert lines["run"].startswith(f"lockerd: {kit.config_path}: "), lines["run"]
    assert message in lines["run"], lines["run"]
    assert "regex" not in lines["run"] and "field" not in lines["run"], lines["run"]
    # `run` refused before it started anything: no database was created.
    assert not (kit.state_dir / "lockerd.db").exists()
