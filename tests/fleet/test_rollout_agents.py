"""A rollout to real agents (`edgefleet agent serve` processes with their fleet link, serving
dies on their sockets), driven through the CLI's entry point in this process: the candidate
shadows the live model on the dies the testers send, through the agent's serving path, then
goes live on every box. This is the sequence docs/rollouts.md gives for a few local agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from agent.install import InstallConfig, Installer
from fleet.artifacts import ArtifactServer
from fleet.inventory import open_controller
from tests.agent_support import wait_for
from tests.broker_fixtures import Broker, FleetKeys, make_real_bundle
from tests.fleet.rollout_helpers import REPO, cli_here

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _agent(root: Path, name: str, broker: Broker, keys: FleetKeys, v1: Path,
           site: str) -> subprocess.Popen:
    store = root / name / "store"
    inst = Installer.open(store, keys.keyring, InstallConfig(max_latency_s=None))
    inst.start()
    inst.install(v1)
    inst.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(EDGEFLEET_MQTT_HOST=broker.host, EDGEFLEET_MQTT_PORT=str(broker.port),
               EDGEFLEET_DEVICE_ID=name, EDGEFLEET_LABELS=f"site={site},tester=t1",
               EDGEFLEET_STATE_INTERVAL_S="0.5", EDGEFLEET_MAX_LATENCY_MS="0")
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket",
         str(root / name / "agent.sock"), "--store", str(store), "--keyring",
         str(keys.keyring), "--metrics-addr", ""], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT)


def _tester(sock: Path, stop: threading.Event, seed: int) -> None:
    """A tester: one die at a time, as fast as the answers come, ~1 ms apart."""
    rng = np.random.default_rng(seed)
    wait_for(lambda: sock.exists() or stop.is_set(), 120, interval=0.05,
             what=f"the agent's socket {sock}")
    with Client(sock) as c:
        i = 0
        while not stop.is_set():
            x = rng.normal(size=8).astype(np.float32)
            if rng.random() < 0.02:
                x[:2] += 8
            c.predict(x, die_id=i)
            i += 1
            stop.wait(0.001)  # pacing, ~1 ms between dies; returns at once on stop


def test_rollout_with_shadow_to_real_agents_serving_dies(tmp_path: Path, broker: Broker,
                                                         fleet_keys: FleetKeys):
    v1 = make_real_bundle(tmp_path / "v1.efb", fleet_keys.release_key, sequence=1, seed=0)
    v2 = make_real_bundle(tmp_path / "v2.efb", fleet_keys.release_key, sequence=2, seed=5)
    store = tmp_path / "art"
    env = {"EDGEFLEET_MQTT_HOST": broker.host, "EDGEFLEET_MQTT_PORT": str(broker.port),
           "EDGEFLEET_KEYRING": str(fleet_keys.keyring), "EDGEFLEET_ACTOR": "tester",
           "EDGEFLEET_FLEET_KEY": str(fleet_keys.fleet_key),
           "EDGEFLEET_ARTIFACT_STORE": str(store)}
    r = cli_here("fleet", "publish", str(v2), env=env)
    assert r.returncode == 0 and "published fleet-test 1.2.5" in r.stdout, r.stderr
    digest = r.stdout.split("sha256:")[1].split()[0]
    srv = ArtifactServer(store).start()
    names = ["box-a", "box-b", "box-c"]
    procs = [_agent(tmp_path, n, broker, fleet_keys, v1, site)
             for n, site in zip(names, ("lab1", "lab2", "lab1"), strict=True)]
    stop = threading.Event()
    testers = [threading.Thread(target=_tester, args=(tmp_path / n / "agent.sock", stop, i),
                                daemon=True) for i, n in enumerate(names)]
    for t in testers:
        t.start()
    try:
        with open_controller(broker.mqtt(), settle_s=0) as ctl:  # every box answering dies
            assert ctl.wait_for(lambda c: sum(
                1 for s in c.devices().values()
                if s.get("online") and ((s.get("summary") or {}).get("requests") or 0) > 50
            ) == 3, 60), ctl.devices()
        r = cli_here("fleet", "rollout", "start", f"sha256:{digest}", "-l",
                     "site in (lab1,lab2)", "--id", "r-agents", "--canary", "1", "--waves",
                     "100%", "--bake", "0s", "--shadow-min-dies", "300", "--min-requests", "50",
                     "--measure-interval", "0.5s", "--artifact-url", srv.base_url, "--once",
                     "-o", "json", env=env)
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["state"] == "succeeded"
        ev = snap["stages"][0]["verdict"]["evidence"]
        assert snap["stages"][0]["name"] == "shadow" and ev["dies"] >= 300
        rows = json.loads(cli_here("fleet", "devices", "-o", "json", env=env).stdout)
        assert {d["model_digest"] for d in rows} == {digest}
        # healthy with no shadow left, as the boxes report it: waited for, since health is a
        # window over the latest requests that restarts with the new model (seen once at load
        # ~20: a box not `ok` in the first read after the rollout ended)
        with open_controller(broker.mqtt(), settle_s=0) as ctl:
            assert ctl.wait_for(lambda c: sum(
                1 for s in c.devices().values()
                if (s.get("health") or {}).get("status") == "ok"
                and (s.get("model") or {}).get("shadow") is None) == 3, 30), ctl.devices()
    finally:
        stop.set()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        srv.stop()
