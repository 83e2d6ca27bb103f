"""The MQTT session's bounded inbox: oversize payloads refused at receipt, its length capped."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiomqtt

# QoS 1 messages held unacknowledged at once: the Receive Maximum the daemon announces, so the
# broker never sends more before the daemon has handled (and only then acknowledged) them.
WINDOW = 8
# Room kept for QoS 0 messages (no flow control applies to them; they are dropped beyond it).
QOS0_ROOM = WINDOW
# A broker that ignores the Receive Maximum (Mosquitto 2.0.11 sends more each time the daemon
# publishes) is not followed: QoS 1 messages beyond this are left unacknowledged.
QOS1_CAP = 2 * WINDOW


@dataclass
class InboxCounts:
    """What the inbox refused or dropped, for telemetry and the console."""

    refused_too_large: int = 0
    dropped_qos0: int = 0
    deferred: int = 0  # QoS 1 messages left unacknowledged for the broker to send again
    awaiting_redelivery: int = 0  # of those, the ones of the current connection
    peak: int = 0  # the most messages one queue has held


class Refused(aiomqtt.Message):
    """Stands in for a message whose payload was over the limit: topic and size, no payload.

    It keeps its place (and its QoS 1 slot) in the queue, so the refusal is evented and the
    message acknowledged in order, without the payload being kept in memory.
    """

    def __init__(self, message: aiomqtt.Message, size: int) -> None:
        super().__init__(message.topic, b"", message.qos, message.retain, message.mid,
                         message.properties)
        self.size = size


class Inbox(asyncio.Queue[aiomqtt.Message]):
    """A queue that applies the receipt rules in `put_nowait`, so nothing big is buffered.

    QoS 1 messages are bounded by the Receive Maximum (WINDOW), since they are acknowledged
    only once handled; one finding QOS1_CAP queued all the same is not queued and not
    acknowledged (the link reconnects later and the broker delivers it again). A QoS 0 message
    finding QOS0_ROOM queued is dropped. A payload over `max_payload` is replaced by a
    `Refused` marker. All three are counted.
    aiomqtt builds its incoming queue with `queue_type(maxsize=...)`: `factory` gives it one.
    """

    def __init__(self, maxsize: int = 0, *, max_payload: int, counts: InboxCounts) -> None:
        super().__init__(maxsize)
        self._max_payload = max_payload
        self.counts = counts

    @classmethod
    def factory(cls, *, max_payload: int, counts: InboxCounts) -> type[Inbox]:
        """A subclass bound to these limits, for aiomqtt's `queue_type` argument."""

        class BoundInbox(cls):  # type: ignore[valid-type,misc]
            def __init__(self, maxsize: int = 0) -> None:
                super().__init__(maxsize, max_payload=max_payload, counts=counts)

        return BoundInbox

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if not isinstance(item, Refused):
            size = _size(item.payload)
            if size > self._max_payload:
                self.counts.refused_too_large += 1
                item = Refused(item, size)
        if item.qos == 0 and self.qsize() >= QOS0_ROOM:
            self.counts.dropped_qos0 += 1
            return
        if item.qos > 0 and self.qsize() >= QOS1_CAP:
            self.counts.deferred += 1
            self.counts.awaiting_redelivery += 1
            return
        super().put_nowait(item)
        self.counts.peak = max(self.counts.peak, self.qsize())


def _size(payload: object) -> int:
    return len(payload) if isinstance(payload, bytes | bytearray | str) else 0
