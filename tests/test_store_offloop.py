"""Big code updates while the daemon serves: its loop and its commits never wait for them."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest
from broker import Broker
from conftest import Running, running, wait_until
from test_sync_mqtt import mqtt_overrides, publish

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.store.staging import STAGING_TABLE
from sim.client import SimClient

pytestmark = pytest.mark.e2e

CODE = "482913"
MANY = 40_000


def many(version_tag: str) -> list[PlainCode]:
    """The pickup code of compartment 3 among MANY others."""
    return [PlainCode("p-1", CODE, "3", parcel_id="PX1"),
            *(PlainCode(f"{version_tag}-{i}", f"{10_000_000 + i}", "1") for i in range(MANY))]


def staging(r: Running) -> bool:
    row = r.app.db.conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
        (STAGING_TABLE,)).fetchone()
    return row is not None


async def test_a_pickup_completes_while_import_bundle_runs(
    make_kit: Callable[..., BankKit],
) -> None:
    kit = make_kit([PlainCode("p-1", CODE, "3", parcel_id="PX1")], parcels=["3"])
    path = kit.directory / "big.json"
    path.write_bytes(kit.bundle(many("b"), version=2))
    async with running(kit) as r:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockerd.cli.lockerd_cmd", "import-bundle", "-c",
            str(kit.config_path), str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            # The import is writing its snapshot beside the live codes.
            await wait_until(lambda: staging(r), timeout=60, what="the import staging codes")
            r.world.press(CODE + "#")
            opened = await r.wait_event("pickup.opened", timeout=10)
            assert opened.code_id == "p-1"
            r.world.set_parcel("3", False)
            r.world.close_door("3")
            await r.wait_event("pickup.completed", timeout=10)
        finally:
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"database is locked" not in err
        assert b"codes bundle version 2" in out
        await wait_until(lambda: r.app.codes.version() == 2, what="the imported version")
        # The code was in both sets with the same digest: its use stays recorded.
        record = r.app.codes.lookup(kit.digest(CODE))
        assert record is not None and record.uses == 1
        assert not staging(r)
        failures = [e for e in r.events() if e.type in ("daemon.task_failed", "hardware.fault")]
        assert failures == []


async def test_an_mqtt_snapshot_is_applied_while_the_sim_socket_keeps_answering(
    make_kit: Callable[..., BankKit], broker: Broker,
) -> None:
    kit = make_kit([], parcels=["3"], import_files=False, overrides=mqtt_overrides(broker))
    async with running(kit) as r, SimClient(kit.socket_path) as sim:
        await publish(kit, broker, kit.keyring(version=1), "keyring.json")
        await wait_until(lambda: r.app.cache.keyring_version == 1, what="keyring")
        publishing = asyncio.create_task(
            publish(kit, broker, kit.bundle(many("m"), version=3), "snapshot.json"))
        await wait_until(lambda: staging(r), timeout=60, what="the snapshot being staged")
        answered_while_staging = 0
        while staging(r):
            state = await sim.state()
            assert "compartments" in state
            if staging(r):
                answered_while_staging += 1
        await publishing
        await wait_until(lambda: r.app.codes.version() == 3, timeout=30, what="applied")
        assert answered_while_staging > 0
        assert r.app.codes.count() == MANY + 1
        # And the bank serves the new codes at once.
        r.world.press(CODE + "#")
        await r.wait_event("pickup.opened")
