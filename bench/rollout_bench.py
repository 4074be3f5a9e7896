"""Rollout benchmark: the real controller service (`edgefleet fleet controller` in its own
process; `edgefleet fleet rollout start --follow` asks it for each rollout) against simulated
floors (fleet/sim.py: real device code, real ONNX Runtime traffic, shadow
scoring) over a real Mosquitto, with the artifact server (`edgefleet fleet serve-artifacts`) in
a third process.

    .venv/bin/python bench/rollout_bench.py [--sizes 100,500,1000] [--fault-devices 200]
                                            [--procs 2] [--light] [--light-from 2000]
                                            [--scenarios scale,...,back-to-back]
                                            [--profile DIR] [--out bench/results/rollout.json]
    .venv/bin/python bench/rollout_bench.py --sizes 1000,5000,10000 --scenarios scale

`--procs P` spreads each floor over P simulator processes (fleet/simprocs.py); `--light` runs
the devices in the simulator's light mode (fleet/sim.py: real MQTT, signed commands, downloads,
verification and store; the ONNX Runtime load and self-test replaced by their measured
duration), except the canary's devices, which keep real traffic and shadow scoring. Floors of
`--light-from` devices or more (default 2,000) are light whatever `--light` says, over at least
one simulator process per 2,500 devices: one process of full-mode devices holds about 500.
`--profile DIR` runs the controller service under bench/profiled.py (yappi, every thread).

Every scale figure comes with the load average at its start and end: on a shared machine the
times are upper bounds; the controller's own CPU seconds (from /proc) and its resident memory
(VmRSS, VmHWM) are the figures docs/scale.md compares. The controller's CPU is measured over
the rollout (`controller_cpu_s`, from `rollout start` to its end) and, for IDLE_S seconds
before it, in the steady state (`controller_steady_cpu_s_per_s`: the devices' periodic state
reports, its rounds and heartbeats, which it pays with or without a rollout); the rollout's
own cost is the first less the second times the rollout's wall time (`controller_cpu_net_s`).

Devices report their state as the agent does by default: when their health summary changed,
at most every 30 s (agent/link.py; a full-mode device's traffic changes it every second, a
light device's static summary never). The exception is what the bakes need: a bake judges
the health its stage's devices report on the new model, and a 10-s bake (the CLI's minimum,
so that the controller's own cost shows) would see none of it from a device that reports
every 30 s. So the devices of every stage but the last (no bake) that score real traffic
report every 5 s, half a bake: each reports real traffic on the new model before its bake
ends, as a real fleet's bakes (minutes) are long next to its 30-s interval. On a 1,000-device
full floor that is about half the devices (canary, 10%, 50%), about 115 state messages a
second instead of the 500 of an earlier version of this bench (every device every 2 s). The
simulator ticks a process's devices in one pass a second, so these arrive as one burst a
second, not spread evenly as a real fleet's (which costs the controller about twice as much:
docs/scale.md). Before its first rollout a floor waits until every device has reported
traffic (a fleet that has been running), and the steady state is measured over one 30-s
interval.

Scenarios (each on a fresh broker and a fresh floor whose devices already run v1):

  scale-N          v1 -> v2 (a good candidate) on N devices: shadow stage on the canary, canary
                   10, bake 10 s, waves 10%, 50%, 100% (10 s bake after each but the last),
                   100 installing at once. Per-stage times, command-to-live latency
                   distribution, time until every device is live (target: 60 s at 500).
  shadow-reject    a candidate whose decisions disagree with v1's on the live traffic: stopped
                   at the shadow stage; no device ever gets an install command
  canary-rollback  no shadow stage, a candidate whose fail rate is far off v1's: the canary's
                   gates fail, the canary is rolled back (target: within 10 s of the verdict),
                   no other device gets an install command
  budget-3pct      3% of the devices fail to install, budget 5% per stage (waves 50%, 100%):
                   completes, lists them
  budget-8pct      8% fail: stops at the wave where the budget runs out, rolls back (policy)
  kill-resume      the controller service is SIGKILLed mid-wave and started again (as its
                   supervisor would): completes, no command sent twice, end state equal to an
                   uninterrupted run's
  broker-restart   Mosquitto restarted mid-wave: the rollout completes
  back-to-back     (only when named in --scenarios) --back-to-back K rollouts (default 10), one
                   after the other, each to a new bundle, on one light floor of
                   --back-to-back-devices (default 1,000) driven by one controller service:
                   its RSS and CPU after each (target: RSS after the last within 10% of after
                   the first)

Device-side figures (the candidate's shadow scoring cost on the agent's p99) are measured by
bench/shadow_bench.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.keys import generate_keypair, trust_key  # noqa: E402
from fleet.inventory import open_controller  # noqa: E402
from fleet.rollout import Plan, assign  # noqa: E402
from fleet.sim import DeviceFaults, SimConfig, Simulator  # noqa: E402
from fleet.simprocs import ProcessSimulator  # noqa: E402
from fleet.simtraffic import TrafficConfig  # noqa: E402
from fleet.state import StateDB  # noqa: E402
from tests.broker_fixtures import Broker, free_port  # noqa: E402
from tests.fleet.rollout_helpers import CommandSniffer, bundles  # noqa: E402

logging.getLogger("edgefleet").setLevel(logging.ERROR)  # one line per install otherwise
TARGET_500_S = 60.0
TARGET_ROLLBACK_S = 10.0
SITES = 4
TRAFFIC = TrafficConfig(interval_s=1.0, batch=32)
SIM: dict[str, Any] = {"procs": 1, "light": False, "light_from": 2000,
                       "profile": None}  # --procs, --light, --light-from, --profile
DEVICES_PER_PROC = 2500  # light floors get at least n / this simulator processes
STATE_INTERVAL_S = 30.0  # the agent's default (agent/link.py LinkConfig.state_interval_s)
BAKE_S = 10.0  # every bake of the scale runs (--bake, --wave-bake: the CLI's minimum)
# a device a bake judges reports at least twice a bake, so every one has reported real traffic
# on the new model before its bake ends (the rule a real fleet's bake length follows too)
JUDGED_STATE_INTERVAL_S = BAKE_S / 2
IDLE_S = STATE_INTERVAL_S  # the steady state is measured over one state interval


def _all_report_traffic(states: dict[str, dict[str, Any]]) -> bool:
    return all((st.get("summary") or {}).get("requests") for st in states.values())


def sim_mode(n: int, light: bool = False) -> tuple[bool, int]:
    """(light, processes) for an n-device floor: light when asked, with --light or from
    --light-from devices on, spread over enough processes that each holds at most
    DEVICES_PER_PROC."""
    light = light or bool(SIM["light"]) or n >= int(SIM["light_from"])
    procs = max(int(SIM["procs"]), -(-n // DEVICES_PER_PROC) if light else 1)
    return light, procs


class Env:
    """Keys, bundles, the artifact server (a subprocess); one broker per scenario."""

    def __init__(self, root: Path) -> None:
        self.root = root
        release = generate_keypair(root / "keys", "release")
        fleet = generate_keypair(root / "keys", "fleet")
        self.keyring = root / "keyring"
        trust_key(self.keyring, release.public_path, "release")
        trust_key(self.keyring, fleet.public_path, "fleet")
        self.fleet_key = fleet.private_path
        self.release_key = release.private_path
        self.store = root / "artifacts"
        self.pubs = bundles(root, release.private_path, self.keyring, self.store)
        self.art_port = free_port()
        self.artifacts = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "fleet", "serve-artifacts", "--store",
             str(self.store), "--host", "127.0.0.1", "--port", str(self.art_port)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)

    def close(self) -> None:
        self.artifacts.terminate()
        self.artifacts.wait(10)

    def env(self, broker: Broker, db: Path) -> dict[str, str]:
        return dict(os.environ, EDGEFLEET_MQTT_HOST=broker.host,
                    EDGEFLEET_MQTT_PORT=str(broker.port), EDGEFLEET_KEYRING=str(self.keyring),
                    EDGEFLEET_FLEET_KEY=str(self.fleet_key),
                    EDGEFLEET_ARTIFACT_STORE=str(self.store), EDGEFLEET_ROLLOUT_DB=str(db),
                    EDGEFLEET_ARTIFACT_URL=f"http://127.0.0.1:{self.art_port}",
                    EDGEFLEET_ACTOR="bench")


class Floor:
    """A broker, a simulated floor on v1 and a controller service. Its devices report their
    state as the agent does (every STATE_INTERVAL_S when their summary changed), except those
    whose new-model health a bake of `flags`' plan judges: every JUDGED_STATE_INTERVAL_S."""

    def __init__(self, env: Env, name: str, n: int, faults: dict | None = None,
                 light: bool = False, flags: list[str] | None = None) -> None:
        self.env, self.n = env, n
        self.dir = env.root / name
        (self.dir / "broker").mkdir(parents=True)
        self.broker = Broker(self.dir / "broker").start()
        self.db_path = self.dir / "rollouts.db"
        light, procs = sim_mode(n, light)
        self.mode = {"light": light, "procs": procs}
        stages = _expected_stages(n, flags or _flags())
        full = frozenset(stages["canary"] if light else ())
        judged = [d for devs in list(stages.values())[:-1] for d in devs  # the last: no bake
                  if not light or d in full]  # a light device's summary never changes
        cfg = SimConfig(devices=n, root=self.dir / "sim",
                        mqtt=self.broker.mqtt(reconnect_min_s=1, reconnect_max_s=4),
                        keyring=env.keyring, state_interval_s=STATE_INTERVAL_S,
                        state_intervals=dict.fromkeys(judged, JUDGED_STATE_INTERVAL_S),
                        traffic=TRAFFIC, preinstall=env.pubs["v1"].path, sites=SITES,
                        workers=64 if light else 4, light=light, full_devices=full)
        t0 = time.monotonic()
        self.sim: Simulator | ProcessSimulator = (
            ProcessSimulator(cfg, faults, procs=procs) if light or procs > 1
            else Simulator(cfg, faults)).start()
        assert self.sim.wait_connected(120 + n / 50), "devices did not connect"
        with open_controller(self.broker.mqtt()) as ctl:  # every state retained at the broker
            assert ctl.wait_for(lambda c: c.device_count() >= n, 120 + n / 50), \
                f"{ctl.device_count()} of {n} devices reported their state"
            # a fleet that has been running: every device's state reports traffic (the
            # rollout's baselines, the bakes' old side)
            assert ctl.wait_for(lambda c: _all_report_traffic(c.devices()),
                                STATE_INTERVAL_S * 3 + n / 50), "no traffic reported"
        self.setup_s = time.monotonic() - t0
        self.sniffer = CommandSniffer(self.broker.mqtt())
        self.controller = self.start_controller()

    def start_controller(self) -> subprocess.Popen:
        """`edgefleet fleet controller`, returned once it holds the lease (with --profile
        under bench/profiled.py, which writes its profile when it stops)."""
        prof = SIM["profile"]
        self.profile = Path(prof) / f"{self.dir.name}.txt" if prof else None
        proc = self.popen("fleet", "controller", "--metrics-port", "0",
                          profile=self.profile)
        db = StateDB(self.db_path)
        deadline = time.monotonic() + 60
        while not db.lease()["live"]:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the controller did not take its lease"
            time.sleep(0.1)
        db.close()
        self.cpu0 = _cpu_s(proc.pid)
        return proc

    def controller_cpu_s(self) -> float:
        return round(_cpu_s(self.controller.pid) - self.cpu0, 2)

    def controller_rss_mb(self) -> dict[str, float]:
        """The controller's resident memory now and its peak (VmRSS, VmHWM), in MB."""
        return _rss_mb(self.controller.pid)

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgefleet", *args], cwd=REPO,
                              env=self.env.env(self.broker, self.db_path), capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, *args: str, profile: Path | None = None) -> subprocess.Popen:
        run = [str(REPO / "bench" / "profiled.py"), str(profile)] if profile else \
            ["-m", "edgefleet"]
        return subprocess.Popen([sys.executable, *run, *args], cwd=REPO,
                                env=self.env.env(self.broker, self.db_path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def actives(self) -> dict[str, str | None]:
        return self.sim.actives()

    def close(self) -> None:
        self.controller.terminate()
        self.controller.communicate(timeout=60)
        if self.profile is not None:
            print(f"controller profile: {self.profile}", flush=True)
        self.sniffer.close()
        self.sim.stop()
        self.broker.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "peak_rss_mb": round(int(fields["VmHWM"].split()[0]) / 1024, 1)}


def _flags(canary: int = 10, *, shadow: bool = True, extra: tuple[str, ...] = (),
           waves: str = "10%,50%,100%") -> list[str]:
    return ["--canary", str(canary), "--bake", f"{BAKE_S:g}s", "--wave-bake", f"{BAKE_S:g}s",
            "--waves", waves, "--max-parallel", "100", "--shadow-min-dies", "1000",
            "--shadow-timeout", "120s", "--min-requests", "200", "--measure-interval", "1s",
            "--step-timeout", "60s", "--health-grace", "10s", "--follow",
            *([] if shadow else ["--no-shadow"]), *extra]


def _plan_of(flags: list[str]) -> Plan:
    kv = dict(zip(flags[::2], flags[1::2], strict=False))  # --follow comes after the pairs
    return Plan(canary=kv["--canary"], waves=kv["--waves"], shadow="--no-shadow" not in flags)


def _expected_stages(n: int, flags: list[str]) -> dict[str, tuple[str, ...]]:
    from agent.link import MqttConfig
    from fleet.inventory import Device, Inventory

    cfg = SimConfig(devices=n, root=Path("/x"), mqtt=MqttConfig(), keyring=Path("."),
                    sites=SITES)
    inv = Inventory(Device.from_state({"device_id": cfg.device_id(i), "online": True,
                                       "labels": cfg.labels(i), "health": {"status": "ok"}})
                    for i in range(n))
    return {s.name: s.devices for s in assign(_plan_of(flags), inv)}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 3)


