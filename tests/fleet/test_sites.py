"""Sites: two real site brokers, each bridged (Mosquitto bridge over TLS, with the bridge's own
client certificate and the central ACL from fleet/bridge.py) to one real central broker through a
WAN link the test can cut (tests/fleet/wan.py, a TCP relay). The controller and the rollout
engine talk to the central broker only, unchanged; the simulated devices to their site's broker.
"""

from __future__ import annotations

import getpass
import threading
from pathlib import Path
from typing import Any

import pytest

from fleet.bridge import Bridge, add_bridge_to_acl, render_site_broker_config
from fleet.certs import CONTROLLER_NAME, issue_bridge
from fleet.inventory import Inventory, open_controller
from fleet.rollout import Bundle, NewRollout, create, drive
from fleet.sim import DeviceFaults, SimConfig, Simulator
from fleet.state import StateDB
from tests.agent_support import wait_for
from tests.broker_fixtures import PKI, Broker, FleetKeys
from tests.fleet.rollout_helpers import (
    FAST_TRAFFIC,
    CommandSniffer,
    bundles,
    plan,
    wait_reporting,
)
from tests.fleet.wan import WanLink

pytestmark = pytest.mark.timeout(300)
PER_SITE = 8


class SiteBroker(Broker):
    """The site's broker and its TLS bridge to the centre. Without `pki`, a plain listener for
    the site's simulated devices (they share one MQTT configuration, so not one certificate
    each); with it, the shipped TLS listener, a certificate per device and the per-device ACL
    (it reuses the PKI's broker certificate: it is for 127.0.0.1 too)."""

    def __init__(self, workdir: Path, bridge: Bridge, pki: PKI | None = None) -> None:
        super().__init__(workdir, pki=pki)
        self.bridge = bridge
        tls = {} if pki is None else {"ca_file": pki.ca.cert, "cert_file": pki.server.cert,
                                      "key_file": pki.server.key}
        self.conf = render_site_broker_config(workdir, bridge, port=self.port,
                                              tls=pki is not None, user=getpass.getuser(),
                                              **tls)


def _site(tmp: Path, pki: PKI, central: Broker, name: str, devices: tuple[str, ...],
          site_pki: PKI | None = None) -> tuple[SiteBroker, WanLink]:
    wan = WanLink(central.host, central.port).start()
    cert = issue_bridge(pki.dir, tmp / name, name)
    bridge = Bridge(name, wan.host, wan.port, ca_file=pki.ca.cert, cert_file=cert.cert,
                    key_file=cert.key, devices=devices, restart_timeout="1 2", keepalive_s=5)
    add_bridge_to_acl(central.workdir / "acl", bridge)
    (tmp / name / "broker").mkdir(parents=True)
    return SiteBroker(tmp / name / "broker", bridge, site_pki), wan


