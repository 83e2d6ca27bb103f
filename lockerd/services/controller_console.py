"""The controller's console commands: doors, open, service and lockout clear."""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, TypeVar

from lockerd.core.access import may_hold_parcel
from lockerd.core.console import Args, Caller, ConsoleError, Level, Registry, Reply
from lockerd.services.controller import Controller, OpenBudgetSpent, RequestRefused
from lockerd.trust.bundle import is_compartment_id

C = TypeVar("C", bound=Caller)


def compartment_arg(a: Args, usage: str, known: Container[str]) -> str:
    """The compartment a console line names, as its first word."""
    cid = a.get(0)
    if cid is None or not is_compartment_id(cid):
        raise ConsoleError(f"usage: {usage}")
    if cid not in known:
        raise ConsoleError(f"no compartment {cid!r}; see `doors`")
    return cid


def no_override(per_hour: int) -> OpenBudgetSpent:
    # One line that fits the terminal; docs/console.md says how the backend overrides it.
    return OpenBudgetSpent(f"open budget spent ({per_hour} opens/hour); the console has no "
                           "override")


def register_door_commands(registry: Registry[C], *, controller: Controller,
                           opens_per_hour: int,
                           clear_console_lockouts: Callable[[], None]) -> None:
    """`clear_console_lockouts` is the console's part of `lockout clear` (its login throttle)."""

    async def doors(s: Caller, a: Args) -> Reply:
        rows: dict[str, dict[str, Any]] = {}
        for cid, c in controller.compartments.items():
            rows[cid] = {
                "lock": c.phase.value,
                "door": "open" if c.door_open else "closed",
                "occupied": c.occupied, "in_service": c.in_service,
                "service_reason": c.service_reason, "last_event": c.last_event,
                "size": c.size, "parcel_id": c.parcel_id}
        text = [f"{'ID':<6} {'SIZE':<5} {'LOCK':<10} {'DOOR':<7} {'PARCEL':<7} {'SERVICE':<22} "
                "LAST"]
        for cid, r in rows.items():
            parcel = {True: "yes", False: "no", None: "?"}[r["occupied"]]
            service = "in" if r["in_service"] else f"out: {r['service_reason']}"[:22]
            on_record = f"  (parcel {r['parcel_id']})" if r["parcel_id"] else ""
            text.append(f"{cid:<6} {r['size'] or '-':<5} {str(r['lock'])[:10]:<10} "
                        f"{r['door']:<7} {parcel:<7} {service:<22} {r['last_event']}"
                        f"{on_record}")
        return Reply(text, {"compartments": rows})

    async def open_door(s: Caller, a: Args) -> Reply:
        cid = compartment_arg(a, "open ID [--force REASON]", controller.compartments)
        comp = controller.compartments[cid]
        if may_hold_parcel(comp.view()) and a.force is None:
            raise RequestRefused(f"compartment {cid} may hold a parcel; add --force REASON "
                                 "to open it anyway")
        assert s.tech_id is not None
        ref = {"tech_id": s.tech_id}
        if a.force:
            ref["reason"] = a.force
        try:
            outcome = await controller.open_for(cid, kind="console", source="console", ref=ref,
                                                budgeted=True)
        except OpenBudgetSpent as exc:
            raise no_override(opens_per_hour) from exc
        return Reply([f"compartment {cid}: {outcome}"], {"compartment": cid, "result": outcome})

    async def service(s: Caller, a: Args) -> Reply:
        usage = "service ID on|off REASON"
        cid = compartment_arg(a, usage, controller.compartments)
        state = a.get(1)
        reason = " ".join(a.words[2:])
        if state not in ("on", "off") or not reason or len(reason) > 200:
            raise ConsoleError(f"usage: {usage} (a reason of at most 200 characters)")
        assert s.tech_id is not None
        changed = await controller.set_service(cid, state == "on",
                                               f"{reason} (console {s.tech_id})")
        word = "in service" if state == "on" else "out of service"
        return Reply([f"compartment {cid}: {word}" + ("" if changed else " (unchanged)")],
                     {"compartment": cid, "in_service": state == "on", "changed": changed})

    async def lockout_clear(s: Caller, a: Args) -> Reply:
        await controller.clear_lockout()
        clear_console_lockouts()
        return Reply(["keypad and console lockouts cleared"], {"cleared": True})

    V, OP = Level.VIEWER, Level.OPERATOR
    registry.register_command("doors", doors, "lock, door, parcel, service per door", level=V)
    registry.register_command("open", open_door, "open a door", level=OP,
                              usage="open ID [--force R]")
    registry.register_command("service", service, "take a door out of/into service", level=OP,
                              usage="service ID on|off REASON")
    registry.register_command("lockout clear", lockout_clear, "clear keypad+console lockout",
                              level=OP)
