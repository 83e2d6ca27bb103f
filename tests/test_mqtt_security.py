"""Broker credentials and TLS (CA file, client certificate) from the config, against a real
Mosquitto with a TLS listener that requires a client certificate and a password."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker
from conftest import running, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lockerd.cli.lockerctl_cmd import main as lockerctl
from lockerd.dev.provision import BankKit

pytestmark = pytest.mark.e2e


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, ip: str | None = None
          ) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, Path]:
    files = {n: d / f"{n}.pem" for n in ("ca", "server", "server_key", "client", "client_key")}
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("lockerd test CA", ca_key, "lockerd test CA", ca_key, ca=True)
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["server"].write_bytes(_cert("broker", server_key, "lockerd test CA", ca_key, ca=False,
                                      ip="127.0.0.1").public_bytes(serialization.Encoding.PEM))
    files["client"].write_bytes(_cert("L1", client_key, "lockerd test CA", ca_key,
                                      ca=False).public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, files["server_key"])
    _write_key(client_key, files["client_key"])
    return files


@pytest.fixture
def secure(bank_dir: Path) -> Iterator[tuple[Broker, dict[str, Path]]]:
    d = bank_dir / "pki"
    d.mkdir()
    pki = make_pki(d)
    passwd = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "locker-L1", "s3cret"],
                   check=True, capture_output=True)
    (d / "password").write_text("s3cret\n")
    (d / "wrong").write_text("guess\n")
    broker = Broker(d, anonymous=False, extra_config="\n".join([
        f"cafile {pki['ca']}", f"certfile {pki['server']}", f"keyfile {pki['server_key']}",
        "require_certificate true", f"password_file {passwd}"]))
    broker.start()
    yield broker, {**pki, "password": d / "password", "wrong": d / "wrong"}
    broker.stop()


def tls_overrides(broker: Broker, files: dict[str, Path], password: str) -> dict[str, Any]:
    return {"mqtt": {
        "host": broker.host, "port": broker.port, "username": "locker-L1",
        "password_file": str(files[password]), "reconnect_min_s": 0.05, "reconnect_max_s": 0.3,
        "tls": {"ca_file": str(files["ca"]), "cert_file": str(files["client"]),
                "key_file": str(files["client_key"])}}}


async def test_tls_with_client_certificate_and_password(
    make_kit: Callable[..., BankKit], secure: tuple[Broker, dict[str, Path]]
) -> None:
    broker, files = secure
    kit = make_kit([], import_files=False, overrides=tls_overrides(broker, files, "password"))
    async with running(kit) as r:
        assert r.app.link is not None
        await wait_until(lambda: r.app.link.status.connected, what="TLS connect")  # type: ignore[union-attr]
        keyring = kit.directory / "keyring2.json"
        keyring.write_bytes(kit.keyring(version=2))
        status = await asyncio.to_thread(lockerctl, [
            "publish", "--broker", broker.address, "--locker", "L1", "--username", "locker-L1",
            "--password-file", str(files["password"]), "--ca-file", str(files["ca"]),
            "--cert-file", str(files["client"]), "--key-file", str(files["client_key"]),
            str(keyring)])
        assert status == 0
        await wait_until(lambda: r.app.cache.keyring_version == 2, what="keyring over TLS")


async def test_wrong_password_is_reported_and_the_bank_works_offline(
    make_kit: Callable[..., BankKit], secure: tuple[Broker, dict[str, Path]]
) -> None:
    broker, files = secure
    kit = make_kit([], import_files=False, overrides=tls_overrides(broker, files, "wrong"))
    async with running(kit) as r:
        assert r.app.link is not None
        await wait_until(lambda: bool(r.app.link.status.last_error), what="a link error")  # type: ignore[union-attr]
        assert not r.app.link.status.connected
        assert "authori" in r.app.link.status.last_error.lower()
        r.world.force_door("2")  # the rest of the daemon goes on regardless
        await r.wait_event("door.forced")


async def test_plain_tcp_to_a_tls_listener_fails_without_hurting_the_daemon(
    make_kit: Callable[..., BankKit], secure: tuple[Broker, dict[str, Path]]
) -> None:
    broker, _ = secure
    kit = make_kit([], import_files=False, overrides={"mqtt": {
        "host": broker.host, "port": broker.port, "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3}})
    async with running(kit) as r:
        assert r.app.link is not None
        # The TLS listener resets the plain connection; the connect attempt times out.
        await wait_until(lambda: r.app.link.status.last_error != "", timeout=20,  # type: ignore[union-attr]
                         what="an error")
        assert not r.app.link.status.connected


def test_missing_password_file_is_a_config_error(make_kit: Callable[..., BankKit],
                                                 tmp_path: Path) -> None:
    from lockerd.app import build_app
    from lockerd.config import load_config
    from lockerd.errors import ConfigError

    kit = make_kit([], overrides={"mqtt": {"host": "127.0.0.1",
                                           "password_file": str(tmp_path / "absent")}})
    with pytest.raises(ConfigError, match=r"\[mqtt\] password_file: cannot read"):
        build_app(load_config(kit.config_path))
