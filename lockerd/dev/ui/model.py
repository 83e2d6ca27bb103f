"""What the UI shows of a bank, built from the simulator's `state` reply (PROTOCOL.md 11)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DISPLAY_ROWS = 4
DISPLAY_COLUMNS = 20


@dataclass(frozen=True, slots=True)
class Cell:
    """One compartment as the person at the bank and the daemon see it."""

    id: str
    size: str | None
    locked: bool
    door_open: bool
    occupied: bool
    in_service: bool
    jammed: bool = False
    sensor_stuck: str | None = None  # "open" / "closed" when the door sensor lies


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole bank at one poll."""

    cells: tuple[Cell, ...]
    display: tuple[str, ...]
    faults: tuple[Mapping[str, str], ...] = field(default_factory=tuple)

    def cell(self, cid: str) -> Cell | None:
        return next((c for c in self.cells if c.id == cid), None)

    def has_fault(self, target: str, kind: str) -> bool:
        return any(f.get("target") == target and f.get("kind") == kind for f in self.faults)

    @property
    def stuck_key(self) -> str | None:
        return next((f.get("key") for f in self.faults if f.get("kind") == "stuck_key"), None)


def _flag(entry: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = entry.get(key, default)
    return value if isinstance(value, bool) else default


def display_lines(text: str) -> tuple[str, ...]:
    """The display's text as exactly 4 rows of 20 characters (padded, cut past 20)."""
    rows = text.split("\n") if text else []
    rows = (rows + [""] * DISPLAY_ROWS)[:DISPLAY_ROWS]
    return tuple(r[:DISPLAY_COLUMNS].ljust(DISPLAY_COLUMNS) for r in rows)


def snapshot_of(state: Mapping[str, Any], *, display: str | None = None,
                service: Mapping[str, bool] | None = None,
                sizes: Mapping[str, str | None] | None = None) -> Snapshot:
    """A Snapshot from a `state` reply. `display`, `service` and `sizes` replace the reply's
    display text, in-service flags and sizes when they come from elsewhere (the daemon's own
    display and view, when the world of the reply is a wire-level bank's)."""
    faults = tuple(f for f in state.get("faults", []) if isinstance(f, dict))
    stuck = {str(f.get("target", "")).removeprefix("door_sensor:"): str(f.get("kind"))
             for f in faults if str(f.get("target", "")).startswith("door_sensor:")}
    cells = []
    for cid, entry in dict(state.get("compartments", {})).items():
        if not isinstance(entry, dict):
            continue
        size = entry.get("size")
        if size is None and sizes is not None:
            size = sizes.get(cid)
        in_service = _flag(entry, "in_service", True)
        if service is not None and cid in service:
            in_service = service[cid]
        sensed = stuck.get(cid)
        cells.append(Cell(
            id=str(cid), size=size if isinstance(size, str) else None,
            locked=_flag(entry, "locked", True), door_open=_flag(entry, "door_open"),
            occupied=_flag(entry, "occupied"), in_service=in_service,
            jammed=any(f.get("target") == f"lock:{cid}" and f.get("kind") == "jam"
                       for f in faults),
            sensor_stuck=sensed.removeprefix("stuck_") if sensed else None))
    text = display if display is not None else str(state.get("display", ""))
    return Snapshot(cells=tuple(cells), display=display_lines(text), faults=faults)
