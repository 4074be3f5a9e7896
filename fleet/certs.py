"""A tiny PKI for a small deployment: one CA, a broker certificate, client certificates.

Real deployments bring their own PKI; this exists so a test floor (and the tests) can run the
MQTT link over TLS with a certificate per device without any other tool. Keys are ECDSA P-256
(every OpenSSL that mosquitto links against accepts it). The broker maps a client certificate's
common name to the MQTT user name (`use_identity_as_username`), and the ACL lets user `<id>`
touch only `<prefix>/device/<id>/...`; so the common name *is* the device's identity.

    <dir>/ca.crt  ca.key            the CA (keep ca.key off the broker and off devices)
    <dir>/broker.crt broker.key     server certificate (serverAuth, SANs for the broker's names)
    <dir>/<name>.crt <name>.key     client certificates (clientAuth, CN = device id or the
                                    controller's name)
    <dir>/bridge-<site>.crt .key    a site broker's bridge to the central broker (clientAuth;
                                    fleet/bridge.py; `issue_bridge`)

Private keys are PKCS#8 PEM, mode 0600, unencrypted (mosquitto and a headless agent must read
them without a person present; protect them with file permissions).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.commands import valid_device_id
from agent.errors import EdgefleetError
from agent.fsio import atomic_write
from agent.keys import write_private

CONTROLLER_NAME = "edgefleet-controller"
BRIDGE_PREFIX = "bridge-"  # site bridges' names (fleet/bridge.py)
BROKER_NAME = "broker"
DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1", "::1")

__all__ = [
    "CONTROLLER_NAME",
    "CertError",
    "CertPaths",
    "init_ca",
    "issue_bridge",
    "issue_client",
    "issue_server",
]


class CertError(EdgefleetError):
    """A certificate could not be created: missing CA, bad name, or a file in the way."""


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path
    ca: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    if path.exists():
        path.unlink()
    write_private(path, data)


def _refuse_existing(*paths: Path, force: bool) -> None:
    for p in paths:
        if p.exists() and not force:
            raise CertError(f"{p} already exists", hint="pass --force to replace it")


def init_ca(out_dir: Path, *, name: str = "edgefleet CA", days: int = 3650,
            force: bool = False) -> CertPaths:
    """Create `ca.crt` and `ca.key` (self-signed, may sign end-entity certificates only)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crt, key_path = out_dir / "ca.crt", out_dir / "ca.key"
    _refuse_existing(crt, key_path, force=force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    atomic_write(crt, cert.public_bytes(serialization.Encoding.PEM))
    return CertPaths(crt, key_path, crt)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as e:
        raise CertError(f"cannot load the CA from {ca_dir}: {e}",
                        hint="create one with: edgefleet fleet certs init --out DIR") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_dir / 'ca.key'} is not an ECDSA key")
    return cert, key


def _issue(ca_dir: Path, out_dir: Path, file_stem: str, common_name: str, *, server: bool,
           hosts: tuple[str, ...], days: int, force: bool) -> CertPaths:
    ca_cert, ca_key = _load_ca(ca_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    crt, key_path = out_dir / f"{file_stem}.crt", out_dir / f"{file_stem}.key"
    _refuse_existing(crt, key_path, force=force)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    atomic_write(crt, cert.public_bytes(serialization.Encoding.PEM))
    return CertPaths(crt, key_path, Path(ca_dir) / "ca.crt")


def issue_server(ca_dir: Path, out_dir: Path, *, hosts: tuple[str, ...] = DEFAULT_BROKER_HOSTS,
                 days: int = 825, force: bool = False) -> CertPaths:
    """`broker.crt`/`broker.key` for the MQTT broker, valid for the host names and IPs given."""
    if not hosts:
        raise CertError("a broker certificate needs at least one host name or IP address")
    return _issue(ca_dir, out_dir, BROKER_NAME, hosts[0], server=True, hosts=tuple(hosts),
                  days=days, force=force)


def issue_client(ca_dir: Path, out_dir: Path, name: str, *, days: int = 825,
                 force: bool = False, controller: bool = False) -> CertPaths:
    """`<name>.crt`/`<name>.key`, CN = `name`: a device id, or (with `controller`) the fleet
    controller's name. A device may not take the controller's name, the broker's, or a
    site bridge's (`bridge-...`: the central ACL gives those other devices' topics)."""
    if not valid_device_id(name):
        raise CertError(f"{name!r} is not a valid device id (1-64 chars of [A-Za-z0-9._-])")
    if not controller and (name in (CONTROLLER_NAME, BROKER_NAME)
                           or name.startswith(BRIDGE_PREFIX)):
        raise CertError(f"{name!r} is reserved; a device may not use it")
    return _issue(ca_dir, out_dir, name, name, server=False, hosts=(), days=days, force=force)


def issue_bridge(ca_dir: Path, out_dir: Path, site: str, *, days: int = 825,
                 force: bool = False) -> CertPaths:
    """`bridge-<site>.crt`/`.key`: the client certificate a site broker's bridge presents to the
    central broker (CN `bridge-<site>`, its MQTT user name there; see fleet/bridge.py)."""
    from fleet.bridge import bridge_name

    name = bridge_name(site)
    return _issue(ca_dir, out_dir, name, name, server=False, hosts=(), days=days, force=force)
