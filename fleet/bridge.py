"""Sites: a Mosquitto broker per site, bridged to the central broker.

Each site's devices connect to their site broker (the same configuration as the central one:
broker/mosquitto-tls.conf, a certificate per device, the per-device ACL), which forwards their
state and events to the central broker and the central broker's commands for them back, over
one TLS connection with the bridge's own certificate (CN `bridge-<site>`). The controller talks
to the central broker only and does not know sites exist; a device does not either (it talks to
the broker its configuration names). When a site's link drops, the site keeps working; the
central broker queues the site's commands and the site broker its devices' events (persistent
sessions on both sides of the bridge), delivered once the link is back.

    bridge = Bridge("fab1", central_host="mqtt.central.example", central_port=8883,
                    ca_file=ca, cert_file=bridge_crt, key_file=bridge_key,
                    devices=("box-001", "box-002"))        # () = every device's topics
    render_site_broker_config(out / "broker", bridge, port=8883, tls=True,
                              ca_file=ca, cert_file=site_crt, key_file=site_key)
    add_bridge_to_acl(central / "acl", bridge)             # the central side lets it in

With `devices` listed, the bridge subscribes to exactly those devices' command topics (a site
receives only its own devices' commands) and the central ACL lets the bridge publish only their
state and events (a site broker cannot speak for another site's devices). With none, wildcards:
simpler to run, but every command crosses every site's link and a site broker is trusted for
every device id (commands stay signed and verified on the device either way).

`local_prefix`/`remote_prefix` remap the topic prefix across the link (a site that uses its own
prefix locally); by default both are the fleet's prefix. Templates: broker/bridge.template,
broker/acl-bridge.template. Command line: `edgefleet fleet certs site`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.commands import valid_device_id
from agent.errors import EdgefleetError
from agent.fsio import atomic_write
from agent.link import Topics
from fleet.broker_config import REPO_BROKER_DIR, _render, render_acl, render_broker_config
from fleet.certs import BRIDGE_PREFIX

__all__ = ["BROKER_POD_PATHS", "Bridge", "add_bridge_to_acl", "bridge_name", "k3s_bridge",
           "render_bridge", "render_bridge_acl", "render_site_broker_config",
           "render_site_broker_k3s"]


def bridge_name(site: str) -> str:
    """The bridge's client id and certificate CN for `site`: `bridge-<site>`."""
    name = BRIDGE_PREFIX + site
    if not site or not valid_device_id(name):
        raise EdgefleetError(f"{site!r} is not a valid site name (1-57 chars of [A-Za-z0-9._-])")
    return name


@dataclass(frozen=True)
class Bridge:
    """One site's link to the central broker (see the module docstring)."""

    site: str
    central_host: str
    central_port: int
    ca_file: Path  # the CA that signed the central broker's certificate
    cert_file: Path  # the bridge's client certificate (CN bridge-<site>)
    key_file: Path
    devices: tuple[str, ...] = ()  # the site's device ids; () = every device (wildcards)
    local_prefix: str = "edgefleet"
    remote_prefix: str = "edgefleet"
    restart_timeout: str = "2 30"  # seconds to the first reconnect, backoff cap
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        bridge_name(self.site)
        Topics(self.local_prefix)
        Topics(self.remote_prefix)
        bad = [d for d in self.devices if not valid_device_id(d)]
        if bad:
            raise EdgefleetError(f"not valid device ids: {', '.join(map(repr, bad[:5]))}")

    @property
    def client_id(self) -> str:
        return bridge_name(self.site)

    def _ids(self) -> tuple[str, ...]:
        return self.devices or ("+",)


def render_bridge(bridge: Bridge, template_dir: Path = REPO_BROKER_DIR) -> str:
    """The site broker's `connection` section (broker/bridge.template)."""
    b = bridge
    topics = [f"topic device/{d}/{kind} {direction} 1 {b.local_prefix}/ {b.remote_prefix}/"
              for d in b._ids()
              for kind, direction in (("state", "out"), ("event", "out"), ("cmd", "in"))]
    values: dict[str, Any] = {
        "NAME": f"central-{b.site}", "CENTRAL_HOST": b.central_host,
        "CENTRAL_PORT": b.central_port, "CLIENT_ID": b.client_id,
        "RESTART_TIMEOUT": b.restart_timeout, "KEEPALIVE": b.keepalive_s,
        "BRIDGE_CA": Path(b.ca_file).resolve(), "BRIDGE_CERT": Path(b.cert_file).resolve(),
        "BRIDGE_KEY": Path(b.key_file).resolve(), "REMOTE_PREFIX": b.remote_prefix,
        "SITE": b.site, "TOPICS": "\n".join(topics)}
    return _render((template_dir / "bridge.template").read_text(), values)


