"""Stage 7b: a supervised head on the autoencoder's features, used when the labels earn it.

Historical test data comes with pass/fail labels. The head is a logistic regression on what
the autoencoder already computes for a die, inside the same ONNX graph:

    features  = [ z_in (F)              robust z the autoencoder sees (|z| <= clip)
                  sqrt(masked) (F)      |weighted residual| per parameter (0 when missing)
                  log(max(ae, 1e-6)) ]  the autoencoder's own score
    logit     = features . w + b        (standardization folded into w and b)
    score     = softplus(logit)         positive, higher = more anomalous, no overflow

So the head can be a hybrid: with w on the log score only it is the autoencoder (a monotone
transform of its score), and the labels move it towards the parameters and residuals that
separate fails from passes. `top_index` / `top_contribution` stay the autoencoder's
per-parameter contributions: they explain the residual part of the score.

Fit: on every die of the training period (passes and fails; the autoencoder was trained on its
passes), class-balanced. The feature set (`z+score`: the robust z and the autoencoder score;
`z+residual+score`: all three blocks) and the L2 strength are chosen by ROC AUC on the last
quarter of that period (time order) after fitting on the first three quarters, then the head
is refitted on the whole period. The residual block helps where a fail shows as a parameter
the others do not predict; on the floor data it hurt (test AUC 0.956 vs 0.987 without it).
Offered only when the training period holds at least `min_fails` fails.

Keep or drop: both the unsupervised INT8 model and the INT8 model with the head (the form
that ships) get their threshold on the validation passes; the head is kept only when its ROC
AUC is higher on the validation part AND on the time-ordered test part. Two later periods
instead of one: a head chosen on the test part alone would report a test AUC biased upward by
the choice. Both are reported with bootstrap intervals and a paired bootstrap interval of the
AUC difference on the test part. The head is float (a few hundred weights); INT8 parity is
checked on the graph with the head as for any build (`optimize.quantize.parity`).

The graph is edited, not re-exported: `attach_head` renames the autoencoder's score to
`ae_score` and appends the head, so it works on the FP32 graph and on either INT8 graph
(static QDQ or dynamic) alike; `z_in` and `masked` keep their names through quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from optimize.baselines import paired_auc_diff, part_figures
from optimize.calibrate import calibrate_threshold
from optimize.export import run
from optimize.split import Split
from optimize.train import Detector

log = logging.getLogger("edgefleet.optimize")

C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strength, chosen on the training period's end
SCORE_FLOOR = 1e-6  # log of the autoencoder score is taken above this


@dataclass(frozen=True)
class SupervisedConfig:
    mode: str = "auto"  # auto: offer when labels allow, keep when it wins; off: never
    min_fails: int = 10  # fails the training period needs for a head to be fitted


@dataclass(frozen=True)
class Head:
    """logit = [z_in, sqrt(masked), log ae score] . weights + bias, on raw feature values."""

    weights: np.ndarray  # (2F + 1,) float32
    bias: float
    c: float  # the chosen inverse L2 strength
    features: str = "z+residual+score"  # the chosen feature set (`feature_sets`)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(n, 2F + 1) features -> (n,) float32 softplus(logit)."""
        logit = features.astype(np.float32) @ self.weights + np.float32(self.bias)
        return np.logaddexp(np.float32(0), logit).astype(np.float32)


def ae_features(det: Detector, x: np.ndarray) -> np.ndarray:
    """(n, F) raw -> (n, 2F + 1) float32 head features, the same float32 steps as the graph."""
    x = np.asarray(x, dtype=np.float32)
    missing = np.isnan(x)
    z = det.prep.scale(x)
    z_in = np.clip(z, -det.prep.clip, det.prep.clip)
    masked = np.where(missing, np.float32(0), (z - det.reconstruction(x)) ** 2 * det.weights)
    score = (masked / det.denominators(missing)).sum(axis=1, dtype=np.float32)
    log_score = np.log(np.maximum(score, np.float32(SCORE_FLOOR)))
    return np.hstack([z_in, np.sqrt(masked), log_score[:, None]]).astype(np.float32)


