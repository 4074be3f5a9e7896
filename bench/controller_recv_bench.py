"""Controller receive-path benchmark: the CPU the controller's MQTT connection spends per device
message (paho parsing, JSON, the state merge, the listeners), with a real Mosquitto.

    .venv/bin/python bench/controller_recv_bench.py [--messages 5000] [--rate 1000]
                                                    [--kinds state,event] [--out FILE]

A publisher process sends `--messages` state documents (1.3 KB, QoS 0, as a device's) or
events (QoS 1) for 1,000 devices, at `--rate` messages a second (0: as fast as it can, a
burst), to a `FleetController` on its selector loop (fleet.inventory.open_controller, as the
controller service runs it) in this process; the figure is this process's CPU (user +
system, from os.times) per message received. Nothing else runs in this process meanwhile
(the main thread sleeps), so it is the receive path's cost. docs/scale.md quotes it; run it on
two trees (git worktree) to compare them, at the same load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from fleet.inventory import open_controller  # noqa: E402
from tests.broker_fixtures import Broker  # noqa: E402

DEVICES = 1000


def state_doc(i: int, seq: int) -> bytes:
    """A device's state document, the size and shape the agent publishes."""
    d = f"sim-{i:05d}"
    model = {"name": "ae", "sequence": 1, "digest": "a" * 64, "model_sha256": "b" * 64}
    return json.dumps({
        "v": 1, "device_id": d, "online": True, "will": False, "seq": seq, "boot": "abc123",
        "ts": "2026-12-04T23:00:00.000Z", "agent_version": "0.9.0", "arch": "x86_64",
        "labels": {"site": "fab-2", "line": "l3", "tester": "t4"},
        "model": {"active": {"id": "v1-abc", "version": "1.0", **model},
                  "previous": {"id": "v0-abc", "version": "0.9", **model}},
        "health": {"status": "ok", "reason": None},
        "summary": {"requests": 1000 + seq, "errors": 0, "fallback": 0, "fail_rate": 0.03,
                    "p50_ms": 1.2, "p99_ms": 3.4, "max_psi": 0.01},
        "busy": None, "last_command": {"id": "x" * 20, "rollout_id": "r-1", "type": "install",
                                       "result": "live", "reason": None, "detail": None,
                                       "ts": "2026-12-04T23:00:00.000Z"}}).encode()


def event_doc(i: int, seq: int) -> bytes:
    return json.dumps({"v": 1, "device_id": f"sim-{i:05d}", "boot": "abc123", "seq": seq,
                       "ts": "2026-12-04T23:00:00.000Z", "command_id": "c" * 20,
                       "rollout_id": "r-other", "type": "install", "step": "verified"}).encode()


def publisher(port: int, n: int, kind: str, rate: float) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub",
                    protocol=mqtt.MQTTv311)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    info = None
    for k in range(n):
        i = k % DEVICES
        if kind == "state":
            info = c.publish(f"edgefleet/device/sim-{i:05d}/state", state_doc(i, 10 + k), qos=0)
        else:
            info = c.publish(f"edgefleet/device/sim-{i:05d}/event", event_doc(i, 10 + k), qos=1)
        if rate:
            time.sleep(1 / rate)
        elif k % 200 == 199:
            time.sleep(0.01)  # let paho's queue drain
    if info is not None:
        info.wait_for_publish(30)
    c.disconnect()
    c.loop_stop()


def run(broker: Broker, n: int, kind: str, rate: float) -> dict[str, Any]:
    with open_controller(broker.mqtt(), client_id=f"bench-ctl-{kind}-{rate:g}") as ctl:
        base = ctl.messages
        proc = mp.Process(target=publisher, args=(broker.port, n, kind, rate))
        t0, w0 = os.times(), time.monotonic()
        proc.start()
        deadline = time.monotonic() + 60 + (n / rate if rate else 0)
        while ctl.messages - base < n and time.monotonic() < deadline:
            time.sleep(0.2)
        t1 = os.times()
        got = ctl.messages - base
        proc.join(30)
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    return {"kind": kind, "rate_per_s": rate, "received": got, "sent": n,
            "wall_s": round(time.monotonic() - w0, 1), "cpu_s": round(cpu, 3),
            "us_per_message": round(1e6 * cpu / max(got, 1), 1),
            "loadavg": round(os.getloadavg()[0], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--rate", type=float, default=1000.0, help="messages a second (0: burst)")
    p.add_argument("--kinds", default="state,event")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                   "controller_recv.json")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="recv-bench-") as tmp:
        broker = Broker(Path(tmp)).start()
        try:
            for kind in args.kinds.split(","):
                results.append(run(broker, args.messages, kind, args.rate))
                print(json.dumps(results[-1]), flush=True)
        finally:
            broker.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