def _report(db_path: Path, rid: str) -> dict[str, Any]:
    """Per-stage times and the command-to-live distribution, from the rollout database."""
    db = StateDB(db_path)
    row = db.rollout(rid)
    steps = db.steps(rid)
    stages = []
    for s in db.stages(rid):
        stages.append({
            "stage": s.name, "kind": s.kind, "devices": s.devices, "state": s.state,
            "deploy_s": round(s.deployed - s.started, 2) if s.deployed and s.started else None,
            "bake_or_evidence_s": round(s.finished - s.bake_started, 2)
            if s.finished and s.bake_started else None,
            "total_s": round(s.finished - s.started, 2) if s.finished and s.started else None,
            "verdict": (s.verdict or {}).get("verdict"),
            "evidence": (s.verdict or {}).get("evidence")})
    live = [s.finished - s.sent for s in steps if s.step == "install" and s.status == "done"
            and s.sent and s.finished and s.result == "live"]
    installs = [s for s in steps if s.step == "install" and s.sent]
    first_cmd = min((s.sent for s in steps if s.sent), default=None)
    last_live = max((s.finished for s in steps if s.step == "install" and s.status == "done"),
                    default=None)
    out = {
        "rollout": rid, "state": row.state, "reason": row.reason,
        "wall_s": round((row.finished or time.time()) - row.created, 2),
        "first_command_to_all_live_s": round(last_live - first_cmd, 2)
        if first_cmd and last_live else None,
        "stages": stages,
        "command_to_live_s": {"n": len(live), "p50": _pct(live, 50), "p90": _pct(live, 90),
                              "p99": _pct(live, 99), "max": round(max(live), 3) if live
                              else None, "mean": round(statistics.mean(live), 3) if live
                              else None},
        "install_commands": len(installs),
        "step_status": dict(sorted(__import__("collections").Counter(
            f"{s.step}:{s.status}" for s in steps).items())),
    }
    db.close()
    return out


