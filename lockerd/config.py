"""The daemon's TOML configuration, validated at startup into typed, frozen objects."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from lockerd.errors import ConfigError
from lockerd.ids import (
    COMPARTMENT_ID_PATTERN,
    COMPARTMENT_ID_RULE,
    LOCKER_ID_PATTERN,
    LOCKER_ID_RULE,
    anchored,
)

# msgspec applies a pattern with re.search: `anchored` ends it with \Z, not `$` ("L1\n").
_LOCKER_ID = anchored(LOCKER_ID_PATTERN)
_COMPARTMENT_ID = anchored(COMPARTMENT_ID_PATTERN)
_HEX_KEY = anchored(r"[0-9a-f]{64}")
_SIZE_LABEL = anchored(r"[A-Za-z0-9]{1,8}")
# What an error says instead of the raw pattern.
_PATTERN_RULES = {
    _LOCKER_ID: LOCKER_ID_RULE,
    _COMPARTMENT_ID: COMPARTMENT_ID_RULE,
    _HEX_KEY: "64 characters of 0-9 a-f",
    _SIZE_LABEL: "1-8 characters of A-Z a-z 0-9",
}
# No setting needs more; anything deeper or bigger is refused before it reaches the schema.
MAX_NESTING = 32
_MAX_INT64 = 2**63 - 1

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
HexKey = Annotated[str, msgspec.Meta(pattern=_HEX_KEY)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every section: unknown keys are an error, not silently ignored."""


class LockerSection(_Section, kw_only=True, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=_LOCKER_ID)]
    state_dir: str
    name: str = ""


class TrustSection(_Section, kw_only=True, frozen=True):
    root_keys: Annotated[list[HexKey], msgspec.Meta(min_length=1)]
    root_threshold: Annotated[int, msgspec.Meta(ge=1)] = 1
    code_key_file: str
    keyring_file: str | None = None


class CodesSection(_Section, kw_only=True, frozen=True):
    bundle_file: str | None = None
    # Derived pickup codes (PROTOCOL section 4): off unless the backend issues them.
    derived_pickup: bool = False
    derived_digits: Annotated[int, msgspec.Meta(ge=4, le=12)] = 8
    # Support codes (PROTOCOL section 13), read out by support over the phone; derived_digits
    # long. Off unless the backend's support desk issues them.
    support_codes: bool = False
    # Most a pickup code's not_after is extended locally, in total, for the time its parcel
    # waited behind a bank that was down or a compartment out of service (PROTOCOL section 14).
    max_extension_s: Annotated[int, msgspec.Meta(ge=0)] = 259200
    # Snapshots in parts over MQTT (docs/protocol.md): what a manifest may name, and how long
    # a transfer waits for its parts. A part is also bound by [mqtt] max_payload_bytes.
    max_parts: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    max_entries: Annotated[int, msgspec.Meta(ge=1)] = 2_000_000
    max_part_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 4 * 1024 * 1024
    parts_idle_s: PositiveSeconds = 15.0
    parts_timeout_s: PositiveSeconds = 600.0
    # The disk (MiB) a snapshot being staged must leave free on the state directory's
    # filesystem, for the events: one that would take more is refused (reason no_space).
    keep_free_mb: Annotated[int, msgspec.Meta(ge=0)] = 64


SizeLabel = Annotated[str, msgspec.Meta(pattern=_SIZE_LABEL)]


class DepositsSection(_Section, kw_only=True, frozen=True):
    """[deposits]: compartment sizes, smallest first, and the courier session's idle limit."""

    sizes: Annotated[list[SizeLabel], msgspec.Meta(min_length=1, max_length=9)] = msgspec.field(
        default_factory=lambda: ["S", "M", "L"])
    session_idle_s: PositiveSeconds = 60.0


class EntrySection(_Section, kw_only=True, frozen=True):
    timeout_s: PositiveSeconds = 20.0
    max_digits: Annotated[int, msgspec.Meta(ge=4, le=64)] = 16
    stuck_key_repeats: Annotated[int, msgspec.Meta(ge=3)] = 24


