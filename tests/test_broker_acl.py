"""The shipped broker access control (config/mosquitto/) against a real Mosquitto: only the
backend's user writes what a bank reads, each bank writes only its own outputs and reads only
its own inputs, anonymous clients are refused; with the ACL file and with dynamic security."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import Broker, free_port
from conftest import running, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from test_mqtt_security import make_pki

from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import BankKit

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "mosquitto"
ACL = SHIPPED / "acl"
DYNSEC_SCRIPT = SHIPPED / "lockerd-dynsec.sh"
USERS = ("backend", "L1", "L2")
TO_BANK = ("keyring", "codes", "codes/manifest", "codes/part", "events/ack", "events/resend",
           "cmd", "help/reply")
FROM_BANK = ("sync/request", "events", "cmd/result", "state", "telemetry")
NOT_AUTHORIZED = 0x87
ACCEPTED = {0x00, 0x10}  # Success; No matching subscribers (the publish was allowed)
WAIT_S = 10.0


def password(user: str) -> str:
    return f"pw-{user}"


def dynsec_plugin() -> Path:
    """The plugin's .so: its directory depends on the architecture (Debian multiarch)."""
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")) + sorted(
        Path("/usr/lib").glob("mosquitto_dynamic_security.so"))
    if not found:
        raise RuntimeError("mosquitto_dynamic_security.so not found: `dpkg -L mosquitto`")
    return found[0]


def make_password_file(d: Path) -> Path:
    passwd = d / "passwd"
    for user in USERS:
        create = [] if passwd.exists() else ["-c"]
        subprocess.run(["mosquitto_passwd", "-b", *create, str(passwd), user, password(user)],
                       check=True, capture_output=True)
    return passwd


def acl_broker(d: Path) -> Broker:
    passwd = make_password_file(d)
    return Broker(d, anonymous=False, extra_config=f"password_file {passwd}\nacl_file {ACL}")


def dynsec_script(broker: Broker, d: Path, *args: str, ca_file: Path | None = None) -> None:
    """Run the shipped lockerd-dynsec.sh against `broker` as its admin."""
    (d / "new-password").write_text("pw-" + (args[1] if len(args) > 1 else "backend") + "\n")
    tls = f" --cafile {ca_file}" if ca_file else ""
    env = {**os.environ, "PASSWORD_FILE": str(d / "new-password"),
           "CTRL_OPTS": f"-h {broker.host} -p {broker.port} -u admin -P pw-admin{tls}"}
    subprocess.run(["sh", str(DYNSEC_SCRIPT), *args], env=env, check=True, capture_output=True,
                   timeout=60)


def dynsec_broker(d: Path) -> Broker:
    config = dynsec_init(d)
    return Broker(d, anonymous=False, extra_config="\n".join([
        f"plugin {dynsec_plugin()}", f"plugin_opt_config_file {config}"]))


def dynsec_init(d: Path) -> Path:
    config = d / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(config), "admin", "pw-admin"],
                   check=True, capture_output=True)
    return config


def provision_dynsec(broker: Broker, d: Path, ca_file: Path | None = None) -> None:
    dynsec_script(broker, d, "init", ca_file=ca_file)
    dynsec_script(broker, d, "add-bank", "L1", ca_file=ca_file)
    dynsec_script(broker, d, "add-bank", "L2", ca_file=ca_file)


# Module-wide brokers: no test changes their users or rules, and clients start with a clean
# session, so a test sees of the others at most a retained message (which no test relies on).
@pytest.fixture(scope="module")
def acl_guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto guarded by the shipped ACL file, with the users `backend`, `L1` and `L2`."""
    broker = acl_broker(tmp_path_factory.mktemp("acl"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def dynsec_guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Mosquitto whose dynamic security plugin was set up by the shipped script, with the
    same users."""
    d = tmp_path_factory.mktemp("dynsec")
    broker = dynsec_broker(d)
    broker.start()
    provision_dynsec(broker, d)
    yield broker
    broker.stop()


