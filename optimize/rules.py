"""Stage 7c: the fallback rules the agent screens with when the model cannot answer.

A die fails when a measured value is below `low` or above `high` of any rule; a missing value
violates nothing. The rules are the data's spec limits when it has them. Otherwise they are
static PAT limits built so that their *union* holds a false-fail budget in the period after
the one they were fitted on, since a floor running on them fails a die as soon as one rule
fires:

1. Centre and sigma per signal from the training passes: the median, and the larger of
   IQR / 1.349 and the half-width of the central 99% range / 2.576 (both the standard
   deviation for a normal signal; the second keeps lumpy signals from a zero sigma).
2. Guards: no rule on a signal that is
   - `constant`: never observed, or its sigma is float noise;
   - `quantized`: fewer than `min_distinct` distinct values among the training passes, or its
     most common value on over half of them (a tester resolution step moves the median by a
     whole band: SECOM's f543 failed 76% of later passes that way);
   - `drifted`: the validation passes' median sits more than `max_shift` sigmas from the
     training median. A centre that moved that far between two adjacent periods keeps moving
     during the period the device screens with it.
3. Limits, per side: median -+ max(`sigmas` sigma, `margin` x the distance of the furthest
   training pass on that side). Real fab signals are heavy-tailed: SECOM's passes reach 15-40
   robust sigma, so 6-sigma limits on its 196 usable signals failed 11% of the very passes they
   were fitted on, 13% of the validation period's and 14% of the test period's, a few dies per
   rule spread over many rules. A limit a margin beyond the furthest pass seen does not care
   what shape the tail has.
4. The margin is chosen on the time-ordered validation part: the smallest of `margins` whose
   rules, fitted on the training passes alone, fail at most `budget_ratio` x the target of the
   validation passes (union over rules). That is an out-of-sample figure for the whole rule
   set, and the report carries it for every margin tried. With no margin within budget, the
   largest, and the report says so. The shipped limits are then refitted at that margin on the
   training and validation passes together (the most recent dies the build has): a rule a
   validation pass would have failed is widened to cover it, never dropped for it.

The report (`rule_report`) lists every rule with its limits and how many validation passes
(training-only limits) and test passes (shipped limits) it fails, and every signal left
without a rule with the reason; the build gate bounds the union on the test passes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optimize.data import ParamSpec

__all__ = ["Rules", "RulesConfig", "fallback_rules", "rule_report", "rule_violations",
           "signal_guards"]


@dataclass(frozen=True)
class RulesConfig:
    sigmas: float = 6.0  # the narrowest PAT limit, robust sigmas from the median
    min_distinct: int = 20  # distinct values a signal needs for a PAT rule
    max_shift: float = 1.0  # validation median this many sigmas off the training one: drifted
    margins: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0)  # x the furthest pass, tried in order
    budget_ratio: float = 1.0  # union false-fail on validation passes, x the target


@dataclass(frozen=True)
class Rules:
    """The manifest's rules and how they were made."""

    rules: list[dict[str, Any]]  # {"feature": j, "low": float | None, "high": float | None}
    source: str  # "spec" or "pat"
    dropped: dict[int, str] = field(default_factory=dict)  # feature -> reason (`REASONS` key)
    detail: dict[int, str] = field(default_factory=dict)  # feature -> the figures behind it
    margin: float | None = None  # the chosen margin (PAT only)
    sigmas: float | None = None  # the narrowest limit, robust sigmas (PAT only)
    holdout: dict[str, float] = field(default_factory=dict)  # margin -> validation union FFR
    budget: float | None = None  # the union false-fail allowed on validation passes
    val_fails: dict[int, int] = field(default_factory=dict)  # feature -> validation passes
    # failed by its training-only limit at the chosen margin


REASONS = {"constant": "constant or never observed",
           "quantized": "quantized or near-constant",
           "drifted": "median moved from training to validation"}


def _centre_sigma(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(x, axis=0)
        q = np.nanpercentile(x, [0.5, 25, 75, 99.5], axis=0)
        std = np.nanstd(x, axis=0)
    sigma = np.maximum((q[2] - q[1]) / 1.349, (q[3] - q[0]) / (2 * 2.576))
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, std)
    return median, np.where(np.isfinite(sigma), sigma, 0.0)


