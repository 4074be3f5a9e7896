"""The methods a model must beat, fitted and judged on the build's own splits.

A multivariate model earns its place on a test floor only when it beats what the floor already
runs, at the same overkill. Every build therefore scores the same validation and test rows with:

- `static_pat`: static Part Average Testing (AEC-Q001): robust centre and sigma per parameter
  from the training passes (several lots); score = largest robust |z| over parameters.
- `dynamic_pat`: dynamic PAT, centre and sigma recomputed from each lot's own dies (only when
  the data names lots); score = largest robust |z| against the die's lot.
- `pca_t2`: Hotelling T2 on PCA of robust-scaled values (components with eigenvalue > 1, at
  most 40) and the residual Q (SPE); score = the larger of T2 and Q, each over its training
  99th percentile.
- `iforest`: IsolationForest (200 trees) on the same scaled values; score = -score_samples.
- `supervised`: logistic regression on the scaled values, class-balanced, fitted on the
  training period's passes and fails (only when that period holds 5 fails or more); score =
  fail probability.

Robust scaling everywhere: median, sigma = IQR / 1.349 (the standard deviation when the IQR is 0),
missing values imputed by the median, scaled values clipped to +-10 so one wild sensor cannot
dominate. Columns constant in training are left out.

Each method is judged like the shipped model (`judge`): the threshold set on validation passes
at the target false-fail rate, then on the test rows ROC AUC, false-fail rate, recall per
defect class at that threshold and at *equal* false-fail (threshold re-set on test passes, so
methods are compared at the same overkill), with counts and bootstrap 95% intervals.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimize.preprocess import log_columns

_CLIP = 10.0

__all__ = [
    "BASELINES",
    "Judged",
    "RobustScaler",
    "bootstrap_aucs",
    "compare",
    "failing_classes",
    "fit_baselines",
    "judge",
    "paired_auc_diff",
    "part_figures",
    "roc_auc",
]

BASELINES = ("static_pat", "dynamic_pat", "pca_t2", "iforest", "supervised")
UNSUPERVISED = ("static_pat", "dynamic_pat", "pca_t2", "iforest")
TITLES = {"static_pat": "static PAT", "dynamic_pat": "dynamic PAT (per lot)",
          "pca_t2": "Hotelling T2 on PCA", "iforest": "IsolationForest",
          "supervised": "logistic regression (labels)"}


def _maybe_log(x: np.ndarray, log: np.ndarray) -> np.ndarray:
    if not log.any():
        return x
    x = np.array(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        x[:, log] = np.log(np.where(x[:, log] > 0, x[:, log], np.nan))
    return x


@dataclass(frozen=True)
class RobustScaler:
    center: np.ndarray  # (F,)
    scale: np.ndarray  # (F,), > 0
    active: np.ndarray  # (F,) bool
    log: np.ndarray  # (F,) bool: judged in log space

    @classmethod
    def fit(cls, x: np.ndarray, log: np.ndarray | None = None) -> RobustScaler:
        log = log_columns(x) if log is None else log
        x = _maybe_log(x, log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            center = np.nanmedian(x, axis=0)
            q75, q25 = np.nanpercentile(x, [75, 25], axis=0)
            std = np.nanstd(x, axis=0)
        scale = (q75 - q25) / 1.349
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, std)
        active = np.isfinite(center) & np.isfinite(scale) & (
            scale > 1e-6 * np.maximum(np.abs(np.nan_to_num(center)), 1e-30))
        return cls(np.where(active, center, 0.0), np.where(active, scale, 1.0), active, log)

    def raw_z(self, x: np.ndarray) -> np.ndarray:
        """(n, F) raw with NaN -> (n, F_active) robust z, NaN where missing."""
        a = self.active
        with np.errstate(invalid="ignore"):
            return (_maybe_log(x, self.log)[:, a] - self.center[a]) / self.scale[a]

    def z(self, x: np.ndarray) -> np.ndarray:
        """(n, F) raw with NaN -> (n, F_active) clipped robust z, NaN -> 0."""
        return np.clip(np.nan_to_num(self.raw_z(x), nan=0.0), -_CLIP, _CLIP)


def _max_abs_z(z: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.abs(z), nan=0.0, posinf=1e6).max(axis=1)


Scorer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # (x, lot ids) -> scores


def _static_pat(x_train: np.ndarray) -> Scorer:
    s = RobustScaler.fit(x_train)
    return lambda x, _lots: _max_abs_z(s.raw_z(x))


def _dynamic_pat(x_train: np.ndarray) -> Scorer:
    ref = RobustScaler.fit(x_train)

    def score(x: np.ndarray, lots: np.ndarray | None) -> np.ndarray:
        out = np.zeros(len(x))
        groups = np.zeros(len(x), int) if lots is None else np.unique(lots, return_inverse=True)[1]
        for g in np.unique(groups):
            rows = groups == g
            s = RobustScaler.fit(x[rows], ref.log)
            z = s.raw_z(x[rows])
            z[:, ~ref.active[s.active]] = 0.0
            out[rows] = _max_abs_z(z)
        return out

    return score


def _pca_t2(x_train: np.ndarray) -> Scorer:
    """Hotelling T2 on the components with eigenvalue > 1 (Kaiser, at most 40) and the
    residual Q (SPE); the score is the larger of the two, each over its training 99th
    percentile, so a die off the correlation structure (Q) counts as much as one far along it."""
    from sklearn.decomposition import PCA

    s = RobustScaler.fit(x_train)
    z = s.z(x_train)
    full = PCA(svd_solver="full").fit(z)  # one SVD: the first k components are PCA(k)'s
    k = int(max(1, min(40, (full.explained_variance_ > 1.0).sum(), z.shape[1] - 1)))
    comps, var, mean = full.components_[:k], full.explained_variance_[:k], full.mean_

    def parts(zx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = (zx - mean) @ comps.T
        return (t**2 / var).sum(axis=1), ((zx - mean - t @ comps) ** 2).sum(axis=1)

    t2_ref, q_ref = (max(float(np.percentile(v, 99)), 1e-9) for v in parts(z))

    def score(x: np.ndarray, _lots: np.ndarray | None) -> np.ndarray:
        t2, q = parts(s.z(x))
        return np.maximum(t2 / t2_ref, q / q_ref)

    return score


def _iforest(x_train: np.ndarray, seed: int) -> Scorer:
    from sklearn.ensemble import IsolationForest

    s = RobustScaler.fit(x_train)
    forest = IsolationForest(n_estimators=200, random_state=seed, n_jobs=1).fit(s.z(x_train))
    return lambda x, _lots: -forest.score_samples(s.z(x))


def _supervised(x_train: np.ndarray, x_fit: np.ndarray, y_fit: np.ndarray, seed: int) -> Scorer:
    from sklearn.linear_model import LogisticRegression

    s = RobustScaler.fit(x_train)
    clf = LogisticRegression(C=0.05, class_weight="balanced", max_iter=500, random_state=seed)
    clf.fit(s.z(x_fit), y_fit)
    return lambda x, _lots: clf.predict_proba(s.z(x))[:, 1]


def fit_baselines(x_train: np.ndarray, *, has_lots: bool, x_fit: np.ndarray | None = None,
                  y_fit: np.ndarray | None = None, seed: int = 0) -> dict[str, Scorer]:
    """The baselines that apply to this data, fitted on the training passes `x_train` (and,
    for the supervised one, every training-period row `x_fit` with labels `y_fit`)."""
    out: dict[str, Scorer] = {"static_pat": _static_pat(x_train)}
    if has_lots:
        out["dynamic_pat"] = _dynamic_pat(x_train)
    out["pca_t2"] = _pca_t2(x_train)
    out["iforest"] = _iforest(x_train, seed)
    if y_fit is not None and x_fit is not None and 0 < int(y_fit.sum()) < len(y_fit) \
            and int(y_fit.sum()) >= 5:
        out["supervised"] = _supervised(x_train, x_fit, y_fit, seed)
    return out


# --------------------------------------------------------------------------------------------
# Judging


@dataclass(frozen=True)
class Judged:
    """A method's figures on the test rows (JSON-ready via `as_dict`)."""

    threshold: float
    auc: float | None
    auc_ci: tuple[float, float] | None
    ffr: float | None
    ffr_ci: tuple[float, float] | None
    fails_flagged: tuple[int, int]  # (flagged, fails)
    passes_flagged: tuple[int, int]  # (flagged, passes)
    recall: dict[str, dict[str, Any]]  # class -> {recall, ci, caught, n, recall_equal_ffr}

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "roc_auc": self.auc, "roc_auc_ci": self.auc_ci,
                "test_ffr": self.ffr, "test_ffr_ci": self.ffr_ci,
                "fails_flagged": list(self.fails_flagged),
                "passes_flagged": list(self.passes_flagged), "recall": self.recall}


