"""The device link against a real Mosquitto (the project's plain configuration), a real artifact
server and the real install state machine: state, commands, events, refusals, offline queues."""

from __future__ import annotations

import json
import socket
import threading
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.commands import Command, InstallSpec, sign_command
from agent.keys import generate_keypair
from agent.manifest import utc_now
from fleet.transport import FleetController
from tests.broker_fixtures import Box, Broker, FleetKeys, make_box, make_real_bundle

pytestmark = pytest.mark.timeout(60)
STEPS_OK = ["received", "downloading", "verified", "installing", "self-test", "live"]


@pytest.fixture
def ctl(broker: Broker, fleet_keys: FleetKeys):
    c = FleetController(broker.mqtt(), fleet_key=fleet_keys.fleet_key).start()
    yield c
    c.stop()


@pytest.fixture
def box(tmp_path: Path, broker: Broker, fleet_keys: FleetKeys, ctl: FleetController):
    b = make_box(tmp_path / "boxes", broker, fleet_keys,
                 labels={"site": "fab2", "tester": "t5", "group": "canary"})
    assert ctl.wait_for(lambda c: (c.state("box-1") or {}).get("online"), 10)
    yield b
    b.stop()


def _publish(broker: Broker, topic: str, payload: bytes) -> None:
    """A raw MQTT publish, as an attacker on the (plain) broker could make."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _settled(ctl: FleetController, command_id: str, device: str = "box-1") -> dict:
    """The device's state once it reports `command_id` as its last command."""
    assert ctl.wait_for(lambda c: ((c.state(device) or {}).get("last_command") or {})
                        .get("id") == command_id, 10)
    return ctl.state(device)


def _bundle(tmp_path: Path, keys: FleetKeys, artifacts, seq: int, **kw) -> tuple[str, str, int]:
    return artifacts.add(make_real_bundle(tmp_path / f"b{seq}-{kw}.efb".replace(" ", ""),
                                          keys.release_key, sequence=seq, **kw))


def test_state_is_retained_complete_and_the_will_marks_a_lost_device_offline(
        box: Box, ctl: FleetController, broker: Broker):
    s = ctl.state("box-1")
    assert s["online"] is True and s["will"] is False and s["v"] == 1
    assert s["labels"] == {"site": "fab2", "tester": "t5", "group": "canary"}
    assert s["agent_version"] and s["arch"]
    assert s["model"] == {"active": None, "previous": None}
    assert s["health"] == {"status": "ok", "reason": None}
    assert set(s["summary"]) >= {"requests", "errors", "fallback", "p99_ms", "fail_rate",
                                 "max_psi", "window_s"}
    # a late subscriber gets the retained state
    late = FleetController(broker.mqtt(), fleet_key=ctl.key, client_id="late").start()
    try:
        assert late.wait_for(lambda c: c.state("box-1") is not None, 5)
    finally:
        late.stop()
    # the connection dies without a DISCONNECT: the broker publishes the will
    box.link.client.loop_stop()
    box.link.client.socket().shutdown(socket.SHUT_RDWR)
    assert ctl.wait_for(lambda c: c.state("box-1")["online"] is False, 10)
    assert ctl.state("box-1")["will"] is True


def test_install_reports_every_step_and_the_new_model(
        tmp_path: Path, box: Box, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 3)
    cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=3, rollout_id="r-1")
    final = ctl.wait_command(cmd.id, 20)
    assert final["step"] == "live", final
    assert ctl.steps(cmd.id) == STEPS_OK
    assert all(e["rollout_id"] == "r-1" for e in ctl.events(cmd.id))
    s = _settled(ctl, cmd.id)
    assert s["model"]["active"]["digest"] == sha  # the digest the command named
    assert s["model"]["active"]["sequence"] == 3
    assert s["last_command"]["result"] == "live" and s["busy"] is None
    # the same bundle again: nothing to do, reported as live and unchanged
    again = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=3, rollout_id="r-2")
    assert ctl.wait_command(again.id, 10).get("unchanged") is True


