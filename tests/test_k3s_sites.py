"""What k3s/ ships for sites, checked against the code that renders it and the real programs
it configures:

- the site broker's configuration in the site overlay is broker/'s templates rendered by
  fleet/bridge.py for the pod's paths, and the central overlay's ACL is the base ACL plus the
  example site's bridge block; a real mosquitto loads the site configuration;
- the site overlay's Sites parts render with kustomize (kubectl's) into what the agents need:
  the site broker, the artifact cache with its fixed address, and the agents' alias for it.

Regenerate the rendered files after changing broker/ or fleet/bridge.py with
`EDGEFLEET_RENDER_K3S=1 pytest tests/test_k3s_sites.py -k rendered`.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fleet.bridge import Bridge, render_bridge_acl, render_site_broker_k3s
from fleet.transport import render_acl
from tests.conftest import REPO

K3S = REPO / "k3s"
SITE = K3S / "overlays" / "site-example"
CENTRAL = K3S / "overlays" / "central"
# SITE / CENTRAL values of the example: the site's name and the central broker's.
EXAMPLE_BRIDGE = Bridge("fab1", "mqtt.central.example", 8883, ca_file=Path("ca.crt"),
                        cert_file=Path("bridge.crt"), key_file=Path("bridge.key"))
HEADER = ("# SITE: the example site fab1, bridged to mqtt.central.example; do not edit:\n"
          "# tests/test_k3s_sites.py regenerates it (EDGEFLEET_RENDER_K3S=1).\n")


def _expected() -> dict[Path, str]:
    site = render_site_broker_k3s(EXAMPLE_BRIDGE)
    return {
        SITE / "site-broker" / "mosquitto.conf": HEADER + site["mosquitto.conf"],
        SITE / "site-broker" / "acl": site["acl"],
        CENTRAL / "mosquitto-acl": render_acl() + render_bridge_acl(EXAMPLE_BRIDGE),
    }


def test_rendered_site_files_match_the_templates():
    expected = _expected()
    if os.environ.get("EDGEFLEET_RENDER_K3S") == "1":
        for path, text in expected.items():
            path.write_text(text)
    for path, text in expected.items():
        assert path.read_text() == text, (
            f"{path.relative_to(REPO)} differs from what fleet/bridge.py renders: regenerate "
            "it with EDGEFLEET_RENDER_K3S=1 pytest tests/test_k3s_sites.py -k rendered")


def test_a_real_mosquitto_loads_the_site_broker_config(tmp_path: Path):
    """The shipped site configuration with its paths pointed at real files: mosquitto parses
    it (bridge section included) and listens."""
    from fleet.certs import issue_bridge
    from tests.broker_fixtures import PKI, free_port, mosquitto_binary
    from tests.deploy_helpers import wait_for

    pki = PKI.create(tmp_path / "pki")
    bridge = issue_bridge(pki.dir, tmp_path, "fab1")
    port = free_port()
    text = (SITE / "site-broker" / "mosquitto.conf").read_text()
    for old, new in {"/mosquitto/config/acl": str(SITE / "site-broker" / "acl"),
                     "listener 8883 0.0.0.0": f"listener {port} 127.0.0.1",
                     "/mosquitto/certs/ca.crt": str(pki.ca.cert),
                     "/mosquitto/certs/broker.crt": str(pki.server.cert),
                     "/mosquitto/certs/broker.key": str(pki.server.key),
                     "/mosquitto/certs/bridge.crt": str(bridge.cert),
                     "/mosquitto/certs/bridge.key": str(bridge.key),
                     "/mosquitto/data/": f"{tmp_path}/",
                     "user mosquitto": f"user {getpass.getuser()}"}.items():
        assert old in text, old
        text = text.replace(old, new)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        import socket

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for("the site broker to listen", listening, 15,
                 lambda: None if proc.poll() is None else log.read_text())
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_site_overlay_renders_the_site_parts():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (scripts/system-deps.sh installs it)",
                    pytrace=False)
    out = subprocess.run([kubectl, "kustomize", str(SITE)], capture_output=True, text=True,
                         check=True).stdout
    import yaml

    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    assert docs[("Deployment", "site-broker")]["metadata"]["namespace"] == "edgefleet"
    cache_ip = docs[("Service", "artifact-cache")]["spec"]["clusterIP"]
    agent = docs[("DaemonSet", "edgefleet-agent")]["spec"]["template"]["spec"]
    assert agent["hostAliases"] == [{"ip": cache_ip,
                                     "hostnames": ["artifacts.edgefleet.internal"]}]
    cms = {name for kind, name in docs if kind == "ConfigMap"}
    assert any(n.startswith("site-broker-config") for n in cms)
    assert any(n.startswith("artifact-cache-nginx") for n in cms)
    egress = docs[("NetworkPolicy", "edgefleet-agent")]["spec"]["egress"]
    assert any("site-broker" in str(rule) and "artifact-cache" in str(rule) for rule in egress)
    central = subprocess.run([kubectl, "kustomize", str(CENTRAL)], capture_output=True,
                             text=True, check=True).stdout
    cm = next(d for d in yaml.safe_load_all(central)
              if d and d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
                  "mosquitto-config"))
    assert cm["data"]["acl"] == (CENTRAL / "mosquitto-acl").read_text()
