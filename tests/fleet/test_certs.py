"""The small PKI: a CA that signs only end-entity certificates, a broker certificate for its
host names, device certificates whose CN is the device id, keys readable by the owner only."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.certs import CONTROLLER_NAME, CertError, init_ca, issue_client, issue_server


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_device_certificate_chains_to_the_ca_and_names_the_device(tmp_path: Path):
    ca = init_ca(tmp_path)
    dev = issue_client(tmp_path, tmp_path / "devices", "box-017")
    ca_cert, cert = _cert(ca.cert), _cert(dev.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "box-017"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (ca.key, dev.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_broker_certificate_covers_its_host_names(tmp_path: Path):
    init_ca(tmp_path)
    srv = _cert(issue_server(tmp_path, tmp_path, hosts=("mqtt.floor", "10.0.0.5")).cert)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.floor"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_names_that_would_break_topics_or_take_the_controllers_rights_are_refused(
        tmp_path: Path):
    init_ca(tmp_path)
    for bad in ("box/1", "box+", "#", ""):
        with pytest.raises(CertError, match="not a valid device id"):
            issue_client(tmp_path, tmp_path, bad)
    with pytest.raises(CertError, match="reserved"):
        issue_client(tmp_path, tmp_path, CONTROLLER_NAME)
    issue_client(tmp_path, tmp_path, "box-1")
    with pytest.raises(CertError, match="already exists"):
        issue_client(tmp_path, tmp_path, "box-1")


def test_cli_init_and_issue(tmp_path: Path):
    cli = [sys.executable, "-m", "edgefleet", "fleet", "certs"]
    r = subprocess.run([*cli, "init", "--out", str(tmp_path / "pki"), "--port", "18883"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    conf = (tmp_path / "pki" / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "listener 18883" in conf
    assert "pattern read edgefleet/device/%u/cmd" in (tmp_path / "pki" / "broker" / "acl"
                                                      ).read_text()
    r = subprocess.run([*cli, "issue", "box-1", "box-2", "--ca", str(tmp_path / "pki"),
                        "--out", str(tmp_path / "dev")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dev" / "box-2.crt").exists()
    r = subprocess.run([*cli, "issue", "box-1", "--ca", str(tmp_path / "pki"),
                        "--out", str(tmp_path / "dev")], capture_output=True, text=True)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr


def _fingerprint(path: str) -> str:
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(Path(path).read_bytes()).fingerprint(
        hashes.SHA256()).hex()


def test_cli_certs_say_what_they_wrote_as_json(tmp_path: Path):
    """`-o json` on init, issue and site: one document naming every certificate written, with
    the fingerprint of the file on disk; text stays the default."""
    import json

    cli = [sys.executable, "-m", "edgefleet", "fleet", "certs"]
    pki = tmp_path / "pki"
    r = subprocess.run([*cli, "init", "--out", str(pki), "--broker-host", "mqtt.test",
                        "-o", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["controller"]["name"] == CONTROLLER_NAME
    assert doc["broker"]["hosts"] == ["mqtt.test"]
    assert doc["broker_config"] == str(pki / "broker" / "mosquitto.conf")
    for part in ("ca", "broker", "controller"):
        assert Path(doc[part]["key"]).exists()
        assert doc[part]["sha256"] == _fingerprint(doc[part]["cert"])

    r = subprocess.run([*cli, "issue", "box-1", "box-2", "--ca", str(pki), "--out",
                        str(tmp_path / "dev"), "-o", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    issued = json.loads(r.stdout)["issued"]
    assert [c["name"] for c in issued] == ["box-1", "box-2"]
    assert issued[1]["cert"] == str(tmp_path / "dev" / "box-2.crt")
    assert issued[1]["sha256"] == _fingerprint(issued[1]["cert"]) != issued[0]["sha256"]

    r = subprocess.run([*cli, "site", "fab2", "--ca", str(pki), "--out", str(tmp_path / "fab2"),
                        "--central-host", "mqtt.test", "--device", "box-1", "-o", "json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bridge"]["name"] == "bridge-fab2" and doc["bridge"]["devices"] == ["box-1"]
    assert doc["central_acl_updated"] is True
    assert "bridge-fab2" in Path(doc["central_acl"]).read_text()
    assert doc["bridge"]["sha256"] == _fingerprint(doc["bridge"]["cert"])

    r = subprocess.run([*cli, "issue", "box-3", "--ca", str(pki), "--out", str(tmp_path / "dev"),
                        "-o", "yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "text or json" in r.stderr
    assert not (tmp_path / "dev" / "box-3.crt").exists()
