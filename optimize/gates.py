"""Build gates: the reasons a build must not be signed, from the report's figures alone.

A model reaches a test floor only when it is better than what the floor already runs and
behaves on dies it has not seen. `gate_reasons` is a pure function of the report; the pipeline
refuses to sign (exit 1, the report still written, every reason listed) unless the build was
run with `--accept-risk "why"`, in which case the reason goes into the manifest and the report.

- `beats_baseline`: the shipped model's test ROC AUC is not above the best unsupervised
  baseline's (`optimize.baselines`);
- `test_ffr`: the test false-fail rate is above `max_ffr_ratio` (2) x the target;
- `drift`: the test part's PSI max against the drift reference is above the shipped alert
  threshold (`optimize.calibrate.drift_with_noise_floor`), which is set above the sampling
  noise floor, the lot-to-lot windows and the process's own period-to-period wander over a
  period as long as the test part: the test part moved over twice as far as the process did;
- `rules_ffr`: the fallback rules fail more than `max_rules_ratio` (5) x the target of test
  passes.

Data without labels has no AUC and no false-fail figures: only the drift gate applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import EdgefleetError


@dataclass(frozen=True)
class GateConfig:
    max_ffr_ratio: float = 2.0
    max_rules_ratio: float = 5.0
    accept_risk: str = ""  # a reason to sign despite failed gates (recorded)


class BuildRefused(EdgefleetError):
    """The build failed a gate and was not signed (the report says why)."""


def gate_reasons(report: dict[str, Any], target_ffr: float, cfg: GateConfig) -> list[str]:
    """Every failed gate as one readable sentence (empty: the build may be signed)."""
    reasons = []
    cmp = report.get("baselines")
    if cmp:
        best = cmp["best_unsupervised"]
        mine = cmp["methods"]["model"]["roc_auc"]
        theirs = cmp["methods"][best]["roc_auc"]
        if mine is not None and theirs is not None and mine <= theirs:
            reasons.append(f"the model does not beat the best unsupervised baseline "
                           f"({cmp['titles'][best]}) on test ROC AUC: {mine:.4f} vs {theirs:.4f}")
    shipped = report["models"]["pruned_int8"]
    ffr = shipped.get("test_ffr")
    if ffr is not None and ffr > cfg.max_ffr_ratio * target_ffr:
        reasons.append(f"test false-fail {ffr:.2%} is above {cfg.max_ffr_ratio:g}x the target "
                       f"{target_ffr:.2%}")
    drift = report.get("drift")
    if drift and drift.get("test_psi") is not None and drift["test_psi"] > drift["alert_psi"]:
        reasons.append(f"the test part drifts from the drift reference: PSI max "
                       f"{drift['test_psi']:.3f} above the alert threshold {drift['alert_psi']:.3f}"
                       f" ({_alert_basis(drift)})")
    rules = report["models"].get("rules", {})
    rffr = rules.get("test_ffr")
    if rffr is not None and rffr > cfg.max_rules_ratio * target_ffr:
        reasons.append(f"the fallback rules fail {rffr:.2%} of test passes, above "
                       f"{cfg.max_rules_ratio:g}x the target {target_ffr:.2%}")
    return reasons


def gate_record(reasons: list[str], cfg: GateConfig) -> dict[str, Any]:
    """The report's and manifest's `gates` object."""
    return {"passed": not reasons, "reasons": reasons,
            "accepted_risk": cfg.accept_risk or None if reasons else None,
            "signed": not reasons or bool(cfg.accept_risk)}


def _alert_basis(drift: dict[str, Any]) -> str:
    """What the alert threshold was set from, as the report's text says it."""
    parts = [f"noise floor {drift['noise_floor_psi']:.3f}"]
    if drift.get("lot_to_lot_psi") is not None:
        parts.append(f"lot to lot {drift['lot_to_lot_psi']:.3f}")
    if drift.get("period_psi") is not None:
        parts.append(f"period to period {drift['period_psi']:.3f}")
    return ", ".join(parts)