def _dupes(fl: Floor) -> int:
    return sum(c - 1 for c in fl.sniffer.ids().values() if c > 1)


def scenario_scale(env: Env, n: int, shadow: bool = True) -> dict[str, Any]:
    fl = Floor(env, f"scale-{n}", n)
    try:
        cpu_idle0 = fl.controller_cpu_s()
        time.sleep(IDLE_S)  # the steady state: the devices' state stream, rounds, heartbeats
        steady = (fl.controller_cpu_s() - cpu_idle0) / IDLE_S
        load0 = os.getloadavg()
        cpu0 = fl.controller_cpu_s()
        t0 = time.monotonic()
        r = fl.cli("fleet", "rollout", "start", f"sha256:{env.pubs['v2'].digest}", "--id",
                   f"r-scale-{n}", *_flags(10, shadow=shadow), timeout=900 + n / 10)
        wall = time.monotonic() - t0
        cpu = round(fl.controller_cpu_s() - cpu0, 2)
        out = {"devices": n, "simulator": fl.mode, "setup_s": round(fl.setup_s, 1),
               "exit_code": r.returncode, "cli_wall_s": round(wall, 2),
               "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "controller_cpu_s": cpu,
               "controller_steady_cpu_s_per_s": round(steady, 4),
               "controller_cpu_net_s": round(cpu - steady * wall, 2),
               "controller": fl.controller_rss_mb(), **_report(fl.db_path, f"r-scale-{n}")}
        out["controller_cpu_ms_per_device"] = round(1000 * cpu / n, 3)
        out["controller_cpu_net_ms_per_device"] = round(1000 * out["controller_cpu_net_s"] / n,
                                                        3)
        out["step_timeouts"] = sum(v for k, v in out["step_status"].items()
                                   if k.endswith(":timeout"))
        actives = fl.actives()
        out["devices_on_v2"] = sum(a == env.pubs["v2"].digest for a in actives.values())
        out["duplicate_commands"] = _dupes(fl)
        if r.returncode != 0:
            out["stderr"] = r.stderr[-2000:]
        return out
    finally:
        fl.close()


