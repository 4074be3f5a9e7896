"""Stage 7: the decision threshold, the confidence scale, the rule-based fallback and the drift
reference. Everything the manifest needs besides the model itself.

Threshold: from the scores of validation passes, the midpoint between the k-th and (k+1)-th
highest, k = floor(target_ffr * n): exactly k validation passes score above it (fewer with
ties), so the validation false-fail rate is <= target. With k = 0 it sits just above the
highest pass.

Confidence (fixed by the bundle format): confidence = 1 - exp(-|score - threshold| / scale).
We set `scale` to the robust spread (IQR / 1.349) of validation-pass scores: a die one typical
pass-to-pass score difference away from the threshold gets 0.63, three away 0.95, and a die
right at the threshold 0, whichever side it is on.

Fallback rules: `optimize.rules`.

max_missing: the most values any training or validation pass lacks, times 1.5, plus 2 (never
above the feature count): a die beyond it is unlike anything the model learnt from. The agent
then answers with the rules when at least `rules_min_measured` of the rules' parameters are
measured, else refuses the die (too_many_missing).

Drift reference: from the most recent passing dies before the test part (the last
`drift_pool` passes of the training and validation periods, in time order), per feature up to
`bins - 1` inner edges at their quantiles and the share in each bin, built by the agent's own
`agent.drift.drift_reference` so writer and monitor cannot disagree on the binning (bin =
number of edges <= value; NaN left out; repeated quantiles merged). Noise floor: the agent's
own PSI max (`agent.drift.DriftMonitor`) of random samples of the agent's window size from that
pool (sampling noise only), and the largest PSI of its consecutive windows (which carry
lot-to-lot variation: a new lot is not drift). Period to period (`period_psi`): the process's
own wander over a period as long as the one judged (`horizon`: the test part), replayed on the
history: for up to `drift_backtests` earlier starts p, a reference of the same pool size from
the passes just before p, and the median window PSI of the `horizon` passes after p, which is
the statistic `window_psi` gives the build gate on the test part; the largest of them. A slow
random walk of the process moves further over five lots than inside the pool's four windows:
without this term, normal floor data (generator seeds 312 and 323) was refused. The shipped
alert threshold is `alert_factor` times the largest of the three, at least `alert_min`: no
window of the reference period, and no earlier period of the history, alarms. A step inside the
history raises the period term as much as the step itself (the alarm then fires on a movement
twice the step's): such a history is not one to set "normal" from; docs/model.md.
The window is the agent's, or smaller when the pool or the test part is small (PSI grows as the
sample shrinks, so the test part is judged by `window_psi` at the same size).
A lower threshold fires on every lot change; a fixed 0.25 fired on shuffled dev rows of SECOM.

Per-tester calibration (`agent.calibration`, docs/model.md): the build ships its parameters in
`decision.calibration` (from the validation scores, `params_from_validation`) and measures it
with the device's own algorithm (`agent.calibration.simulate`), die by die in time order on
the test part, starting from an empty state as after a model swap: false-fail per lot and
tester and recall per class, calibration on and off (`calibration_figures`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from agent.calibration import (
    BodyParams,
    CalibrationParams,
    manifest_block,
    simulate,
    strata_from_validation,
    tune_level,
)
from agent.drift import drift_reference
from optimize.breakdown import ffr_by_group, wilson

__all__ = [
    "CalibrateConfig",
    "Decision",
    "body_params",
    "calibrate_threshold",
    "calibration_figures",
    "calibration_params",
    "confidence",
    "drift_reference",
    "drift_with_noise_floor",
    "imputed_differs",
    "learn_max_missing",
    "period_psi",
    "psi_max",
    "tester_prior",
    "window_psi",
]


@dataclass(frozen=True)
class CalibrateConfig:
    target_ffr: float = 0.01  # false-fail rate on validation passes
    top_k: int = 5  # contributing parameters reported per die
    drift_bins: int = 10
    drift_pool: int = 8192  # most recent passes the drift reference is built from
    drift_window: int = 2048  # the agent's drift window (agent Limits.drift_window)
    alert_factor: float = 2.0  # alert threshold = factor x in-distribution PSI noise floor
    alert_min: float = 0.1
    drift_backtests: int = 16  # earlier periods replayed for `period_psi`
    rules_min_measured: float = 0.5  # share of rule parameters a die beyond max_missing needs
    per_tester: bool = True  # ship decision.calibration (agent/calibration.py)
    # the body tracker (agent.calibration.BodyParams; its defaults, so one place sets them):
    body_window: int = BodyParams.window  # floor-wide window (0: no body tracker)
    body_beta: float = BodyParams.beta  # the threshold moves as the body's ratio to this power
    body_max_factor: float = BodyParams.max_factor  # the most the body can raise a threshold by
    body_margin: float = 1.2  # deadband = margin x the largest move of the validation windows


@dataclass(frozen=True)
class Decision:
    threshold: float
    confidence_scale: float
    target_ffr: float
    val_ffr: float  # false-fail rate on the validation passes it was fitted on
    n_val_passes: int


def calibrate_threshold(pass_scores: np.ndarray, target_ffr: float) -> Decision:
    """Threshold and confidence scale from validation-pass scores (module docstring)."""
    if not 0 <= target_ffr < 1:
        raise ValueError(f"target false-fail rate must be in [0, 1), got {target_ffr}")
    s = np.sort(np.asarray(pass_scores, dtype=np.float64))
    if len(s) == 0 or not np.all(np.isfinite(s)):
        raise ValueError("calibrate_threshold: needs finite scores of at least one pass")
    n = len(s)
    k = math.floor(target_ffr * n + 1e-9)
    if k == 0:
        threshold = float(np.nextafter(np.float32(s[-1]), np.float32(np.inf)))
    else:
        threshold = float((s[n - k - 1] + s[n - k]) / 2)
    q25, q75 = np.quantile(s, [0.25, 0.75])
    scale = max(float(q75 - q25) / 1.349, 1e-6 * max(abs(threshold), 1e-3))
    return Decision(threshold, scale, target_ffr, float(np.mean(s > threshold)), n)


def confidence(scores: np.ndarray, decision: Decision) -> np.ndarray:
    """The bundle format's confidence in [0, 1] for each score."""
    return 1.0 - np.exp(-np.abs(np.asarray(scores, np.float64) - decision.threshold)
                        / decision.confidence_scale)


