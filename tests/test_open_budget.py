"""The open budget (PROTOCOL section 7) over a real Mosquitto and the console's pty: remote and
console opens share `[commands] max_opens_per_hour`, a refusal is evented once an hour, only an
override signed by more commands keys than the threshold goes past it, and a restart keeps it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from broker import Broker
from conftest import RunFn, Running, running
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_commands import connected, results
from test_console import make_service, pty_console, token
from test_sync_mqtt import mqtt_overrides, raw_publish, watching

from lockerd.dev.provision import BankKit
from lockerd.timeutil import utcnow
from lockerd.trust.command import build_command_payload
from lockerd.trust.dsse import COMMAND_PAYLOAD_TYPE, RoleKeys, sign_envelope
from lockerd.trust.keys import generate_key, save_private_key

pytestmark = pytest.mark.e2e

CMD = "lockers/L1/cmd"


class Backend:
    """The bank's kit with three commands keys, threshold two (the root key is one of them)."""

    def __init__(self, kit: BankKit) -> None:
        self.kit = kit
        self.keys: list[Ed25519PrivateKey] = [kit.root_key, generate_key(), generate_key()]
        role = RoleKeys.from_keys([k.public_key() for k in self.keys], 2)
        kit.keyring_path.write_bytes(kit.keyring(commands=role))

    def open(self, cmd_id: str, cid: str, *, signers: int = 2, override: bool = False) -> bytes:
        return self.kit.command("open", cmd_id=cmd_id, args={"compartment": cid},
                                signers=self.keys[:signers], override=override)


def bank(make_kit: Callable[..., BankKit], broker: Broker, **commands: Any) -> Backend:
    overrides: dict[str, Any] = mqtt_overrides(broker)
    if commands:
        overrides["commands"] = commands
    return Backend(make_kit([], parcels=["3"], overrides=overrides))


async def remote_open(r: Running, w: Any, broker: Broker, raw: bytes,
                      cmd_id: str) -> dict[str, Any]:
    """Publish an open, wait for its result; close the door again if it opened."""
    await raw_publish(broker, CMD, raw)
    [result] = await results(w, cmd_id)
    if result["status"] == "ok":
        closed = len(r.events("door.closed"))
        r.world.close_door("5")
        await r.wait_event("door.closed", count=closed + 1)
    return result