def scenario_back_to_back(env: Env, n: int, k: int) -> dict[str, Any]:
    """`k` rollouts one after the other on one floor, driven by one controller service: each
    to a new bundle (sequences rise, as a device requires), no shadow stage, no bakes. The
    controller's RSS and CPU after each: a long-running controller must not grow per rollout
    (target: RSS after the k-th within 10% of after the first)."""
    from agent.keys import Keyring
    from fleet.artifacts import publish
    from tests.broker_fixtures import make_real_bundle

    ring = Keyring.load(env.keyring)
    digests = []
    for i in range(k):
        path = make_real_bundle(env.root / f"b2b-{i}.efb", env.release_key, sequence=10 + i,
                                seed=5)
        digests.append(publish(env.store, path, ring, who="bench").digest)
    flags = ["--canary", "10", "--bake", "0s", "--wave-bake", "0s", "--waves", "50%,100%",
             "--max-parallel", "100", "--step-timeout", "60s", "--health-grace", "10s",
             "--no-shadow", "--follow"]  # no bake, so no gates: memory, not evidence
    fl = Floor(env, f"back-to-back-{n}", n, light=True, flags=flags)
    rollouts = []
    try:
        for i, digest in enumerate(digests):
            cpu0 = fl.controller_cpu_s()
            r = fl.cli("fleet", "rollout", "start", f"sha256:{digest}", "--id", f"r-b2b-{i}",
                       *flags, timeout=900 + n / 10)
            rep = _report(fl.db_path, f"r-b2b-{i}")
            rollouts.append({"rollout": i + 1, "exit_code": r.returncode, "state": rep["state"],
                             "wall_s": rep["wall_s"],
                             "controller_cpu_s": round(fl.controller_cpu_s() - cpu0, 2),
                             **fl.controller_rss_mb(), "loadavg": os.getloadavg()[0]})
            print(json.dumps(rollouts[-1]), flush=True)
            if r.returncode != 0:
                rollouts[-1]["stderr"] = r.stderr[-1500:]
                break
        first, last = rollouts[0]["rss_mb"], rollouts[-1]["rss_mb"]
        return {"devices": n, "simulator": fl.mode, "rollouts": rollouts,
                "all_succeeded": all(x["state"] == "succeeded" for x in rollouts)
                and len(rollouts) == k,
                "rss_first_mb": first, "rss_last_mb": last,
                "rss_last_over_first": round(last / first, 3),
                "within_10pct": last <= 1.10 * first}
    finally:
        fl.close()


