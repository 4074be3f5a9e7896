"""`edgefleet agent predict --file` beside the documented Client's batches, alone (the figure of
bench/agent_bench.py without its other runs), and the CSV readers one by one.

    .venv/bin/python bench/file_screen_bench.py [--dies 20000] [--runs 3] [--baseline-tree DIR]

On the bench autoencoder (bench/ae_model.py, 512 parameters), one agent process: the CLI on a
CSV of --dies dies (whole process: start, read, screen; and the CLI's own in-process rate;
`agent_bench.file_screening`), with the reader this install has and with the base install's
(orjson), and Client.predict_batch on the same rows, medians of --runs rounds; with
--baseline-tree (e.g. a checkout of main), that tree's CLI on the same file and agent in the
same rounds. Then each reader of agent/csvread.py on its own (ns per value, wall and CPU;
polars' import timed apart). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from agent_bench import _model, _start_baseline, file_screening  # noqa: E402


def reader_costs(csv_path: Path, n: int, names: list[str]) -> dict[str, dict[str, float]]:
    """ns per value of each available reader on `csv_path`, in this process."""
    from agent import csvread

    out = {}
    if "polars" in csvread.engines():
        c0 = time.process_time()
        import polars  # noqa: F401

        out["polars_import"] = {"cpu_s": time.process_time() - c0}
    for engine in csvread.engines():
        t0, c0 = time.perf_counter(), time.process_time()
        values = sum(x.size for _, x in csvread.read_batches(csv_path, "die_id", names, n, 256,
                                                             engine=engine))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[engine] = {"wall_ns_per_value": wall * 1e9 / values,
                       "cpu_ns_per_value": cpu * 1e9 / values}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dies", type=int, default=20000, help="dies in the CSV")
    ap.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    ap.add_argument("--baseline-tree", type=Path, help="another checkout (e.g. main): its "
                    "predict --file on the same file and agent, in the same rounds")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "file_screen.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="effile-", dir="/tmp"))
    procs = []
    try:
        store, keyring, dies, _, n, _ = _model(argparse.Namespace(bundle=None), tmp)
        sock = _start_baseline(REPO, store, keyring, tmp, procs)
        res = {"loadavg_start": os.getloadavg()[0]}
        res["file_screening"] = file_screening(sock, tmp, dies[:args.dies], args.runs,
                                               args.baseline_tree, light_cli=True)
        res["readers"] = reader_costs(tmp / "dies.csv", n, [f"p{i}" for i in range(n)])
        res["loadavg_end"] = os.getloadavg()[0]
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    fs = res["file_screening"]
    print(f"{fs['dies']} dies, {fs['csv_mb']:.0f} MB CSV, median of {fs['runs']} rounds, load "
          f"{res['loadavg_start']:.1f} -> {res['loadavg_end']:.1f}")
    print(f"  Client batches of 256       {fs['client_dies_per_s']:>9,.0f} dies/s; CPU "
          f"{fs['client_cpu_s']:.2f} s (the client's own; the agent's is not counted)")
    for key in ("cli", "light_cli", "baseline_cli"):
        if f"{key}_dies_per_s" in fs:
            ratio = key.replace("cli", "ratio")
            print(f"  predict --file ({key:12s}) {fs[f'{key}_dies_per_s']:>9,.0f} dies/s  "
                  f"ratio {fs[ratio]:.2f} (target >= 0.5); in-process "
                  f"{fs[f'{key}_inprocess_dies_per_s']:,.0f} dies/s, ratio "
                  f"{fs[f'{ratio}_inprocess']:.2f}; CPU {fs[f'{key}_cpu_s']:.2f} s")
    print(f"  the CLI on a one-die file   {fs['cli_startup_s']:.2f} s (start-up); with a free "
          f"CSV reader the ratio would be at most {fs['ratio_bound']:.2f}")
    readers = res["readers"]
    for engine, r in readers.items():
        if "cpu_ns_per_value" in r:
            print(f"  reader {engine:10s} {r['wall_ns_per_value']:6.1f} ns/value wall, "
                  f"{r['cpu_ns_per_value']:6.1f} CPU")
    if "polars_import" in readers:
        print(f"  importing polars: {readers['polars_import']['cpu_s']:.2f} s CPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