def test_rollback_and_report_now(tmp_path: Path, box: Box, ctl: FleetController,
                                 fleet_keys: FleetKeys, artifacts):
    for seq in (1, 2):
        url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, seq, seed=seq)
        cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=seq, rollout_id="r")
        assert ctl.wait_command(cmd.id, 20)["step"] == "live"
    s = _settled(ctl, cmd.id)
    v1, v2 = s["model"]["previous"], s["model"]["active"]
    assert (v1["sequence"], v2["sequence"]) == (1, 2)
    rb = ctl.rollback("box-1", rollout_id="r")
    final = ctl.wait_command(rb.id, 20)
    assert final["step"] == "rolled-back" and final["model"]["id"] == v1["id"]
    assert ctl.steps(rb.id) == ["received", "installing", "self-test", "rolled-back"]
    rep = ctl.report_now("box-1")
    assert ctl.wait_command(rep.id, 10)["step"] == "reported"
    assert ctl.wait_for(lambda c: c.state("box-1")["model"]["active"]["id"] == v1["id"], 5)


def test_self_test_failure_keeps_the_old_model_and_says_why(
        tmp_path: Path, box: Box, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 1)
    assert ctl.wait_command(ctl.install("box-1", url=url, sha256=sha, size=size, sequence=1,
                                        rollout_id="r").id, 20)["step"] == "live"
    url2, sha2, size2 = _bundle(tmp_path, fleet_keys, artifacts, 2, break_golden=True)
    cmd = ctl.install("box-1", url=url2, sha256=sha2, size=size2, sequence=2, rollout_id="r")
    final = ctl.wait_command(cmd.id, 20)
    assert final["step"] == "failed" and final["reason"] == "self-test-failed"
    assert "golden vector" in final["detail"] and final["state"] == "self_test"
    assert ctl.steps(cmd.id) == ["received", "downloading", "verified", "installing",
                                 "self-test", "failed"]
    assert _settled(ctl, cmd.id)["model"]["active"]["digest"] == sha


def _refusal(ctl: FleetController, command_id: str, timeout: float = 10) -> dict:
    def seen(c: FleetController) -> bool:
        return any(e.get("command_id") == command_id and e["step"] == "failed"
                   for e in c.orphan_events() + c.events(command_id))
    assert ctl.wait_for(seen, timeout), f"no refusal for {command_id}"
    return next(e for e in ctl.orphan_events() + ctl.events(command_id)
                if e.get("command_id") == command_id and e["step"] == "failed")


def test_forged_expired_replayed_and_mismatched_commands_install_nothing(
        tmp_path: Path, box: Box, ctl: FleetController, broker: Broker, fleet_keys: FleetKeys,
        artifacts):
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 5)
    spec = InstallSpec(url, sha, size, 5)
    topic = ctl.topics.cmd("box-1")

    def install(cid: str, **kw) -> Command:
        return Command.new("install", "box-1", id=cid, rollout_id="r", install=spec, **kw)

    # forged: signed by a key the device does not trust for commands (here: the release key,
    # and a stranger's key), unsigned, and a signed command whose body was changed
    from agent.keys import load_private_key
    stranger = generate_keypair(tmp_path / "stranger", "fleet").private_path
    _publish(broker, topic, sign_command(install("forged-release"),
                                         load_private_key(fleet_keys.release_key)))
    _publish(broker, topic, sign_command(install("forged-stranger"),
                                         load_private_key(stranger)))
    env = json.loads(sign_command(install("unsigned"), ctl.key))
    del env["sig"]
    _publish(broker, topic, json.dumps(env).encode())
    env = json.loads(sign_command(install("tampered"), ctl.key))
    env["body"] = env["body"].replace(sha, "0" * 64)
    _publish(broker, topic, json.dumps(env).encode())
    # expired, and addressed to another box
    old = install("expired", now=utc_now() - timedelta(hours=3), ttl=timedelta(hours=1))
    _publish(broker, topic, sign_command(old, ctl.key))
    _publish(broker, topic, sign_command(
        Command.new("install", "box-2", id="elsewhere", rollout_id="r", install=spec), ctl.key))
    # a digest that does not match the bundle the URL serves
    wrong = ctl.install("box-1", url=url, sha256="f" * 64, size=size, sequence=5,
                        rollout_id="r")

    expected = {"forged-release": "untrusted-key", "forged-stranger": "untrusted-key",
                "unsigned": "unsigned", "tampered": "bad-signature", "expired": "expired",
                "elsewhere": "wrong-device", wrong.id: "digest-mismatch"}
    for cid, reason in expected.items():
        ev = _refusal(ctl, cid)
        assert ev["reason"] == reason, (cid, ev)
        assert ev["detail"]
    assert box.installer.store.version_ids() == []
    assert ctl.state("box-1")["model"]["active"] is None
    # only the digest-mismatch command reached the artifact server
    assert artifacts.requests == 1

    # replay: a command that ran once is refused the second time, byte for byte
    good = ctl.send(install("good-once"))
    assert ctl.wait_command(good.id, 20)["step"] == "live"
    versions = box.installer.store.version_ids()
    last = _settled(ctl, good.id)["last_command"]
    _publish(broker, topic, sign_command(good, ctl.key))  # the same bytes again
    ev = _refusal(ctl, good.id)
    assert ev["reason"] == "replayed"
    assert box.installer.store.version_ids() == versions
    assert ctl.state("box-1")["last_command"] == last  # a replay cannot rewrite the report
    assert artifacts.requests == 2


