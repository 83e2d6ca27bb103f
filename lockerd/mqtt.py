"""MQTT plumbing shared by the daemon and lockerctl: topics, broker settings, client factory."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lockerd.config import Config
from lockerd.errors import ConfigError

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
