"""Rollouts on a simulated floor (real device code, real Mosquitto, real ONNX Runtime traffic):
stages, gates, automatic rollback, failure budgets, stuck and offline devices, a broker
restart. The engine runs in this process; tests/fleet/test_rollout_cli.py drives the CLI."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from fleet.rollout import snapshot
from fleet.sim import DeviceFaults
from fleet.state import S_DONE
from tests.broker_fixtures import Broker, FleetKeys
from tests.fleet.rollout_helpers import (
    CommandSniffer,
    expected_stages,
    floor,
    plan,
    run_in_process,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


def test_rollout_moves_every_device_through_canary_and_waves_one_command_each(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 24
    p = plan(shadow=False, canary="3", waves=(25, 100))
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        rid, row = run_in_process(fl, p)
        sniffer.close()
        assert row.state == "succeeded", row.reason
        assert set(fl.actives().values()) == {fl.pubs["v2"].digest}
        snap = snapshot(fl.db, rid)
        assert [(s["name"], s["devices"], s["done"], s["state"]) for s in snap["stages"]] == [
            ("canary", 3, 3, "passed"), ("wave-1", 3, 3, "passed"), ("wave-2", 18, 18, "passed")]
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
    n = 15
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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("share,expect", [("3%", "succeeded"), ("8%", "rolled-back")])
def test_failure_budget_five_percent(tmp_path: Path, broker: Broker, fleet_keys: FleetKeys,
                                     share: str, expect: str):
    """The step timeout is the helpers' generous one (20 s): a healthy device on a busy
    machine must not time out (a 3 s timeout made healthy devices fail under load), so the
    stuck device stays silent for far longer than that."""
    n = 60
    p = plan(shadow=False, canary="2", waves=(50, 100), max_failures="5%",
             on_failure="rollback", bake_s=2.5, wave_bake_s=1.0, max_parallel=30)
    stages = expected_stages(p, n, sites=2)
    w1, w2 = stages["wave-1"], stages["wave-2"]  # 28 and 30 devices: budget 1 each
    if share == "3%":  # 2 of 60: one disk full, one stuck (silent past its step timeout)
        faults = {w1[0]: DeviceFaults(install_failure=True),
                  w2[0]: DeviceFaults(offline_mid_install_s=6 * p.step_timeout_s)}
    else:  # 5 of 60, three of them in wave-1
        faults = {d: DeviceFaults(install_failure=True) for d in (*w1[:3], *w2[:2])}
    with floor(tmp_path, broker, fleet_keys, n, faults=faults, sites=2, workers=6) as fl:
        sniffer = CommandSniffer(fl.mqtt)
        rid, row = run_in_process(fl, p)
        sniffer.close()
        assert row.state == expect, row.reason
        snap = snapshot(fl.db, rid)
        failed = {pr["device"]: pr["reason"] for pr in snap["problems"]
                  if pr["step"] == "install"}
        actives = fl.actives()
        if share == "3%":
            assert failed == {w1[0]: "os-error", w2[0]: "timeout"}
            assert f"2 devices failed within the budget: {min(failed)}" in row.reason
            assert actives[w1[0]] == fl.pubs["v1"].digest
            assert all(a == fl.pubs["v2"].digest for d, a in actives.items() if d not in failed)
        else:
            assert set(failed) == set(w1[:3])
            assert "wave-1: 3 of 28 devices failed, budget 1" in row.reason
            installed = {c["device_id"] for c in sniffer.by_type("install")}
            assert not installed & set(w2)  # it stopped at wave-1
            assert set(actives.values()) == {fl.pubs["v1"].digest}  # and rolled back


def test_a_device_that_goes_live_but_is_not_healthy_has_failed(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 6
    p = plan(shadow=False, canary="2", waves=(100,), health_grace_s=2)
    sick = expected_stages(p, n)["canary"][0]
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        from agent.bundle import read_manifest_unverified

        v2_model = read_manifest_unverified(fl.pubs["v2"].path).model_digest
        fl.sim.devices[sick].traffic.sick_models.add(v2_model)
        rid, row = run_in_process(fl, p)
        assert row.state == "paused"  # the canary's budget is 0 devices
        assert row.reason.startswith(f"canary: 1 of 2 devices failed, budget 0: {sick} "
                                     "(unhealthy)")
        step = next(s for s in fl.db.steps(rid) if s.device_id == sick)
        assert (step.status, step.result) == ("failed", "live")
        assert "live, but health is fallback: model error (simulated)" in step.detail


def test_offline_devices_are_skipped_or_waited_for(tmp_path: Path, broker: Broker,
                                                   fleet_keys: FleetKeys):
    n = 12
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        p = plan(shadow=False, canary="2", waves=(100,), offline="skip")
        away = sorted(set(expected_stages(p, n)["wave-1"]))[:2]
        for d in away:
            fl.sim.devices[d].network.cut(30)
        rid, row = run_in_process(fl, p, reporting=n - 2)
        assert row.state == "succeeded", row.reason
        assert "2 offline devices skipped" in row.reason
        snap = snapshot(fl.db, rid)
        assert {(pr["device"], pr["status"]) for pr in snap["problems"]} == \
            {(d, "skipped") for d in away}
        # offline=wait: a device that comes back within the wait gets its install then
        for d in away:
            fl.sim.devices[d].network.offline_until = 0  # reconnects at its next attempt
        back = sorted(set(expected_stages(p, n)["wave-1"]))[2:4]
        for d in back:
            fl.sim.devices[d].network.cut(3)
        rid2, row2 = run_in_process(fl, plan(shadow=False, canary="2", waves=(100,),
                                             offline="wait", offline_wait_s=30), bundle="v3",
                                    reporting=n - 4)
        assert row2.state == "succeeded", row2.reason
        steps = {s.device_id: s for s in fl.db.steps(rid2)}
        assert all(steps[d].status == S_DONE and steps[d].result == "live" for d in back)
        assert all(steps[d].result == "live" for d in away)  # back online by now


def test_broker_restart_mid_rollout_completes(tmp_path: Path, broker: Broker,
                                              fleet_keys: FleetKeys):
    n = 20
    restarted = []

    def progress(snap):  # the broker goes away for 2 s while wave-1 is being sent
        st = {s["name"]: s for s in snap["stages"]}
        if not restarted and st["wave-1"]["state"] == "deploying":
            restarted.append(time.monotonic())
            broker.stop()
            threading.Timer(2.0, broker.start).start()

    with floor(tmp_path, broker, fleet_keys, n) as fl:
        p = plan(shadow=False, canary="2", waves=(50, 100), max_parallel=1)
        rid, row = run_in_process(fl, p, on_progress=progress)
        assert restarted, "the broker was never restarted"
        assert row.state == "succeeded", row.reason
        assert set(fl.actives().values()) == {fl.pubs["v2"].digest}
        assert Counter(s.status for s in fl.db.steps(rid)) == {S_DONE: n}