def threshold_at(pass_scores: np.ndarray, target_ffr: float) -> float:
    """The score above which a share `target_ffr` of `pass_scores` lies (same rule as
    `optimize.calibrate.calibrate_threshold`)."""
    from optimize.calibrate import calibrate_threshold

    return calibrate_threshold(pass_scores, target_ffr).threshold


_BOOT_CELLS = 4_000_000  # resamples x rows held at once by `bootstrap_aucs` (~32 MB each)


def bootstrap_aucs(labels: np.ndarray, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of `scores` on each bootstrap resample, the rows of `idx` (boot, n) (the same
    value as sklearn's `roc_auc_score` on `scores[idx[b]]`, ties counted half; NaN where a
    resample lacks a class). All resamples at once from one sort: a resample is a count per
    row, and the AUC of weighted rows is sum over tie groups of pass weight below plus half
    the tied, times fail weight, over (fail weight x pass weight). sklearn's call per resample
    was a quarter of a default build's CPU time (4,400 calls, 27 s of 99)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    n = len(s)
    boot = len(idx)
    step = max(1, _BOOT_CELLS // max(n, 1))
    if boot > step:  # bounded memory: (resamples x rows) float arrays, a chunk at a time
        return np.concatenate([bootstrap_aucs(y, s, idx[i:i + step])
                               for i in range(0, boot, step)])
    order = np.argsort(s, kind="stable")
    _, group = np.unique(s[order], return_inverse=True)  # tie group of each sorted row
    counts = np.bincount((idx + n * np.arange(boot)[:, None]).ravel(),
                         minlength=boot * n).reshape(boot, n)[:, order].astype(np.float64)
    ng = int(group.max()) + 1 if n else 0
    fails = np.zeros((boot, ng))
    passes = np.zeros((boot, ng))
    ys = y[order]
    np.add.at(fails.T, group[ys], counts[:, ys].T)
    np.add.at(passes.T, group[~ys], counts[:, ~ys].T)
    below = np.cumsum(passes, axis=1) - passes
    total = fails.sum(axis=1) * passes.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (fails * (below + 0.5 * passes)).sum(axis=1) / total, np.nan)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` (fails high) against 0/1 `labels` (`bootstrap_aucs` on all rows)."""
    return float(bootstrap_aucs(labels, scores, np.arange(len(scores))[None, :])[0])


def _interval(values: list[float]) -> tuple[float, float] | None:
    v = np.asarray([x for x in values if np.isfinite(x)])
    if len(v) < 10:
        return None
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def judge(test_scores: np.ndarray, val_pass_scores: np.ndarray, labels: np.ndarray | None,
          classes: Mapping[str, np.ndarray], target_ffr: float, *, boot: int = 200,
          seed: int = 0, threshold: float | None = None) -> Judged:
    """Figures of one method on the test rows; `threshold` defaults to the one set on the
    validation passes at `target_ffr`. Bootstrap: `boot` resamples of the test rows."""
    s = np.asarray(test_scores, dtype=np.float64)
    thr = threshold_at(val_pass_scores, target_ffr) if threshold is None else threshold
    flagged = s > thr
    if labels is None:
        return Judged(thr, None, None, None, None, (int(flagged.sum()), 0),
                      (int(flagged.sum()), len(s)), {})
    passes, fails = labels == 0, labels == 1
    both = passes.any() and fails.any()
    auc = roc_auc(labels, s) if both else None
    ffr = float(flagged[passes].mean()) if passes.any() else None
    thr_eq = threshold_at(s[passes], target_ffr) if passes.any() else thr
    rng = np.random.default_rng(seed)
    ffrs = []
    rec_boot: dict[str, list[float]] = {c: [] for c in classes}
    n = len(s)
    resamples = rng.integers(0, n, size=(boot, n))
    aucs = bootstrap_aucs(labels, s, resamples).tolist() if both and boot else []
    for idx in resamples:
        y = labels[idx]
        p = y == 0
        if p.any():
            ffrs.append(float(flagged[idx][p].mean()))
        for c, mask in classes.items():
            mi = mask[idx]
            if mi.any():
                rec_boot[c].append(float(flagged[idx][mi].mean()))
    recall = {}
    for c, mask in classes.items():
        if not mask.any():
            continue
        recall[c] = {"recall": float(flagged[mask].mean()), "ci": _interval(rec_boot[c]),
                     "caught": int(flagged[mask].sum()), "n": int(mask.sum()),
                     "recall_equal_ffr": float((s[mask] > thr_eq).mean())}
    return Judged(thr, auc, _interval(aucs) if both else None, ffr, _interval(ffrs),
                  (int(flagged[fails].sum()), int(fails.sum())),
                  (int(flagged[passes].sum()), int(passes.sum())), recall)


def paired_auc_diff(labels: np.ndarray, a: np.ndarray, b: np.ndarray, boot: int,
                    seed: int) -> tuple[float, float] | None:  # fmt: skip
    """95% bootstrap interval of AUC(a) - AUC(b) on the same resampled rows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(labels), size=(boot, len(labels)))
    diffs = bootstrap_aucs(labels, a, idx) - bootstrap_aucs(labels, b, idx)
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) < 10:
        return None
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def part_figures(part: Any, scores: np.ndarray, val_pass_scores: np.ndarray, threshold: float,
                 target_ffr: float, *, seed: int = 0, boot: int = 200) -> dict[str, Any] | None:
    """`judge` of `scores` on one split part (validation or test) as a JSON-ready summary:
    ROC AUC with its interval, false-fail, recall per class at the threshold and at equal
    false-fail, class sizes. None when the part has no pass/fail mix."""
    if part.labels is None or not 0 < part.labels.sum() < len(part):
        return None
    j = judge(scores, val_pass_scores, part.labels, failing_classes(part.defect, part.labels),
              target_ffr, boot=boot, seed=seed, threshold=threshold)
    return {"roc_auc": j.auc, "roc_auc_ci": j.auc_ci, "ffr": j.ffr, "ffr_ci": j.ffr_ci,
            "recall": {k: v["recall"] for k, v in j.recall.items()},
            "recall_equal_ffr": {k: v["recall_equal_ffr"] for k, v in j.recall.items()},
            "class_size": {k: v["n"] for k, v in j.recall.items()}}


# --------------------------------------------------------------------------------------------
# The build's comparison


def failing_classes(defect: np.ndarray | None, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Failing classes of some rows -> (n,) bool masks (one class `fail` without defects)."""
    if defect is not None:
        return {str(c): defect == c for c in sorted(set(defect.tolist())) if c != "none"}
    if labels is not None:
        return {"fail": labels == 1}
    return {}


def compare(split: Any, shipped_val: np.ndarray, shipped_test: np.ndarray, target_ffr: float,
            *, seed: int = 0, boot: int = 200,
            focus: str = "subtle_multi") -> dict[str, Any] | None:
    """Fit every baseline on the split's training rows, judge them and the shipped model on the
    test rows the same way, and say which baseline the model beats and by how much. None when
    the data has no labels (nothing to judge on)."""
    t, v = split.test, split.val
    if t.labels is None or not (0 < t.labels.sum() < len(t.labels)):
        return None
    period = split.train_period
    lots_val, lots_test = v.groups.get("lot"), t.groups.get("lot")
    methods = fit_baselines(split.train.x, has_lots=lots_test is not None,
                            x_fit=None if period is None else period.x,
                            y_fit=None if period is None else period.labels, seed=seed)
    classes = failing_classes(t.defect, t.labels)
    scores = {"model": (shipped_val, shipped_test)}
    for name, score in methods.items():
        scores[name] = (score(v.x, lots_val), score(t.x, lots_test))
    judged = {name: judge(te, va[v.passes], t.labels, classes, target_ffr, boot=boot, seed=seed)
              for name, (va, te) in scores.items()}
    out: dict[str, Any] = {"methods": {k: j.as_dict() for k, j in judged.items()},
                           "titles": {k: TITLES.get(k, "shipped model") for k in judged}}
    unsup = [k for k in UNSUPERVISED if k in judged]
    best = max(unsup, key=lambda k: judged[k].auc or 0.0)
    margin = (judged["model"].auc or 0.0) - (judged[best].auc or 0.0)
    out["best_unsupervised"] = best
    out["auc_diff_ci"] = {k: paired_auc_diff(t.labels, scores["model"][1], scores[k][1], boot,
                                             seed) for k in judged if k != "model"}
    out["auc_margin_vs_best_unsupervised"] = margin
    focus_class = focus if focus in classes else None
    if focus_class:
        mine = judged["model"].recall[focus_class]["recall_equal_ffr"]
        others = {k: j.recall[focus_class]["recall_equal_ffr"] for k, j in judged.items()
                  if k != "model" and focus_class in j.recall}
        out["focus"] = {"class": focus_class, "model": mine, "baselines": others,
                        "beats_all": all(mine > r for r in others.values())}
    verb = "beats" if margin > 0 else "does NOT beat"
    ci = out["auc_diff_ci"][best]
    text = (f"The model {verb} the best unsupervised baseline, {TITLES[best]}, on ROC AUC: "
            f"{judged['model'].auc:.4f} vs {judged[best].auc:.4f} ({margin:+.4f}"
            + (f", paired 95% interval [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + ").")
    if ci and ci[0] <= 0 <= ci[1]:
        text += (f" The interval includes 0: on {int(t.labels.sum())} test fails the two cannot "
                 "be told apart.")
    if focus_class:
        f = out["focus"]
        runner = max(f["baselines"], key=f["baselines"].get)
        text += (f" On {focus_class} at equal false-fail ({target_ffr:.2%} of test passes) it "
                 f"catches {f['model']:.1%} vs {f['baselines'][runner]:.1%} for the best baseline, "
                 f"{TITLES[runner]}.")
    out["verdict"] = text
    return out
