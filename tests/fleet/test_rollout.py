"""Rollouts on a simulated floor (real device code, real Mosquitto, real ONNX Runtime traffic):
stages, gates, automatic rollback, forged events, a device left behind, a broker restart. The
driver runs in this process; tests/fleet/test_rollout_cli.py drives the CLI and
tests/fleet/test_rollout_controller.py the controller service. The rules themselves (budgets,
timeouts, offline devices, health grace, fresh state) are millisecond tests of the decision
core: tests/fleet/test_rollout_decide.py."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fleet.actions import apply
from fleet.inventory import open_controller
from fleet.rollout import drive, snapshot
from fleet.state import S_DONE
from tests.broker_fixtures import Broker, FleetKeys
from tests.fleet.rollout_helpers import (
    NO_BAKE,
    CommandSniffer,
    expected_stages,
    floor,
    plan,
    run_in_process,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


class Forger:
    """A compromised device: it reads the command ids meant for others (learnable from its
    own: `<rollout>:<device>:<step>`) and publishes `failed` for each on its *own* event
    topic, as the broker's ACL lets it."""

    def __init__(self, mqtt_config, me: str) -> None:
        self.me, self.forged = me, 0
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                                  client_id=f"forger-{me}")
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe("edgefleet/device/+/cmd", qos=1)
        self.client.on_message = self._on_command
        self.client.connect(mqtt_config.host, mqtt_config.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_command(self, client, userdata, msg) -> None:
        envelope = json.loads(msg.payload)
        if "body" not in envelope:  # a CommandSniffer's own marker, not a signed command
            return
        body = json.loads(envelope["body"])
        if body["device_id"] == self.me:
            return
        self.forged += 1
        client.publish(f"edgefleet/device/{self.me}/event", json.dumps({
            "v": 1, "device_id": self.me, "boot": "forged", "seq": self.forged,
            "command_id": body["id"], "rollout_id": body["rollout_id"], "type": body["type"],
            "step": "failed", "reason": "os-error", "detail": "forged"}), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_rollout_moves_every_device_through_canary_and_waves_one_command_each(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    """...and a device that answers other devices' commands from its own topic (issue 14:
    it rolled a whole rollout back) changes nothing: an event counts only from the device
    the command was for."""
    n = 12
    p = plan(shadow=False, canary="3", waves=(50, 100), wave_bake_s=0)
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        forger = Forger(fl.mqtt, sorted(fl.sim.devices)[-1])
        rid, row = run_in_process(fl, p)
        sniffer.close()
        forger.close()
        assert forger.forged >= n - 1  # every other device's install was answered falsely
        assert row.state == "succeeded", row.reason
        assert set(fl.actives().values()) == {fl.pubs["v2"].digest}
        snap = snapshot(fl.db, rid)
        assert [(s["name"], s["devices"], s["done"], s["state"]) for s in snap["stages"]] == [
            ("canary", 3, 3, "passed"), ("wave-1", 3, 3, "passed"), ("wave-2", 6, 6, "passed")]
        assert snap["stages"][0]["verdict"]["verdict"] == "pass"
        canary = {s.device_id for s in fl.db.steps(rid)} & set(expected_stages(p, n)["canary"])
        assert len(canary) == 3  # the planned canary is the one that went first
        # one install command per device, each id once, ids derived from rollout+device+step
        ids = sniffer.ids()
        assert len(ids) == n and set(ids.values()) == {1}
        assert all(cid == f"{rid}:{cid.split(':')[1]}:install" for cid in ids)
        # success means live and healthy: every step saw the new digest active, health ok
        assert {(s.status, s.result) for s in fl.db.steps(rid)} == {(S_DONE, "live")}
        actions = [a["action"] for a in fl.db.audit_log(rid)]
        assert actions[0] == "start" and actions[-1] == "succeeded"
        assert fl.db.audit_log(rid)[0]["detail"]["bundle_digest"] == fl.pubs["v2"].digest


def test_canary_failing_its_gates_is_rolled_back_within_10s_and_no_one_else_installs(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 9
    p = plan(shadow=False, canary="3", bake_s=8, on_failure="rollback")
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        rid, row = run_in_process(fl, p, bundle="bad")
        sniffer.close()
        assert row.state == "rolled-back", row.reason
        assert "fail_rate_delta" in row.reason
        canary = set(expected_stages(p, n)["canary"])
        assert {c["device_id"] for c in sniffer.by_type("install")} == canary
        assert {c["device_id"] for c in sniffer.by_type("rollback")} == canary
        assert set(fl.actives().values()) == {fl.pubs["v1"].digest}
        failed_at = next(a["ts"] for a in fl.db.audit_log(rid) if a["action"] == "rolling-back")
        rolled = [s.finished for s in fl.db.steps(rid) if s.step == "rollback"]
        assert len(rolled) == 3 and max(rolled) - failed_at <= 10.0
        snap = snapshot(fl.db, rid)
        assert snap["stages"][0]["state"] == "failed"
        assert snap["rollback"] == {"devices": 3, "done": 3, "failed": 0}


def test_a_device_left_behind_never_makes_a_success_until_retry_brings_it(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    """Issue 14: a device offline past the wait failed within the budget; after it came back
    `resume` said SUCCEEDED with it on the old model. Now the end is honest: paused, naming
    it; resume checks again (still behind: paused again); retry commands it; then success."""
    n = 6
    p = plan(shadow=False, canary="2", waves=(100,), offline="wait", offline_wait_s=1,
             max_failures="50%", **NO_BAKE)
    away = sorted(expected_stages(p, n)["wave-1"])[0]
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        fl.sim.devices[away].network.cut(600)
        rid, row = run_in_process(fl, p, reporting=n - 1)
        assert row.state == "paused", row.reason
        assert row.reason.startswith(f"1 of 6 devices do not run the bundle: {away} (failed")
        assert f"next: edgefleet fleet rollout retry {rid}" in row.reason
        fl.sim.devices[away].network.offline_until = 0  # it comes back
        with open_controller(fl.mqtt, fleet_key=fl.fleet_key, client_id="ctl-2") as ctl:
            assert ctl.wait_for(lambda c: (c.state(away) or {}).get("online"), 20)
            assert apply(fl.db, rid, "resume", "tester")[0]
            row = drive(fl.db, rid, ctl, actor="tester")
            assert row.state == "paused" and away in row.reason  # still not on the bundle
            assert apply(fl.db, rid, "retry", "tester")[0]
            row = drive(fl.db, rid, ctl, actor="tester")
        assert row.state == "succeeded", row.reason
        assert set(fl.actives().values()) == {fl.pubs["v2"].digest}
        step = next(s for s in fl.db.steps(rid) if s.device_id == away)
        assert step.status == S_DONE  # under a new command id: a device runs an id once
        assert step.command_id.startswith(f"{rid}:{away}:install.")
        # the same bundle again: every device is already there, which is taken only from a
        # report made after this rollout began (asked for with report-now when needed)
        sniffer = CommandSniffer(fl.mqtt)
        rid2, row2 = run_in_process(fl, plan(shadow=False, canary="2", waves=(100,), **NO_BAKE))
        sniffer.close()
        assert row2.state == "succeeded", row2.reason
        installs = [s for s in fl.db.steps(rid2) if s.step == "install"]
        assert {(s.status, s.result) for s in installs} == {(S_DONE, "unchanged")}
        assert sniffer.by_type("install") == []
        reports = [s for s in fl.db.steps(rid2) if s.step == "report"]
        assert {c["device_id"] for c in sniffer.by_type("report-now")} == \
            {s.device_id for s in reports}
        assert all(s.status == S_DONE for s in reports)


def test_broker_restart_mid_rollout_completes(tmp_path: Path, broker: Broker,
                                              fleet_keys: FleetKeys):
    n = 6
    restarted = []

    def progress(snap):  # the broker goes away for 1 s while wave-1 is being sent
        st = {s["name"]: s for s in snap["stages"]}
        if not restarted and st["wave-1"]["state"] == "deploying":
            restarted.append(time.monotonic())
            broker.stop()
            threading.Timer(1.0, broker.start).start()

    with floor(tmp_path, broker, fleet_keys, n) as fl:
        p = plan(shadow=False, canary="2", waves=(50, 100), max_parallel=1, **NO_BAKE)
        rid, row = run_in_process(fl, p, on_progress=progress)
        assert restarted, "the broker was never restarted"
        assert row.state == "succeeded", row.reason
        assert set(fl.actives().values()) == {fl.pubs["v2"].digest}
        assert Counter(s.status for s in fl.db.steps(rid)) == {S_DONE: n}
