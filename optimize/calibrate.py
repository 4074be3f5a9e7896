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

Fallback rules: a die fails when a measured value is below `low` or above `high`. From the
data's spec limits when it has them, else robust bounds from training passes: median +- k
sigmas (k = 6 by default), sigma being the larger of IQR / 1.349 and the half-width of the
central 99% range / 2.576. Both equal the standard deviation for a normal signal; the second
keeps heavy-tailed and lumpy signals (most of SECOM) from failing every die, as IQR alone did
(97% false fails over 207 rules). Constant and never-observed columns get no rule: there is no
spread to set a limit from.

Drift reference: per feature, up to `bins - 1` inner edges at the training passes' quantiles
and the share of training passes in each bin, built by the agent's own `agent.drift
.drift_reference` so writer and monitor cannot disagree on the binning (bin = number of edges
<= value; NaN left out; repeated quantiles merged, so a constant column has one edge and all its
mass above it, a never-observed column no edge and one bin). Edges are finite and increasing,
shares sum to 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.drift import drift_reference
from optimize.data import ParamSpec

__all__ = [
    "CalibrateConfig", "Decision", "calibrate_threshold", "confidence", "drift_reference",
    "fallback_rules", "rule_violations",
]


@dataclass(frozen=True)
class CalibrateConfig:
    target_ffr: float = 0.01  # false-fail rate on validation passes
    top_k: int = 5  # contributing parameters reported per die
    rule_sigmas: float = 6.0  # robust bounds when the data has no spec limits
    drift_bins: int = 10


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


def _robust_center_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(x, axis=0)
        q = np.nanpercentile(x, [0.5, 25, 75, 99.5], axis=0)
        std = np.nanstd(x, axis=0)
    sigma = np.maximum((q[2] - q[1]) / 1.349, (q[3] - q[0]) / (2 * 2.576))
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, std)
    return median, np.where(np.isfinite(sigma), sigma, 0.0)


def fallback_rules(
    x_train: np.ndarray, spec: Sequence[ParamSpec] | None = None, sigmas: float = 6.0
) -> tuple[list[dict[str, Any]], str]:
    """(rules for the manifest, where they came from: "spec" or "robust")."""
    if spec is not None:
        rules = [{"feature": j, "low": p.low, "high": p.high}
                 for j, p in enumerate(spec) if p.low is not None or p.high is not None]
        return rules, "spec"
    median, sigma = _robust_center_scale(np.asarray(x_train, dtype=np.float64))
    rules = []
    for j, (m, s) in enumerate(zip(median, sigma, strict=True)):
        if np.isfinite(m) and s > 1e-6 * max(abs(m), 1e-30):
            low, high = float(m - sigmas * s), float(m + sigmas * s)
            rules.append({"feature": j, "low": low, "high": high})
    return rules, "robust"


def rule_violations(rules: Sequence[dict[str, Any]], x: np.ndarray) -> np.ndarray:
    """(n,) number of rules each row violates; NaN violates nothing."""
    x = np.asarray(x, dtype=np.float64)
    n_features = x.shape[1]
    low, high = np.full(n_features, -np.inf), np.full(n_features, np.inf)
    for r in rules:
        if r["low"] is not None:
            low[r["feature"]] = r["low"]
        if r["high"] is not None:
            high[r["feature"]] = r["high"]
    with np.errstate(invalid="ignore"):
        return ((x < low) | (x > high)).sum(axis=1)
