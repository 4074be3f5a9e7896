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
