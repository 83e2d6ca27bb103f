"""The demo's backend answering a customer's help request, with a signed reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from lockerd.dev.demobank import DemoBank
from lockerd.services.help import HelpService
from lockerd.store.events import StoredEvent


async def backend_answers(bank: DemoBank, request: StoredEvent,
                          tell: Callable[[str], Awaitable[None]]) -> str:
    """Answer a help request as `lockerctl respond-help` would: resent for a parcel on record
    here, not_found otherwise. `tell` hears what the backend decided (`help request H-REF for
    TRACKING: OUTCOME`) before the reply goes to the bank. Returns the outcome."""
    app = bank.app
    tracking, phone = str(request.data["tracking"]), str(request.data["phone_last4"])
    if tracking in parcels_here(bank):
        outcome, message = "resent", f"New code sent by SMS to ***{phone[-2:]}"
    else:
        outcome, message = "not_found", "No parcel found for these details. Call support"
    await tell(f"help request H-{request.data['reference']} for {tracking}: {outcome}")
    responder = HelpService(
        link=None, topic="", cache=app.cache, requests=app.controller.help_requests,
        events=app.events, locker_id=bank.kit.locker_id,
        answer=lambda help_id, outcome_, text: app.controller.help_reply(
            help_id, outcome=outcome_, message=text),
        reply_valid_s=app.config.help.reply_valid_s, now=app.clock.wall,
        monotonic=app.clock.monotonic)
    await responder.receive(bank.kit.help_reply(str(request.data["help_id"]), outcome=outcome,
                                                message=message))
    return outcome


def parcels_here(bank: DemoBank) -> set[str]:
    """The parcels the demo's backend knows to be in this bank: those on record (deposited
    here), and those of the printed codes whose compartment holds a parcel."""
    comps = bank.app.controller.compartments
    here = {c.parcel_id for c in comps.values() if c.parcel_id}
    here |= {c.parcel_id for c in bank.kit.codes
             if c.parcel_id and c.compartment and comps[c.compartment].occupied}
    return here
