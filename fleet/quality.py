"""`edgefleet fleet quality`: how each model on the fleet is doing, from the central Prometheus
- input drift before labels arrive, realized false-fail and recall once they have.

Per bundle digest (the `digest` of `edgefleet_model_info`, what rollouts name):

    devices      agents serving it now                    count(edgefleet_model_info)
    drift        the worst device's PSI, and the alert     edgefleet_drift_psi_max,
                 threshold its bundle ships (max of each)  edgefleet_drift_psi_alert
    labels       final-test labels joined to its decisions, as the label gates count them
                 (fleet/label_gates.py): good / bad dies, false-fail rate, recall; a rate over
                 fewer than `min_good` good (`min_bad` bad) labelled dies is inconclusive

Which labels count: those joined over the last `window` (`increase(...[window])`), or, with no
window, every label the agents counted since they started (the counters as they are), less a
`since` report: `quality -o json > before.json`, later `quality --since before.json` gives the
labels joined in between, exactly (no extrapolation). A counter that went down (an agent
restarted) counts from zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.label_gates import DEFAULT_MIN_BAD, DEFAULT_MIN_GOOD, LabelCounts, window_text
from fleet.prometheus import PrometheusClient

__all__ = ["ModelQuality", "fleet_quality", "quality_table"]

_JOIN = "on (job, instance) group_left (digest)"
DRIFT_QUERY = f"max by (digest) (edgefleet_drift_psi_max * {_JOIN} edgefleet_model_info)"
ALERT_QUERY = f"max by (digest) (edgefleet_drift_psi_alert * {_JOIN} edgefleet_model_info)"
MODELS_QUERY = "count by (digest, name, version) (edgefleet_model_info)"


def labels_query(window_s: float | None) -> str:
    if window_s is None:
        return "sum by (digest, predicted, actual) (edgefleet_label_joins_total)"
    return ("sum by (digest, predicted, actual) (increase(edgefleet_label_joins_total"
            f"[{window_text(window_s)}]))")


@dataclass
class ModelQuality:
    digest: str
    name: str = ""
    version: str = ""
    devices: int = 0
    drift_psi: float | None = None
    drift_alert: float | None = None
    labels: LabelCounts = field(default_factory=LabelCounts)

    @property
    def drifting(self) -> bool:
        return self.drift_psi is not None and self.drift_alert is not None and \
            self.drift_psi > self.drift_alert

    def rates(self, min_good: int, min_bad: int) -> tuple[float | None, float | None]:
        """(false-fail rate, recall), each None below its minimum of labelled dies."""
        c = self.labels
        return (c.false_fail_rate if c.good >= min_good else None,
                c.recall if c.bad >= min_bad else None)

    def to_json(self, min_good: int, min_bad: int) -> dict[str, Any]:
        ffr, recall = self.rates(min_good, min_bad)
        c = self.labels
        return {"digest": self.digest, "name": self.name, "version": self.version,
                "devices": self.devices, "drift_psi": self.drift_psi,
                "drift_alert": self.drift_alert, "drifting": self.drifting,
                "labels": c.to_json(), "good": c.good, "bad": c.bad,
                "false_fail_rate": ffr, "recall": recall}


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _minus(now: LabelCounts, before: Mapping[str, Any] | None) -> LabelCounts:
    if not before:
        return now
    cells = {}
    for k, v in now.to_json().items():
        old = int(before.get(k) or 0)
        cells[k] = v - old if v >= old else v  # went down: the agent restarted
    return LabelCounts(**cells)


def fleet_quality(client: PrometheusClient, *, window_s: float | None = None,
                  since: Mapping[str, Any] | None = None) -> list[ModelQuality]:
    """One `ModelQuality` per digest that serves now or has labels; `since` is an earlier
    `-o json` report (its labels are subtracted). Raises `PrometheusError`."""
    models: dict[str, ModelQuality] = {}

    def model(digest: str) -> ModelQuality:
        return models.setdefault(digest, ModelQuality(digest))

    for m, v in client.series(MODELS_QUERY):
        if m.get("digest"):
            q = model(m["digest"])
            q.name, q.version, q.devices = m.get("name", ""), m.get("version", ""), int(v)
    for query, attr in ((DRIFT_QUERY, "drift_psi"), (ALERT_QUERY, "drift_alert")):
        for m, v in client.series(query):
            if m.get("digest"):
                setattr(model(m["digest"]), attr, _finite(v))
    pairs: dict[str, list[tuple[str, str, float]]] = {}
    for m, v in client.series(labels_query(window_s)):
        if m.get("digest"):
            pairs.setdefault(m["digest"], []).append((m.get("predicted", ""),
                                                      m.get("actual", ""), v))
    before = {d["digest"]: d.get("labels") for d in (since or {}).get("models", [])}
    for digest, rows in pairs.items():
        model(digest).labels = _minus(LabelCounts.from_pairs(rows), before.get(digest))
    return sorted(models.values(), key=lambda q: (-q.devices, q.digest))


def quality_table(models: list[ModelQuality], min_good: int = DEFAULT_MIN_GOOD,
                  min_bad: int = DEFAULT_MIN_BAD) -> str:
    def pct(v: float | None, need: int, have: int, kind: str) -> str:
        return f"{v:.2%}" if v is not None else f"- ({have}/{need} {kind})"

    lines = [f"{'DIGEST':14} {'MODEL':24} {'DEVICES':>7} {'DRIFT PSI':>15}  {'GOOD':>6} "
             f"{'BAD':>5}  {'FALSE-FAIL':>18} {'RECALL':>16}"]
    for q in models:
        drift = "-" if q.drift_psi is None else f"{q.drift_psi:.3f}/{q.drift_alert or 0:.3f}"
        if q.drifting:
            drift += " ALARM"
        ffr, recall = q.rates(min_good, min_bad)
        c = q.labels
        lines.append(f"{q.digest[:12]:14} {(q.name + ' ' + q.version).strip() or '-':24} "
                     f"{q.devices:>7} {drift:>15}  {c.good:>6} {c.bad:>5}  "
                     f"{pct(ffr, min_good, c.good, 'good'):>18} "
                     f"{pct(recall, min_bad, c.bad, 'bad'):>16}")
    return "\n".join(lines)
