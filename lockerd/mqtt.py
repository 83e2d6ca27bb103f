"""MQTT plumbing shared by the daemon and lockerctl: topics, broker settings, client factory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from lockerd.config import Config
from lockerd.errors import ConfigError

# aiomqtt warns whenever more than ten publishes await their PUBACK, which the outbox's
# pipelining does by design; configure_logging keeps this logger to errors.
CLIENT_LOGGER = "lockerd.mqtt.client"


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
    def sync_request(self) -> str:
        return self.prefix + "sync/request"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def events_ack(self) -> str:
        return self.prefix + "events/ack"

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

    def client(
        self,
        *,
        clean_session: bool,
        will: aiomqtt.Will | None = None,
        timeout_s: float = 10.0,
        max_inflight: int | None = None,
    ) -> aiomqtt.Client:
        tls = None
        if self.ca_file is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file
            )
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id or None,
            username=self.username,
            password=self.password,
            clean_session=clean_session,
            will=will,
            keepalive=self.keepalive_s,
            tls_params=tls,
            timeout=timeout_s,
            max_inflight_messages=max_inflight,
            logger=logging.getLogger(CLIENT_LOGGER),
        )


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
