"""What an operator reads about the fleet: `fleet devices` (HEALTH `unknown` while a device is
offline, `-o wide|json|yaml|name`), one device with `fleet devices NAME` (state, labels, the
rollouts that targeted it, from a real rollout database), and `fleet artifacts` (bundles
published in a real artifact store). Devices are real device links on a real Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fleet.inventory import Device, device_history, device_view, devices_table
from fleet.state import StateDB
from tests.broker_fixtures import Broker, FleetKeys, make_box
from tests.fleet.rollout_helpers import cli

pytestmark = pytest.mark.timeout(120)


def _state(online: bool, health: str = "ok") -> dict:
    return {"device_id": "box-9", "online": online, "ts": "2026-01-01T00:00:00Z",
            "labels": {"site": "fab2"}, "agent_version": "0.1.0", "arch": "aarch64",
            "model": {"active": {"id": "1-a-x", "name": "m", "version": "1", "sequence": 1,
                                 "digest": "ab" * 32}},
            "health": {"status": health, "reason": None}, "summary": {}}


def test_an_offline_device_shows_health_unknown():
    off, on = Device.from_state(_state(False)), Device.from_state(_state(True))
    assert devices_table([off]).splitlines()[1].split()[5] == "unknown"
    assert devices_table([on]).splitlines()[1].split()[5] == "ok"
    assert off.to_json()["health"] == "unknown" and off.to_json()["reported_health"] == "ok"
    wide = devices_table([on], wide=True).splitlines()
    assert wide[0].split()[-3:] == ["DIGEST", "AGENT", "BUSY"]
    assert "abababababab" in wide[1] and "0.1.0" in wide[1]


def test_device_view_shows_the_rollouts_that_targeted_it(state_db: StateDB):
    db = state_db  # SQLite, PostgreSQL
    for rid, digest in (("r-1", "11" * 32), ("r-2", "22" * 32)):
        db.create(id=rid, created_by="t@h", bundle_digest=digest, bundle_size=10,
                  bundle_url="http://x", model_name="m", model_version=rid[-1], sequence=1,
                  plan={}, stages=[("canary", "install", 1)],
                  targets=[{"device_id": "box-9", "stage": 0}],
                  steps=[("box-9", "install", f"{rid}:box-9:install"),
                         ("box-8", "install", f"{rid}:box-8:install")])
    history = device_history(db, "box-9")
    assert sorted(h["rollout"] for h in history) == ["r-1", "r-2"]
    assert {h["status"] for h in history} == {"pending"}
    text = device_view(Device.from_state(_state(False)), history)
    assert "Health:        unknown; last reported ok" in text
    assert "site=fab2" in text and "r-2" in text and "222222222222" in text
    assert "no rollout database" in device_view(Device.from_state(_state(True)), None)


def test_fleet_devices_name_and_output_formats(tmp_path: Path, broker: Broker,
                                               fleet_keys: FleetKeys):
    boxes = [make_box(tmp_path / "boxes", broker, fleet_keys, f"box-{i}",
                      labels={"site": "fab2", "tester": f"t{i}"}) for i in range(2)]
    env = {"EDGEFLEET_MQTT_HOST": broker.host, "EDGEFLEET_MQTT_PORT": str(broker.port),
           "EDGEFLEET_ARTIFACT_STORE": str(tmp_path / "store")}
    try:
        for _ in range(50):  # the boxes' first states may still be on their way
            r = cli("fleet", "devices", "-o", "name", env=env)
            if r.returncode == 0 and r.stdout.split() == ["device/box-0", "device/box-1"]:
                break
        assert r.stdout.split() == ["device/box-0", "device/box-1"], r.stderr
        r = cli("fleet", "devices", "-o", "yaml", env=env)
        assert [d["id"] for d in yaml.safe_load(r.stdout)] == ["box-0", "box-1"]
        r = cli("fleet", "devices", "-o", "wide", env=env)
        assert r.returncode == 0 and "DIGEST" in r.stdout.splitlines()[0]
        r = cli("fleet", "devices", "box-1", env=env)
        assert r.returncode == 0, r.stderr
        assert "Device:        box-1" in r.stdout and "tester=t1" in r.stdout
        assert "no rollout database" in r.stdout
        r = cli("fleet", "devices", "device/box-0", "-o", "json", env=env)
        doc = json.loads(r.stdout)
        assert doc["id"] == "box-0" and doc["state"]["device_id"] == "box-0"
        r = cli("fleet", "devices", "box-7", env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "box-7" in r.stderr
        r = cli("fleet", "devices", "-o", "table", env=env)
        assert r.returncode == 2 and "--output must be" in r.stderr
    finally:
        for b in boxes:
            b.stop()


def test_fleet_artifacts_lists_published_bundles(tmp_path: Path):
    from tests.agent_support import build_model, make_keys

    ring, key = make_keys(tmp_path / "keys")
    store = tmp_path / "store"
    r = cli("fleet", "artifacts", "--store", str(store))
    assert r.returncode == 2 and "does not exist" in r.stderr
    models = [build_model(tmp_path / "b", ring, key, version=v, sequence=i)
              for i, v in enumerate(("1.0.0", "1.1.0"), 1)]
    digests = []
    for m in models:
        r = cli("fleet", "publish", str(m.bundle), "--keyring", str(ring), "--store",
                str(store), "-o", "json")
        assert r.returncode == 0, r.stderr
        digests.append(json.loads(r.stdout)["digest"])
    r = cli("fleet", "artifacts", "--store", str(store))
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["DIGEST", "MODEL", "SEQ", "SIZE", "PUBLISHED", "BY"]
    assert [ln.split()[0] for ln in lines[1:]] == [d[:12] for d in digests]
    assert "robust-z 1.1.0" in lines[2]
    r = cli("fleet", "artifacts", "--store", str(store), "-o", "name")
    assert r.stdout.split() == [f"sha256:{d}" for d in digests]
    r = cli("fleet", "artifacts", "--store", str(store), "-o", "json")
    assert [a["digest"] for a in json.loads(r.stdout)] == digests
