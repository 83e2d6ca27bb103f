"""MQTT plumbing shared by the daemon and lockerctl: topics, broker settings, client factory."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt_client
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lockerd.config import Config
from lockerd.errors import ConfigError
from lockerd.logs import get_logger

log = get_logger("lockerd.mqtt")

# aiomqtt warns whenever more than ten publishes await their PUBACK, which the outbox's
# pipelining does by design; configure_logging keeps this logger to errors.
CLIENT_LOGGER = "lockerd.mqtt.client"

# The broker keeps the daemon's session (subscriptions, queued QoS 1 messages) this long after
# the link drops. MQTT 5 ends a session at disconnect unless the interval is above zero.
SESSION_EXPIRY_S = 7 * 24 * 3600
# Room for the fixed header, topic, packet id and properties around a payload.
PACKET_OVERHEAD = 4096
MQTT_MAX_PACKET = 268_435_455  # the largest packet MQTT can express


@dataclass(frozen=True)
class Topics:
    """The topics of one bank (PROTOCOL section 5) under its prefix, `lockers/<id>/` by default."""

    prefix: str

    @classmethod
    def for_locker(cls, locker_id: str, prefix: str = "") -> Topics:
        return cls(prefix or f"lockers/{locker_id}/")

    @property
    def keyring(self) -> str:
        return self.prefix + "keyring"

    @property
    def codes(self) -> str:
        return self.prefix + "codes"

    @property
    def codes_manifest(self) -> str:
        """The signed manifest of a snapshot in parts (retained, like a snapshot bundle)."""
        return self.prefix + "codes/manifest"

    @property
    def codes_part(self) -> str:
        """The parts of the snapshot a manifest names, every part on this one topic."""
        return self.prefix + "codes/part"

    @property
    def sync_request(self) -> str:
        return self.prefix + "sync/request"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def events_ack(self) -> str:
        return self.prefix + "events/ack"

    @property
    def events_resend(self) -> str:
        return self.prefix + "events/resend"

    @property
    def cmd(self) -> str:
        return self.prefix + "cmd"

    @property
    def cmd_result(self) -> str:
        return self.prefix + "cmd/result"

    @property
    def state(self) -> str:
        return self.prefix + "state"

    @property
    def telemetry(self) -> str:
        return self.prefix + "telemetry"

    @property
    def help_reply(self) -> str:
        return self.prefix + "help/reply"


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker. The password is read from a file, never from the config."""

    host: str
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30

    def session_client(
        self,
        *,
        will: aiomqtt.Will,
        max_payload_bytes: int,
        receive_maximum: int,
        queue_type: type[asyncio.Queue[aiomqtt.Message]],
        max_inflight: int,
        timeout_s: float = 10.0,
    ) -> aiomqtt.Client:
        """The daemon's MQTT 5 client: a persistent session with flow control on what comes in.

        Clean start false plus a Session Expiry Interval keep the session across reconnects.
        Receive Maximum bounds the QoS 1 messages the broker sends before they are acknowledged,
        and messages are acknowledged by `ack` once handled, not on receipt. Maximum Packet Size
        lets the broker drop an oversize message instead of sending it.
        """
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = receive_maximum
        props.MaximumPacketSize = min(max_payload_bytes + PACKET_OVERHEAD, MQTT_MAX_PACKET)
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id or None,
            username=self.username,
            password=self.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            will=will,
            keepalive=self.keepalive_s,
            tls_params=self._tls(),
            timeout=timeout_s,
            max_inflight_messages=max_inflight,
            queue_type=queue_type,
            logger=logging.getLogger(CLIENT_LOGGER),
        )
        # aiomqtt 2.x does not expose paho's application-controlled acknowledgements yet
        # (aiomqtt issue #345); they are switched on before connecting, as that issue shows.
        client._client.manual_ack_set(True)
        bound_reads(client)
        return client

    def client(
        self,
        *,
        clean_session: bool,
        will: aiomqtt.Will | None = None,
        timeout_s: float = 10.0,
        max_inflight: int | None = None,
    ) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id or None,
            username=self.username,
            password=self.password,
            clean_session=clean_session,
            will=will,
            keepalive=self.keepalive_s,
            tls_params=self._tls(),
            timeout=timeout_s,
            max_inflight_messages=max_inflight,
            logger=logging.getLogger(CLIENT_LOGGER),
        )

    def _tls(self) -> aiomqtt.TLSParameters | None:
        if self.ca_file is None:
            return None
        return aiomqtt.TLSParameters(ca_certs=self.ca_file, certfile=self.cert_file,
                                     keyfile=self.key_file)


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge a handled QoS 1 message of a `session_client` (a no-op for QoS 0)."""
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)


def read_password(path: Path, *, where: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from exc
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{where}: {path} is empty")
    return password


def broker_from_config(config: Config) -> BrokerSettings | None:
    """The daemon's broker settings, or None when the bank runs without a broker."""
    mqtt = config.mqtt
    if mqtt is None:
        return None
    password = None
    if mqtt.password_file:
        password = read_password(config.path(mqtt.password_file),
                                 where=f"{config.source}: [mqtt] password_file")
    tls = mqtt.tls
    return BrokerSettings(
        host=mqtt.host,
        port=mqtt.port,
        client_id=mqtt.client_id or f"lockerd-{config.locker.id}",
        username=mqtt.username,
        password=password,
        ca_file=str(config.path(tls.ca_file)) if tls else None,
        cert_file=str(config.path(tls.cert_file)) if tls and tls.cert_file else None,
        key_file=str(config.path(tls.key_file)) if tls and tls.key_file else None,
        keepalive_s=mqtt.keepalive_s,
    )