def render_bridge_acl(bridge: Bridge, template_dir: Path = REPO_BROKER_DIR) -> str:
    """The central ACL's block for this bridge (broker/acl-bridge.template)."""
    b, p = bridge, bridge.remote_prefix
    topics = [line for d in b._ids() for line in (
        f"topic write {p}/device/{d}/state", f"topic write {p}/device/{d}/event",
        f"topic read {p}/device/{d}/cmd")]
    return _render((template_dir / "acl-bridge.template").read_text(),
                   {"SITE": b.site, "CLIENT_ID": b.client_id, "PREFIX": p,
                    "TOPICS": "\n".join(topics)})


def render_site_broker_config(out_dir: Path, bridge: Bridge, *, port: int, tls: bool,
                              bind: str = "127.0.0.1", ca_file: Path | None = None,
                              cert_file: Path | None = None, key_file: Path | None = None,
                              user: str = "mosquitto",
                              template_dir: Path = REPO_BROKER_DIR) -> Path:
    """The site broker's `mosquitto.conf` (and, with TLS, `acl`) in `out_dir`: the shipped
    broker configuration for the site's devices (fleet.transport.render_broker_config) plus
    the bridge to the central broker. `tls` is the devices' listener; the bridge always uses
    TLS with its client certificate."""
    conf = render_broker_config(out_dir, port=port, tls=tls, bind=bind, ca_file=ca_file,
                                cert_file=cert_file, key_file=key_file,
                                prefix=bridge.local_prefix, user=user,
                                template_dir=template_dir)
    atomic_write(conf, (conf.read_text() + "\n" + render_bridge(bridge, template_dir)).encode())
    return conf


# Where the broker pods mount their files: the central broker's Deployment
# (k3s/base/central/mosquitto/deployment.yaml) and the site broker's
# (k3s/overlays/site-example/site-broker/deployment.yaml, which adds the bridge's certificate).
BROKER_POD_PATHS = {
    "ACL_FILE": "/mosquitto/config/acl",
    "PORT": "8883",
    "BIND": "0.0.0.0",
    "CA_FILE": "/mosquitto/certs/ca.crt",
    "CERT_FILE": "/mosquitto/certs/broker.crt",
    "KEY_FILE": "/mosquitto/certs/broker.key",
    "DATA_DIR": "/mosquitto/data",
    "USER": "mosquitto",
}
K3S_HEADER = (
    "# Rendered by fleet/bridge.py (broker/mosquitto-tls.conf + broker/bridge.template) for\n"
    "# the site broker pod's paths (`edgefleet fleet certs site --k3s`).\n")


def k3s_bridge(bridge: Bridge) -> Bridge:
    """`bridge` with the certificate paths of the site broker pod."""
    from dataclasses import replace

    certs = Path("/mosquitto/certs")
    return replace(bridge, ca_file=certs / "ca.crt", cert_file=certs / "bridge.crt",
                   key_file=certs / "bridge.key")


def render_site_broker_k3s(bridge: Bridge, template_dir: Path = REPO_BROKER_DIR
                           ) -> dict[str, str]:
    """The site broker pod's `mosquitto.conf` and `acl` (TLS for the devices, the bridge with
    the pod's certificate paths), as file name -> text."""
    broker = _render((template_dir / "mosquitto-tls.conf").read_text(), BROKER_POD_PATHS)
    return {"mosquitto.conf": K3S_HEADER + broker + "\n" + render_bridge(k3s_bridge(bridge),
                                                                          template_dir),
            "acl": render_acl(bridge.local_prefix, template_dir=template_dir)}


def add_bridge_to_acl(acl: Path, bridge: Bridge, template_dir: Path = REPO_BROKER_DIR) -> None:
    """Add (or replace) this site's bridge block in the central broker's ACL file. Mosquitto
    reads it at start and on SIGHUP."""
    text = Path(acl).read_text()
    block = render_bridge_acl(bridge, template_dir)
    site = re.escape(bridge.site)
    old = re.compile(rf"\n# >>> bridge {site}:.*?# <<< bridge {site}\n", re.S)
    text = old.sub("", text)
    atomic_write(Path(acl), (text.rstrip("\n") + "\n" + block).encode())