def scenario_shadow_reject(env: Env, n: int) -> dict[str, Any]:
    fl = Floor(env, "shadow-reject", n)
    try:
        r = fl.cli("fleet", "rollout", "start", f"sha256:{env.pubs['bad'].digest}", "--id",
                   "r-shadow", *_flags(10))
        rep = _report(fl.db_path, "r-shadow")
        time.sleep(0.5)
        return {"devices": n, "exit_code": r.returncode, **rep,
                "install_commands_sent": len(fl.sniffer.by_type("install")),
                "shadow_commands_sent": len(fl.sniffer.by_type("shadow")),
                "shadow_stop_commands_sent": len(fl.sniffer.by_type("shadow-stop")),
                "devices_answering_with_candidate": sum(
                    a == env.pubs["bad"].digest for a in fl.actives().values()),
                "stopped_at_shadow": rep["state"] == "failed"
                and rep["stages"][0]["state"] == "failed"}
    finally:
        fl.close()


def scenario_canary_rollback(env: Env, n: int) -> dict[str, Any]:
    flags = _flags(10, shadow=False, extra=("--on-failure", "rollback"))
    fl = Floor(env, "canary-rollback", n, flags=flags)
    try:
        r = fl.cli("fleet", "rollout", "start", f"sha256:{env.pubs['bad'].digest}", "--id",
                   "r-canary", *flags)
        rep = _report(fl.db_path, "r-canary")
        db = StateDB(fl.db_path)
        failed_at = next(a["ts"] for a in db.audit_log("r-canary")
                         if a["action"] == "rolling-back")
        rb = [s.finished for s in db.steps("r-canary") if s.step == "rollback" and s.finished]
        canary = set(_expected_stages(n, flags)["canary"])
        time.sleep(0.5)
        installed = {c["device_id"] for c in fl.sniffer.by_type("install")}
        out = {"devices": n, "exit_code": r.returncode, **rep,
               "gate_failure": rep["reason"],
               "gate_failed_to_canary_rolled_back_s": round(max(rb) - failed_at, 2)
               if rb else None, "target_s": TARGET_ROLLBACK_S,
               "install_commands_outside_canary": len(installed - canary),
               "devices_on_candidate_after": sum(a == env.pubs["bad"].digest
                                                 for a in fl.actives().values())}
        db.close()
        return out
    finally:
        fl.close()