# One socket-readable callback of the daemon's client reads at most this much of a packet, so
# a big message arrives over several turns of the event loop instead of in one (issue 14).
READ_SLICE_BYTES = 256 << 10


def bound_reads(client: aiomqtt.Client, *, slice_bytes: int = READ_SLICE_BYTES) -> None:
    """Make the paho client under `client` read an incoming packet in slices.

    paho's own `_packet_read` asks the socket for the whole rest of a packet on every
    receive (a buffer of that size each time), appends each piece to a growing bytearray and
    reads up to 100 pieces in one callback; its PUBLISH decoder then copies the whole
    packet once per field. A 13.6 MiB message held the loop 30 to 120 ms. This reader asks
    for at most `slice_bytes` at a time and reads no more than that per callback (the
    selector calls it again while the socket is readable), appending to the bytearray paho
    would build; a QoS 0 or 1 PUBLISH is then decoded without copying its payload, which is
    handed on as that bytearray (a `bytes`-like payload, not a `bytes`).
    """
    paho = client._client
    if not all(callable(getattr(paho, name, None))
               for name in ("_packet_read", "_handle_publish")) or not hasattr(paho, "_in_packet"):
        # Another paho than the one this was written for: its own reader, whole packets.
        log.warning("paho's client has not the packet reader lockerd bounds; big messages"
                    " are read in one piece", paho=type(paho).__module__)
        return

    def packet_read() -> MQTTErrorCode:
        return _read_slice(paho, slice_bytes)

    def handle_publish() -> MQTTErrorCode:
        return _handle_publish(paho, original)

    original = paho._handle_publish
    paho._packet_read = packet_read  # type: ignore[method-assign]
    paho._handle_publish = handle_publish  # type: ignore[method-assign]


def _varint_end(view: memoryview, at: int) -> int:
    """The length of the properties at `at`: their variable-length count and what it counts."""
    value, mult, used = 0, 1, 0
    while True:
        if at + used >= len(view) or used == 4:
            raise MalformedPacket("a PUBLISH whose properties length is cut or too long")
        byte = view[at + used]
        used += 1
        value += (byte & 127) * mult
        mult *= 128
        if byte & 128 == 0:
            return used + value