class LockoutSection(_Section, kw_only=True, frozen=True):
    free_attempts: Annotated[int, msgspec.Meta(ge=1)] = 5
    base_s: PositiveSeconds = 30.0
    max_s: PositiveSeconds = 3600.0
    rejected_events_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 20


class CommandsSection(_Section, kw_only=True, frozen=True):
    """[commands]: the open budget of remote and console opens (PROTOCOL section 7)."""

    max_opens_per_hour: Annotated[int, msgspec.Meta(ge=0)] = 10


class DoorsSection(_Section, kw_only=True, frozen=True):
    pulse_s: Annotated[float, msgspec.Meta(gt=0, le=5)] = 0.5
    open_timeout_s: PositiveSeconds = 4.0
    held_open_after_s: PositiveSeconds = 120.0
    show_result_s: PositiveSeconds = 6.0
    # After a pickup's door jammed: the window for the customer's `#` (one more pulse); 0: none.
    jam_retry_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 60.0


class CompartmentSection(_Section, kw_only=True, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=_COMPARTMENT_ID)]
    size: SizeLabel = "M"  # one of [deposits] sizes


class DeviceSection(_Section, kw_only=True, frozen=True):
    backend: str
    options: dict[str, Any] = {}


class HalSection(_Section, kw_only=True, frozen=True):
    lock: DeviceSection
    door_sensor: DeviceSection
    occupancy: DeviceSection | None = None
    keypad: DeviceSection | None = None
    scanner: DeviceSection | None = None
    display: DeviceSection | None = None
    tamper: DeviceSection | None = None


class MqttTlsSection(_Section, kw_only=True, frozen=True):
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


