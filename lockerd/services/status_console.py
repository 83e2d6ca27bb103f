"""The console's view of the running bank: `status` (telemetry, link, outbox) and `net`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lockerd import __version__
from lockerd.core.console import Args, Caller, Level, Registry, Reply
from lockerd.services.link import MqttLink
from lockerd.timeutil import format_time

C = TypeVar("C", bound=Caller)


def register_status_commands(registry: Registry[C], *, locker_id: str,
                             telemetry: Callable[[], Awaitable[dict[str, Any]]],
                             link: MqttLink | None) -> None:
    """`telemetry` is the heartbeat snapshot; `link` is None on a bank without [mqtt]."""

    async def status(s: Caller, a: Args) -> Reply:
        t = await telemetry()
        faults = [f"{name}: {h['detail']}" for name, h in t["hardware"].items() if not h["ok"]]
        faults += [f"task down: {name}" for name in t["tasks_down"]]
        st = link.status if link else None
        data = {"locker_id": locker_id, "version": __version__,
                "uptime_s": t["uptime_s"], "codes_version": t["codes_version"],
                "keyring_version": t["keyring_version"],
                "link": None if st is None else ("connected" if st.connected else "down"),
                "outbox_depth": t["outbox_depth"], "faults": faults,
                "out_of_service": t["out_of_service"]}
        text = [f"bank {locker_id}  lockerd {__version__}  up {t['uptime_s']:.0f} s",
                f"codes v{t['codes_version']}  keyring v{t['keyring_version']}",
                f"link: {data['link'] or 'not configured'}  outbox: {t['outbox_depth']} "
                "unacknowledged",
                f"out of service: {', '.join(t['out_of_service']) or 'none'}",
                f"faults: {'none' if not faults else len(faults)}"]
        text += [f"  {f}" for f in faults]
        return Reply(text, data)

    async def net(s: Caller, a: Args) -> Reply:
        if link is None:
            return Reply(["no [mqtt] section: this bank runs offline"], {"broker": None})
        st = link.status
        data = {"broker": st.broker, "connected": st.connected, "connects": st.connects,
                "last_connect": format_time(st.last_connect) if st.last_connect else None,
                "last_error": st.last_error,
                "last_error_at": format_time(st.last_error_at) if st.last_error_at else None}
        text = [f"broker {st.broker}: {'connected' if st.connected else 'NOT connected'}",
                f"connects: {st.connects}  last: {data['last_connect'] or 'never'}",
                f"last error: {st.last_error or 'none'}"
                + (f" at {data['last_error_at']}" if data["last_error_at"] else "")]
        return Reply(text, data)

    V = Level.VIEWER
    registry.register_command("status", status, "bank, versions, link, outbox, faults", level=V)
    registry.register_command("net", net, "broker, last connect, last error", level=V)
