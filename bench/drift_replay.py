"""Drift-gate replay: the build's drift figures on floor seeds, without training a model.

For each seed, the floor generator's data (`--lots` whole lots, as `bench/fidelity_bench.py`
makes it, with or without `--drift`), the build's own time-ordered split and the build's own
drift code (`optimize.calibrate.drift_with_noise_floor`, `window_psi`): the test part's PSI
against the shipped alert threshold, with the threshold as set before the period-to-period term
(2x the larger of the sampling noise floor and the lot-to-lot windows) and as set now (2x the
largest of the three). A few seconds of CPU per seed instead of a build's 75.

`--after-lots N`: the generator runs N lots further; the build sees the first `--lots`, and the
N lots after them are what the device sees once the bundle ships. Their median window PSI is
judged against the shipped reference and alert, and against a reference refitted on the
latest passes including the test part's (the alternative of shipping the latest period).

    .venv/bin/python bench/drift_replay.py [--seeds 311 312 313] [--drift-seeds 312] [--lots 25]
        [--after-lots 5]

Writes bench/results/drift_replay.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "drift_replay.json"


def replay(seed: int, drift: bool, lots: int, work: Path, after_lots: int = 0) -> dict[str, Any]:
    """The drift figures a default build would compute on this seed (module docstring)."""
    import dataclasses

    import numpy as np

    from optimize.calibrate import CalibrateConfig, drift_with_noise_floor, window_psi
    from optimize.data import load_dataset, write_csv
    from optimize.floor import FloorConfig, generate_floor
    from optimize.split import split_dataset

    total = lots + after_lots
    path = work / f"floor-seed{seed}{'-drift' if drift else ''}-lots{total}.csv"
    if not path.exists():  # through the CSV, as the build reads it
        n = total * FloorConfig().dies_per_lot
        write_csv(path, generate_floor(FloorConfig(n_dies=n, seed=seed, drift=drift)))
    data, m = load_dataset(path), lots * FloorConfig().dies_per_lot
    seen = dataclasses.replace(  # what the build is given: the first `lots` lots
        data, X=data.X[:m], labels=_head(data.labels, m), defect=_head(data.defect, m),
        times=_head(data.times, m), ids=_head(data.ids, m),
        extra={k: v[:m] for k, v in data.extra.items()})
    split = split_dataset(seen)
    cfg = CalibrateConfig()
    recent = np.vstack([split.train.x, split.val.x[split.val.passes]])

    def reference(x: np.ndarray) -> dict[str, Any]:
        return drift_with_noise_floor(x, cfg, 0, max_window=max(len(split.test), 200),
                                      horizon=len(split.test))

    ref = reference(recent)
    before = max(cfg.alert_min, cfg.alert_factor * max(ref["noise_floor_psi"],
                                                       ref["lot_to_lot_psi"]))
    test = window_psi(ref, split.test.x)
    out = {"seed": seed, "drift": drift, "test_dies": len(split.test), "test_psi": test,
           "noise_floor_psi": ref["noise_floor_psi"], "lot_to_lot_psi": ref["lot_to_lot_psi"],
           "period_psi": ref["period_psi"], "alert_before": round(before, 4),
           "alert_after": ref["alert_psi"],
           "refused_before": test is not None and test > before,
           "refused_after": test is not None and test > ref["alert_psi"]}
    if after_lots:
        later = data.X[m:].astype(np.float32)
        refit = reference(np.vstack([recent, split.test.x[split.test.passes]]))
        out["after"] = {"psi": window_psi(ref, later), "alert": ref["alert_psi"],
                        "refit_psi": window_psi(refit, later), "refit_alert": refit["alert_psi"]}
    return out


def _head(a: Any, m: int) -> Any:
    return None if a is None else a[:m]


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[311, 312, 313, 321, 322, 323])
    ap.add_argument("--drift-seeds", type=int, nargs="*", default=[311, 312, 321, 322, 323])
    ap.add_argument("--lots", type=int, default=25, help="whole lots per seed (default 25)")
    ap.add_argument("--after-lots", type=int, default=0,
                    help="lots the device sees after the build's (default 0: none)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = ap.parse_args()
    rows = []
    print("seed      drift  test PSI  alert before  period PSI  alert after  refused before->after")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(s, False) for s in args.seeds] + [(s, True) for s in args.drift_seeds]
        for seed, drift in jobs:
            r = replay(seed, drift, args.lots, Path(tmp), args.after_lots)
            rows.append(r)
            print(f"{seed:<9} {drift!s:<6} {_f(r['test_psi']):>8}  {_f(r['alert_before']):>12}"
                  f"  {_f(r['period_psi']):>10}  {_f(r['alert_after']):>11}  "
                  f"{r['refused_before']} -> {r['refused_after']}", flush=True)
            if "after" in r:
                a = r["after"]
                print(f"  {args.after_lots} lots after: PSI {_f(a['psi'])} vs shipped alert "
                      f"{_f(a['alert'])}; refitted on the test part too: {_f(a['refit_psi'])} "
                      f"vs {_f(a['refit_alert'])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_avg": os.getloadavg(), "lots": args.lots,
                                    "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
