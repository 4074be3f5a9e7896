"""The device simulator: many real devices (store, installer, self-test, link) in one process
against one broker, each taking one install, with faults injected per device."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.sim import DeviceFaults, SimConfig, Simulator
from fleet.transport import FleetController
from tests.broker_fixtures import Broker, FleetKeys, make_real_bundle

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("driver", ["selector", "threads"])
def test_fifty_devices_take_one_install_each_with_faults(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys, artifacts, driver: str):
    n = 50
    cfg = SimConfig(devices=n, root=tmp_path / "sim", mqtt=broker.mqtt(reconnect_min_s=1),
                    keyring=fleet_keys.keyring, driver=driver)
    faults = {
        cfg.device_id(1): DeviceFaults(install_failure=True),
        cfg.device_id(2): DeviceFaults(self_test_failure=True),
        cfg.device_id(3): DeviceFaults(slow_download_bps=4000),
        cfg.device_id(4): DeviceFaults(offline_mid_install_s=1.5),
    }
    url, sha, size = artifacts.add(make_real_bundle(tmp_path / "v1.efb",
                                                    fleet_keys.release_key, sequence=1))
    with FleetController(broker.mqtt(), fleet_key=fleet_keys.fleet_key) as ctl, \
            Simulator(cfg, faults) as sim:
        # how fast they come online depends on the machine: bench/fleet_link_bench.py
        assert ctl.wait_for(lambda c: sum(1 for s in c.devices().values() if s["online"]) == n,
                            60)
        states = ctl.devices()
        assert {s["labels"]["group"] for s in states.values()} >= {"canary", "wave-1"}
        cmds = {dev: ctl.install(dev, url=url, sha256=sha, size=size, sequence=1,
                                 rollout_id="r-sim", wait=False) for dev in sim.devices}
        finals = {dev: ctl.wait_command(cmd.id, 60) for dev, cmd in cmds.items()}
        # every device reports the outcome in its state too (the offline one once it is back)
        assert ctl.wait_for(lambda c: all(
            (c.state(d)["last_command"] or {}).get("id") == cmds[d].id and c.state(d)["online"]
            for d in sim.devices), 30)
    reasons = {d: (f["step"], f.get("reason")) for d, f in finals.items()}
    assert reasons.pop(cfg.device_id(1)) == ("failed", "os-error")
    assert reasons.pop(cfg.device_id(2)) == ("failed", "latency-too-high")
    assert set(reasons.values()) == {("live", None)}
    assert ctl.steps(cmds[cfg.device_id(4)].id)[-1] == "live"
    assert ctl.state(cfg.device_id(4))["model"]["active"]["digest"] == sha
    assert ctl.state(cfg.device_id(2))["model"]["active"] is None


def test_light_mode_over_two_processes(tmp_path: Path, broker: Broker, fleet_keys: FleetKeys,
                                       artifacts):
    """Light mode, spread over two processes: every device still verifies the signed command,
    downloads, verifies and commits the bundle (real store), and reports it in its state; the
    ONNX Runtime steps are measured once per process, and a self-test fault still fails."""
    from fleet.simprocs import ProcessSimulator

    n = 30
    v1 = make_real_bundle(tmp_path / "v1.efb", fleet_keys.release_key, sequence=1)
    cfg = SimConfig(devices=n, root=tmp_path / "sim", mqtt=broker.mqtt(reconnect_min_s=1),
                    keyring=fleet_keys.keyring, light=True, preinstall=v1,
                    full_devices=frozenset({"sim-0000"}))
    bad = cfg.device_id(n - 1)  # in the second process
    url, sha, size = artifacts.add(make_real_bundle(tmp_path / "v2.efb",
                                                    fleet_keys.release_key, sequence=2))
    sim = ProcessSimulator(cfg, {bad: DeviceFaults(self_test_failure=True)}, procs=2)
    assert [(s.offset, s.devices) for s in sim.shards()] == [(0, 15), (15, 15)]
    with FleetController(broker.mqtt(), fleet_key=fleet_keys.fleet_key) as ctl, sim:
        assert sim.wait_connected(60)
        assert ctl.wait_for(lambda c: sum(1 for s in c.devices().values() if s["online"]) == n,
                            60)
        cmds = {dev: ctl.install(dev, url=url, sha256=sha, size=size, sequence=2,
                                 rollout_id="r-light", wait=False) for dev in sim.device_ids}
        finals = {dev: ctl.wait_command(cmd.id, 60) for dev, cmd in cmds.items()}
        back = cfg.device_id(3)  # a light rollback: the retained v1, checked at rest
        assert ctl.wait_command(ctl.rollback(back, rollout_id="r-light").id, 60)["step"] \
            == "rolled-back"
        actives = sim.actives()
        usage = sim.usage()
        assert ctl.wait_for(lambda c: all(
            (c.state(d)["model"]["active"] or {}).get("digest") == actives[d]
            for d in sim.device_ids), 30)
    assert finals.pop(bad)["reason"] == "latency-too-high"
    assert {f["step"] for f in finals.values()} == {"live"}
    assert actives.pop(bad) == actives.pop(back) != sha
    assert set(actives.values()) == {sha}
    assert [u["devices"] for u in usage] == [15, 15]
    for u in usage:  # each process measured the real steps and reuses the durations
        t = u["light_timings"]
        assert t["measured"] and t["samples"] == 3
        assert t["load_s"] > 0 and t["self_test_s"] > 0 and t["latency_s"] > 0
    assert len(sim.final_usage) == 2


def test_sim_bench_runs_and_reports(tmp_path: Path):
    """bench/sim_bench.py end to end on a tiny floor (the figures themselves are load-dependent
    and belong to the benchmark, not here)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "sim.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "sim_bench.py"), "--runs",
                        "light:2:12", "--parallel", "6", "--out", str(out)],
                       capture_output=True, text=True, timeout=110, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads(out.read_text())["runs"]["light:2:12"]
    assert run["live"] == run["on_v2"] == 12 and run["timeouts"] == 0
    assert [p["devices"] for p in run["procs_detail"]] == [6, 6]
    assert run["events"] >= 12 * 3 and set(run["cpu_share_during_installs"]) == {
        "bench_controller", "mosquitto", "artifact_server"}