def test_commands_sent_while_the_device_is_away_arrive_when_it_is_back(
        tmp_path: Path, broker: Broker, ctl: FleetController, fleet_keys: FleetKeys,
        artifacts):
    first = make_box(tmp_path / "boxes", broker, fleet_keys)
    assert ctl.wait_for(lambda c: (c.state("box-1") or {}).get("online"), 10)
    first.stop()  # a clean shutdown: the retained state says offline, the session stays
    assert ctl.wait_for(lambda c: c.state("box-1")["online"] is False, 5)
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 1)
    cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=1, rollout_id="r")
    again = make_box(tmp_path / "boxes", broker, fleet_keys)
    try:
        assert ctl.wait_command(cmd.id, 20)["step"] == "live"
        assert ctl.steps(cmd.id) == STEPS_OK
    finally:
        again.stop()


def test_events_published_while_the_broker_is_down_arrive_after_it_returns(
        tmp_path: Path, box: Box, broker: Broker, ctl: FleetController, fleet_keys: FleetKeys,
        artifacts):
    """Broker restart during an install: the install completes, every step is reported after
    the reconnect, and the final state shows the new model."""
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 1)
    artifacts.faults.bytes_per_s = size / 1.5  # the download takes ~1.5 s
    downloading = threading.Event()
    ctl.add_listener(lambda kind, dev, doc: doc.get("step") == "downloading"
                     and downloading.set())
    cmd = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=1, rollout_id="r")
    assert downloading.wait(10)
    broker.stop()
    done = box.link.wait_idle(20)  # the install finishes with the broker gone
    assert done and box.installer.store.active() is not None
    broker.start()
    final = ctl.wait_command(cmd.id, 20)
    assert final["step"] == "live"
    assert ctl.steps(cmd.id) == STEPS_OK
    assert ctl.wait_for(lambda c: (c.state("box-1")["model"]["active"] or {}).get("digest")
                        == sha and c.state("box-1")["online"], 10)


