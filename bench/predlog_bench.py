"""What the prediction log costs the tester: p99 latency with the log on vs off, same run.

    .venv/bin/python bench/predlog_bench.py [--requests 4000] [--rounds 8] [--out FILE]
        [--capture-rate 0.1] [--pin-cpu 0] [--batch-seconds 2] [--agent-tree CHECKOUT]

Two agent processes (`edgefleet agent serve`) on copies of the same model store (the 512-feature
bench autoencoder, bench/ae_model.py): one with EDGEFLEET_AGENT_PREDLOG=off (the baseline), one
with the log on at its defaults plus a 10% capture (`--capture-rate`; ten times the default, so
the capture path is exercised). A client sends single-row requests (binary frames, then JSON
lines) in alternating rounds to one agent and the other, so load that comes and goes on a shared
machine hits both alike. With --pin-cpu (default 0) both agents and the client share one CPU,
the worst case for the log's writer thread, which then competes with serving for that CPU.
After each round the bench waits until the log has written every answer so far (reported as
the writer's catch-up time; a tester's handling time gives the writer that room), so a writer
that falls behind a continuous stream of back-to-back requests on one CPU is not judged by
its queue's caps.

Then, unpinned on all CPUs (--batch-seconds, 0: skipped), the batch figures of the agent bench
with and without the log: binary frames of 1024 rows and JSON lines of 64 rows on one
connection, dies per second, alternating, and each agent's resident memory after them (1.5 s
later, as bench/agent_bench.py measures it). --agent-tree runs the agents of another checkout
(e.g. the main branch), for a before/after comparison on the same machine.

Printed and written to JSON: p50/p99 per encoding and agent, the ratio log-on / log-off (target
p99 ratio <= 1.05; also each round pair's p99 ratio and their median, which a burst of load
from other work during one round moves less than the pooled p99), each agent's CPU time per
answer (serving plus, for the one with the log, its writer thread: less sensitive to a busy
machine than a p99), the records the log wrote (scraped from its metrics, to show it ran) and
the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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
    _recv_frame,
    _recv_line,
    binary_loop,
    free_port,
    json_loop,
    pct,
    rss_mb,
    scrape,
    set_affinity,
)

from agent.protocol import encode_predict, json_values  # noqa: E402

PY = sys.executable
TARGET_P99_RATIO = 1.05


def _start(store: Path, keyring: Path, sock: Path, port: int, env: dict, log: Path,
           tree: Path = REPO) -> subprocess.Popen:
    proc = subprocess.Popen(
        [PY, "-m", "edgefleet", "agent", "serve", "--socket", str(sock), "--store", str(store),
         "--keyring", str(keyring), "--metrics-addr", f"127.0.0.1:{port}",
         "--log-level", "warning"], cwd=tree, env=env, stderr=open(log, "w"))  # noqa: SIM115
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


_WRITTEN = 'edgefleet_predlog_records_total{log="predictions"}'
_DROPPED = 'edgefleet_predlog_dropped_total{reason="queue_full"}'


def _catch_up(url: str, answered: int, timeout: float = 60.0) -> float:
    """Seconds until the log at `url` has written (or dropped) `answered` answers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = scrape(url)
        if m.get(_WRITTEN, 0) + m.get(_DROPPED, 0) >= answered:
            break
        time.sleep(0.1)  # a scrape costs the agent CPU too: not too often
    return time.monotonic() - t0