def scenario_budget(env: Env, n: int, share: float) -> dict[str, Any]:
    # Two waves (45% and 50% of the fleet): a 5% budget per wave is then a few devices (it
    # rounds down: 5% of a 10-device wave is 0). The failing devices are spread evenly over
    # the waves; the canary (budget 0) stays clean.
    flags = _flags(10, shadow=False, extra=("--max-failures", "5%", "--on-failure",
                                            "rollback", "--allow-partial"), waves="50%,100%")
    stages = _expected_stages(n, flags)
    k = round(share * n)
    waves = [devs for name, devs in stages.items() if name.startswith("wave")]
    failing = [d for i in range(k) for d in [waves[i % len(waves)][i // len(waves)]]]
    faults = {d: DeviceFaults(install_failure=True) for d in failing}
    name = f"budget-{round(share * 100)}pct"
    fl = Floor(env, name, n, faults, flags=flags)
    try:
        r = fl.cli("fleet", "rollout", "start", f"sha256:{env.pubs['v2'].digest}", "--id",
                   f"r-{name}", *flags)
        rep = _report(fl.db_path, f"r-{name}")
        db = StateDB(fl.db_path)
        failed = sorted(s.device_id for s in db.steps(f"r-{name}")
                        if s.step == "install" and s.status in ("failed", "timeout"))
        db.close()
        time.sleep(0.5)
        installed = {c["device_id"] for c in fl.sniffer.by_type("install")}
        later = [d for st, devs in stages.items() for d in devs
                 if st.startswith("wave") and d not in installed]
        return {"devices": n, "failing_devices": len(failing), "budget": "5% per stage",
                "waves": {name: len(devs) for name, devs in stages.items()},
                "exit_code": r.returncode, **rep, "failed_listed": failed,
                "all_failing_listed": sorted(failing) == failed or set(failed) <= set(failing),
                "devices_never_commanded": len(later)}
    finally:
        fl.close()


def scenario_kill_resume(env: Env, n: int) -> dict[str, Any]:
    fl = Floor(env, "kill-resume", n)
    try:
        flags = _flags(10)
        ref = fl.cli("fleet", "rollout", "start", f"sha256:{env.pubs['v2'].digest}", "--id",
                     "r-ref", *flags)
        fl.sniffer.commands.clear()
        start = [a for a in flags if a != "--follow"]  # the controller drives; we watch the db
        r0 = fl.cli("fleet", "rollout", "start", f"sha256:{env.pubs['v3'].digest}", "--id",
                    "r-kill", *start)
        assert r0.returncode == 0, r0.stderr
        db = StateDB(fl.db_path)
        deadline = time.monotonic() + 300
        killed_at = None
        while time.monotonic() < deadline:
            st = {s.name: s for s in db.stages("r-kill")}
            w = st.get("wave-2")
            if w is not None and w.state == "deploying":
                done = sum(1 for s in db.steps("r-kill") if s.status == "done")
                if done > st["canary"].devices + st["wave-1"].devices + 20:
                    fl.controller.send_signal(signal.SIGKILL)
                    killed_at = {"stage": "wave-2", "devices_done": done}
                    break
            time.sleep(0.05)
        fl.controller.communicate(timeout=30)
        t0 = time.monotonic()
        fl.controller = fl.start_controller()  # the supervisor restarts it
        while db.rollout("r-kill").state not in ("succeeded", "failed", "paused",
                                                 "rolled-back", "aborted"):
            assert time.monotonic() - t0 < 600, "the restarted controller did not finish"
            time.sleep(0.2)
        resume_s = time.monotonic() - t0
        r = subprocess.CompletedProcess([], 0 if db.rollout("r-kill").state == "succeeded"
                                        else 1)
        time.sleep(0.5)

        def final(rid: str) -> dict:
            stage_of = {t["device_id"]: t["stage"] for t in db.targets(rid)}
            return {s.device_id: (stage_of[s.device_id], s.step, s.status, s.result)
                    for s in db.steps(rid)}

        out = {"devices": n, "reference_exit_code": ref.returncode, "killed_at": killed_at,
               "resume_exit_code": r.returncode, "restart_to_end_s": round(resume_s, 2),
               **_report(fl.db_path, "r-kill"),
               "duplicate_commands": _dupes(fl),
               "commands_sent": len(fl.sniffer.commands),
               "end_state_equals_uninterrupted_run": final("r-kill") == final("r-ref"),
               "devices_on_v3": sum(a == env.pubs["v3"].digest for a in fl.actives().values())}
        db.close()
        return out
    finally:
        fl.close()


def scenario_broker_restart(env: Env, n: int) -> dict[str, Any]:
    fl = Floor(env, "broker-restart", n)
    try:
        proc = fl.popen("fleet", "rollout", "start", f"sha256:{env.pubs['v2'].digest}",
                        "--id", "r-broker", *_flags(10))
        db = StateDB(fl.db_path)
        restarted = None
        while proc.poll() is None:
            st = {s.name: s for s in db.stages("r-broker")} if any(
                r.id == "r-broker" for r in db.rollouts()) else {}
            if st.get("wave-2") is not None and st["wave-2"].state == "deploying":
                t0 = time.monotonic()
                fl.broker.restart()
                restarted = {"stage": "wave-2", "broker_down_s": round(time.monotonic() - t0,
                                                                       2)}
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=600)
        out = {"devices": n, "restarted": restarted, "exit_code": proc.returncode,
               "stderr_tail": err[-1500:] if proc.returncode else None,
               **_report(fl.db_path, "r-broker"), "duplicate_commands": _dupes(fl),
               "devices_on_v2": sum(a == env.pubs["v2"].digest
                                    for a in fl.actives().values())}
        db.close()
        return out
    finally:
        fl.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,500,1000")
    p.add_argument("--fault-devices", type=int, default=200)
    p.add_argument("--scenarios", default="scale,shadow-reject,canary-rollback,budget,"
                   "kill-resume,broker-restart")
    p.add_argument("--no-shadow", action="store_true", help="scale runs without the shadow "
                   "stage")
    p.add_argument("--procs", type=int, default=1, help="simulator processes per floor "
                   f"(at least one per {DEVICES_PER_PROC} devices on a light floor)")
    p.add_argument("--light", action="store_true", help="simulator light mode on every floor "
                   "(see above)")
    p.add_argument("--light-from", type=int, default=2000, help="floors of this many devices "
                   "or more run in light mode")
    p.add_argument("--back-to-back", type=int, default=10, metavar="K",
                   help="rollouts in the back-to-back scenario (not in the default set)")
    p.add_argument("--back-to-back-devices", type=int, default=1000, metavar="N")
    p.add_argument("--profile", type=Path, metavar="DIR", help="run the controller service "
                   "under yappi (bench/profiled.py): DIR/<floor>.txt")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rollout.json")
    args = p.parse_args()
    SIM.update(procs=args.procs, light=args.light, light_from=args.light_from,
               profile=args.profile)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    wanted = set(args.scenarios.split(","))
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(),
                                           "python": platform.python_version(),
                                           "platform": platform.platform(),
                                           "loadavg_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        env = Env(Path(tmp))
        try:
            runs: list[tuple[str, Any]] = []
            if "scale" in wanted:
                runs += [(f"scale-{n}", lambda n=n: scenario_scale(env, n, not args.no_shadow))
                         for n in map(int, args.sizes.split(","))]
            nf = args.fault_devices
            if "shadow-reject" in wanted:
                runs.append(("shadow-reject", lambda: scenario_shadow_reject(env, nf)))
            if "canary-rollback" in wanted:
                runs.append(("canary-rollback", lambda: scenario_canary_rollback(env, nf)))
            if "budget" in wanted:
                runs.append(("budget-3pct", lambda: scenario_budget(env, nf, 0.03)))
                runs.append(("budget-8pct", lambda: scenario_budget(env, nf, 0.08)))
            if "kill-resume" in wanted:
                runs.append(("kill-resume", lambda: scenario_kill_resume(env, nf)))
            if "broker-restart" in wanted:
                runs.append(("broker-restart", lambda: scenario_broker_restart(env, nf)))
            if "back-to-back" in wanted:
                runs.append(("back-to-back", lambda: scenario_back_to_back(
                    env, args.back_to_back_devices, args.back_to_back)))
            for name, fn in runs:
                print(f"running {name} ...", flush=True)
                t0 = time.monotonic()
                results[name] = fn()
                results[name]["scenario_s"] = round(time.monotonic() - t0, 1)
                print(json.dumps(results[name], indent=1)[:3000], flush=True)
        finally:
            env.close()
    results["summary"] = _summary(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(results["summary"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    scale = {int(k.split("-")[1]): v for k, v in r.items() if k.startswith("scale-")}
    if scale:
        s["all_live_s_by_devices"] = {n: v.get("first_command_to_all_live_s")
                                      for n, v in sorted(scale.items())}
        s["wall_s_by_devices"] = {n: v.get("wall_s") for n, v in sorted(scale.items())}
        s["command_to_live_p50_p99_s_by_devices"] = {
            n: (v["command_to_live_s"]["p50"], v["command_to_live_s"]["p99"])
            for n, v in sorted(scale.items())}
        if 500 in scale:
            s["target_500_all_live_s"] = TARGET_500_S
            s["meets_500_target"] = (scale[500].get("wall_s") or 1e9) <= TARGET_500_S
        ns = sorted(scale)
        if len(ns) > 1:
            base = scale[ns[0]]
            s["growth_vs_smallest"] = {
                n: {"devices_x": round(n / ns[0], 1),
                    "wall_x": round(scale[n]["wall_s"] / base["wall_s"], 2),
                    "deploy_only_x": round(
                        sum(st["deploy_s"] or 0 for st in scale[n]["stages"])
                        / max(1e-9, sum(st["deploy_s"] or 0 for st in base["stages"])), 2)}
                for n in ns}
    if "canary-rollback" in r:
        c = r["canary-rollback"]
        s["canary_rollback_s"] = c.get("gate_failed_to_canary_rolled_back_s")
        s["canary_rollback_within_10s"] = (c.get("gate_failed_to_canary_rolled_back_s")
                                           or 1e9) <= TARGET_ROLLBACK_S
        s["installs_outside_canary"] = c.get("install_commands_outside_canary")
    if "shadow-reject" in r:
        s["shadow_reject_stopped_at_shadow"] = r["shadow-reject"].get("stopped_at_shadow")
        s["shadow_reject_install_commands"] = r["shadow-reject"].get("install_commands_sent")
    for k in ("budget-3pct", "budget-8pct", "kill-resume", "broker-restart"):
        if k in r:
            s[f"{k}_state"] = r[k].get("state")
    if "kill-resume" in r:
        s["kill_resume_duplicates"] = r["kill-resume"].get("duplicate_commands")
        s["kill_resume_equal_end_state"] = r["kill-resume"].get(
            "end_state_equals_uninterrupted_run")
    return s


if __name__ == "__main__":
    main()
