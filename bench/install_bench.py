"""Install benchmark: how long a 512-feature bundle takes to go live, and what a swap costs the
requests around it.

    .venv/bin/python bench/install_bench.py [--installs 20] [--rate 5000] [--seconds 3]

1. install-to-live: `Installer.install` on a real store (fsyncs and all) with the 512-128-32-
   128-512 autoencoder from bench/ae_model.py (its manifest carries golden vectors, a rule per
   feature and a drift reference, as `edgefleet build` writes them), timed from the call to the
   moment the swap callback has returned (verify + unpack + load + self-test + commit); cleanup
   after that is reported apart. The same for a local rollback. Also the CPU time the
   installing thread uses per install: what an install takes from the serving process, and a
   figure that moves far less with the box's load than the latencies do.
2. latency during a swap: the agent (server + runtime + installer, one process, wired as
   `edgefleet agent serve` wires them) answers a client process sending RATE single-die
   requests per second. Quiet windows (no installs: the baseline) alternate with install
   windows (installs and rollbacks back to back), 0.5 s each, so background load on the box
   weighs on both alike. Reported: p99 of requests sent within +-2 ms of a swap, and p99 of
   all requests in install windows, each minus the baseline p99 of the same run; the rate the
   client achieved; the time and the installing thread's CPU in the switch (the snapshot
   `runtime.prepare` built in the load step going live), and in that build; the agent
   process's RSS growth over the install windows (per swap, and against its RSS before
   them); the garbage collections in the install windows, per
   generation: count and CPU time each (every one holds the GIL). As `edgefleet agent serve`
   does, what start-up built is frozen out of garbage collection (gc.freeze) once the agent
   is up: without that, full collections (~14 ms each, 3 per 4 s of installs) dominated the
   p99 here and not in the agent.
   tests/test_install_load.py asserts the behaviour (no
   error, no fallback, no engine or session left alive); these figures only here.

The 1-minute load average before and after is printed and stored: on a 2-core box shared with
other work, added p99 figures under a millisecond are only meaningful when it stays below ~1;
compare trees by running them alternately and by the ratios to the same run's baseline.

Writes bench/results/install.json and prints the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.bundle import write_bundle  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.drift import drift_reference  # noqa: E402
from agent.install import InstallConfig, Installer  # noqa: E402
from agent.keys import generate_keypair, load_private_key, trust_key  # noqa: E402
from agent.predictor import Limits  # noqa: E402
from agent.runtime import Runtime  # noqa: E402
from agent.server import AgentServer  # noqa: E402
from bench.ae_model import N_FEATURES, TOP_K, build_onnx, synthetic_dies  # noqa: E402

WINDOW_S = 0.002  # "during a swap": requests sent within this of the swap callback
PHASE_S = 0.5  # quiet and install windows alternate at this length


def make_bundles(out: Path, count: int, key: Path, models: int = 3) -> list[Path]:
    """`count` signed 512-feature bundles with rising sequences over `models` distinct nets."""
    import onnxruntime as ort

    nets = []
    for m in range(models):
        train = synthetic_dies(2000, seed=m)
        onnx_bytes = build_onnx(train)
        sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        golden = train[:8]
        nets.append((onnx_bytes, golden, sess.run(["score"], {"params": golden})[0],
                     drift_reference(train)))
    bundles = []
    for i in range(count):
        onnx_bytes, golden, scores, drift = nets[i % models]
        fields = {
            "model": {"name": "die-ae-bench", "version": f"bench-{i + 1}", "sequence": i + 1},
            "input": {"n_features": N_FEATURES, "dtype": "float32",
                      "feature_names": [f"param_{j:03d}" for j in range(N_FEATURES)]},
            "decision": {"threshold": 1.0, "confidence_scale": 0.5, "top_k": TOP_K},
            "fallback": {"rules": [{"feature": j, "low": -5.0, "high": 7.0}
                                   for j in range(N_FEATURES)]},
            "golden": {"abs_tol": 1e-4, "rel_tol": 1e-3,
                       "vectors": [{"params": row.tolist(), "score": float(s)}
                                   for row, s in zip(golden, scores, strict=True)]},
            "drift_reference": drift,  # as `edgefleet build` writes it: ~10k more numbers
        }
        path = out / f"bench-{i + 1}.efb"
        write_bundle(path, fields, {"model.onnx": onnx_bytes}, load_private_key(key))
        bundles.append(path)
    return bundles


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.array(xs) * 1e3
    return {"median_ms": round(float(np.median(a)), 2), "p95_ms": round(float(
        np.percentile(a, 95)), 2), "max_ms": round(float(a.max()), 2), "n": len(xs)}


def _rss_bytes() -> int:
    """This process's resident set after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def install_to_live(tmp: Path, ring: Path, bundles: list[Path]) -> dict:
    live_at: list[float] = []
    inst = Installer.open(tmp / "store-a", ring, InstallConfig(),
                          on_commit=lambda e, m: live_at.append(time.perf_counter()))
    to_live, cleanup, states, rollbacks, cpu = [], [], {}, [], []
    try:
        inst.install(bundles[0])  # warm: first session creation pays one-time costs
        for b in bundles[1:]:
            c0, t0 = time.thread_time(), time.perf_counter()
            r = inst.install(b)
            t1 = time.perf_counter()
            cpu.append(time.thread_time() - c0)
            to_live.append(live_at[-1] - t0)
            cleanup.append(t1 - live_at[-1])
            for k, v in r.timings.items():
                states.setdefault(k, []).append(v)
        for _ in range(10):
            t0 = time.perf_counter()
            inst.rollback()
            rollbacks.append(live_at[-1] - t0)
    finally:
        inst.close()
    return {
        "install_to_live": _stats(to_live),
        "after_live_cleanup": _stats(cleanup),
        "per_state_median_ms": {k: round(statistics.median(v) * 1e3, 2)
                                for k, v in states.items()},
        "rollback_to_live": _stats(rollbacks),
        # CPU the installing thread used per install (GIL-free C work such as hashing and ONNX
        # Runtime's included): the install's claim on the serving process, far less load-
        # dependent than the latency figures
        "install_thread_cpu": _stats(cpu),
    }