def test_a_wave_across_two_sites_survives_one_sites_link_dropping(
        tmp_path: Path, pki: PKI, fleet_keys: FleetKeys):
    """A rollout whose wave spans both sites. Site a's link to the centre is cut as the wave
    starts: site b's devices finish while site a's wait (their commands queue at the centre);
    once the link is back site a catches up and the rollout succeeds. Every device got its one
    install command exactly once and installed once."""
    from fleet.artifacts import ArtifactServer

    ids = {s: tuple(f"{s}-{i:02d}" for i in range(PER_SITE)) for s in ("a", "b")}
    (tmp_path / "central").mkdir()
    central = Broker(tmp_path / "central", pki=pki)
    site_a, wan_a = _site(tmp_path, pki, central, "a", ids["a"])
    # site b's bridge carries every device's topics (wildcards): both renderings run here
    site_b, wan_b = _site(tmp_path, pki, central, "b", ())
    store = tmp_path / "artifacts"
    pubs = bundles(tmp_path, fleet_keys.release_key, fleet_keys.keyring, store)
    srv = ArtifactServer(store).start()
    sims: dict[str, Simulator] = {}
    sniffers: dict[str, CommandSniffer] = {}
    central.start()
    try:
        for name, site in (("a", site_a), ("b", site_b)):
            site.start()
            # site a's downloads crawl (a few seconds each): its installs are still running
            # when the link drops, whatever the machine's load
            faults = {d: DeviceFaults(slow_download_bps=1500) for d in ids[name]} \
                if name == "a" else {}
            sims[name] = Simulator(SimConfig(
                devices=PER_SITE, root=tmp_path / f"sim-{name}", mqtt=site.mqtt(),
                keyring=fleet_keys.keyring, id_format=f"{name}-{{:02d}}", site=name,
                state_interval_s=0.5, traffic=FAST_TRAFFIC, preinstall=pubs["v1"].path),
                faults).start()
            sniffers[name] = CommandSniffer(site.mqtt())
        db = StateDB(tmp_path / "rollouts.db")
        with open_controller(central.mqtt(CONTROLLER_NAME), fleet_key=fleet_keys.fleet_key,
                             client_id=CONTROLLER_NAME) as ctl:
            wait_reporting(ctl, 2 * PER_SITE, timeout=60)  # through both bridges
            # each bridge's link state, retained at the centre (its will says 0 when it drops)
            links: dict[str, bytes] = {}
            link_seen = threading.Condition()

            def on_link(client: object, userdata: object, msg: Any) -> None:
                with link_seen:
                    links[msg.topic.split("/")[2]] = msg.payload
                    link_seen.notify_all()

            def link_is(site: str, value: bytes) -> bool:
                with link_seen:
                    return link_seen.wait_for(lambda: links.get(site) == value, 60)

            ctl.client.message_callback_add("edgefleet/site/+/bridge", on_link)
            ctl.client.subscribe("edgefleet/site/+/bridge", qos=1)
            assert link_is("a", b"1") and link_is("b", b"1")
            p = pubs["v2"]
            bundle = Bundle(p.digest, p.size, srv.url_for(p.digest), p.sequence, p.name,
                            p.version)
            # one wave after a canary of 2, every device of it in flight at once; a step may
            # wait as long as the test runs (the link comes back when site b is done)
            rplan = plan(canary="2", waves=(100,), shadow=False, max_parallel=50,
                         step_timeout_s=600, bake_s=1, wave_bake_s=1)
            rid = create(db, rplan, NewRollout(bundle, Inventory.from_states(ctl.devices()),
                                               "tester", "r-sites"))
            result: dict[str, object] = {}
            engine = threading.Thread(target=lambda: result.update(row=drive(
                db, rid, ctl, actor="tester")), daemon=True)
            engine.start()
            watch = StateDB(tmp_path / "rollouts.db")

            def stage(name: str) -> str | None:
                return next((s.state for s in watch.stages(rid) if s.name == name), None)

            def wave_deploying() -> bool:
                assert engine.is_alive(), stage("canary")
                return stage("wave-1") == "deploying"

            wait_for(wave_deploying, 120, interval=0.02, what="wave-1 deploying")
            wan_a.cut()
            assert link_is("a", b"0")  # the centre knows site a's link is down
            w = next(s.idx for s in watch.stages(rid) if s.name == "wave-1")
            wave = {t["device_id"] for t in watch.targets(rid) if t["stage"] == w}
            assert wave & set(ids["a"]) and wave & set(ids["b"]), "the wave spans both sites"

            def done(site: str) -> set[str]:
                return {s.device_id for s in watch.steps(rid)
                        if s.step == "install" and s.status == "done"
                        and s.device_id in wave and s.device_id[0] == site}

            wait_for(lambda: done("b") == wave & set(ids["b"]), 120, interval=0.1,
                     what="site b finishing its part of the wave")
            # ... while site a's part waits: nothing of it reached the centre
            assert done("a") == set()
            assert stage("wave-1") == "deploying"
            wan_a.restore()
            assert link_is("a", b"1")
            engine.join(180)
            assert not engine.is_alive()
        row = result["row"]
        assert row.state == "succeeded", row.reason
        steps = [s for s in db.steps(rid) if s.step == "install"]
        assert len(steps) == 2 * PER_SITE
        assert {(s.status, s.result, s.attempts) for s in steps} == {("done", "live", 1)}
        for name in ("a", "b"):
            def delivered(name: str = name) -> list[dict[str, Any]]:
                return [c for c in sniffers[name].by_type("install")
                        if c["device_id"] in ids[name]]

            wait_for(lambda d=delivered, n=name: {c["device_id"] for c in d()} == set(ids[n]),
                     30, interval=0.05,  # a listener beside the devices: it may lag
                     what=f"site {name}'s install commands at its listener")
            # each of the site's devices got its one install command through the bridge:
            # none lost, one command id per device
            by_device = {d: {c["id"] for c in delivered() if c["device_id"] == d}
                         for d in ids[name]}
            assert all(len(v) == 1 for v in by_device.values()), by_device
            if name == "b":  # its link never dropped: not even a QoS 1 redelivery
                assert len(delivered()) == PER_SITE
            else:  # site a's bridge lists its devices: it never saw site b's commands
                assert {c["device_id"] for c in sniffers["a"].by_type("install")} \
                    == set(ids["a"])
            installs = {d: [e for e in dev.installer.store.history()  # v2 (v1 came with
                            if e.get("event") == "install"        # the template)
                            and e.get("id") == dev.installer.store.active()]
                        for d, dev in sims[name].devices.items()}
            assert all(len(v) == 1 for v in installs.values()), installs  # installed once
            assert set(sims[name].actives().values()) == {p.digest}
        assert wan_a.connections >= 2  # the bridge did reconnect through the link
    finally:
        for s in sniffers.values():
            s.close()
        for s in sims.values():
            s.stop()
        for b in (site_a, site_b, central):
            b.stop()
        wan_a.stop()
        wan_b.stop()
        srv.stop()


