"""SECOM rolling check: how well can any detector tell SECOM's fails from its passes, judged in
time order *inside* the periods a build learns and calibrates from (its test part, the last
20%, is never looked at)?

SECOM's validation and test parts hold 6 fails each, too few to choose between detectors: a
ROC AUC on 6 fails has a 95% interval about 0.4 wide. So this bench cuts the first 80% of the
rows (training and validation periods) at 35%, 50% and 65%: each method is fitted on the
passes before a cut (the last quarter of them held out for the autoencoder's early stopping,
as the build does with its validation passes) and scores the next 15% of the rows, fails
included. Methods: the build's baselines (static PAT, Hotelling T2 on PCA, IsolationForest;
`optimize.baselines`), the autoencoder as the build trains it (`optimize.train`, default
settings), and the same autoencoder with quantized or near-constant signals left out of its
input and score (the fallback rules' guard, `optimize.rules`). Printed: ROC AUC per cut and
the mean weighted by each cut's fails, with the number of fails. Results go to
bench/results/secom_rolling.json.

    .venv/bin/python bench/secom_rolling_bench.py [--secom PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.fidelity_bench import SECOM  # noqa: E402

RESULTS = REPO / "bench" / "results" / "secom_rolling.json"
CUTS = (0.35, 0.50, 0.65)  # fit before the cut, score the next WIDTH of the rows
WIDTH = 0.15


def _without_quantized(prep: Any, x: np.ndarray) -> Any:
    """The preprocessor with the signals the rules' guard calls quantized made inactive."""
    from optimize.rules import signal_guards

    dropped = signal_guards(x)
    keep = np.array([dropped.get(j) != "quantized" for j in range(x.shape[1])])
    return dataclasses.replace(
        prep, active=prep.active & keep,
        inv_scale=np.where(keep, prep.inv_scale, 0).astype(np.float32),
        low=np.where(keep, prep.low, prep.center).astype(np.float32),
        high=np.where(keep, prep.high, prep.center).astype(np.float32))


def _scores(fit: np.ndarray, held: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    from optimize.baselines import fit_baselines
    from optimize.preprocess import PreprocessConfig, fit_preprocessor
    from optimize.train import AEConfig, Detector, TrainConfig, new_autoencoder, train

    out = {k: f(rows, None) for k, f in fit_baselines(fit, has_lots=False).items()}
    pc = PreprocessConfig()
    base = fit_preprocessor(fit, pc.clip, pc.bound, log_skewed=pc.log_skewed)
    for name, prep in (("autoencoder", base),
                       ("autoencoder without quantized", _without_quantized(base, fit))):
        model = new_autoencoder(fit.shape[1], AEConfig(), TrainConfig().seed)
        model, _ = train(model, prep.transform(fit), prep.transform(held), TrainConfig())
        out[name] = Detector.fit(prep, model, fit).scores(rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secom", type=Path, default=SECOM)
    args = ap.parse_args()
    if not args.secom.exists():
        print(f"SECOM not found at {args.secom}")
        return 1
    logging.disable(logging.INFO)
    from sklearn.metrics import roc_auc_score

    from optimize.data import load_dataset

    data = load_dataset(args.secom)
    order = np.argsort(data.times, kind="stable")
    x, y = np.asarray(data.X, np.float64)[order], np.asarray(data.labels)[order]
    n = len(y)
    cuts: list[dict[str, Any]] = []
    for cut in CUTS:
        a, b = int(cut * n), int((cut + WIDTH) * n)
        fit = x[:a][y[:a] == 0]
        k = int(0.75 * len(fit))
        aucs = {name: float(roc_auc_score(y[a:b], s))
                for name, s in _scores(fit[:k], fit[k:], x[a:b]).items()}
        cuts.append({"fit_rows": a, "scored_rows": b - a, "fails": int(y[a:b].sum()),
                     "auc": aucs})
        print(f"cut at {cut:.0%}: fit on {len(fit)} passes, score rows {a}-{b} "
              f"({int(y[a:b].sum())} fails): "
              + ", ".join(f"{m} {v:.3f}" for m, v in aucs.items()), flush=True)
    weights = [c["fails"] for c in cuts]
    mean = {m: float(np.average([c["auc"][m] for c in cuts], weights=weights))
            for m in cuts[0]["auc"]}
    print(f"mean over {sum(weights)} fails (load avg {os.getloadavg()[0]:.1f}):")
    for m, v in sorted(mean.items(), key=lambda kv: -kv[1]):
        print(f"  {m:32s} {v:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"cuts": cuts, "mean_auc": mean}, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