def learn_max_missing(x_passes: np.ndarray) -> dict[str, Any]:
    """max_missing (module docstring) and the histogram of missing values per pass."""
    per_die = np.isnan(np.asarray(x_passes)).sum(axis=1)
    n = int(np.asarray(x_passes).shape[1])
    seen = int(per_die.max()) if len(per_die) else 0
    limit = min(n, math.ceil(seen * 1.5) + 2)
    counts = np.bincount(per_die, minlength=seen + 1)
    return {"max_missing": limit, "most_missing_seen": seen,
            "histogram": {str(k): int(c) for k, c in enumerate(counts) if c}}


def drift_with_noise_floor(x_recent: np.ndarray, cfg: CalibrateConfig, seed: int = 0,
                           max_window: int | None = None,
                           horizon: int | None = None) -> dict[str, Any]:
    """The drift reference from the recent passes `x_recent` (time order), its PSI noise floor,
    the process's period-to-period PSI over `horizon` passes (default: one window) and the alert
    threshold (module docstring). Returns the manifest's `drift_reference` object (edges,
    proportions, alert_psi, the figures it was set from)."""
    history = np.asarray(x_recent, dtype=np.float32)
    pool = history[-cfg.drift_pool:]
    ref = drift_reference(pool, cfg.drift_bins)
    window = int(min(cfg.drift_window, max(len(pool) // 2, 1), max_window or cfg.drift_window))
    rng = np.random.default_rng(seed)
    starts = range(0, max(len(pool) - window, 0) + 1, max(window, 1))
    lots = [psi_max(ref, pool[s:s + window]) for s in starts]  # consecutive: lot to lot
    noise = [psi_max(ref, pool[np.sort(rng.choice(len(pool), window, replace=False))])
             for _ in range(4)]  # random samples: sampling noise only
    floor = max([v for v in noise if np.isfinite(v)], default=0.0)
    typical = max([v for v in lots if np.isfinite(v)], default=0.0)
    horizon = max(int(horizon or window), window)
    period = period_psi(history, len(pool), window, horizon, cfg)
    alert = max(cfg.alert_min, cfg.alert_factor * max(floor, typical, period or 0.0))
    return {**ref, "alert_psi": round(float(alert), 4), "noise_floor_psi": round(float(floor), 4),
            "lot_to_lot_psi": round(float(typical), 4),
            "period_psi": None if period is None else round(period, 4), "horizon": horizon,
            "window": window, "pool": len(pool)}


def period_psi(history: np.ndarray, pool: int, window: int, horizon: int,
               cfg: CalibrateConfig) -> float | None:
    """The largest median window PSI of `horizon` passes against a reference of the `pool`
    passes just before them, over up to `cfg.drift_backtests` starts spread over `history`
    (module docstring). The pool shrinks to what the history leaves (not under two windows);
    None when even that does not fit."""
    pool = min(pool, len(history) - horizon)
    if pool < 2 * window:
        return None
    starts = np.unique(np.linspace(pool, len(history) - horizon, cfg.drift_backtests).astype(int))
    got = [window_psi({**drift_reference(history[p - pool:p], cfg.drift_bins), "window": window},
                      history[p:p + horizon]) for p in starts]
    finite = [float(v) for v in got if v is not None and np.isfinite(v)]
    return max(finite, default=None)


def window_psi(reference: dict[str, Any], x: np.ndarray) -> float | None:
    """Median PSI max over consecutive windows of `x` of the reference's own window size (a
    small sample has a larger PSI: the test part is judged at the noise floor's size)."""
    w = int(reference["window"])
    if len(x) < min(w, 200):
        return None
    return float(np.median([psi_max(reference, x[s:s + w])
                            for s in range(0, len(x) - w + 1, w)]))


def psi_max(reference: dict[str, Any], x: np.ndarray, min_rows: int = 200) -> float:
    """The agent's PSI max of rows `x` against `reference`, computed by `agent.drift`."""
    from agent.drift import DriftMonitor

    x = np.asarray(x, dtype=np.float32)
    mon = DriftMonitor(tuple(tuple(e) for e in reference["edges"]),
                       tuple(tuple(p) for p in reference["proportions"]),
                       window=max(len(x), 1), min_rows=min(min_rows, max(len(x), 1)))
    mon.observe(x)
    return float(mon.report(force=True).psi_max)


Strata = tuple[CalibrationParams, CalibrationParams | None]  # complete dies, imputed ones


def calibration_params(cfg: CalibrateConfig, val_scores: np.ndarray, val_passes: np.ndarray,
                       val_x: np.ndarray, threshold: float,
                       val_testers: np.ndarray | None = None,
                       val_lots: np.ndarray | None = None) -> Strata | None:
    """The parameters of the bundle's `decision.calibration` (`agent.calibration
    .manifest_block`), or None (configured off, or too few passes). The levels are tuned by
    replaying the device's algorithm on the validation part in time order, per tester
    (`val_testers`) as the device will (`agent.calibration.tune_level`); the prior comes from
    how the testers' and lots' (`val_lots`) rates spread (`tester_prior`). The complete dies'
    stratum carries the floor-wide body tracker (`body_params`; off with `body_window = 0`),
    and its level is tuned with it on."""
    if not cfg.per_tester:
        return None
    imputed = np.isnan(val_x).any(axis=1)
    if not imputed_differs(val_scores, val_passes, imputed, threshold, cfg.target_ffr):
        imputed = np.zeros_like(imputed)  # one stratum
    strata = strata_from_validation(val_scores, val_passes, imputed, threshold, cfg.target_ffr,
                                    val_testers)
    if strata is None:
        return None
    prior = None if val_testers is None else tester_prior(
        val_scores, val_passes, val_testers, strata[0].threshold, val_lots)
    complete = ~imputed if strata[1] is not None else np.ones_like(imputed)
    body = body_params(cfg, val_scores[complete], strata[0].cap)
    if prior is None and body is None:
        return strata

    def tuned(p: CalibrationParams, rows: np.ndarray, b: BodyParams | None) -> CalibrationParams:
        return tune_level(replace(p, prior=prior or p.prior, body=b), val_scores[rows],
                          None if val_testers is None else val_testers[rows], val_passes[rows])

    return (tuned(strata[0], complete, body),
            None if strata[1] is None else tuned(strata[1], imputed, None))


def body_params(cfg: CalibrateConfig, val_scores: np.ndarray, cap: float) -> BodyParams | None:
    """The body tracker's `ref` and `band` from the validation dies (the complete dies'
    stratum, fails included, as the device sees them) in time order, every tester together:
    `ref` the mean of the scores below `cap`; `band` `cfg.body_margin` times the largest
    |ln(mean / ref)| of its consecutive `body_window`-die windows, the move normal lot-to-lot
    variation and sampling make. None: configured off, fewer than four windows, or scores whose
    mean is not positive (a ratio means nothing there).

    Why floor-wide and why the mean (docs/model.md): an excursion lot moved the body of seed
    342's test part by 2-5% per tester; per tester, 100-200-die windows of normal validation
    dies already move 2.6-3.5% (median) or 2.6% (mean), so a per-tester body either missed
    the lot or fired on noise and spatial clusters; every tester's dies together fill a window
    four times as fast."""
    w = cfg.body_window
    s = np.asarray(val_scores, np.float32)
    s = s[np.isfinite(s) & (s < cap)].astype(np.float64)
    if w <= 0 or len(s) < 4 * w:
        return None
    ref = float(s.mean())
    if not ref > 0:
        return None
    means = s[: len(s) // w * w].reshape(-1, w).mean(axis=1)
    if not np.all(means > 0):
        return None
    band = cfg.body_margin * float(np.abs(np.log(means / ref)).max())
    try:
        return BodyParams(ref=ref, band=band, window=w, beta=cfg.body_beta,
                          max_factor=cfg.body_max_factor)
    except ValueError:  # CalibrationError: a configuration out of range
        return None


MIN_PRIOR, MAX_PRIOR = 200, 100_000  # the device's shrinkage `prior`, in dies


def tester_prior(val_scores: np.ndarray, val_passes: np.ndarray, val_testers: np.ndarray,
                 threshold: float, val_lots: np.ndarray | None = None) -> int | None:
    """The calibration's `prior` (w = n / (n + prior)) from how much the false-fail rate really
    moves between testers and periods on the validation passes (empirical Bayes; None: fewer
    than two testers). A tester's tail estimate from n dies has a sampling variance of about
    p(1 - p) / n in false-fail terms; the rates at the fixed threshold of the testers, of the
    lots, and of each tester within each lot spread by tau^2 beyond their binomial noise
    (method of moments), and the largest of the three is taken. Shrinking by
    n / (n + p(1 - p) / tau^2) weighs the two as a posterior mean does. Rates that differ no
    more than noise give `MAX_PRIOR` (the fixed threshold, nearly); never less than
    `MIN_PRIOR`, the earlier fixed value.

    Why the lots: a tester's ring holds its last 1,000 dies, about two lots of a four-tester
    floor, so what it must follow is how a tester's rate moves from period to period (the
    process's wander), not only how the testers differ over the whole validation part.
    Testers alone gave 23,486 and 100,000 on floor seeds 201 and 202, whose lots (and
    testers within lots) spread well beyond noise (401 and 735 with them).

    Why at all: with a fixed prior of 200, the per-tester threshold followed noise. On floor
    seeds 311 and 312 (test parts), lots in band went 5 -> 4 of 5 and 4 -> 3 of 5 and testers
    4 -> 3 of 4 on 312 with the calibration on, against the fixed threshold."""
    passes = np.asarray(val_passes, bool)
    testers = np.asarray(val_testers)[passes].astype(str)
    flagged = np.asarray(val_scores)[passes] > threshold
    if len(set(testers.tolist())) < 2:
        return None
    groupings = [testers]
    if val_lots is not None:
        lots = np.asarray(val_lots)[passes].astype(str)
        groupings += [lots, np.char.add(np.char.add(testers, "\x00"), lots)]
    p = float(flagged.mean())
    tau2 = max(_excess_variance(flagged, g) for g in groupings)
    if tau2 <= 0 or p <= 0:
        return MAX_PRIOR
    return int(min(max(p * (1 - p) / tau2, MIN_PRIOR), MAX_PRIOR))


def _excess_variance(flagged: np.ndarray, groups: np.ndarray) -> float:
    """The spread (variance) of the groups' flagged rates beyond their binomial noise (method
    of moments; <= 0 when they differ by noise only, -inf with fewer than two groups)."""
    _, idx = np.unique(groups, return_inverse=True)
    n = np.bincount(idx).astype(np.float64)
    if len(n) < 2:
        return -math.inf
    k = np.bincount(idx, weights=flagged.astype(np.float64))
    p = k.sum() / n.sum()
    return float(np.var(k / n, ddof=1) - np.mean(p * (1 - p) / n))


def imputed_differs(val_scores: np.ndarray, val_passes: np.ndarray, imputed: np.ndarray,
                    threshold: float, target_ffr: float) -> bool:
    """Whether the validation passes with imputed values fail at the common `threshold` at a
    rate the target lies outside of (95% Wilson interval): only then do they get a stratum of
    their own. The model's score does not depend on how many values a die lacks
    (`optimize.train.missing_spread`), and a stratum's own threshold costs estimation noise:
    at a 1% target, ~1,400 such passes put it on ~14 scores. Floor seed 203: 11 of 1,447 such
    validation passes over the common threshold (0.76%, interval 0.42-1.36%): one stratum."""
    rows = np.asarray(val_passes, bool) & np.asarray(imputed, bool)
    if not rows.any():
        return False
    flagged = int((np.asarray(val_scores)[rows] > threshold).sum())
    lo, hi = wilson(flagged, int(rows.sum()))
    return not lo <= target_ffr <= hi


def calibration_figures(strata: Strata, scores: np.ndarray, x: np.ndarray, passes: np.ndarray,
                        defect: np.ndarray | None, groups: dict[str, np.ndarray],
                        threshold: float, target: float) -> dict[str, Any]:
    """Calibration on vs off (the fixed `threshold`) on the test part (`x`, its `scores`; time
    order, the device's algorithm from an empty state): false-fail overall and per lot /
    wafer / tester, recall per defect class, and the warm-up cost (false-fail on each
    tester's first `prior` passes vs the rest)."""
    params, imputed = strata
    n = len(scores)
    testers = groups.get("tester")
    thr_on = simulate(params, scores, testers if testers is not None else [None] * n,
                      imputed, np.isnan(x).any(axis=1))
    flagged = {"off": np.asarray(scores, np.float32) > np.float32(threshold),
               "on": np.asarray(scores, np.float32) > thr_on}
    out: dict[str, Any] = {"params": manifest_block(params, imputed), "threshold_range":
                           [float(thr_on.min()), float(thr_on.max())] if n else None}
    for mode, f in flagged.items():
        fig: dict[str, Any] = {"test_ffr": float(f[passes].mean()) if passes.any() else None}
        if groups:
            fig["breakdown"] = ffr_by_group(f, passes, groups, target)
        if defect is not None:
            fig["recall"] = {c: float(f[defect == c].mean())
                             for c in sorted(set(defect.tolist()) - {"none"})}
        out[mode] = fig
    if testers is not None and passes.any():
        first = np.zeros(n, bool)
        for t in set(testers.tolist()):
            rows = np.flatnonzero(testers == t)
            first[rows[:params.prior]] = True
        out["warmup"] = {mode: {"first_dies": _rate(f, passes & first),
                                "later_dies": _rate(f, passes & ~first)}
                         for mode, f in flagged.items()}
        out["warmup"]["dies_per_tester"] = params.prior
    return out


def _rate(flagged: np.ndarray, rows: np.ndarray) -> float | None:
    return float(flagged[rows].mean()) if rows.any() else None