def _throughput(sock: str, messages: list[bytes], receive, rows: int, seconds: float) -> float:
    """Dies per second of `messages` (each `rows` rows) sent one at a time on one connection."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    buf = bytearray(1 << 24)
    n, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            for m in messages:
                s.sendall(m)
                receive(s, buf)
                n += rows
        return n / (time.perf_counter() - t0)
    finally:
        s.close()


def _batches(agents: dict, dies: np.ndarray, seconds: float) -> dict:
    """Batched throughput with and without the log (alternating), then each agent's RSS."""
    frames = [encode_predict(dies[i:i + 1024], np.arange(i, i + 1024, dtype=np.uint64))
              for i in range(0, len(dies) - 1023, 1024)]
    lines = [json.dumps([{"die_id": f"D{i + j}", "params": json_values(r)}
                         for j, r in enumerate(dies[i:i + 64])]).encode() + b"\n"
             for i in range(0, 32 * 64, 64)]
    out: dict = {k: {"binary_dies_per_s": [], "json_dies_per_s": []} for k in agents}
    for r in range(2):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            sock = agents[name][0]
            out[name]["binary_dies_per_s"].append(
                _throughput(sock, frames, _recv_frame, 1024, seconds / 2))
    for r in range(2):
        for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
            out[name]["json_dies_per_s"].append(
                _throughput(agents[name][0], lines, _recv_line, 64, seconds / 2))
    time.sleep(1.5)  # the agent gives batch buffers back after 1 s without one
    for name, (_, _, proc) in agents.items():
        out[name]["rss_mb"] = rss_mb(proc.pid)
        for k in ("binary_dies_per_s", "json_dies_per_s"):
            out[name][k] = float(np.mean(out[name][k]))
    out["binary_ratio"] = out["on"]["binary_dies_per_s"] / out["off"]["binary_dies_per_s"]
    out["json_ratio"] = out["on"]["json_dies_per_s"] / out["off"]["json_dies_per_s"]
    out["loadavg"] = os.getloadavg()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000, help="requests per round and agent")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pin-cpu", type=int, default=0, help="CPU for agents and client; -1: none")
    ap.add_argument("--capture-rate", type=float, default=0.1,
                    help="the log-on agent's sampled capture (the agent's default is 0.01)")
    ap.add_argument("--batch-seconds", type=float, default=2.0,
                    help="batched throughput per encoding and agent, unpinned (0: skip)")
    ap.add_argument("--agent-tree", type=Path, default=REPO,
                    help="the checkout whose agents run (default: this one)")
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
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(args.agent_tree),
                       **extra)
            proc = _start(store, m.keyring, d / "agent.sock", port, env, d / "agent.log",
                          args.agent_tree)
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
        catch_up = []
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for name in order:
                sock = agents[name][0]
                lat[name]["binary"].append(binary_loop(sock, frames, args.requests, 200))
                lat[name]["json"].append(json_loop(sock, lines, args.requests, 200))
            # let the writer write every answer so far (or 60 s)
            catch_up.append(_catch_up(agents["on"][1], (r + 1) * 2 * (args.requests + 200)))
        load_end = os.getloadavg()
        written = scrape(agents["on"][1])
        answers = args.rounds * 2 * (args.requests + 200)
        cpu = {k: (_cpu_s(a[2].pid) - cpu_start[k]) / answers * 1e6 for k, a in agents.items()}
        res: dict = {"requests_per_agent_and_encoding": args.requests * args.rounds,
                     "cpu_us_per_answer": cpu, "cpu_ratio": cpu["on"] / cpu["off"],
                     "pinned_cpu": args.pin_cpu, "loadavg_start": load_start,
                     "loadavg_end": load_end, "agent_tree": str(args.agent_tree),
                     "capture_rate": args.capture_rate,
                     "writer_catch_up_s": {"mean": float(np.mean(catch_up)),
                                           "max": float(np.max(catch_up))}, "figures": {}}
        for enc in ("binary", "json"):
            off = pct(np.concatenate(lat["off"][enc]))
            on = pct(np.concatenate(lat["on"][enc]))
            rounds = [pct(a)["p99_us"] / pct(b)["p99_us"]
                      for a, b in zip(lat["on"][enc], lat["off"][enc], strict=True)]
            res["figures"][enc] = {"off": off, "on": on,
                                   "p50_ratio": on["p50_us"] / off["p50_us"],
                                   "p99_ratio": on["p99_us"] / off["p99_us"],
                                   "p99_ratio_per_round": rounds,
                                   "p99_ratio_median_of_rounds": float(np.median(rounds))}
        res["log_records"] = {k: v for k, v in written.items()
                              if k.startswith(("edgefleet_predlog_records_total",
                                               "edgefleet_predlog_dropped_total",
                                               "edgefleet_capture_rows_total"))}
        if args.batch_seconds > 0:
            every = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
            for _, _, proc in agents.values():
                set_affinity(proc.pid, every)
            os.sched_setaffinity(0, every)
            batch_dies = m.normal.copy()  # 3% anomalous, as in the agent bench: every fail
            bad = rng.random(len(batch_dies)) < 0.03  # is captured
            batch_dies[bad] += rng.normal(scale=0.3, size=(int(bad.sum()), dies.shape[1])
                                          ).astype(np.float32)
            res["batches"] = _batches(agents, batch_dies, args.batch_seconds)
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
                  f"{f['on']['p99_us']:7.1f} us  ratio {f['p99_ratio']:.3f} (median of the "
                  f"rounds' ratios {f['p99_ratio_median_of_rounds']:.3f})")
        print(f"agent CPU per answer (serving + the log's writer): off {cpu['off']:.1f} us, "
              f"on {cpu['on']:.1f} us, ratio {res['cpu_ratio']:.3f}; the writer caught up "
              f"{res['writer_catch_up_s']['mean']:.2f} s after a round (max "
              f"{res['writer_catch_up_s']['max']:.2f} s)")
        b = res.get("batches")
        if b:
            print(f"batches (unpinned, load {b['loadavg'][0]:.2f}): binary 1024 rows off "
                  f"{b['off']['binary_dies_per_s']:,.0f} on {b['on']['binary_dies_per_s']:,.0f} "
                  f"dies/s (ratio {b['binary_ratio']:.3f}); JSON 64 rows off "
                  f"{b['off']['json_dies_per_s']:,.0f} on {b['on']['json_dies_per_s']:,.0f} "
                  f"(ratio {b['json_ratio']:.3f}); RSS after them off {b['off']['rss_mb']:.1f} "
                  f"MB, on {b['on']['rss_mb']:.1f} MB")
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
