"""Shared set-up for the rollout tests and the rollout benchmark: a simulated floor (devices
with traffic, already on a v1 model), published bundles, a rollout database, and a driver that
runs the rollout in-process or as the real CLI in a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.keys import Keyring
from agent.link import MqttConfig
from fleet.artifacts import ArtifactServer, Published, publish
from fleet.inventory import Inventory, open_controller
from fleet.rollout import Bundle, NewRollout, Plan, create, drive
from fleet.selector_loop import SelectorLoop
from fleet.sim import DeviceFaults, SimConfig, Simulator
from fleet.simtraffic import TrafficConfig
from fleet.state import StateDB
from tests.agent_support import wait_for
from tests.broker_fixtures import make_real_bundle

REPO = Path(__file__).resolve().parents[2]
FAST_TRAFFIC = TrafficConfig(interval_s=0.25, batch=32)


def bundles(tmp: Path, release_key: Path, keyring: Path, store: Path) -> dict[str, Published]:
    """v1 (the fleet runs it), v2 and v3 (good candidates: same data, other samples), bad
    (fitted on shifted data: its decisions disagree and its fail rate is far off v1's)."""
    out = {}
    for name, seq, seed in (("v1", 1, 0), ("v2", 2, 5), ("v3", 4, 10), ("bad", 3, 1)):
        path = make_real_bundle(tmp / f"{name}.efb", release_key, sequence=seq, seed=seed)
        out[name] = publish(store, path, Keyring.load(keyring), who="test")
    return out


@dataclass
class Floor:
    sim: Simulator
    artifacts: ArtifactServer
    mqtt: MqttConfig
    fleet_key: Path
    keyring: Path
    store: Path
    pubs: dict[str, Published]
    db: StateDB = field(init=False)

    def __post_init__(self) -> None:
        self.db = StateDB(self.store / "rollouts.db")

    def bundle(self, name: str) -> Bundle:
        p = self.pubs[name]
        return Bundle(p.digest, p.size, self.artifacts.url_for(p.digest), p.sequence, p.name,
                      p.version)

    def actives(self) -> dict[str, str | None]:
        """device -> digest of its active model, from the devices' own stores."""
        return self.sim.actives()


@contextlib.contextmanager
def floor(tmp: Path, broker: Any, keys: Any, n: int, *, faults: Mapping[str, DeviceFaults]
          | None = None, sites: int = 3, state_interval_s: float = 0.5,
          traffic: TrafficConfig = FAST_TRAFFIC, workers: int = 4) -> Iterator[Floor]:
    store = tmp / "artifacts"
    pubs = bundles(tmp, keys.release_key, keys.keyring, store)
    srv = ArtifactServer(store).start()
    cfg = SimConfig(devices=n, root=tmp / "sim", mqtt=broker.mqtt(reconnect_min_s=0.5,
                                                                 reconnect_max_s=2),
                    keyring=keys.keyring, state_interval_s=state_interval_s, traffic=traffic,
                    preinstall=pubs["v1"].path, sites=sites, workers=workers)
    sim = Simulator(cfg, faults).start()
    try:
        assert sim.wait_connected(30)
        yield Floor(sim, srv, broker.mqtt(reconnect_min_s=0.5, reconnect_max_s=2),
                    keys.fleet_key, keys.keyring, store, pubs)
    finally:
        sim.stop()
        srv.stop()


def expected_stages(p: Plan, n: int, sites: int = 3) -> dict[str, tuple[str, ...]]:
    """Which simulated device lands in which stage, computed before the floor exists (the
    assignment depends only on ids and labels; every device is online and healthy)."""
    from fleet.inventory import Device
    from fleet.rollout import assign

    cfg = SimConfig(devices=n, root=Path("/nonexistent"), mqtt=MqttConfig(), keyring=Path("."),
                    sites=sites)
    inv = Inventory(Device.from_state({"device_id": cfg.device_id(i), "online": True,
                                       "labels": cfg.labels(i), "health": {"status": "ok"}})
                    for i in range(n))
    return {s.name: s.devices for s in assign(p, inv)}


def plan(**kw: Any) -> Plan:
    """A plan for tests: short bake, quick evidence."""
    base = dict(canary="3", bake_s=2.5, wave_bake_s=1.5, waves=(50, 100), max_parallel=20,
                shadow_min_dies=300, shadow_timeout_s=20, min_requests=50,
                measure_interval_s=0.5, step_timeout_s=20, health_grace_s=5,
                offline_wait_s=5)
    base.update(kw)
    return Plan(**base).validate()


# no bake (and so no bake gates): for the tests whose subject is not the gates; each stage
# passes once its installs are live, so nothing waits on the clock
NO_BAKE = {"bake_s": 0, "wave_bake_s": 0}


def wait_reporting(ctl: Any, n: int, timeout: float = 30) -> None:
    """Until every device reported a state with traffic on its model."""
    assert ctl.wait_for(lambda c: sum(
        1 for s in c.devices().values()
        if s.get("online") and (s.get("summary") or {}).get("requests")) >= n, timeout), \
        "devices did not report traffic"


def start_rollout(fl: Floor, ctl: Any, p: Plan, bundle: str = "v2",
                  rid: str | None = None) -> str:
    inv = Inventory.from_states(ctl.devices())
    return create(fl.db, p, NewRollout(fl.bundle(bundle), inv, "tester", rid))


def run_in_process(fl: Floor, p: Plan, bundle: str = "v2", rid: str | None = None,
                   on_progress: Any = None, reporting: int | None = None) -> tuple[str, Any]:
    """Create and drive a rollout in this process (once `reporting` devices, default all,
    report traffic); returns (id, final row)."""
    # waiting for every device to report is all the settling needed (when some are away,
    # their retained states must be in too: settle on the retained burst first)
    with open_controller(fl.mqtt, fleet_key=fl.fleet_key, client_id=f"ctl-{rid or 'x'}",
                         settle_s=0 if reporting is None else 0.5) as ctl:
        wait_reporting(ctl, len(fl.sim.devices) if reporting is None else reporting)
        rid = start_rollout(fl, ctl, p, bundle, rid)
        row = drive(fl.db, rid, ctl, actor="tester", progress=on_progress)
    return rid, row


class CommandSniffer:
    """Subscribes to every device's command topic: what was actually published, per device.

    Ready once the broker acknowledged the subscription (its SUBACK), so a command published
    after the constructor returns is seen. `sync()` (and `close()`, which calls it) proves
    absence too: it publishes a marker on a command topic no device has and waits until the
    marker comes back. The broker (mosquitto, one queue per subscriber) delivers in the order it
    took the messages, so once the marker is back every command that the broker had
    acknowledged before the call is in `commands`: assert "nothing was sent" after `sync()`,
    never after a sleep.

    Its socket is driven by an epoll `SelectorLoop`, not paho's `loop_start()`: paho's loop
    waits with select(), which cannot watch a descriptor above 1023, and a process holding a
    simulated floor of 1,000 devices (a socket and a store lock each) has its sockets there
    (the rollout bench's 1,000-device floor never saw its SUBACK)."""

    def __init__(self, mqtt_config: MqttConfig, prefix: str = "edgefleet",
                 timeout: float = 10) -> None:
        self.commands: list[dict[str, Any]] = []
        self.timeout = timeout
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._markers: set[str] = set()
        self._marker_topic = f"{prefix}/device/sniffer-marker-{os.getpid()}-{id(self)}/cmd"
        self.client = dataclasses.replace(mqtt_config, session_expiry_s=0).new_client(
            f"sniffer-{os.getpid()}-{id(self)}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"{prefix}/device/+/cmd", qos=1)
        self.client.on_subscribe = self._on_subscribe
        self._loop = SelectorLoop(reconnect_min_s=mqtt_config.reconnect_min_s,
                                  reconnect_max_s=mqtt_config.reconnect_max_s, tick_s=0.5,
                                  name="command-sniffer")
        self._loop.add(self.client)
        self._loop.start()
        if not self._subscribed.wait(timeout):
            self.close(sync=False)
            raise AssertionError(f"the sniffer's subscription was not acknowledged within "
                                 f"{timeout} s")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any],
                      properties: Any) -> None:
        if not any(c.is_failure for c in codes):
            self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        with self._cond:
            if "sniffer_marker" in doc:
                self._markers.add(doc["sniffer_marker"])
            else:
                self.commands.append(json.loads(doc["body"]))
            self._cond.notify_all()

    def sync(self) -> None:
        """Return once every command the broker took before this call has been received."""
        marker = f"{time.monotonic_ns()}"
        self.client.publish(self._marker_topic, json.dumps({"sniffer_marker": marker}), qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: marker in self._markers, self.timeout), \
                f"the sniffer's marker did not come back within {self.timeout} s"

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Whether `predicate(commands)` holds within `timeout`: woken by each command as it
        arrives."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.commands), timeout)

    def ids(self) -> Counter:
        with self._cond:
            return Counter(c["id"] for c in self.commands)

    def by_type(self, ctype: str) -> list[dict[str, Any]]:
        with self._cond:
            return [c for c in self.commands if c["type"] == ctype]

    def close(self, sync: bool = True) -> None:
        """Stop listening, after `sync()`: what it has then is all that was sent before."""
        try:
            if sync:
                self.sync()
        finally:
            self._loop.disconnect(self.client)
            self._loop.stop()


def cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120,
        **popen: Any) -> subprocess.CompletedProcess:
    """Run the real `edgefleet` CLI."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=REPO, **popen)


def cli_here(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """`edgefleet ARGS` through its entry point (`edgefleet.cli.main`) in this process, with
    `env` set: the same parsing, checks, output and exit codes as `cli`, without an
    interpreter start per call. A `--once` run drives the rollout here; the signal handlers
    it installs (Ctrl-C pauses) are put back afterwards."""
    import io
    import signal

    from edgefleet.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(old)
        for s, h in handlers.items():
            signal.signal(s, h)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def cli_env(fl: Floor) -> dict[str, str]:
    return {"EDGEFLEET_MQTT_HOST": fl.mqtt.host, "EDGEFLEET_MQTT_PORT": str(fl.mqtt.port),
            "EDGEFLEET_KEYRING": str(fl.keyring), "EDGEFLEET_FLEET_KEY": str(fl.fleet_key),
            "EDGEFLEET_ARTIFACT_STORE": str(fl.store),
            "EDGEFLEET_ARTIFACT_URL": fl.artifacts.base_url, "EDGEFLEET_ACTOR": "tester"}


# CLI flags for quick rollouts in tests: no shadow stage, little evidence, short timeouts
FAST_FLAGS = ["--no-shadow", "--min-requests", "50", "--measure-interval", "0.5s",
              "--step-timeout", "20s", "--health-grace", "5s"]


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    """Poll `pred` (state kept in a database or another process, with no event to wait on)
    until it returns something true; fails the test naming `what` after `timeout`."""
    return wait_for(pred, timeout, interval=0.1, what=what)