def test_topics_and_configuration_from_the_environment(tmp_path: Path):
    from agent.link import LinkConfig
    from agent.wire import Topics

    t = Topics("plant/a")
    assert t.state("box-1") == "plant/a/device/box-1/state"
    assert t.parse("plant/a/device/box-1/event") == ("box-1", "event")
    assert t.parse("plant/b/device/box-1/event") is None
    with pytest.raises(Exception, match="wildcards"):
        Topics("plant/#")
    cfg = LinkConfig.from_env({
        "EDGEFLEET_DEVICE_ID": "box-9", "EDGEFLEET_MQTT_HOST": "mqtt.floor",
        "EDGEFLEET_MQTT_PORT": "8883", "EDGEFLEET_MQTT_CA": "/etc/ef/ca.crt",
        "EDGEFLEET_LABELS": "site=fab2,group=canary", "EDGEFLEET_LINK_DIR": str(tmp_path),
        "EDGEFLEET_TOPIC_PREFIX": "plant/a", "EDGEFLEET_DOWNLOAD_ATTEMPTS": "3",
        "EDGEFLEET_DOWNLOAD_MIN_RATE_BPS": "4096", "EDGEFLEET_DOWNLOAD_GRACE_S": "30"})
    assert (cfg.device_id, cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == \
        ("box-9", "mqtt.floor", 8883, True)
    assert cfg.labels == {"site": "fab2", "group": "canary"} and cfg.prefix == "plant/a"
    assert (cfg.download.attempts, cfg.download.min_rate_bps, cfg.download.grace_s) == \
        (3, 4096, 30)
    with pytest.raises(Exception, match="device id"):
        LinkConfig("box/1", tmp_path)


def test_keys_revoked_on_disk_bite_at_once_on_a_running_device(
        tmp_path: Path, broker: Broker, ctl: FleetController, fleet_keys: FleetKeys,
        artifacts):
    """The agent loads its keyring once at start and hands it to the installer and the link
    (agent/app.py): revocations written to the keyring directory afterwards still apply to
    the next bundle (release key) and the next command (fleet key), without a restart."""
    import dataclasses

    from agent.keys import Keyring, key_id, load_private_key, revoke_key

    loaded = dataclasses.replace(fleet_keys, keyring=Keyring.load(fleet_keys.keyring))
    box = make_box(tmp_path / "boxes", broker, loaded)
    try:
        assert ctl.wait_for(lambda c: (c.state("box-1") or {}).get("online"), 10)
        url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 1)
        first = ctl.install("box-1", url=url, sha256=sha, size=size, sequence=1, rollout_id="r")
        assert ctl.wait_command(first.id, 20)["step"] == "live"

        def kid(path: Path) -> str:
            return key_id(load_private_key(path).public_key())

        revoke_key(fleet_keys.keyring, kid(fleet_keys.release_key))
        url2, sha2, size2 = _bundle(tmp_path, fleet_keys, artifacts, 2, seed=2)
        cmd = ctl.install("box-1", url=url2, sha256=sha2, size=size2, sequence=2,
                          rollout_id="r")
        final = ctl.wait_command(cmd.id, 20)
        assert (final["step"], final["reason"]) == ("failed", "bundle-signature"), final
        assert "revoked" in final["detail"]
        assert _settled(ctl, cmd.id)["model"]["active"]["digest"] == sha

        revoke_key(fleet_keys.keyring, kid(fleet_keys.fleet_key))
        refused = ctl.report_now("box-1")
        ev = _refusal(ctl, refused.id)
        assert ev["reason"] == "untrusted-key" and "revoked" in ev["detail"]
        assert ctl.steps(refused.id) == ["failed"]  # never received, never reported
    finally:
        box.stop()


def test_the_same_sequence_with_other_content_is_refused_before_any_download(
        tmp_path: Path, box: Box, ctl: FleetController, fleet_keys: FleetKeys, artifacts):
    url, sha, size = _bundle(tmp_path, fleet_keys, artifacts, 4, seed=1)
    assert ctl.wait_command(ctl.install("box-1", url=url, sha256=sha, size=size, sequence=4,
                                        rollout_id="r").id, 20)["step"] == "live"
    requests = artifacts.requests
    url2, sha2, size2 = _bundle(tmp_path, fleet_keys, artifacts, 4, seed=2)  # signed, valid
    cmd = ctl.install("box-1", url=url2, sha256=sha2, size=size2, sequence=4, rollout_id="r")
    final = ctl.wait_command(cmd.id, 20)
    assert (final["step"], final["reason"]) == ("failed", "sequence-reused"), final
    assert ctl.steps(cmd.id) == ["received", "failed"] and artifacts.requests == requests
    assert _settled(ctl, cmd.id)["model"]["active"]["digest"] == sha


def test_every_command_type_has_a_handler():
    from agent.handlers import HANDLERS
    from agent.wire import COMMAND_TYPES

    assert set(HANDLERS) == set(COMMAND_TYPES)