def feature_sets(n_features: int) -> dict[str, np.ndarray]:
    """The candidate inputs of the head, as column indices of `ae_features`."""
    f = n_features
    return {"z+score": np.r_[0:f, 2 * f], "z+residual+score": np.arange(2 * f + 1)}


def fit_head(features: np.ndarray, labels: np.ndarray, seed: int = 0,
             max_passes: int = 3000) -> Head:
    """Logistic regression on standardized `features` (time order). The feature set
    (`feature_sets`) and C are chosen by ROC AUC on the last quarter after fitting on the
    first three, then the model is refitted on all rows; weights returned on the raw features
    (0 for the columns the chosen set leaves out). At most `max_passes` passes, evenly spaced
    in time, and every fail: the fits then take seconds, and class weights balance anyway."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    passes = np.flatnonzero(y == 0)
    if len(passes) > max_passes:  # every k-th pass (time order kept) and every fail
        keep = np.sort(np.r_[passes[np.linspace(0, len(passes) - 1, max_passes).astype(int)],
                             np.flatnonzero(y == 1)])
        f, y = f[keep], y[keep]
    mean, std = f.mean(axis=0), f.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    s = (f - mean) / std
    cut = int(len(s) * 0.75)
    sets = feature_sets((f.shape[1] - 1) // 2)

    def model(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, class_weight="balanced", max_iter=300, random_state=seed)

    best, best_auc = ("z+score", C_GRID[0]), -1.0
    if 0 < y[:cut].sum() < cut and 0 < y[cut:].sum() < len(y) - cut:
        for name, cols in sets.items():
            for c in C_GRID:
                auc = float(roc_auc_score(y[cut:], model(c).fit(s[:cut, cols], y[:cut])
                                          .decision_function(s[cut:, cols])))
                if auc > best_auc + 1e-4:
                    best, best_auc = (name, c), auc
    cols = sets[best[0]]
    clf = model(best[1]).fit(s[:, cols], y)
    w = np.zeros(f.shape[1])
    w[cols] = clf.coef_[0] / std[cols]
    b = float(clf.intercept_[0] - np.sum(clf.coef_[0] * mean[cols] / std[cols]))
    return Head(w.astype(np.float32), b, best[1], best[0])


def attach_head(model: bytes, head: Head) -> bytes:
    """The graph `model` (export.to_onnx or its INT8 form) with `score` = the head's score."""
    g = onnx.load_from_string(model)
    nodes = list(g.graph.node)
    producer = next(n for n in nodes if "score" in n.output)
    producer.output[list(producer.output).index("score")] = "ae_score"
    if producer.name == "score":
        producer.name = "ae_score"
    w = head.weights.astype(np.float32)[:, None]  # (2F + 1, 1)
    g.graph.initializer.extend([
        numpy_helper.from_array(w, "head_w"),
        numpy_helper.from_array(np.array([head.bias], np.float32), "head_b"),
        numpy_helper.from_array(np.array(SCORE_FLOOR, np.float32), "head_floor"),
        numpy_helper.from_array(np.array([1], np.int64), "head_axis1"),
        numpy_helper.from_array(np.array([-1], np.int64), "head_flat"),
    ])  # fmt: skip

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    g.graph.node.extend([
        node("Sqrt", ["masked"], "head_resid"),  # (batch, F)
        node("Max", ["ae_score", "head_floor"], "head_ae_floored"),  # (batch,)
        node("Log", ["head_ae_floored"], "head_ae_log"),
        node("Unsqueeze", ["head_ae_log", "head_axis1"], "head_ae_col"),  # (batch, 1)
        node("Concat", ["z_in", "head_resid", "head_ae_col"], "head_features", axis=1),
        node("Gemm", ["head_features", "head_w", "head_b"], "head_logit"),  # (batch, 1)
        node("Softplus", ["head_logit"], "head_score"),
        node("Reshape", ["head_score", "head_flat"], "score"),  # (batch,)
    ])  # fmt: skip
    onnx.checker.check_model(g, full_check=True)
    return g.SerializeToString()