async def test_ten_opens_then_open_budget_then_only_a_stronger_override(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    b = bank(make_kit, broker)
    async with watching(broker) as w, running(b.kit) as r:
        await connected(r)
        for i in range(10):
            result = await remote_open(r, w, broker, b.open(f"c-{i}", "5"), f"c-{i}")
            assert result["status"] == "ok", result
        assert r.world.pulses == ["5"] * 10

        refused = await remote_open(r, w, broker, b.open("c-10", "5"), "c-10")
        assert refused == {"cmd_id": "c-10", "status": "rejected", "detail": "open_budget"}
        [budget] = r.events("security.open_budget")
        assert (budget.compartment, budget.data["cmd_id"]) == ("5", "c-10")
        assert budget.data["max_opens_per_hour"] == 10
        assert budget.data["source"] == "mqtt"
        assert r.world.pulses == ["5"] * 10, "a refused open pulses nothing"

        # Asking for an override with the threshold's worth of signatures is not enough.
        weak = await remote_open(r, w, broker, b.open("c-11", "5", override=True), "c-11")
        assert weak["detail"] == "open_budget"
        # Nor are more signatures without asking for the override.
        unasked = await remote_open(r, w, broker, b.open("c-12", "5", signers=3), "c-12")
        assert unasked["detail"] == "open_budget"
        assert len(r.events("security.open_budget")) == 1, "one event per hour"

        # More distinct commands keys than the threshold, asking for it: the door opens, and
        # its events say it went past the budget.
        strong = await remote_open(r, w, broker, b.open("c-13", "5", signers=3, override=True),
                                   "c-13")
        assert strong["status"] == "ok", strong
        pulse = r.events("lock.pulse")[-1]
        assert (pulse.data["cmd_id"], pulse.data["open_budget"]) == ("c-13", "override")
        assert r.world.pulses == ["5"] * 11
        # The override counted too: the budget is still spent.
        after = await remote_open(r, w, broker, b.open("c-14", "5"), "c-14")
        assert after["detail"] == "open_budget"
        ended = [e.data for e in r.events("command.result") if e.data["cmd_id"] == "c-10"]
        assert ended[0]["status"] == "rejected" and ended[0]["reason"] == "open_budget"
        assert "max_opens_per_hour" in ended[0]["message"]


async def test_the_budget_survives_a_restart(make_kit: Callable[..., BankKit],
                                             broker: Broker) -> None:
    b = bank(make_kit, broker, max_opens_per_hour=2)
    async with watching(broker) as w, running(b.kit) as r:
        await connected(r)
        for i in range(2):
            assert (await remote_open(r, w, broker, b.open(f"c-{i}", "5"),
                                      f"c-{i}"))["status"] == "ok"
        assert (await remote_open(r, w, broker, b.open("c-2", "5"), "c-2"))["detail"] == (
            "open_budget")
    # A new daemon on the same state directory: the hour is not over, nor its event.
    async with watching(broker) as w2, running(b.kit) as r2:
        await connected(r2)
        again = await remote_open(r2, w2, broker, b.open("c-3", "5"), "c-3")
        assert again == {"cmd_id": "c-3", "status": "rejected", "detail": "open_budget"}
        assert len(r2.events("security.open_budget")) == 1
        assert r2.world.pulses == []


async def test_console_opens_count_against_the_same_budget(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    b = bank(make_kit, broker, max_opens_per_hour=2)
    prompt = r"\(operator\)> $"
    async with watching(broker) as w, running(b.kit) as r, pty_console(
            lambda tty: make_service(r.app, b.kit, tty)) as t:
        await connected(r)
        await t.until(r"> $")
        await t.run(f"login {token(b.kit)}", prompt=prompt)
        assert "compartment 5: opened" in await t.run("open 5", prompt=prompt)
        r.world.close_door("5")
        await r.wait_event("door.closed")
        assert (await remote_open(r, w, broker, b.open("c-0", "5"), "c-0"))["status"] == "ok"

        # Spent by one console and one remote open: the console is refused, and says it
        # cannot override ...
        out = await t.run("open 5", prompt=prompt)
        assert "refused: open budget spent (2 opens/hour); the console has no override" in out
        [budget] = r.events("security.open_budget")
        assert (budget.data["source"], budget.data["tech_id"]) == ("console", "t-17")
        # ... a forced pulse of a door that may hold a parcel is an open too ...
        out = await t.run('pulse 3 --force "stuck"', prompt=prompt)
        assert "refused: open budget spent" in out
        # ... and the remote side is refused as well, with no second event in the hour.
        refused = await remote_open(r, w, broker, b.open("c-1", "5"), "c-1")
        assert refused["detail"] == "open_budget"
        assert len(r.events("security.open_budget")) == 1
        assert r.world.pulses == ["5", "5"]
        # A pulse test of a door known to be empty is not an open that can hand out a parcel.
        assert "compartment 6: opened" in await t.run("pulse 6", prompt=prompt)


async def test_a_mistyped_override_is_refused_and_the_daemon_stays_up(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    b = bank(make_kit, broker, max_opens_per_hour=0)
    payload = build_command_payload(
        cmd_id="c-bad", locker_id="L1", issued_at=utcnow(),
        expires_at=utcnow() + timedelta(minutes=5), action="open", args={"compartment": "5"})
    payload = payload.replace(b'"action"', b'"override":"yes","action"')
    raw = sign_envelope(COMMAND_PAYLOAD_TYPE, payload, b.keys)
    async with watching(broker) as w, running(b.kit) as r:
        await connected(r)
        bad = await remote_open(r, w, broker, raw, "c-bad")
        assert bad == {"cmd_id": "c-bad", "status": "rejected", "detail": "malformed"}
        assert r.world.pulses == []
        ok = await remote_open(r, w, broker, b.open("c-ok", "5", signers=3, override=True),
                               "c-ok")
        assert ok["status"] == "ok"


async def test_lockerctl_signs_an_override(make_kit: Callable[..., BankKit], broker: Broker,
                                           run: RunFn) -> None:
    b = bank(make_kit, broker, max_opens_per_hour=0)
    files = [b.kit.directory / "keys" / "root.key"]
    for i, key in enumerate(b.keys[1:]):
        files.append(b.kit.directory / "keys" / f"ops-{i}.key")
        save_private_key(key, files[-1], overwrite=True)
    out = b.kit.directory / "override.json"
    signed = run("command", "--locker", "L1", "--action", "open", "--compartment", "5",
                 "--cmd-id", "c-ctl", "--override", "--expires-in", "5m", "--sign", *files,
                 "-o", out)
    assert signed.status == 0, signed.err
    refused = run("command", "--locker", "L1", "--action", "resync", "--override",
                  "--expires-in", "5m", "--sign", files[0], "-o", b.kit.directory / "x.json")
    assert refused.status == 2 and "--override is for --action open only" in refused.err
    async with watching(broker) as w, running(b.kit) as r:
        await connected(r)
        result = await remote_open(r, w, broker, out.read_bytes(), "c-ctl")
        assert result["status"] == "ok"
        assert r.events("lock.pulse")[0].data["open_budget"] == "override"


@pytest.mark.parametrize("value", [-1, "10", 2.5])
def test_a_bad_max_opens_per_hour_is_a_config_error(value: object) -> None:
    from lockerd.config import parse_config
    from lockerd.errors import ConfigError

    base: dict[str, Any] = {
        "locker": {"id": "L1", "state_dir": "s"},
        "trust": {"root_keys": ["ab" * 32], "code_key_file": "k"},
        "compartments": [{"id": "1"}],
        "hal": {"lock": {"backend": "sim"}, "door_sensor": {"backend": "sim"}},
        "commands": {"max_opens_per_hour": value},
    }
    with pytest.raises(ConfigError, match=r"\[commands\] 'max_opens_per_hour'"):
        parse_config(base)
