"""Transport security with the project's TLS broker configuration and per-device ACL: a device
speaks only for itself, hears only its own commands, and nobody without a certificate from the
fleet CA gets in."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.link import MqttConfig
from fleet.certs import CONTROLLER_NAME, init_ca, issue_client
from fleet.transport import FleetController
from tests.broker_fixtures import PKI, Broker, FleetKeys, make_box, make_real_bundle

pytestmark = pytest.mark.timeout(60)


class _Client:
    """A bare MQTT client with a given certificate, recording what it receives."""

    def __init__(self, broker: Broker, name: str | None, *, client_id: str | None = None):
        cfg = broker.mqtt(name, reconnect_min_s=60)
        self.client = cfg.new_client(client_id or f"probe-{name}")
        self.received: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.refused: list[object] = []
        self.got = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: (self.received.append(m), self.got.set())

    def _on_connect(self, c, u, flags, reason, props) -> None:
        if reason.is_failure:
            self.refused.append(reason)
        else:
            self.connected.set()

    def __enter__(self) -> _Client:
        self.client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ctl(tls_broker: Broker, fleet_keys: FleetKeys):
    c = FleetController(tls_broker.mqtt(CONTROLLER_NAME), fleet_key=fleet_keys.fleet_key)
    c.start()
    yield c
    c.stop()


def test_device_cannot_publish_another_devices_state(tls_broker: Broker, ctl: FleetController):
    with _Client(tls_broker, "box-a") as a:
        assert a.connected.wait(10)
        forged = {"v": 1, "device_id": "box-b", "online": True, "seq": 1, "will": False}
        a.client.publish(ctl.topics.state("box-b"), json.dumps(forged), qos=1,
                         retain=True).wait_for_publish(5)
        a.client.publish(ctl.topics.event("box-b"), json.dumps(
            {"device_id": "box-b", "step": "live", "command_id": "x", "seq": 1}), qos=1
        ).wait_for_publish(5)
        own = {"v": 1, "device_id": "box-a", "online": True, "seq": 1, "will": False}
        a.client.publish(ctl.topics.state("box-a"), json.dumps(own), qos=1,
                         retain=True).wait_for_publish(5)
        # messages from one client arrive in order: once box-a's own state is here, the
        # forged ones would have been too
        assert ctl.wait_for(lambda c: c.state("box-a") is not None, 10)
    assert ctl.state("box-b") is None
    assert ctl.orphan_events() == []


def test_device_cannot_read_another_devices_commands(tls_broker: Broker,
                                                     ctl: FleetController):
    with _Client(tls_broker, "box-a") as a, _Client(tls_broker, "box-b") as b:
        assert a.connected.wait(10) and b.connected.wait(10)
        subs = {}
        for probe, topic in ((a, ctl.topics.cmd("box-b")), (a, ctl.topics.all("cmd")),
                             (a, ctl.topics.cmd("box-a")), (b, ctl.topics.cmd("box-b"))):
            ok = threading.Event()
            probe.client.on_subscribe = lambda c, u, mid, codes, p, ok=ok: ok.set()
            probe.client.subscribe(topic, qos=1)
            assert ok.wait(5)
            subs[topic] = True
        ctl.report_now("box-b")  # the broker accepts it: the controller may write any cmd
        assert b.got.wait(10)  # box-b, subscribed to its own topic, gets it ...
        # ... box-a, subscribed to box-b's and to all, does not: a command to box-a itself,
        # sent after, arrives after it would have (the broker keeps one client's order)
        ctl.report_now("box-a")
        assert a.got.wait(10)
        assert {m.topic for m in a.received} == {ctl.topics.cmd("box-a")}


def _can_connect(cfg: MqttConfig, client_id: str) -> bool:
    """Try once: TCP, TLS handshake, CONNECT, CONNACK within 2 s."""
    client = cfg.new_client(client_id)
    try:
        if client.reconnect() != mqtt.MQTT_ERR_SUCCESS:
            return False
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                return False
            if client.is_connected():
                return True
        return False
    except (ssl.SSLError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


def test_client_without_a_certificate_cannot_connect(tls_broker: Broker, tmp_path: Path):
    assert _can_connect(tls_broker.mqtt("box-a"), "box-a")  # the control: a device can
    assert not _can_connect(tls_broker.mqtt(None), "anonymous")
    # nor can one whose certificate comes from another CA, whatever name it claims
    other = tmp_path / "other-ca"
    init_ca(other)
    cert = issue_client(other, other, CONTROLLER_NAME, controller=True)
    rogue = dataclasses.replace(tls_broker.mqtt(None), cert_file=cert.cert, key_file=cert.key)
    assert not _can_connect(rogue, "rogue")


def test_install_over_tls_with_a_device_certificate(
        tmp_path: Path, tls_broker: Broker, pki: PKI, ctl: FleetController,
        fleet_keys: FleetKeys, artifacts):
    box = make_box(tmp_path / "boxes", tls_broker, fleet_keys, "box-7")
    try:
        assert ctl.wait_for(lambda c: (c.state("box-7") or {}).get("online"), 10)
        url, sha, size = artifacts.add(make_real_bundle(tmp_path / "b.efb",
                                                        fleet_keys.release_key, sequence=1))
        cmd = ctl.install("box-7", url=url, sha256=sha, size=size, sequence=1, rollout_id="r")
        assert ctl.wait_command(cmd.id, 20)["step"] == "live"
        # the will works under the ACL too: the device may write its own state
        box.link.client.loop_stop()
        box.link.client.socket().close()
        assert ctl.wait_for(lambda c: c.state("box-7")["online"] is False, 10)
    finally:
        box.stop()