class MqttSection(_Section, kw_only=True, frozen=True):
    host: Annotated[str, msgspec.Meta(min_length=1)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    client_id: str = ""  # default: lockerd-<locker id>
    username: str | None = None
    password_file: str | None = None
    topic_prefix: str = ""  # default: lockers/<locker id>/
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    reconnect_min_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 60.0
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 * 1024 * 1024
    tls: MqttTlsSection | None = None


class TimeSection(_Section, kw_only=True, frozen=True):
    # auto: trust the system clock only while the kernel says it is synchronised (NTP);
    # always: a real-time clock you trust; never: always apply the signed time floor.
    trust_system_clock: Literal["auto", "always", "never"] = "auto"


class OutboxSection(_Section, kw_only=True, frozen=True):
    max_events: Annotated[int, msgspec.Meta(ge=100)] = 200_000
    keep_acked: Annotated[int, msgspec.Meta(ge=0)] = 1000


class TelemetrySection(_Section, kw_only=True, frozen=True):
    interval_s: Annotated[float, msgspec.Meta(ge=1)] = 60.0


class HelpSection(_Section, kw_only=True, frozen=True):
    """[help]: help at the bank for a customer whose code never arrived (PROTOCOL section 12)."""

    support_text: Annotated[str, msgspec.Meta(min_length=1, max_length=80)] = "Call support"
    reply_timeout_s: PositiveSeconds = 20.0
    reply_valid_s: PositiveSeconds = 600.0
    max_per_hour: Annotated[int, msgspec.Meta(ge=0)] = 6
    # Off for a bank whose backend answers no help requests: `#` on an empty entry then does
    # nothing and the idle screen does not offer help.
    enabled: bool = True


class ConsoleSection(_Section, kw_only=True, frozen=True):
    """[console]: where technicians connect, and how failed logins are throttled."""

    socket: str  # relative paths are taken from [locker] state_dir
    serial_port: str | None = None
    idle_timeout_s: PositiveSeconds = 300.0
    free_attempts: Annotated[int, msgspec.Meta(ge=1)] = 5
    base_s: PositiveSeconds = 30.0
    max_s: PositiveSeconds = 3600.0


class LoggingSection(_Section, kw_only=True, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Config(_Section, kw_only=True, frozen=True):
    locker: LockerSection
    trust: TrustSection
    compartments: Annotated[list[CompartmentSection], msgspec.Meta(min_length=1)]
    hal: HalSection
    codes: CodesSection = CodesSection()
    deposits: DepositsSection = DepositsSection()
    entry: EntrySection = EntrySection()
    lockout: LockoutSection = LockoutSection()
    commands: CommandsSection = CommandsSection()
    doors: DoorsSection = DoorsSection()
    logging: LoggingSection = LoggingSection()
    mqtt: MqttSection | None = None
    time: TimeSection = TimeSection()
    console: ConsoleSection | None = None
    outbox: OutboxSection = OutboxSection()
    telemetry: TelemetrySection = TelemetrySection()
    help: HelpSection = HelpSection()
    backends: dict[str, dict[str, Any]] = {}

    # Filled in by load_config, not read from the file.
    source: str = ""

    @property
    def compartment_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.compartments)

    @property
    def compartment_sizes(self) -> dict[str, str]:
        return {c.id: c.size for c in self.compartments}

    def path(self, value: str) -> Path:
        """A path from the file, relative paths taken from the file's own directory."""
        p = Path(value).expanduser()
        if p.is_absolute() or not self.source:
            return p
        return Path(self.source).resolve().parent / p

    @property
    def topic_prefix(self) -> str:
        if self.mqtt is not None and self.mqtt.topic_prefix:
            return self.mqtt.topic_prefix
        return f"lockers/{self.locker.id}/"

    @property
    def state_dir(self) -> Path:
        return self.path(self.locker.state_dir)


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; a problem raises ConfigError naming file and key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration file: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: the file is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    except ValueError as exc:
        # tomllib's int() refuses an integer of thousands of digits with a plain ValueError.
        what = "an integer has far too many digits" if "digits" in str(exc) else str(exc)
        raise ConfigError(f"{p}: not valid TOML: {what}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{p}: not valid TOML: arrays or tables are nested too deeply") from exc
    return parse_config(data, source=str(p))


def parse_config(data: dict[str, Any], *, source: str = "<config>") -> Config:
    """Validate an already parsed TOML document."""
    if "source" in data:
        raise ConfigError(f"{source}: unknown key 'source' at the top level")
    _check_values(data, source)
    try:
        config = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc, data)}") from exc
    config = msgspec.structs.replace(config, source=source)
    _check_consistency(config, source)
    return config


def _check_consistency(config: Config, source: str) -> None:
    ids = config.compartment_ids
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{source}: [[compartments]] id {dupes[0]!r} is listed more than once")
    if config.trust.root_threshold > len(set(config.trust.root_keys)):
        raise ConfigError(
            f"{source}: [trust] root_threshold is {config.trust.root_threshold} but only "
            f"{len(set(config.trust.root_keys))} distinct root_keys are given"
        )
    sizes = config.deposits.sizes
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"{source}: [deposits] sizes lists a size twice: {sizes}")
    for comp in config.compartments:
        if comp.size not in sizes:
            raise ConfigError(
                f"{source}: [[compartments]] id {comp.id!r}: size {comp.size!r} is not one of "
                f"[deposits] sizes {sizes} (list the sizes smallest first there)")
    if config.lockout.max_s < config.lockout.base_s:
        raise ConfigError(f"{source}: [lockout] max_s must not be smaller than base_s")
    mqtt = config.mqtt
    if mqtt is not None:
        if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
            raise ConfigError(
                f"{source}: [mqtt] reconnect_max_s must not be smaller than reconnect_min_s")
        if mqtt.tls is not None and (mqtt.tls.cert_file is None) != (mqtt.tls.key_file is None):
            raise ConfigError(
                f"{source}: [mqtt.tls] cert_file and key_file go together (a client certificate "
                "needs its key)")
        if mqtt.topic_prefix and not mqtt.topic_prefix.endswith("/"):
            raise ConfigError(f"{source}: [mqtt] topic_prefix must end with '/'")
        if any(c in mqtt.topic_prefix for c in "#+"):
            raise ConfigError(f"{source}: [mqtt] topic_prefix must not contain '#' or '+'")


