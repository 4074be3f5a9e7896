"""Simulator capacity: how many simulated devices this machine holds, per process and in all,
and what a simulated install costs, for today's full mode against light mode over processes.

    .venv/bin/python bench/sim_bench.py [--runs full:1:500,light:1:1000,light:2:2000]
                                        [--parallel 100] [--state-interval 10]
                                        [--out bench/results/sim.json]

Each run (`mode:procs:devices`) starts a fresh Mosquitto and a fresh floor on v1 (fleet/simprocs.py,
the devices in their own processes, so the controller here does not share their GIL), waits
until every device is connected and has reported, then installs v2 on every device through a
`FleetController` in this process, `--parallel` commands in flight at once (the rollout's
max-parallel). Full mode is today's simulator: real ONNX Runtime load and self-test, and every
device scoring 32 dies a second (the rollout bench's traffic). Light mode: see fleet/sim.py.

Per run: connect time, command-to-live distribution, all-live time, installs per second,
install timeouts, state messages received, and per simulator process its CPU seconds during the
installs and its peak RSS; the CPU taken meanwhile by this process (the controller), Mosquitto
and the artifact server.
The load average is recorded at the start and end of every run: the figures depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rollout_bench import Env, _pct  # noqa: E402

from agent.wire import TERMINAL_STEPS  # noqa: E402
from fleet.sim import SimConfig  # noqa: E402
from fleet.simprocs import ProcessSimulator  # noqa: E402
from fleet.simtraffic import TrafficConfig  # noqa: E402
from fleet.transport import FleetController  # noqa: E402
from tests.broker_fixtures import Broker  # noqa: E402

INSTALL_TIMEOUT_S = 60.0
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system
TRAFFIC = TrafficConfig(interval_s=1.0, batch=32)
# A light install mostly sleeps (the measured ONNX Runtime time a real box would spend on its
# own CPU), so a light process runs many at once; full mode keeps today's 4 workers.
LIGHT_WORKERS = 64


class Installs:
    """Sends an install to every device, `parallel` at a time; times each to its final step."""

    def __init__(self, ctl: FleetController, parallel: int) -> None:
        self.ctl, self.parallel = ctl, parallel
        self.sent: dict[str, float] = {}
        self.done: dict[str, tuple[float, str]] = {}
        self.states = 0
        self.events = 0
        self._cond = threading.Condition()
        ctl.add_listener(self._on)

    def _on(self, kind: str, device: str, doc: dict[str, Any]) -> None:
        if kind == "state":
            self.states += 1
            return
        self.events += 1
        cid, step = doc.get("command_id") or doc.get("id"), doc.get("step")
        if kind == "event" and step in TERMINAL_STEPS and cid in self.sent:
            with self._cond:
                self.done.setdefault(cid, (time.monotonic(), step))
                self._cond.notify_all()

    def run(self, devices: list[str], url: str, sha: str, size: int, seq: int) -> float:
        t0 = time.monotonic()
        pending = list(devices)
        timeouts = 0
        while pending or len(self.done) + timeouts < len(devices):
            with self._cond:
                now = time.monotonic()
                late = [c for c, t in self.sent.items()
                        if c not in self.done and now - t > INSTALL_TIMEOUT_S]
                for c in late:
                    self.done[c] = (now, "timeout")
                in_flight = len(self.sent) - len(self.done)
            while pending and in_flight < self.parallel:
                cmd = self.ctl.install(pending.pop(0), url=url, sha256=sha, size=size,
                                       sequence=seq, rollout_id="r-simbench", wait=False)
                with self._cond:
                    self.sent[cmd.id] = time.monotonic()
                in_flight += 1
            with self._cond:
                self._cond.wait(0.2)
        return time.monotonic() - t0


def run(env: Env, mode: str, procs: int, n: int, parallel: int, state_s: float,
        root: Path) -> dict[str, Any]:
    load0 = os.getloadavg()
    (root / "broker").mkdir(parents=True)
    broker = Broker(root / "broker").start()
    light = mode == "light"
    cfg = SimConfig(devices=n, root=root / "sim",
                    mqtt=broker.mqtt(reconnect_min_s=1, reconnect_max_s=4),
                    keyring=env.keyring, state_interval_s=state_s,
                    traffic=None if light else TRAFFIC, preinstall=env.pubs["v1"].path,
                    sites=4, workers=LIGHT_WORKERS if light else 4, light=light)
    t0 = time.monotonic()
    sim = ProcessSimulator(cfg, procs=procs).start()
    out: dict[str, Any] = {"mode": mode, "procs": procs, "devices": n, "parallel": parallel,
                           "state_interval_s": state_s, "loadavg_start": load0}
    try:
        out["connected_all"] = sim.wait_connected(300)
        out["connect_s"] = round(time.monotonic() - t0, 1)
        with FleetController(broker.mqtt(), fleet_key=env.fleet_key,
                             client_id="sim-bench") as ctl:
            ctl.wait_for(lambda c: len(c.devices()) >= n, 120)
            out["reported"] = len(ctl.devices())
            inst = Installs(ctl, parallel)
            before = sim.usage()
            others0 = (own_cpu_s(), proc_cpu_s(broker.proc.pid),
                       proc_cpu_s(env.artifacts.pid))
            s0, e0 = inst.states, inst.events
            p = env.pubs["v2"]
            wall = inst.run(sim.device_ids, f"http://127.0.0.1:{env.art_port}/sha256/{p.digest}",
                            p.digest, p.size, p.sequence)
            states = inst.states - s0
            after = sim.usage()
            others = [b - a for a, b in zip(others0, (
                own_cpu_s(), proc_cpu_s(broker.proc.pid), proc_cpu_s(env.artifacts.pid)),
                strict=True)]
        lat = [t - inst.sent[c] for c, (t, step) in inst.done.items() if step == "live"]
        steps = [step for _, step in inst.done.values()]
        out.update({
            "install_wall_s": round(wall, 2),
            "installs_per_s": round(len(lat) / wall, 1),
            "live": len(lat), "timeouts": steps.count("timeout"),
            "other_final_steps": len(steps) - len(lat) - steps.count("timeout"),
            "command_to_live_s": {"p50": _pct(lat, 50), "p90": _pct(lat, 90),
                                  "p99": _pct(lat, 99),
                                  "mean": round(statistics.mean(lat), 3) if lat else None},
            # a device republishes its state when it changed (an install: twice; traffic
            # moves a full-mode device's health summary), at most every state interval
            "state_messages": states, "events": inst.events - e0,
            # where the rest of the CPU went (cores busy during the installs)
            "cpu_share_during_installs": {
                "bench_controller": round(others[0] / wall, 2),
                "mosquitto": round(others[1] / wall, 2),
                "artifact_server": round(others[2] / wall, 2)},
            "on_v2": sum(a == p.digest for a in sim.actives().values()),
            "procs_detail": [{"devices": a["devices"],
                              "cpu_s_during_installs": round(a["cpu_s"] - b["cpu_s"], 2),
                              "cpu_share_during_installs": round(
                                  (a["cpu_s"] - b["cpu_s"]) / wall, 2),
                              "max_rss_mb": a["max_rss_mb"],
                              "light_timings": a["light_timings"] if light else None}
                             for a, b in zip(after, before, strict=True)],
        })
    finally:
        sim.stop()
        broker.stop()
    out["loadavg_end"] = os.getloadavg()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="full:1:500,light:1:500,light:1:1000,light:2:2000",
                   help="comma-separated mode:procs:devices")
    p.add_argument("--parallel", type=int, default=100)
    p.add_argument("--state-interval", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sim.json")
    args = p.parse_args()
    import logging

    logging.getLogger("edgefleet").setLevel(logging.ERROR)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="sim-bench-") as tmp:
        env = Env(Path(tmp))
        try:
            for spec in args.runs.split(","):
                mode, procs, n = spec.split(":")
                print(f"running {spec} ...", flush=True)
                r = run(env, mode, int(procs), int(n), args.parallel, args.state_interval,
                        Path(tmp) / spec.replace(":", "-"))
                results["runs"][spec] = r
                print(json.dumps(r, indent=1), flush=True)
        finally:
            env.close()
    write_results(args.out, results)


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
