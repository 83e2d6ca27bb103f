"""The daemon's MQTT client reads a big packet in slices and hands its payload on uncopied."""

from __future__ import annotations

import asyncio
import os

import aiomqtt
from broker import Broker
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lockerd.mqtt import BrokerSettings, ack, bound_reads


async def _receive(broker: Broker, payload: bytes, *, qos: int,
                   slice_bytes: int) -> tuple[aiomqtt.Message, int]:
    """One message published by a plain client, received by a `session_client`; and how many
    times paho was told the socket was readable meanwhile."""
    settings = BrokerSettings(host=broker.host, port=broker.port, client_id="reader-test")
    client = settings.session_client(
        will=aiomqtt.Will("t/will", b"gone"), max_payload_bytes=len(payload) + 1024,
        receive_maximum=4, queue_type=asyncio.Queue, max_inflight=4)
    bound_reads(client, slice_bytes=slice_bytes)
    reads = 0
    paho_read = client._client.loop_read

    def counted(max_packets: int = 1) -> MQTTErrorCode:
        nonlocal reads
        reads += 1
        return paho_read(max_packets)

    client._client.loop_read = counted  # type: ignore[method-assign]
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("k", "v")]
    props.MessageExpiryInterval = 60
    async with client:
        await client.subscribe("t/big", qos=qos)
        async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5,
                                  identifier="reader-pub") as sender:
            await sender.publish("t/big", payload, qos=qos, properties=props)
        async for message in client.messages:
            ack(client, message)
            return message, reads
    raise AssertionError("no message")


async def test_a_big_message_arrives_whole_over_many_reads(broker: Broker) -> None:
    payload = os.urandom(3 << 20)
    message, reads = await _receive(broker, payload, qos=1, slice_bytes=64 << 10)
    assert message.payload == payload
    assert isinstance(message.payload, bytearray)  # not copied out of the packet
    assert message.topic.matches("t/big") and message.qos == 1
    assert message.properties is not None
    assert message.properties.UserProperty == [("k", "v")]
    assert reads >= (3 << 20) // (64 << 10)  # at most one slice per readable callback


async def test_small_and_qos0_messages_decode_as_paho_does(broker: Broker) -> None:
    for payload in (b"", b"x", b"{\"a\": 1}" * 100):
        message, _ = await _receive(broker, payload, qos=0, slice_bytes=4)
        assert bytes(message.payload) == payload
        assert message.qos == 0 and message.topic.value == "t/big"


class _OtherPaho:
    """A paho client without the private reader `bound_reads` replaces (another release)."""

    def loop_read(self, max_packets: int = 1) -> int:
        return 0


class _ClientOf:
    def __init__(self) -> None:
        self._client = _OtherPaho()


def test_a_paho_without_the_reader_is_left_as_it_is() -> None:
    client = _ClientOf()
    bound_reads(client)  # type: ignore[arg-type]
    assert not hasattr(client._client, "_packet_read")
    assert not hasattr(client._client, "_handle_publish")