@dataclass(frozen=True)
class HeadOffer:
    kept: bool
    report: dict[str, Any] | None  # the report's `supervised` object; None when not offered
    fp32: bytes | None = None  # pruned FP32 graph with the head
    int8: bytes | None = None  # INT8 graph with the head
    int8_val: np.ndarray | None = None  # its scores, one row at a time
    int8_test: np.ndarray | None = None


def offer_head(split: Split, det: Detector, fp32: bytes, int8: bytes, int8_val: np.ndarray,
               int8_test: np.ndarray, cfg: SupervisedConfig, target_ffr: float,
               seed: int = 0) -> HeadOffer:  # fmt: skip
    """Fit the head on the training period, judge it against the unsupervised INT8 model
    (scores `int8_val`, `int8_test`, one row at a time) and say whether it ships."""
    period = split.train_period
    if cfg.mode == "off" or period is None or period.labels is None:
        return HeadOffer(False, None)
    n_fails = int(period.labels.sum())
    if n_fails < cfg.min_fails or n_fails == len(period):
        return HeadOffer(False, {"offered": False, "kept": False, "verdict":
                                 f"No supervised head: the training period holds {n_fails} "
                                 f"fails (at least {cfg.min_fails} needed)."})
    head = fit_head(ae_features(det, period.x), period.labels, seed)
    fp32_h, int8_h = attach_head(fp32, head), attach_head(int8, head)
    from optimize.quantize import score_rows  # one row at a time, as a device scores

    val_h, test_h = score_rows(int8_h, split.val.x), score_rows(int8_h, split.test.x)
    vp = split.val.passes
    thr_u = calibrate_threshold(int8_val[vp], target_ffr).threshold
    thr_h = calibrate_threshold(val_h[vp], target_ffr).threshold
    ref = run(fp32_h, split.test.x)[0]  # Python reference vs ONNX: see the tests
    out: dict[str, Any] = {"offered": True, "c": head.c, "train_fails": n_fails,
                           "features": head.features}
    for name, v, t, thr in (("unsupervised", int8_val, int8_test, thr_u),
                            ("head", val_h, test_h, thr_h)):
        out[name] = {"threshold": thr,
                     "val": part_figures(split.val, v, v[vp], thr, target_ffr, seed=seed, boot=100),
                     "test": part_figures(split.test, t, v[vp], thr, target_ffr, seed=seed,
                                          boot=100)}
    out["int8_vs_fp32_head"] = {
        "decision_agreement": float(np.mean((ref > thr_h) == (test_h > thr_h)))}
    t = split.test
    if t.labels is not None and 0 < t.labels.sum() < len(t):
        out["test_auc_diff_ci"] = paired_auc_diff(t.labels, test_h, int8_test, 200, seed)
    reasons = []
    for part in ("val", "test"):
        u, h = out["unsupervised"][part], out["head"][part]
        if u is None or h is None:
            reasons.append(f"no pass/fail mix on the {part} part to judge it")
        elif h["roc_auc"] <= u["roc_auc"]:
            reasons.append(f"{part} ROC AUC {h['roc_auc']:.4f} is not above the unsupervised "
                           f"model's {u['roc_auc']:.4f}")
    kept = not reasons
    out.update(kept=kept, reasons=reasons)
    u, h = out["unsupervised"], out["head"]
    title = f"Supervised head (logistic on {head.features}, {n_fails} training fails)"
    out["verdict"] = (f"{title}: kept, it ships (ROC AUC validation "
                      f"{h['val']['roc_auc']:.4f} vs {u['val']['roc_auc']:.4f}, test "
                      f"{h['test']['roc_auc']:.4f} vs {u['test']['roc_auc']:.4f} for the "
                      "autoencoder)." if kept else f"{title}: dropped: {'; '.join(reasons)}.")
    log.info("%s", out["verdict"])
    return HeadOffer(kept, out, fp32_h, int8_h, val_h, test_h)