@pytest.fixture(params=["acl_file", "dynsec"])
def guarded(request: pytest.FixtureRequest) -> Broker:
    name = "acl_guarded" if request.param == "acl_file" else "dynsec_guarded"
    broker: Broker = request.getfixturevalue(name)
    return broker


class Peer:
    """One paho client in its own network thread: what it received, and the reason codes the
    broker answered its publishes and subscriptions with."""

    def __init__(self, broker: Broker, user: str | None, *, v5: bool = True,
                 ca_file: Path | None = None, client_id: str | None = None,
                 port: int | None = None) -> None:
        self.user = user
        self.v5 = v5
        self.received: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._acks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        self._connack: int | None = None
        self.disconnects = 0
        if client_id is None:
            # A bank as the daemon connects (dynamic security ties the user to this id); any
            # other client with an id of its own, so two of them never take each other over.
            client_id = (f"lockerd-{user}" if user in USERS[1:]
                         else f"test-{user or 'anonymous'}-{id(self):x}")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if user is not None:
            self.client.username_pw_set(user, password(user))
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.broker = broker
        self.port = port or broker.port

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason: ReasonCode, properties: object) -> None:
        with self._cond:
            self._connack = reason.value
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason: ReasonCode, properties: object) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason: ReasonCode, properties: object) -> None:
        with self._cond:
            self._acks[mid] = reason.value
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reasons: list[ReasonCode], properties: object) -> None:
        with self._cond:
            self._subacks[mid] = [r.value for r in reasons]
            self._cond.notify_all()

    def _wait(self, cond: Callable[[], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(cond, timeout=WAIT_S):
                raise AssertionError(f"{self.user}: timed out waiting for {what}")

    def connect(self) -> int:
        """Connect; the CONNACK's reason code (0 when accepted)."""
        self.client.connect(self.broker.host, self.port)
        self.client.loop_start()
        self._wait(lambda: self._connack is not None, "CONNACK")
        assert self._connack is not None
        return self._connack

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's reason code per topic (>= 0x80 is refused)."""
        rc, mid = self.client.subscribe([(t, 1) for t in topics])
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        self._wait(lambda: mid in self._subacks, "SUBACK")
        return self._subacks[mid]

    def publish(self, topic: str, payload: bytes | str) -> int:
        """Publish at QoS 1 and wait for the PUBACK; its reason code (MQTT 5 only: 0 with
        MQTT 3.1.1, where the broker drops a refused publish without saying so)."""
        info = self.client.publish(topic, payload, qos=1)
        self._wait(lambda: info.mid in self._acks, f"PUBACK of {topic}")
        return self._acks[info.mid]

    def wait_for(self, topic: str, payload: bytes) -> None:
        self._wait(lambda: (topic, payload) in self.received, f"{payload!r} on {topic}")

    def wait_for_match(self, topic: str, fragment: bytes) -> None:
        self._wait(lambda: any(fragment in p for t, p in self.received if t == topic),
                   f"{fragment!r} in a message on {topic}")

    def payloads(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p in self.received if t == topic]


@pytest.fixture
def peers(guarded: Broker) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def connect(user: str | None, **kwargs: object) -> Peer:
        peer = Peer(guarded, user, **kwargs)  # type: ignore[arg-type]
        assert peer.connect() == 0, f"{user} refused"
        made.append(peer)
        return peer

    yield connect
    for peer in made:
        peer.close()


def barrier(backend: Peer, bank: Peer, topic: str) -> None:
    """Publish a marker as the backend and wait until `bank` has it. Mosquitto routes
    publishes one at a time and queues them per client in order, so anything published (and
    acknowledged) before the marker that was going to reach `bank` has reached it by then."""
    marker = f"marker-{time.monotonic_ns()}".encode()
    assert backend.publish(topic, marker) in ACCEPTED
    bank.wait_for(topic, marker)


def test_backend_ack_reaches_the_bank(peers: Callable[..., Peer]) -> None:
    l1, backend = peers("L1"), peers("backend")
    assert l1.subscribe(*(f"lockers/L1/{t}" for t in TO_BANK)) == [1] * len(TO_BANK)
    for t in TO_BANK:
        assert backend.publish(f"lockers/L1/{t}", b'{"upto_seq": 3}') in ACCEPTED
        l1.wait_for(f"lockers/L1/{t}", b'{"upto_seq": 3}')


def test_bank_outputs_reach_the_backend(peers: Callable[..., Peer]) -> None:
    backend, l1 = peers("backend"), peers("L1")
    assert backend.subscribe(*(f"lockers/+/{t}" for t in FROM_BANK)) == [1] * len(FROM_BANK)
    for t in FROM_BANK:
        assert l1.publish(f"lockers/L1/{t}", b"{}") in ACCEPTED
        backend.wait_for(f"lockers/L1/{t}", b"{}")


@pytest.mark.parametrize("forger", ["L2", "L1"])
def test_no_bank_writes_what_a_bank_reads(peers: Callable[..., Peer], forger: str) -> None:
    """Another bank's user, and L1's own: a forged ack would prune events never stored."""
    l1, backend = peers("L1"), peers("backend")
    forged = l1 if forger == "L1" else peers(forger)
    l1.subscribe(*(f"lockers/L1/{t}" for t in TO_BANK))
    for t in TO_BANK:
        topic = f"lockers/L1/{t}"
        assert forged.publish(topic, b'{"upto_seq": 1000000}') == NOT_AUTHORIZED, topic
        barrier(backend, l1, topic)
        assert b'{"upto_seq": 1000000}' not in l1.payloads(topic), topic


def test_a_refused_mqtt311_publish_is_dropped_silently(peers: Callable[..., Peer]) -> None:
    l1, backend, l2 = peers("L1"), peers("backend"), peers("L2", v5=False)
    l1.subscribe("lockers/L1/events/ack")
    assert l2.publish("lockers/L1/events/ack", b'{"upto_seq": 9}') in ACCEPTED  # no reason in 3.1.1
    barrier(backend, l1, "lockers/L1/events/ack")
    assert b'{"upto_seq": 9}' not in l1.payloads("lockers/L1/events/ack")


def test_a_bank_does_not_write_another_banks_outputs(peers: Callable[..., Peer]) -> None:
    backend, l2 = peers("backend"), peers("L2")
    backend.subscribe(*(f"lockers/+/{t}" for t in FROM_BANK))
    for t in FROM_BANK:
        assert l2.publish(f"lockers/L1/{t}", b'{"forged": true}') == NOT_AUTHORIZED, t
        assert l2.publish(f"lockers/L2/{t}", b"{}") in ACCEPTED  # its own: delivered after
        backend.wait_for(f"lockers/L2/{t}", b"{}")
        assert b'{"forged": true}' not in backend.payloads(f"lockers/L1/{t}"), t


def test_a_bank_reads_nothing_of_another_bank(peers: Callable[..., Peer]) -> None:
    l1, l2, backend = peers("L1"), peers("L2"), peers("backend")
    l1.subscribe("lockers/L1/cmd")
    # Asking for another bank's topics is refused outright, or filtered at delivery; either
    # way nothing of L2's reaches L1.
    l1.subscribe(*(f"lockers/L2/{t}" for t in (*TO_BANK, *FROM_BANK)), "lockers/#")
    for t in TO_BANK:
        assert backend.publish(f"lockers/L2/{t}", b"for L2") in ACCEPTED
    for t in FROM_BANK:
        assert l2.publish(f"lockers/L2/{t}", b"from L2") in ACCEPTED
    barrier(backend, l1, "lockers/L1/cmd")
    assert [t for t, _ in l1.received if not t.startswith("lockers/L1/")] == []


def test_a_bank_does_not_read_its_own_outputs_or_another_banks_events(
    peers: Callable[..., Peer]
) -> None:
    """Events say who opened which door: only the backend reads them."""
    l1, l2, backend = peers("L1"), peers("L2"), peers("backend")
    l2.subscribe("lockers/L2/cmd", "lockers/L1/events", "lockers/+/events")
    l1.subscribe("lockers/L1/cmd", "lockers/L1/events")
    assert l1.publish("lockers/L1/events", b'{"seq": 1}') in ACCEPTED
    barrier(backend, l2, "lockers/L2/cmd")
    barrier(backend, l1, "lockers/L1/cmd")
    assert l2.payloads("lockers/L1/events") == []
    assert l1.payloads("lockers/L1/events") == []


@pytest.mark.parametrize("v5", [True, False])
def test_anonymous_and_unknown_clients_are_refused(guarded: Broker, v5: bool) -> None:
    for user in (None, "L9"):  # L9: a name with no password on this broker
        peer = Peer(guarded, user, v5=v5)
        try:
            reason = peer.connect()
        finally:
            peer.close()
        # 0x87 Not authorized or 0x86 Bad user name or password (paho maps the 3.1.1 return
        # codes 5 and 4 to these).
        assert reason in {0x86, NOT_AUTHORIZED}, (user, reason)


def test_a_bank_cannot_take_over_another_banks_session(dynsec_guarded: Broker) -> None:
    """With dynamic security a bank's user connects only with its own client id: as
    `lockerd-L1`, L2 would disconnect L1 and drop what is queued for it."""
    for user, client_id in (("L2", "lockerd-L1"), ("L1", "lockerd-L2"), ("L1", "other")):
        peer = Peer(dynsec_guarded, user, client_id=client_id)
        try:
            assert peer.connect() in (0x86, NOT_AUTHORIZED), (user, client_id)
        finally:
            peer.close()


def test_wrong_password_is_refused(guarded: Broker) -> None:
    peer = Peer(guarded, "L1")
    peer.client.username_pw_set("L1", "guess")
    try:
        assert peer.connect() in (0x86, NOT_AUTHORIZED)
    finally:
        peer.close()


def test_dynsec_setup_denies_whatever_no_role_allows(dynsec_guarded: Broker) -> None:
    """The plugin saves its state to its file on every change: check what the script left."""
    state = json.loads((dynsec_guarded.directory / "dynamic-security.json").read_text())
    assert state["defaultACLAccess"] == {"publishClientSend": False,
                                         "publishClientReceive": False,
                                         "subscribe": False, "unsubscribe": True}
    roles = {r["rolename"]: r for r in state["roles"]}
    assert {"backend", "bank-L1", "bank-L2"} <= set(roles)
    sends = {a["topic"] for a in roles["bank-L1"]["acls"]
             if a["acltype"] == "publishClientSend" and a["allow"]}
    assert sends == {f"lockers/L1/{t}" for t in FROM_BANK}
    clients = {c["username"]: c for c in state["clients"]}
    assert [r["rolename"] for r in clients["L1"]["roles"]] == ["bank-L1"]
    assert [r["rolename"] for r in clients["backend"]["roles"]] == ["backend"]


def peer_on(broker: Broker, user: str | None) -> Peer:
    peer = Peer(broker, user)
    assert peer.connect() == 0, f"{user} refused"
    return peer


def bank_overrides(broker: Broker, password_file: Path | None) -> dict[str, dict[str, object]]:
    mqtt_section: dict[str, object] = {"host": broker.host, "port": broker.port,
                                       "reconnect_min_s": 0.05, "reconnect_max_s": 0.3}
    if password_file is not None:
        mqtt_section |= {"username": "L1", "password_file": str(password_file)}
    return {"mqtt": mqtt_section}


async def forged_ack_outcome(kit: BankKit, backend: Peer, forger: Peer) -> tuple[int, int, int]:
    """Run the daemon as bank L1; once the backend holds its events, `forger` acks them all,
    then the backend acks only the first. Returns the forged publish's reason code, the last
    seq, and how far the bank pruned once the backend's ack was applied."""
    events = "lockers/L1/events"
    assert backend.subscribe(events, "lockers/L1/state") == [1, 1]
    async with running(kit) as r:
        assert r.app.link is not None
        await asyncio.wait_for(r.app.link.subscribed.wait(), WAIT_S)
        r.world.force_door("2")
        await r.wait_event("door.forced")
        last = max(e.seq for e in r.events())

        def backend_has_all() -> bool:
            seqs = {json.loads(p)["seq"] for p in backend.payloads(events)}
            return seqs >= set(range(1, last + 1))

        await wait_until(backend_has_all, timeout=WAIT_S, what="the backend has every event")
        await asyncio.to_thread(backend.wait_for_match, "lockers/L1/state", b'"online"')
        forged = await asyncio.to_thread(forger.publish, "lockers/L1/events/ack",
                                         json.dumps({"upto_seq": last}))
        # The bank handles messages in arrival order: once the backend's ack below is applied,
        # a forged ack that got through has been applied too.
        ack = await asyncio.to_thread(backend.publish, "lockers/L1/events/ack",
                                      json.dumps({"upto_seq": 1}))
        assert ack in ACCEPTED
        await wait_until(lambda: r.app.outbox.acked_upto() >= 1, timeout=WAIT_S,
                         what="the backend's ack applied")
        pruned = r.app.outbox.acked_upto()
        # The backend's own acks keep working.
        await asyncio.to_thread(backend.publish, "lockers/L1/events/ack",
                                json.dumps({"upto_seq": last}))
        await wait_until(lambda: r.app.outbox.acked_upto() == last, timeout=WAIT_S,
                         what="the backend's full ack applied")
    return forged, last, pruned


async def test_daemon_runs_as_its_bank_user_and_a_forged_ack_prunes_nothing(
    make_kit: Callable[..., BankKit], bank_dir: Path, guarded: Broker
) -> None:
    password_file = bank_dir / "L1.password"
    password_file.write_text(password("L1") + "\n")
    kit = make_kit([], import_files=False, overrides=bank_overrides(guarded, password_file))
    backend, l2 = peer_on(guarded, "backend"), peer_on(guarded, "L2")
    try:
        forged, last, pruned = await forged_ack_outcome(kit, backend, l2)
    finally:
        backend.close()
        l2.close()
    assert forged == NOT_AUTHORIZED
    assert last >= 2
    assert pruned == 1



async def test_lockerctl_as_the_backend_serves_the_daemon(
    make_kit: Callable[..., BankKit], bank_dir: Path, guarded: Broker,
    capsys: pytest.CaptureFixture[str]
) -> None:
    for user in ("L1", "backend"):
        (bank_dir / f"{user}.password").write_text(password(user) + "\n")
    kit = make_kit([], import_files=False,
                   overrides=bank_overrides(guarded, bank_dir / "L1.password"))
    as_backend = ["--broker", guarded.address, "--locker", "L1", "--username", "backend",
                  "--password-file", str(bank_dir / "backend.password")]
    async with running(kit) as r:
        assert r.app.link is not None
        await asyncio.wait_for(r.app.link.subscribed.wait(), WAIT_S)
        keyring = kit.directory / "keyring2.json"
        keyring.write_bytes(kit.keyring(version=2))
        assert await asyncio.to_thread(lockerctl, ["publish", *as_backend, str(keyring)]) == 0
        await wait_until(lambda: r.app.cache.keyring_version == 2, timeout=WAIT_S,
                         what="the keyring lockerctl published")
        capsys.readouterr()
        assert await asyncio.to_thread(lockerctl, ["state", *as_backend]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "online"


async def test_without_access_control_a_forged_ack_prunes_events(
    make_kit: Callable[..., BankKit], broker: Broker
) -> None:
    """Why the ACL matters: on an open broker anyone's ack makes the bank drop its events."""
    kit = make_kit([], import_files=False, overrides=bank_overrides(broker, None))
    backend, anonymous = peer_on(broker, "backend"), peer_on(broker, None)
    try:
        forged, last, pruned = await forged_ack_outcome(kit, backend, anonymous)
    finally:
        backend.close()
        anonymous.close()
    assert forged in ACCEPTED
    assert pruned == last


def adapt(fragment: Path, ports: list[int], files: dict[str, Path]) -> str:
    """A shipped listener fragment as an operator would install it, with its listeners on
    loopback ports (in order) and each file it names (`files`: by the path written there)
    in this test's directory instead."""
    lines = []
    free = iter(ports)
    for line in fragment.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "listener":
            line = f"listener {next(free)} 127.0.0.1"
        elif value in files:
            line = f"{key} {files[value]}"
        elif not line.startswith("#"):
            assert "/" not in line, f"{fragment.name}: a path the test does not replace: {line}"
        lines.append(line)
    assert next(free, None) is None, f"{fragment.name}: fewer listeners than expected"
    return "\n".join(lines)


def tls_files(d: Path) -> tuple[dict[str, Path], Path]:
    pki = make_pki(d)
    return {"/etc/mosquitto/certs/ca.pem": pki["ca"],
            "/etc/mosquitto/certs/broker.pem": pki["server"],
            "/etc/mosquitto/certs/broker-key.pem": pki["server_key"]}, pki["ca"]


@dataclass
class Listeners:
    """The shipped lockerd.conf running: the banks' and the backend's listener, over TLS."""

    broker: Broker
    banks_port: int
    backend_port: int
    ca: Path
    peers: list[Peer] = field(default_factory=list)

    def connect(self, user: str | None, port: int, **kwargs: object) -> tuple[Peer, int]:
        """A client of `user` on `port`, and the CONNACK's reason code."""
        peer = Peer(self.broker, user, ca_file=self.ca, port=port, **kwargs)  # type: ignore[arg-type]
        self.peers.append(peer)
        return peer, peer.connect()


@pytest.fixture
def shipped_listeners(bank_dir: Path) -> Iterator[Listeners]:
    files, ca = tls_files(bank_dir)
    passwd = make_password_file(bank_dir)
    banks_passwd, backend_passwd = bank_dir / "banks.passwd", bank_dir / "backend.passwd"
    lines = passwd.read_text().splitlines()
    banks_passwd.write_text("".join(f"{x}\n" for x in lines if not x.startswith("backend:")))
    backend_passwd.write_text("".join(f"{x}\n" for x in lines if x.startswith("backend:")))
    files |= {"/etc/mosquitto/lockerd-banks.passwd": banks_passwd,
              "/etc/mosquitto/lockerd-backend.passwd": backend_passwd,
              "/etc/mosquitto/lockerd.acl": ACL}
    banks_port, backend_port = free_port(), free_port()
    broker = Broker(bank_dir, port=banks_port, listener=adapt(
        SHIPPED / "lockerd.conf", [banks_port, backend_port], files))
    broker.start()
    listeners = Listeners(broker, banks_port, backend_port, ca)
    yield listeners
    for peer in listeners.peers:
        peer.close()
    broker.stop()


def test_shipped_acl_fragment_gives_banks_and_backend_a_listener_each(
    shipped_listeners: Listeners
) -> None:
    on = shipped_listeners
    (l1, ok1), (l2, ok2) = on.connect("L1", on.banks_port), on.connect("L2", on.banks_port)
    backend, ok3 = on.connect("backend", on.backend_port)
    assert (ok1, ok2, ok3) == (0, 0, 0)
    assert l1.subscribe("lockers/L1/events/ack") == [1]
    assert l2.publish("lockers/L1/events/ack", b'{"upto_seq": 7}') == NOT_AUTHORIZED
    barrier(backend, l1, "lockers/L1/events/ack")
    assert b'{"upto_seq": 7}' not in l1.payloads("lockers/L1/events/ack")
    # Each listener knows only its own users; nobody gets in anonymously.
    for user, port in (("backend", on.banks_port), ("L1", on.backend_port),
                       (None, on.banks_port), (None, on.backend_port)):
        assert on.connect(user, port)[1] in (0x86, NOT_AUTHORIZED), (user, port)
    # L2 asking for L1's client id gets its own: L1 is not disconnected, and a marker sent
    # after still reaches it (had it been, the marker would come only after the disconnect
    # and a reconnect).
    l2.close()  # the L2 below would take this one's session over
    assert on.connect("L2", on.banks_port, client_id="lockerd-L1")[1] == 0
    barrier(backend, l1, "lockers/L1/events/ack")
    assert l1.disconnects == 0


async def test_daemon_through_the_shipped_listeners(
    make_kit: Callable[..., BankKit], bank_dir: Path, shipped_listeners: Listeners
) -> None:
    """The daemon over TLS on the banks' listener, where its client id is its username, and
    the backend on its own listener: events and acks flow, L2's forged ack is refused."""
    on = shipped_listeners
    password_file = bank_dir / "L1.password"
    password_file.write_text(password("L1") + "\n")
    overrides = bank_overrides(on.broker, password_file)
    overrides["mqtt"] |= {"port": on.banks_port, "tls": {"ca_file": str(on.ca)}}
    kit = make_kit([], import_files=False, overrides=overrides)
    (backend, ok1), (l2, ok2) = (on.connect("backend", on.backend_port),
                                 on.connect("L2", on.banks_port))
    assert (ok1, ok2) == (0, 0)
    forged, last, pruned = await forged_ack_outcome(kit, backend, l2)
    assert (forged, pruned) == (NOT_AUTHORIZED, 1)
    assert last >= 2


def test_shipped_dynsec_fragment_serves_tls_and_guards_the_topics(bank_dir: Path) -> None:
    files, ca = tls_files(bank_dir)
    files |= {"/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so": dynsec_plugin(),
              "/var/lib/mosquitto/dynamic-security.json": dynsec_init(bank_dir)}
    port = free_port()
    broker = Broker(bank_dir, port=port,
                    listener=adapt(SHIPPED / "lockerd-dynsec.conf", [port], files))
    broker.start()
    peers: list[Peer] = []
    try:
        provision_dynsec(broker, bank_dir, ca_file=ca)
        for user in ("L1", "backend", "L2", None):
            peers.append(Peer(broker, user, ca_file=ca))
        l1, backend, l2, anonymous = peers
        assert (l1.connect(), backend.connect(), l2.connect()) == (0, 0, 0)
        l1.subscribe("lockers/L1/events/ack")
        assert l2.publish("lockers/L1/events/ack", b'{"upto_seq": 7}') == NOT_AUTHORIZED
        barrier(backend, l1, "lockers/L1/events/ack")
        assert b'{"upto_seq": 7}' not in l1.payloads("lockers/L1/events/ack")
        assert anonymous.connect() in (0x86, NOT_AUTHORIZED)
    finally:
        for peer in peers:
            peer.close()
        broker.stop()




@pytest.mark.parametrize("user", ["L1", "L2"])
def test_only_the_bank_itself_leaves_its_will_on_state(
    peers: Callable[..., Peer], guarded: Broker, user: str
) -> None:
    """The will is the backend's word that a bank vanished; L2 cannot leave one for L1."""
    backend = peers("backend")
    backend.subscribe("lockers/L1/state")
    will = f'{{"status":"offline","by":"{user}"}}'.encode()
    vanishing = Peer(guarded, user)
    vanishing.client.will_set("lockers/L1/state", will, qos=1, retain=True)
    assert vanishing.connect() == 0  # Mosquitto checks a will's topic when it sends it
    vanishing.client.loop_stop()  # so that it does not reconnect
    # A second connection with the same client id: Mosquitto closes the first one, sending
    # its will, before it accepts this one.
    peers(user)  # connected (and its CONNACK checked) by the fixture
    try:
        if user == "L1":
            backend.wait_for("lockers/L1/state", will)
        else:
            # A publish routed after the takeover: the will, had it been sent, came first.
            barrier_state = b'{"status":"online"}'
            assert peers("L1").publish("lockers/L1/state", barrier_state) in ACCEPTED
            backend.wait_for("lockers/L1/state", barrier_state)
            assert will not in backend.payloads("lockers/L1/state")
    finally:
        vanishing.client.disconnect()
