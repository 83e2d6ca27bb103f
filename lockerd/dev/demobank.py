"""What the demo's tools act on: the simulated bank, the daemon running it, and its backend kit."""

from __future__ import annotations

from dataclasses import dataclass

from lockerd.app import App
from lockerd.dev.provision import BankKit, PlainCode
from lockerd.trust.digest import derived_pickup_code
from sim.world import SimWorld


@dataclass(frozen=True)
class DemoBank:
    """A running demo bank.

    `world` is the world a person acts on (with `--wire`, the emulated hardware's);
    `display` is the world of the daemon's own sim devices, whose display the customer reads
    (the same object as `world` without `--wire`); `app` is the running daemon; `kit` holds
    the keys and the plain codes, as the backend would."""

    world: SimWorld
    display: SimWorld
    app: App
    kit: BankKit

    def derived_code(self, parcel_id: str) -> str:
        """The pickup code of a parcel deposited here, as the backend derives it offline."""
        return derived_pickup_code(self.kit.code_key, self.kit.locker_id, parcel_id,
                                   self.app.config.codes.derived_digits)

    def courier_code(self) -> PlainCode | None:
        """The bank's courier code, if it was provisioned with one."""
        return next((c for c in self.kit.codes if c.kind == "courier"), None)