def _handle_publish(paho: mqtt_client.Client,
                    original: Callable[[], MQTTErrorCode]) -> MQTTErrorCode:
    """paho's `_handle_publish` for QoS 0 and 1, with the payload copied once out of the
    packet (paho's decoder copies the whole packet at each of its four fields: 4 x 13.6 MiB
    on the loop); QoS 2, which the daemon does not use, goes to paho's own."""
    command: int = paho._in_packet["command"]
    qos = (command & 0x06) >> 1
    if qos == 2:
        return original()
    packet: bytearray = paho._in_packet["packet"]
    view = memoryview(packet)
    try:
        if len(view) < 2:
            raise MalformedPacket("a PUBLISH shorter than its topic length")
        topic_len = int.from_bytes(view[:2], "big")
        at = 2 + topic_len
        topic = bytes(view[2:at])
        if len(topic) != topic_len:
            raise MalformedPacket("a PUBLISH shorter than its topic")
        mid = 0
        if qos:
            mid = int.from_bytes(view[at:at + 2], "big")
            at += 2
        properties = None
        if paho._protocol == mqtt_client.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            end = at + _varint_end(view, at)
            _, props_len = properties.unpack(  # type: ignore[no-untyped-call]
                bytes(view[at:end]))
            at += props_len
    finally:
        view.release()
    # The payload stays where it was read: CPython drops a bytearray's head in place.
    del packet[:at]
    payload = packet
    message = mqtt_client.MQTTMessage(mid=mid, topic=topic)
    message.dup = (command & 0x08) != 0
    message.qos = qos
    message.retain = (command & 0x01) != 0
    message.properties = properties
    message.payload = payload
    message.timestamp = mqtt_client.time_func()
    paho._handle_on_message(message)
    if qos == 0 or paho._manual_ack:
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    return paho._send_puback(mid)


def _recv(paho: mqtt_client.Client, size: int) -> bytes | None:
    """Up to `size` bytes from the socket; None when nothing is there yet; b"" when the
    link is lost."""
    sock = paho._sock
    if sock is None:
        return b""
    try:
        return sock.recv(size)
    except (BlockingIOError, ssl.SSLWantReadError):
        return None
    except ssl.SSLWantWriteError:
        paho._call_socket_register_write()
        return None
    except OSError:
        return b""


def _read_header(paho: mqtt_client.Client) -> MQTTErrorCode | None:
    """The packet's command byte and remaining length, as paho reads them (byte by byte);
    None once both are in and the buffer for the rest is made."""
    state = paho._in_packet
    if state["command"] == 0:
        one = _recv(paho, 1)
        if not one:
            return MQTTErrorCode.MQTT_ERR_AGAIN if one is None else MQTTErrorCode.MQTT_ERR_CONN_LOST
        state["command"] = one[0]
    if state["have_remaining"] == 0:
        while True:
            one = _recv(paho, 1)
            if not one:
                return (MQTTErrorCode.MQTT_ERR_AGAIN if one is None
                        else MQTTErrorCode.MQTT_ERR_CONN_LOST)
            state["remaining_count"].append(one[0])
            if len(state["remaining_count"]) > 4:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            state["remaining_length"] += (one[0] & 127) * state["remaining_mult"]
            state["remaining_mult"] *= 128
            if one[0] & 128 == 0:
                break
        state["have_remaining"] = 1
        state["to_process"] = state["remaining_length"]
    return None


def _read_slice(paho: mqtt_client.Client, slice_bytes: int) -> MQTTErrorCode:
    if (early := _read_header(paho)) is not None:
        return early
    state = paho._in_packet
    packet: bytearray = state["packet"]
    budget = slice_bytes
    while state["to_process"] > 0:
        if budget <= 0:
            return MQTTErrorCode.MQTT_ERR_AGAIN  # the rest on a later turn
        data = _recv(paho, min(budget, state["to_process"]))
        if not data:
            return (MQTTErrorCode.MQTT_ERR_AGAIN if data is None
                    else MQTTErrorCode.MQTT_ERR_CONN_LOST)
        state["to_process"] -= len(data)
        budget -= len(data)
        packet += data
        with paho._msgtime_mutex:
            paho._last_bytes_received = mqtt_client.time_func()
    state["pos"] = 0
    try:
        rc = paho._packet_handle()
    except MalformedPacket as exc:
        paho._easy_log(mqtt_client.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
        rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
    paho._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [],
                       "remaining_mult": 1, "remaining_length": 0, "packet": bytearray(b""),
                       "to_process": 0, "pos": 0}
    with paho._msgtime_mutex:
        paho._last_bytes_received = mqtt_client.time_func()
    return rc