def _check_values(data: dict[str, Any], source: str) -> None:
    """Refuse what no setting can mean, anywhere in the file (backend tables included):
    inf and nan, integers beyond 64 bits, nesting deeper than MAX_NESTING."""
    stack: list[tuple[list[str | int], Any]] = [([key], value) for key, value in data.items()]
    while stack:
        parts, value = stack.pop()
        problem = ""
        if isinstance(value, float) and not math.isfinite(value):
            problem = f"must be a finite number, not {value}"
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_INT64:
            problem = "integer out of range (it must fit in 64 bits)"
        elif isinstance(value, dict | list) and len(parts) > MAX_NESTING:
            # Named by the key that holds the whole nest, not by thirty-odd indexes.
            first_index = next((i for i, p in enumerate(parts) if isinstance(p, int)), 2)
            parts = parts[:max(1, first_index)]
            problem = f"nested more than {MAX_NESTING} levels deep"
        if problem:
            raise ConfigError(f"{source}: {_where(parts)}: {problem}")
        if isinstance(value, dict):
            stack.extend(([*parts, str(k)], v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(([*parts, i], v) for i, v in enumerate(value))


def _where(parts: list[str | int]) -> str:
    """["doors", "pulse_s"] -> "[doors] 'pulse_s'"; list indexes count from 1 ("#2")."""
    section = ""
    for part in parts[:-1]:
        if isinstance(part, int):
            section += f" #{part + 1}"
        else:
            section += f".{part}" if section else part
    last = parts[-1]
    key = f"item {last + 1}" if isinstance(last, int) else repr(last)
    return f"[{section}] {key}" if section else key


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _explain(exc: msgspec.ValidationError, data: dict[str, Any]) -> str:
    """Turn msgspec's message and JSON path into '[section] key: what is wrong'."""
    msg = str(exc)
    m = _PATH.search(msg)
    text = msg[: m.start()] if m else msg
    path = m.group("path") if m else ""
    parts = [p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    missing = re.match(r"Object missing required field `(?P<key>[^`]+)`", text)
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", text)
    pattern = re.fullmatch(r"Expected `str` matching regex (?P<re>'.*')", text)
    key = None
    if pattern:
        rule = {repr(p): r for p, r in _PATTERN_RULES.items()}.get(pattern.group("re"))
        text = f"must be {rule}" if rule else "is not in the allowed form"
    if unknown and _is_table(data, [*parts, unknown.group("key")]):
        section = ".".join([_section_name(parts, data), unknown.group("key")]).lstrip(".")
        return f"unknown section [{section}] (check the spelling; see config/lockerd.example.toml)"
    if missing:
        key = missing.group("key")
        text = "missing required key"
    elif unknown:
        key = unknown.group("key")
        text = "unknown key (check the spelling; see config/lockerd.example.toml)"
    elif parts:
        key = parts.pop()
    section = _section_name(parts, data)
    where = f"[{section}] " if section else ""
    if key is None:
        return f"{where}{text}"
    if key.isdigit():
        return f"{where}item {int(key) + 1}: {text}"
    return f"{where}{key!r}: {text}"


def _is_table(data: dict[str, Any], parts: list[str]) -> bool:
    """Whether the value at msgspec's path is a table (or an array of tables): a section."""
    node: Any = data
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    if isinstance(node, list):
        return bool(node) and all(isinstance(item, dict) for item in node)
    return isinstance(node, dict)


def _section_name(parts: list[str], data: dict[str, Any]) -> str:
    names: list[str] = []
    for part in parts:
        if part.isdigit():
            names[-1] = f"{names[-1]} #{int(part) + 1}" if names else f"#{int(part) + 1}"
        else:
            names.append(part)
    return ".".join(names)
