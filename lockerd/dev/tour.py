"""The demo's guided tour: a deposit, a pickup, a customer without a code and a jammed door."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from lockerd.core.deposit import SessionPhase
from lockerd.core.help import Step
from lockerd.dev.demobank import DemoBank
from lockerd.dev.helpdesk import backend_answers, parcels_here
from lockerd.dev.provision import PlainCode
from lockerd.store.events import StoredEvent

T = TypeVar("T")

TOUR_STEP_S = 6.0  # a step of the tour that takes longer than this has failed
_POLL_S = 0.02

Say = Callable[[str], Awaitable[None]]

HINTS = {
    "no_free_compartment": "every compartment holds a parcel or is in use; take one out "
    "with a pickup code first, or run the demo with more compartments",
    "locked_out": "too many wrong codes were typed; wait for the lockout to end",
    "parcel_already_here": "that parcel is already in a compartment",
}


class TourFailed(Exception):
    """A step of the tour did not happen; the message says which and why."""


async def play_tour(bank: DemoBank, say: Say) -> bool:
    """Play the guided tour on a running demo bank; False when one of its steps failed.

    `bank` is the running bank (`DemoBank`: the person's world, the display's world, the
    daemon, the backend's kit). `say(line)` is awaited with each step's one-line explanation
    BEFORE the step acts on the bank (the transcript prints `[tour] line`; a UI may show the
    line and wait for a key before it returns). When a step fails, `say` gets one line
    starting with `FAILED: ` that says what was awaited and why, then, if a courier session
    is still open, the step that ends it. Every step acts on the world as a person would and
    then waits, with a deadline of `TOUR_STEP_S` seconds (longer for the door timeouts), for
    the daemon's event or the world's change that shows it worked."""
    return await _Tour(bank, say).run()


class _Tour:
    """A courier deposits a parcel, then its customer picks it up with the derived code."""

    def __init__(self, bank: DemoBank, say: Say) -> None:
        self.bank = bank
        self.app = bank.app
        self.world = bank.world
        self.say = say

    async def run(self) -> bool:
        try:
            await self._run()
        except TourFailed as exc:
            await self.say(f"FAILED: {exc}")
            if self.app.controller.session is not None and not self.app.stop.is_set():
                await self.say("the courier presses * to end the session")
                mark = self.app.events.last_seq()
                self.world.press("*")
                try:
                    await self.event(mark, "session.ended", what="the session to end")
                except TourFailed as again:
                    await self.say(f"FAILED: {again}")
            return False
        return True

    async def _run(self) -> None:
        cid, parcel = await self._deposit()
        world = self.world
        code = self.bank.derived_code(parcel)
        await self.say(f"the backend derives the customer's pickup code from the parcel id "
                       f"alone (nothing sent to the locker): {code}")
        await self.say(f"the customer types code {code}#")
        mark = self.app.events.last_seq()
        world.press(code + "#")
        await self.event(mark, "pickup.opened", compartment=cid, what=f"door {cid} to open",
                         fail=("code.rejected", "door.jammed"))
        await self.say(f"door {cid} is open: the customer takes parcel {parcel} out")
        await self.take_out(mark, cid, closing=f"the customer closes door {cid}")
        await self.say(f"pickup completed with code derived:{parcel}.")
        await _no_code_chapter(self)
        if not await self._jam_chapter():
            await self.say("End of the tour.")

    async def _deposit(self) -> tuple[str, str]:
        """The courier's chapter; returns the compartment and the parcel deposited."""
        world, ctl = self.world, self.app.controller
        courier = self.bank.courier_code()
        if courier is None:
            raise TourFailed("this bank has no courier code")
        if ctl.session is not None:
            raise TourFailed("a courier session is already running: press * to end it, then "
                             "type 'tour' again")
        parcel = self._parcel_id()
        await self.say(f"a courier arrives with parcel {parcel}")
        await self.say(f"the courier types code {courier.code}#")
        mark = self.app.events.last_seq()
        world.press(courier.code + "#")
        await self.event(mark, "session.started", what="the courier session to start",
                         fail=("code.rejected",))

        await self.say(f"the display asks for a label: the courier scans parcel {parcel}")
        world.scan_label(parcel)
        sizes = ctl.rules.sizes
        if len(sizes) > 1:
            def asks_size() -> bool | None:
                session = ctl.session
                if (session is not None and session.phase is SessionPhase.SIZE
                        and session.parcel_id == parcel):
                    return True
                self._find(mark, "deposit.refused", fail=("deposit.refused",))
                return None

            await self.until("the display to ask for a size", asks_size)
            await self.say(f"the parcel is small: the courier presses 1 (size {sizes[0]}); "
                           f"the daemon opens the smallest free door of size {sizes[0]} "
                           "or larger")
            world.press("1")
        pulse = await self.event(mark, "lock.pulse", what="a door to be assigned",
                                 fail=("deposit.refused", "session.ended"))
        cid = pulse.compartment or ""
        await self.event(mark, "door.opened", compartment=cid, what=f"door {cid} to open",
                         fail=("door.jammed",))
        size = ctl.compartments[cid].size or "?"
        await self.say(f"door {cid} (size {size}) is open: the courier puts parcel {parcel} "
                       "in")
        world.set_parcel(cid, True)
        await self.until(f"the occupancy sensor of {cid} to see the parcel",
                         lambda: True if ctl.compartments[cid].occupied else None)
        await self.say(f"the courier closes door {cid}")
        world.close_door(cid)
        await self.event(mark, "deposit.confirmed", compartment=cid,
                         what="the deposit to be confirmed", fail=("deposit.aborted",))
        # No person is quicker than the lock pulse: let the latch catch the door first.
        await self.until(f"the latch of door {cid} to engage",
                         lambda: True if world.compartment(cid).locked else None)
        await self.say(f"deposit.confirmed is on its way to the backend: parcel {parcel} "
                       f"lies in compartment {cid}")
        await self.say("the courier presses * to end the session")
        world.press("*")
        await self.event(mark, "session.ended", what="the courier session to end")
        return cid, parcel

    async def take_out(self, mark: int, cid: str, *, closing: str | None = None) -> None:
        """The customer takes the parcel out of the open door `cid` and closes it; returns once
        `pickup.completed` is recorded and the latch holds the door. `closing`: a step said
        before the door is closed."""
        world, ctl = self.world, self.app.controller
        world.set_parcel(cid, False)
        await self.until(f"the occupancy sensor of {cid} to see it empty",
                         lambda: True if ctl.compartments[cid].occupied is False else None)
        if closing is not None:
            await self.say(closing)
        world.close_door(cid)
        await self.event(mark, "pickup.completed", compartment=cid,
                         what="the pickup to complete", fail=("pickup.incomplete",))
        await self.until(f"the latch of door {cid} to engage",
                         lambda: True if world.compartment(cid).locked else None)

    async def _jam_chapter(self) -> bool:
        """A customer's door jams; the display asks to push it and press `#`; the guided
        retry opens it and the code is used once. False when it was skipped (no provisioned
        parcel left here, or the guided retry is off)."""
        world = self.world
        code = self._parcel_with_a_code()
        if code is None or self.app.config.doors.jam_retry_s <= 0:
            await self.say("(no guided jam retry this time: no provisioned parcel left here, "
                           "or [doors] jam_retry_s is 0)")
            return False
        cid = code.compartment or ""
        await self.say(f"a customer comes for parcel {code.parcel_id} in compartment {cid}, "
                       f"but its lock sticks (the tour jams it: 'jam {cid}')")
        world.set_fault(f"lock:{cid}", "jam", True)
        try:
            mark = self.app.events.last_seq()
            await self.say(f"the customer types code {code.code}#")
            world.press(code.code + "#")
            both_pulses = 2 * self.app.config.doors.open_timeout_s
            await self.event(mark, "door.jammed", compartment=cid, within=both_pulses,
                             what=f"door {cid} to be reported jammed after two pulses",
                             fail=("code.rejected", "pickup.opened"))
            await self.say("the display asks to push the door firmly and press #; the code "
                           "is still valid and nothing was used")
            await self.say("the customer pushes the door (the tour clears the jam: "
                           f"'unjam {cid}') and presses #")
            world.set_fault(f"lock:{cid}", "jam", False)
            world.press("#")
            await self.event(mark, "pickup.opened", compartment=cid,
                             what=f"the guided retry to open door {cid}",
                             fail=("compartment.out_of_service",))
        finally:
            world.set_fault(f"lock:{cid}", "jam", False)
        await self.say(f"door {cid} is open: the customer takes the parcel and closes it")
        await self.take_out(mark, cid)
        await self.say(f"pickup completed after the guided retry, code {code.id} used once. "
                       "End of the tour.")
        return True

    def _parcel_with_a_code(self) -> PlainCode | None:
        """A provisioned pickup code whose parcel is still in its compartment, unused."""
        for code in self.bank.kit.codes:
            comp = self.app.controller.compartments.get(code.compartment or "")
            if code.kind != "pickup" or comp is None:
                continue
            record = self.app.codes.lookup(self.bank.kit.digest(code.code))
            if (comp.in_service and comp.occupied and comp.view().idle and record is not None
                    and record.uses < record.max_uses):
                return code
        return None

    def _parcel_id(self) -> str:
        """PX-TOUR-1, or the next number if that parcel is already here."""
        on_record = {c.parcel_id for c in self.app.controller.compartments.values()}
        n = 1
        while f"PX-TOUR-{n}" in on_record:
            n += 1
        return f"PX-TOUR-{n}"

    def _find(self, since: int, *types: str, compartment: str | None = None,
              fail: Collection[str] = ()) -> StoredEvent | None:
        for event in self.app.events.since(since):
            if compartment is not None and event.compartment not in (None, compartment):
                continue
            if event.type in fail:
                reason = event.data.get("reason")
                hint = HINTS.get(reason) if isinstance(reason, str) else None
                raise TourFailed(f"the daemon recorded {event.type}"
                                 + (f" ({reason})" if reason else "")
                                 + (f" for door {event.compartment}" if event.compartment
                                    else "")
                                 + (f": {hint}" if hint else ""))
            if event.type in types and (compartment is None or event.compartment == compartment):
                return event
        return None

    async def event(self, since: int, type_: str, *, what: str,
                    compartment: str | None = None, fail: Collection[str] = (),
                    within: float = 0.0) -> StoredEvent:
        """The first event of `type_` recorded after `since` (for `compartment`), waited for;
        one of the `fail` types first stops the tour."""
        return await self.until(what, lambda: self._find(since, type_, compartment=compartment,
                                                         fail=fail), within=within)

    async def until(self, what: str, check: Callable[[], T | None], *,
                    within: float = 0.0) -> T:
        """`check()` once it is not None. `within`: how much longer than a step this one may
        take (the door timeouts)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOUR_STEP_S + within
        while True:
            result = check()
            if result is not None:
                return result
            if self.app.stop.is_set():
                raise TourFailed(f"the demo is stopping (while waiting for {what})")
            if loop.time() >= deadline:
                shown = " | ".join(self.bank.display.display.lines)
                raise TourFailed(f"waited {TOUR_STEP_S + within:.0f} s for {what}, in vain "
                                 f"(the display shows: {shown or 'nothing'})")
            await asyncio.sleep(_POLL_S)


async def _no_code_chapter(tour: _Tour) -> None:
    """The tour's "no code" chapter: a customer whose SMS never came asks for help at the
    bank, the backend resends the code, and that code opens the door."""
    bank, app, world = tour.bank, tour.app, tour.world
    ctl = app.controller
    code = next((c for c in bank.kit.codes if c.kind == "pickup" and c.compartment
                 and c.parcel_id in parcels_here(bank)), None)
    if code is None or code.compartment is None or code.parcel_id is None:
        await tour.say("no code: no parcel with a known code is left here; chapter skipped")
        return
    cid, parcel = code.compartment, code.parcel_id
    app.controller.online = lambda: True  # the demo's backend is in this process
    await tour.say(f"chapter 'no code': the SMS for parcel {parcel} never came; its "
                   "customer presses # with nothing typed")
    mark = app.events.last_seq()
    world.press("#")
    await tour.until("the display to ask for a tracking number",
                     lambda: True if ctl.bank.help is not None else None)
    await tour.say(f"the customer scans the tracking number on the notice: {parcel}")
    world.scan(parcel)
    await tour.until("the display to ask for the phone's last 4 digits",
                     lambda: True if ctl.bank.help is not None
                     and ctl.bank.help.step is Step.PHONE else None)
    await tour.say("the customer types the last 4 digits of their phone: 9876")
    world.press("9876")
    request = await tour.event(mark, "help.requested", what="the help request")
    await tour.say(f"help.requested is on its way; the customer reads the reference "
                   f"H-{request.data['reference']}")

    async def answered(line: str) -> None:
        await tour.say(f"the demo's backend answers {line}")

    if await backend_answers(bank, request, answered) != "resent":
        raise TourFailed(f"the backend did not find parcel {parcel}")
    await tour.event(mark, "help.answered", what="the reply to be accepted")
    await tour.say(f"the SMS arrives with the pickup code: the customer types {code.code}#")
    world.press(code.code + "#")
    await tour.event(mark, "pickup.opened", compartment=cid, what=f"door {cid} to open",
                     fail=("code.rejected", "door.jammed"))
    await tour.say(f"door {cid} is open: the customer takes parcel {parcel} and closes it")
    await tour.take_out(mark, cid)
