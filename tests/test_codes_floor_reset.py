"""Recovery from a stolen codes key over a real Mosquitto: a bundle at the highest version is
undone by a keyring that replaces the codes keys and a snapshot signed by the new ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from broker import Broker
from conftest import Running, running, wait_until
from test_sync_mqtt import CODE, OTHER, _keyring, codes, mqtt_overrides, publish, synced, watching

from lockerd.dev.provision import BankKit, PlainCode
from lockerd.trust.keys import generate_key

pytestmark = pytest.mark.e2e

MAX_VERSION = 2**63 - 1
FRESH_CODES_KEY = generate_key()
ATTACKER_CODE = "999111"


@pytest.fixture
def kit(make_kit: Callable[..., BankKit], broker: Broker) -> BankKit:
    return make_kit(codes(), parcels=["3", "4"], import_files=False,
                    overrides=mqtt_overrides(broker))


async def frozen(kit: BankKit, broker: Broker, r: Running) -> None:
    """Synced at version 5, then a bundle signed by the (stolen) codes key at the top version:
    the bank's codes plus the attacker's own."""
    await synced(kit, broker, r)
    stolen = kit.bundle([*codes(), PlainCode("x-1", ATTACKER_CODE, "5")], version=MAX_VERSION)
    await publish(kit, broker, stolen, "stolen.json")
    await wait_until(lambda: r.app.codes.version() == MAX_VERSION, what="the stolen bundle")
    # A pickup while frozen: its use must survive the recovery (consumption is local truth).
    r.world.press(CODE + "#")
    await r.wait_event("pickup.opened")
    r.world.set_parcel("3", False)
    r.world.close_door("3")
    await r.wait_event("pickup.completed")


async def test_without_a_codes_key_rotation_the_bank_stays_frozen(kit: BankKit,
                                                                  broker: Broker) -> None:
    async with running(kit) as r:
        await frozen(kit, broker, r)
        await publish(kit, broker, kit.bundle(codes(), version=6), "next.json")
        ev = await r.wait_event("cache.rejected")
        assert ev.data["reason"] == "rollback"
        # A keyring that keeps the codes key (a new version for other reasons) changes nothing.
        await publish(kit, broker, _keyring(kit, version=2, root=[kit.root_key],
                                            signers=[kit.root_key]), "keyring2.json")
        await wait_until(lambda: r.app.cache.keyring_version == 2, what="keyring 2")
        await publish(kit, broker, kit.bundle(codes(), version=7), "again.json")
        ev = await r.wait_event("cache.rejected", count=2)
        assert ev.data["reason"] == "rollback"
        assert r.events("codes.floor_reset") == []
        assert r.app.codes.version() == MAX_VERSION


async def test_a_codes_key_rotation_lets_the_next_snapshot_in_at_any_version(
        kit: BankKit, broker: Broker) -> None:
    rotation = _keyring(kit, version=2, root=[kit.root_key], signers=[kit.root_key],
                        codes_keys=[FRESH_CODES_KEY])
    async with watching(broker) as w, running(kit) as r:
        await frozen(kit, broker, r)
        requests = len(w.on("sync/request"))
        await publish(kit, broker, rotation, "rotation.json")
        reset = await r.wait_event("codes.floor_reset")
        assert reset.data["keyring_version"] == 2
        assert reset.data["codes_version"] == MAX_VERSION
        # The bank asks for the snapshot that sets the new floor.
        await wait_until(lambda: len(w.on("sync/request")) > requests,
                         what="a sync request after the rotation")
        # The removed key is refused, whatever the version; so is a delta of the new key.
        await publish(kit, broker, kit.bundle(codes(), version=8), "old-key.json")
        assert (await r.wait_event("cache.rejected")).data["reason"] == "signature"
        await publish(kit, broker, kit.bundle(codes(), version=6, base_version=MAX_VERSION,
                                              signer=FRESH_CODES_KEY), "delta.json")
        assert (await r.wait_event("cache.rejected", count=2)).data["reason"] == "gap"
        assert r.app.codes.version() == MAX_VERSION
    # The reset is durable with the keyring: it holds across a restart.
    async with running(kit) as r2:
        assert r2.app.cache.codes_floor_reset
        await publish(kit, broker, kit.bundle(codes(), version=5, signer=FRESH_CODES_KEY),
                      "recovery.json")
        await wait_until(lambda: r2.app.codes.version() == 5, what="the recovery snapshot")
        updated = r2.events("cache.updated")[-1]
        assert updated.data["version"] == 5
        assert (updated.data["floor_reset"], updated.data["previous_version"]) == (
            True, MAX_VERSION)
        assert not r2.app.cache.codes_floor_reset
        # The attacker's code is gone, the code used while frozen stays used, the other works.
        r2.world.press(ATTACKER_CODE + "#")
        assert (await r2.wait_event("code.rejected")).data["reason"] == "unknown_code"
        r2.world.press(CODE + "#")
        assert (await r2.wait_event("code.rejected", count=2)).data["reason"] == "used"
        r2.world.press(OTHER + "#")
        await r2.wait_event("pickup.opened")
        # From now on the usual rules hold, with the snapshot as the floor.
        await publish(kit, broker, kit.bundle(codes(), version=4, signer=FRESH_CODES_KEY),
                      "older.json")
        # Matched by its detail: the retained snapshot of the removed key, delivered again on
        # subscribing, is a refusal of its own.
        await wait_until(lambda: any(
            e.data["reason"] == "rollback" and "version 4 is not newer" in e.data["detail"]
            for e in r2.events("cache.rejected")), what="version 4 refused as a rollback")
        await publish(kit, broker, kit.bundle([], version=6, base_version=5, revoke=["p-2"],
                                              signer=FRESH_CODES_KEY), "delta6.json")
        await wait_until(lambda: r2.app.codes.version() == 6, what="a delta on the new floor")
