"""What the prediction log costs the tester: p99 latency with the log on vs off, same run.

    .venv/bin/python bench/predlog_bench.py [--requests 4000] [--rounds 8] [--out FILE]

Two agent processes (`edgefleet agent serve`) on copies of the same model store (the 512-feature
bench autoencoder, bench/ae_model.py): one with EDGEFLEET_AGENT_PREDLOG=off (the baseline), one
with the log on at its defaults plus a 10% capture (`--capture-rate`; ten times the default, so
the capture path is exercised). A client sends single-row requests (binary frames, then JSON
lines) in alternating rounds to one agent and the other, so load that comes and goes on a shared
machine hits both alike. With --pin-cpu (default 0) both agents and the client share one CPU,
the worst case for the log's writer thread, which then competes with serving for that CPU.

Printed and written to JSON: p50/p99 per encoding and agent, the ratio log-on / log-off (target
p99 ratio <= 1.05), each agent's CPU time per answer (serving plus, for the one with the log,
its writer thread: less sensitive to a busy machine than a p99), the records the log wrote
(scraped from its metrics, to show it ran) and the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent_bench import (  # noqa: E402
    binary_loop,
    free_port,
    json_loop,
    pct,
    scrape,
    set_affinity,
)

from agent.protocol import encode_predict, json_values  # noqa: E402

PY = sys.executable
TARGET_P99_RATIO = 1.05


def _start(store: Path, keyring: Path, sock: Path, port: int, env: dict, log: Path
           ) -> subprocess.Popen:
    proc = subprocess.Popen(
        [PY, "-m", "edgefleet", "agent", "serve", "--socket", str(sock), "--store", str(store),
         "--keyring", str(keyring), "--metrics-addr", f"127.0.0.1:{port}",
         "--log-level", "warning"], cwd=REPO, env=env, stderr=open(log, "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}/readyz"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("agent did not start: " + log.read_text())
        time.sleep(0.01)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000, help="requests per round and agent")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pin-cpu", type=int, default=0, help="CPU for agents and client; -1: none")
    ap.add_argument("--capture-rate", type=float, default=0.1,
                    help="the log-on agent's sampled capture (the agent's default is 0.01)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predlog.json")
    args = ap.parse_args()
    import ae_model

    tmp = Path(tempfile.mkdtemp(prefix="ef-plb-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        m = ae_model.build(tmp / "model")
        dies = m.normal[:512].copy()
        rng = np.random.default_rng(5)
        bad = rng.random(len(dies)) < 0.03  # a few fails: every fail is captured
        dies[bad] += rng.normal(scale=0.3, size=(int(bad.sum()), dies.shape[1])).astype(
            np.float32)
        frames = [encode_predict(r.reshape(1, -1), np.array([i], np.uint64))
                  for i, r in enumerate(dies)]
        lines = [json.dumps({"die_id": f"D{i}", "params": json_values(r)}).encode() + b"\n"
                 for i, r in enumerate(dies)]
        agents = {}
        for name, extra in (("off", {"EDGEFLEET_AGENT_PREDLOG": "off"}),
                            ("on", {"EDGEFLEET_AGENT_PREDLOG": "on",
                                    "EDGEFLEET_AGENT_CAPTURE_RATE": str(args.capture_rate),
                                    "EDGEFLEET_AGENT_PREDLOG_DIR": str(tmp / "predlog")})):
            d = tmp / name
            d.mkdir()
            store = shutil.copytree(m.store, d / "store", symlinks=True)
            port = free_port()
            env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
            proc = _start(store, m.keyring, d / "agent.sock", port, env, d / "agent.log")
            procs.append(proc)
            agents[name] = (str(d / "agent.sock"), f"http://127.0.0.1:{port}/metrics", proc)
        if args.pin_cpu >= 0:
            cpus = {args.pin_cpu}
            for _, _, proc in agents.values():
                set_affinity(proc.pid, cpus)
            os.sched_setaffinity(0, cpus)
        cpu_start = {k: _cpu_s(a[2].pid) for k, a in agents.items()}
        load_start = os.getloadavg()
        lat: dict[str, dict[str, list]] = {k: {"binary": [], "json": []} for k in agents}
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for name in order:
                sock = agents[name][0]
                lat[name]["binary"].append(binary_loop(sock, frames, args.requests, 200))
                lat[name]["json"].append(json_loop(sock, lines, args.requests, 200))
        load_end = os.getloadavg()
        # the writer runs at idle priority: give it until every answer is written (or 60 s)
        expected = args.rounds * 2 * (args.requests + 200)
        key = 'edgefleet_predlog_records_total{log="predictions"}'
        deadline = time.monotonic() + 60
        while (written := scrape(agents["on"][1])).get(key, 0) < expected and (
                time.monotonic() < deadline):
            time.sleep(0.2)
        answers = args.rounds * 2 * (args.requests + 200)
        cpu = {k: (_cpu_s(a[2].pid) - cpu_start[k]) / answers * 1e6 for k, a in agents.items()}
        res: dict = {"requests_per_agent_and_encoding": args.requests * args.rounds,
                     "cpu_us_per_answer": cpu, "cpu_ratio": cpu["on"] / cpu["off"],
                     "pinned_cpu": args.pin_cpu, "loadavg_start": load_start,
                     "loadavg_end": load_end, "figures": {}}
        for enc in ("binary", "json"):
            off = pct(np.concatenate(lat["off"][enc]))
            on = pct(np.concatenate(lat["on"][enc]))
            res["figures"][enc] = {"off": off, "on": on,
                                   "p50_ratio": on["p50_us"] / off["p50_us"],
                                   "p99_ratio": on["p99_us"] / off["p99_us"]}
        res["log_records"] = {k: v for k, v in written.items()
                              if k.startswith(("edgefleet_predlog_records_total",
                                               "edgefleet_predlog_dropped_total",
                                               "edgefleet_capture_rows_total"))}
        worst = max(f["p99_ratio"] for f in res["figures"].values())
        res["target_p99_ratio"] = TARGET_P99_RATIO
        res["pass"] = worst <= TARGET_P99_RATIO
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"load average start {load_start[0]:.2f} end {load_end[0]:.2f}; "
              f"{args.rounds} alternating rounds x {args.requests} requests per agent")
        for enc, f in res["figures"].items():
            print(f"{enc:6s} p50 off {f['off']['p50_us']:7.1f} us  on {f['on']['p50_us']:7.1f} us"
                  f"  ratio {f['p50_ratio']:.3f} | p99 off {f['off']['p99_us']:7.1f} us  on "
                  f"{f['on']['p99_us']:7.1f} us  ratio {f['p99_ratio']:.3f}")
        print(f"agent CPU per answer (serving + the log's writer): off {cpu['off']:.1f} us, "
              f"on {cpu['on']:.1f} us, ratio {res['cpu_ratio']:.3f}")
        for k, v in res["log_records"].items():
            print(f"  {k} {v:.0f}")
        print(f"p99 ratio (worst encoding) {worst:.3f}, target <= {TARGET_P99_RATIO}: "
              f"{'pass' if res['pass'] else 'FAIL'}; written to {args.out}")
        return 0 if res["pass"] else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
