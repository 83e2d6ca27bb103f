"""What a door is opened for: the credential behind an access and how its use is counted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lockerd.core.actions import UseChange

DEPOSIT_KINDS = ("deposit", "courier")


@dataclass(frozen=True, slots=True)
class Access:
    """A credential granted for one compartment: a bundle code (`code_id` + `digest`), a derived
    pickup code (`code_id` "derived:<parcel_id>", no digest), a QR token (`cti`), a support
    code (`support_window`, with the code of its parcel if the bundle has one), or a command,
    self-test or technician named in `ref` (e.g. {"cmd_id": ...}). `ref` is carried into every
    event's data.

    `consumes`: the door seen open takes one use (False when an earlier door of the same courier
    session already took it). `returnable`: the use is given back when the person leaves the
    compartment as it was (a pickup closed on its parcel, a deposit closed empty).
    """

    code_id: str | None
    digest: str | None
    kind: str  # pickup | deposit | courier | command | selftest | console
    source: str  # keypad | scanner | mqtt | console
    ref: Mapping[str, str] = field(default_factory=dict)
    parcel_id: str | None = None
    cti: str | None = None
    cti_expires: int | None = None
    consumes: bool = True
    returnable: bool = True
    support_window: int | None = None

    @property
    def is_pickup(self) -> bool:
        return self.kind == "pickup"

    @property
    def is_deposit(self) -> bool:
        return self.kind in DEPOSIT_KINDS

    def use(self, delta: int) -> UseChange | None:
        """The count change of taking (+1) or giving back (-1) this access's use, if counted."""
        if not self.consumes:
            return None
        if self.cti is not None:
            return UseChange(delta, cti=self.cti, expires=self.cti_expires)
        support = (None if self.support_window is None or self.parcel_id is None
                   else (self.parcel_id, self.support_window))
        if self.code_id is not None and self.digest is not None:
            return UseChange(delta, code_id=self.code_id, digest=self.digest, support=support)
        if support is not None:
            return UseChange(delta, support=support)
        return None

    def given_back(self) -> UseChange | None:
        return self.use(-1) if self.returnable else None