def test_a_device_on_a_tls_site_broker_takes_a_command_from_the_centre(
        tmp_path: Path, pki: PKI, fleet_keys: FleetKeys, artifacts):
    """The shipped TLS configuration on both sides: a real device with its own certificate on
    the site broker (per-device ACL) installs a bundle the controller sent to the central
    broker. The bridge carries only the site's listed devices: a device the site does not list
    reaches its site broker but never the centre."""
    from fleet.transport import FleetController
    from tests.broker_fixtures import make_box, make_real_bundle

    (tmp_path / "central").mkdir()
    central = Broker(tmp_path / "central", pki=pki)
    site, wan = _site(tmp_path, pki, central, "fab1", ("box-1",), site_pki=pki)
    url, sha, size = artifacts.add(make_real_bundle(tmp_path / "v1.efb",
                                                    fleet_keys.release_key, sequence=1))
    central.start()
    site.start()
    boxes = []
    try:
        with FleetController(central.mqtt(CONTROLLER_NAME),
                             fleet_key=fleet_keys.fleet_key) as ctl:
            boxes = [make_box(tmp_path / "boxes", site, fleet_keys, d,
                              mqtt=site.mqtt(d), labels={"site": "fab1"})
                     for d in ("box-1", "box-stray")]
            assert ctl.wait_for(lambda c: (c.state("box-1") or {}).get("online"), 30)
            cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=1,
                              rollout_id="r-tls-site")
            assert ctl.wait_command(cmd.id, 60)["step"] == "live"
            assert ctl.wait_for(lambda c: (((c.state("box-1") or {}).get("model") or {})
                                           .get("active") or {}).get("digest") == sha, 30)
            # the stray box is connected to its site broker, reporting there ...
            assert boxes[1].link.connected.wait(10)
            # ... and the centre never heard of it (states are sent at connect)
            assert ctl.state("box-stray") is None
    finally:
        for b in boxes:
            b.stop()
        site.stop()
        central.stop()
        wan.stop()


def test_site_bridge_renders_per_device_and_wildcard_topics(tmp_path: Path):
    ca = tmp_path / "ca.crt"
    listed = Bridge("fab1", "central", 8883, ca, ca, ca, devices=("box-1",))
    every = Bridge("fab2", "central", 8883, ca, ca, ca, local_prefix="site2",
                   remote_prefix="edgefleet")
    conf = render_site_broker_config(tmp_path / "b", listed, port=1883, tls=False)
    text = conf.read_text()
    assert "topic device/box-1/cmd in 1 edgefleet/ edgefleet/" in text
    assert "topic device/+/" not in text and "remote_clientid bridge-fab1" in text
    from fleet.bridge import render_bridge, render_bridge_acl

    assert "topic device/+/state out 1 site2/ edgefleet/" in render_bridge(every)
    acl = tmp_path / "acl"
    acl.write_text("user edgefleet-controller\ntopic readwrite edgefleet/#\n")
    add_bridge_to_acl(acl, listed)
    add_bridge_to_acl(acl, every)
    add_bridge_to_acl(acl, Bridge("fab1", "central", 8883, ca, ca, ca,
                                  devices=("box-1", "box-2")))  # replaces fab1's block
    text = acl.read_text()
    assert text.count("user bridge-fab1") == 1 and "edgefleet/device/box-2/state" in text
    assert render_bridge_acl(every) in text
    assert "topic read edgefleet/device/+/cmd" in text
    with pytest.raises(Exception, match="not a valid site"):
        Bridge("a/b", "central", 8883, ca, ca, ca)


def test_a_device_may_not_take_a_bridge_name(tmp_path: Path, pki: PKI):
    from fleet.certs import CertError, issue_client

    with pytest.raises(CertError, match="reserved"):
        issue_client(pki.dir, tmp_path, "bridge-fab1")
    assert issue_bridge(pki.dir, tmp_path, "fab1").cert.name == "bridge-fab1.crt"


def test_the_documented_site_command(tmp_path: Path):
    """docs/deploy-k3s.md, Sites: the `edgefleet fleet certs site` command as written there,
    after `certs init` as in step 3, writes the site broker's certificates and pod
    configuration and lets the bridge into the central ACL for the listed devices only."""
    import re
    import shlex
    import subprocess
    import sys

    from fleet.bridge import render_site_broker_k3s
    from tests.conftest import REPO

    doc = (REPO / "docs" / "deploy-k3s.md").read_text()
    init = re.search(r"^edgefleet fleet certs init .*$", doc, re.M).group()
    site = re.search(r"^edgefleet fleet certs site (?:.*\\\n)*.*$", doc, re.M).group()
    for line in (init, site):
        argv = shlex.split(line.replace("\\\n", " "))
        r = subprocess.run([sys.executable, "-m", "edgefleet", *argv[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "site-fab1"
    for name in ("broker.crt", "broker.key", "bridge-fab1.crt", "bridge-fab1.key"):
        assert (out / name).is_file(), name
    bridge = Bridge("fab1", "mqtt.central.fab1.example", 8883, Path("x"), Path("x"), Path("x"),
                    devices=("box-01", "box-02"))
    expected = render_site_broker_k3s(bridge)
    assert (out / "broker" / "mosquitto.conf").read_text() == expected["mosquitto.conf"]
    assert (out / "broker" / "acl").read_text() == expected["acl"]
    acl = (tmp_path / "pki" / "broker" / "acl").read_text()
    assert "user bridge-fab1\ntopic write edgefleet/device/box-01/state" in acl
    assert "edgefleet/device/+/" not in acl