def _guard(x_train: np.ndarray, x_val: np.ndarray | None, median: np.ndarray,
           sigma: np.ndarray, cfg: RulesConfig) -> tuple[dict[int, str], dict[int, str]]:
    """(feature -> reason, feature -> figures) for every signal that gets no rule."""
    dropped: dict[int, str] = {}
    detail: dict[int, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        val_median = (np.nanmedian(x_val, axis=0) if x_val is not None and len(x_val)
                      else np.full(len(median), np.nan))
    for j, (m, s) in enumerate(zip(median, sigma, strict=True)):
        if not (np.isfinite(m) and s > 1e-6 * max(abs(m), 1e-30)):
            dropped[j], detail[j] = "constant", "no spread among the training passes"
            continue
        col = x_train[:, j][~np.isnan(x_train[:, j])]
        values, counts = np.unique(col, return_counts=True)
        if len(values) < cfg.min_distinct or counts.max() > 0.5 * len(col):
            dropped[j] = "quantized"
            detail[j] = (f"{len(values)} distinct values, the most common on "
                         f"{counts.max() / len(col):.0%} of the training passes")
            continue
        shift = (val_median[j] - m) / s
        if np.isfinite(shift) and abs(shift) > cfg.max_shift:
            dropped[j] = "drifted"
            detail[j] = f"{m:.4g} -> {val_median[j]:.4g}, {shift:+.1f} sigma"
    return dropped, detail


def signal_guards(x_train: np.ndarray, x_val: np.ndarray | None = None,
                  cfg: RulesConfig = RulesConfig()) -> dict[int, str]:  # fmt: skip
    """Feature -> reason (`REASONS` key) for every signal the guards give no rule."""
    x = np.asarray(x_train, dtype=np.float64)
    return _guard(x, x_val, *_centre_sigma(x), cfg)[0]


def _limits(x: np.ndarray, features: Sequence[int], median: np.ndarray, sigma: np.ndarray,
            sigmas: float, margin: float) -> list[dict[str, Any]]:  # fmt: skip
    """Rules on `features`: median -+ max(sigmas sigma, margin x furthest pass of `x`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low_seen, high_seen = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
    out = []
    for j in features:
        m, s = float(median[j]), float(sigma[j])
        below = max(sigmas * s, margin * (m - low_seen[j])) if np.isfinite(low_seen[j]) \
            else sigmas * s
        above = max(sigmas * s, margin * (high_seen[j] - m)) if np.isfinite(high_seen[j]) \
            else sigmas * s
        out.append({"feature": int(j), "low": float(m - below), "high": float(m + above)})
    return out


def rule_violations(rules: Sequence[dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """(n,) number of rules each row violates; NaN violates nothing."""
    return _violated(rules, x).sum(axis=1)


def _violated(rules: Sequence[dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """(n, len(rules)) bool: row i fails rule k."""
    x = np.asarray(x, dtype=np.float64)
    cols = [r["feature"] for r in rules]
    low = np.array([-np.inf if r["low"] is None else r["low"] for r in rules])
    high = np.array([np.inf if r["high"] is None else r["high"] for r in rules])
    with np.errstate(invalid="ignore"):
        return (x[:, cols] < low) | (x[:, cols] > high)


def _union_ffr(rules: Sequence[dict[str, Any]], x: np.ndarray) -> float:
    return float(_violated(rules, x).any(axis=1).mean()) if len(x) and rules else 0.0


def fallback_rules(x_train: np.ndarray, spec: Sequence[ParamSpec] | None = None, *,
                   x_val_passes: np.ndarray | None = None, target_ffr: float = 0.01,
                   cfg: RulesConfig = RulesConfig()) -> Rules:  # fmt: skip
    """The rules for the manifest from the spec limits, else from the training passes
    `x_train` and the later validation passes (module docstring)."""
    if spec is not None:
        return Rules([{"feature": j, "low": p.low, "high": p.high}
                      for j, p in enumerate(spec) if p.low is not None or p.high is not None],
                     "spec")
    x = np.asarray(x_train, dtype=np.float64)
    xv = None if x_val_passes is None else np.asarray(x_val_passes, dtype=np.float64)
    median, sigma = _centre_sigma(x)
    dropped, detail = _guard(x, xv, median, sigma, cfg)
    kept = [j for j in range(x.shape[1]) if j not in dropped]
    if xv is None or not len(xv):
        margin = cfg.margins[0]
        return Rules(_limits(x, kept, median, sigma, cfg.sigmas, margin), "pat", dropped,
                     detail, margin, cfg.sigmas)
    budget = cfg.budget_ratio * target_ffr
    holdout: dict[str, float] = {}
    margin = cfg.margins[-1]
    for m in cfg.margins:
        holdout[f"{m:g}"] = _union_ffr(_limits(x, kept, median, sigma, cfg.sigmas, m), xv)
        if holdout[f"{m:g}"] <= budget:
            margin = m
            break
    trained = _limits(x, kept, median, sigma, cfg.sigmas, margin)
    val_fails = dict(zip(kept, _violated(trained, xv).sum(axis=0).tolist(), strict=True))
    rules = _limits(np.vstack([x, xv]), kept, median, sigma, cfg.sigmas, margin)
    return Rules(rules, "pat", dropped, detail, margin, cfg.sigmas, holdout, budget,
                 {j: int(n) for j, n in val_fails.items() if n})


def rule_report(made: Rules, names: Sequence[str], x_val_passes: np.ndarray,
                x_test_passes: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """The report's `fallback` object: the union false-fail on validation and test passes,
    how the margin was chosen, every rule with the passes it fails, every dropped signal with
    its reason."""
    test = _violated(made.rules, x_test_passes) if made.rules else np.zeros((0, 0), bool)
    val = _violated(made.rules, x_val_passes) if made.rules else np.zeros((0, 0), bool)
    test_fails = test.sum(axis=0) if len(x_test_passes) else np.zeros(len(made.rules), int)
    per_rule = [{"feature": names[r["feature"]], "low": r["low"], "high": r["high"],
                 "val_fails": made.val_fails.get(r["feature"], 0),
                 "test_fails": int(n)} for r, n in zip(made.rules, test_fails, strict=True)]
    counts = {k: sum(1 for v in made.dropped.values() if v == k) for k in REASONS}
    out: dict[str, Any] = {
        "source": made.source, "rules": len(made.rules), "skipped": counts,
        "val_ffr": (made.holdout.get(f"{made.margin:g}") if made.source == "pat" and made.holdout
                    else float(val.any(axis=1).mean()) if val.size else 0.0),
        "test_ffr": float(test.any(axis=1).mean()) if len(x_test_passes) and test.size
        else (0.0 if len(x_test_passes) else None),
        "test_passes": len(x_test_passes), "per_rule": per_rule,
        "dropped": {names[j]: f"{REASONS[why]}: {made.detail.get(j, '')}".rstrip(": ")
                    for j, why in sorted(made.dropped.items())},
    }
    if made.source == "pat":
        out["margin"], out["sigmas"] = made.margin, made.sigmas
        out["holdout_val_ffr"] = made.holdout
        out["budget"] = made.budget
    return out