def swap_latency(tmp: Path, ring: Path, bundles: list[Path], rate: float, seconds: float
                 ) -> dict:
    sock_dir = Path(tempfile.mkdtemp(prefix="efb-", dir="/tmp"))
    cfg = replace(AgentConfig(), socket=sock_dir / "agent.sock", metrics_addr="")
    sys.setswitchinterval(cfg.switch_interval_s)  # as agent.server.run does
    runtime = Runtime(Limits(fallback_retry_s=0.0))
    swaps: list[tuple[float, float]] = []
    swap_cpu: list[float] = []
    prepare_cpu: list[float] = []

    def prepare(engine, manifest):
        # runtime.prepare (in the load step) builds the snapshot; the call it returns, run at
        # the commit, is the switch: the swap window is that call
        c0 = time.thread_time()
        go_live = runtime.prepare(engine, manifest)
        prepare_cpu.append(time.thread_time() - c0)

        def switch():
            c0, t0 = time.thread_time(), time.perf_counter()
            old = go_live()
            swaps.append((t0, time.perf_counter()))
            swap_cpu.append(time.thread_time() - c0)
            return old  # the installer releases it at the end of the job, as in the agent

        return switch

    gc_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    gc_start: list[float] = [0.0]
    counting = [False]

    def on_gc(phase: str, info: dict) -> None:
        # every collection holds the GIL from start to end: the serving thread waits on it.
        # The collecting thread's CPU time: the wall time would also count the other thread's
        # turn when the GIL changes hands inside this callback, and the box's other work
        if phase == "start":
            gc_start[0] = time.thread_time()
        elif counting[0]:
            gc_pauses[info["generation"]].append(time.thread_time() - gc_start[0])

    inst = Installer.open(tmp / "store-b", ring, on_commit=runtime.swap, on_prepare=prepare,
                          on_fallback=runtime.enter_fallback)
    server = AgentServer(cfg, runtime)
    server.start()
    gc.freeze()  # as agent.app.run does once the agent is up: full collections skip start-up's
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        inst.install(bundles[0])
        inst.install(bundles[1])
        client = subprocess.Popen(
            [sys.executable, "-m", "tests.load_client", str(cfg.socket), str(rate),
             str(N_FEATURES)], cwd=REPO, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
        # Alternate quiet and install windows, so that whatever else runs on the box weighs
        # on the baseline and on the swaps alike.
        quiet: list[tuple[float, float]] = []
        busy: list[tuple[float, float]] = []
        swaps.clear()
        i, nxt = 0, 2
        time.sleep(0.2)
        rss_before = _rss_bytes()
        gc.callbacks.append(on_gc)
        for _ in range(max(1, int(seconds / (2 * PHASE_S)))):
            q0 = time.perf_counter()
            time.sleep(PHASE_S)
            quiet.append((q0, time.perf_counter()))
            b0 = time.perf_counter()
            counting[0] = True
            while time.perf_counter() - b0 < PHASE_S and nxt < len(bundles):
                if i % 2 == 0:
                    inst.install(bundles[nxt])
                    nxt += 1
                else:
                    inst.rollback()
                i += 1
            counting[0] = False
            busy.append((b0, time.perf_counter()))
        gc.callbacks.remove(on_gc)
        rss_growth = _rss_bytes() - rss_before
        out, _ = client.communicate("", timeout=120)
    finally:
        gc.unfreeze()
        server.stop()
        inst.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    s = json.loads(out)
    t, lat = np.array(s["t"]), np.array(s["lat"])  # lat in us

    def within(spans: list[tuple[float, float]], margin: float = 0.0) -> np.ndarray:
        mask = np.zeros(len(t), dtype=bool)
        for a, b in spans:
            mask |= (t >= a - margin) & (t <= b + margin)
        return mask

    base, during = lat[within(quiet)], lat[within(busy)]
    at_swap = lat[within(swaps, WINDOW_S)]
    p99 = lambda a: float(np.percentile(a, 99))  # noqa: E731
    return {
        "rate_requested": rate, "rate_achieved": round(s["rate"], 1),
        "requests": s["requests"], "errors": s["errors"], "fallback_answers": s["fallback"],
        "swaps": len(swaps), "swap_call_median_us": round(float(np.median(
            [(b - a) * 1e6 for a, b in swaps])), 1),
        # the installing thread's CPU in the switch, and in building the new snapshot before
        # it (runtime.prepare in the load step: warm-up, digest, drift monitor, rules): the
        # swap's claim on the serving process, less load-dependent than the wall times
        "swap_call_cpu_median_us": round(float(np.median(swap_cpu)) * 1e6, 1),
        "prepare_cpu_median_us": round(float(np.median(prepare_cpu)) * 1e6, 1),
        "baseline": {"n": len(base), "p50_us": round(float(np.median(base)), 1),
                     "p99_us": round(p99(base), 1)},
        "within_2ms_of_swap": {"n": len(at_swap), "p99_us": round(p99(at_swap), 1),
                               "added_p99_us": round(p99(at_swap) - p99(base), 1),
                               "p99_vs_baseline": round(p99(at_swap) / p99(base), 2)},
        "whole_install_phase": {"n": len(during), "p99_us": round(p99(during), 1),
                                "added_p99_us": round(p99(during) - p99(base), 1),
                                "p99_vs_baseline": round(p99(during) / p99(base), 2)},
        # garbage collections in the install windows: count and CPU time per generation (each
        # holds the GIL; CPU time moves far less with the box's load than the p99)
        "gc_in_install_windows": {
            f"gen{g}": {"count": len(xs), "cpu_median_us": round(float(np.median(xs)) * 1e6, 1)
                        if xs else 0.0, "cpu_max_us": round(max(xs, default=0.0) * 1e6, 1),
                        "cpu_total_ms": round(sum(xs) * 1e3, 2)}
            for g, xs in gc_pauses.items()},
        "rss": {"before_mib": round(rss_before / 2**20, 1),
                "growth_kib": round(rss_growth / 1024, 1),
                "growth_per_swap_kib": round(rss_growth / 1024 / max(1, len(swaps)), 1),
                "growth_vs_before": round(rss_growth / rss_before, 4)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--installs", type=int, default=20)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--seconds", type=float, default=6.0, help="quiet + install time")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "install.json")
    args = ap.parse_args()
    logging.getLogger("edgefleet.agent").setLevel(logging.ERROR)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="install-bench-", dir=REPO / "bench") as d:
        tmp = Path(d)
        pair = generate_keypair(tmp / "keys", "release")
        ring = tmp / "keyring"
        trust_key(ring, pair.public_path, "release")
        bundles = make_bundles(tmp, max(args.installs + 1, 160), pair.private_path)
        live = install_to_live(tmp, ring, bundles[: args.installs + 1])
        swap = swap_latency(tmp, ring, bundles, args.rate, args.seconds)
    result = {
        "bench": "install", "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "model": f"{N_FEATURES}-feature MLP autoencoder (bench/ae_model.py)",
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        **live, "swap_under_load": swap,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    il, sw = live["install_to_live"], swap
    print(f"install-to-live (512 features, verify+unpack+load+self-test+commit): "
          f"median {il['median_ms']} ms, p95 {il['p95_ms']} ms, max {il['max_ms']} ms "
          f"over {il['n']} installs (target <= 300 ms)")
    print(f"  per state, median ms: {live['per_state_median_ms']}")
    print(f"  installing thread's CPU per install: median {live['install_thread_cpu']['median_ms']}"
          " ms")
    print(f"  rollback-to-live: median {live['rollback_to_live']['median_ms']} ms")
    print(f"load average (1 min) {result['load_average']['before']:.2f} before, "
          f"{result['load_average']['after']:.2f} after (above ~1 on a 2-core box, other work "
          "competes for the CPU and the p99 figures below measure it as much as the agent)")
    print(f"added p99 latency within 2 ms of a swap: {sw['within_2ms_of_swap']['added_p99_us']} us"
          f" (p99 {sw['within_2ms_of_swap']['p99_us']} us vs baseline "
          f"{sw['baseline']['p99_us']} us, {sw['within_2ms_of_swap']['p99_vs_baseline']}x; "
          f"{sw['within_2ms_of_swap']['n']} requests around "
          f"{sw['swaps']} swaps; target <= 1000 us)")
    print(f"  the switch (prepared snapshot goes live): median {sw['swap_call_median_us']} us, "
          f"of it the installing thread's CPU {sw['swap_call_cpu_median_us']} us; building "
          f"the snapshot in the load step (runtime.prepare): CPU {sw['prepare_cpu_median_us']} us")
    print(f"  whole install phase p99 {sw['whole_install_phase']['p99_us']} us "
          f"({sw['whole_install_phase']['p99_vs_baseline']}x the baseline, added "
          f"{sw['whole_install_phase']['added_p99_us']} us); {sw['requests']} requests at "
          f"{sw['rate_achieved']}/s, {sw['errors']} errors, {sw['fallback_answers']} fallback")
    print("  garbage collections in the install windows (CPU each): " + "; ".join(
        f"{g} {v['count']}x median {v['cpu_median_us']} us max {v['cpu_max_us']} us"
        for g, v in sw["gc_in_install_windows"].items()))
    print(f"RSS growth {sw['rss']['growth_per_swap_kib']} KiB per swap over {sw['swaps']} swaps"
          f" ({sw['rss']['growth_vs_before']:.2%} of the {sw['rss']['before_mib']} MiB before)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
