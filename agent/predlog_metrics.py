"""The prediction log's metrics, rendered from a snapshot of its counts.

The writer (agent/predlog.py's `PredictionLog`, in its own process: agent/predlog_child.py)
keeps the counts; `PredictionLog.snapshot()` hands them over as JSON-able values (a reply on its
pipe for each scrape, agent/predlog_proc.py); this module turns one into Prometheus families in
the agent. Kept apart so that the writer process never imports prometheus_client (its resident
memory counts for the device too).

Families: edgefleet_predlog_records/written_bytes/dropped, edgefleet_capture_rows,
edgefleet_predlog_disk_bytes; per model (label `digest`, the bundle digest) the proxy figures
before any label - decisions by source, score-margin and confidence histograms, the margin PSI
against the build's reference; and the label desk's (agent/labels.py): edgefleet_labels,
edgefleet_label_joins, edgefleet_labels_pending.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.labels import LABEL_NAMES
from agent.predlog import CONFIDENCE_EDGES
from agent.predlog_models import ModelInfo
from agent.protocol import DECISION_LABELS
from agent.wire import MARGIN_EDGES

_ZERO_MODELS = 4  # the newest models whose label series are exported from zero

__all__ = ["label_families", "psi", "snapshot_families"]


def psi(counts: Iterable[int], proportions: Iterable[float], floor: float = 1e-4) -> float:
    """Population stability index of observed bucket counts against reference proportions."""
    counts = np.asarray(list(counts), dtype=np.float64)
    p = np.maximum(np.asarray(list(proportions), dtype=np.float64), floor)
    total = counts.sum()
    if not total:
        return 0.0
    q = np.maximum(counts / total, floor)
    return float(((q - p) * np.log(q / p)).sum())


def snapshot_families(snap: dict[str, Any]) -> Iterable[Metric]:
    """The log's metrics (and its label desk's) from a `PredictionLog.snapshot()`."""
    yield _by_label("edgefleet_predlog_records", "Records written to the log.", "log",
                    snap["records"])
    yield _by_label("edgefleet_predlog_written_bytes", "Bytes appended.", "log",
                    snap["bytes_written"])
    yield _by_label("edgefleet_predlog_dropped", "Records not logged: the queue was full, the "
                    "disk was, or the writer process was lost.", "reason", snap["dropped"])
    yield _by_label("edgefleet_capture_rows", "Input rows captured, by why.", "reason",
                    snap["captured"])
    fam = GaugeMetricFamily("edgefleet_predlog_disk_bytes", "Bytes the rings hold on disk.",
                            labels=["log"])
    for name, n in snap["disk"].items():
        fam.add_metric([name], n)
    yield fam
    models = [ModelInfo(**m) for m in snap["models"]]
    yield from _model_families(models, {k: (d, m, c) for k, d, m, c in snap["stats"]})
    if snap["labels"] is not None:
        yield from label_families(snap["labels"], models)


def _by_label(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in values.items():
        fam.add_metric([k], v)
    return fam


def _model_families(models: list[ModelInfo], stats: dict) -> Iterable[Metric]:
    """Per model (label `digest`, the bundle digest): proxy figures before any label."""
    dec = CounterMetricFamily("edgefleet_model_decisions",
                              "Logged decisions per model, by decision and source.",
                              labels=["digest", "decision", "source"])
    margin = CounterMetricFamily("edgefleet_model_score_margin",
                                 "Model answers per margin bucket, (score - threshold) / "
                                 "confidence_scale in (previous edge, upper].",
                                 labels=["digest", "upper"])
    confidence = CounterMetricFamily("edgefleet_model_confidence",
                                     "Model answers per confidence bucket, in (previous "
                                     "edge, upper].", labels=["digest", "upper"])
    drift = GaugeMetricFamily("edgefleet_model_score_psi",
                              "PSI of the margin distribution vs the build's reference (only "
                              "for bundles that ship one).", labels=["digest"])
    for index, (decisions, m_hist, c_hist) in stats.items():
        info = models[index] if 0 <= index < len(models) else None
        digest = info.digest if info is not None else "none"
        for d in (0, 1):
            for s in (0, 1):
                dec.add_metric([digest, DECISION_LABELS[d], "model" if s == 0 else "fallback"],
                               decisions[d * 2 + s])
        for edge, c in zip([*MARGIN_EDGES, "+Inf"], m_hist, strict=True):
            margin.add_metric([digest, str(edge)], c)
        for edge, c in zip([*CONFIDENCE_EDGES, "+Inf"], c_hist, strict=True):
            confidence.add_metric([digest, str(edge)], c)
        if info is not None and info.reference is not None and sum(m_hist):
            drift.add_metric([digest], psi(m_hist, info.reference["proportions"]))
    yield dec
    yield margin
    yield confidence
    yield drift


def label_families(snap: dict[str, Any], models: list[Any]) -> Iterable[Metric]:
    """The desk's metrics from its `snapshot()`; `models`: the log's table (ModelInfo, by
    index)."""
    fam = CounterMetricFamily("edgefleet_labels", "Final-test labels received, by source "
                              "and what became of them.", labels=["source", "result"])
    for s, r, n in snap["results"]:
        fam.add_metric([s, r], n)
    yield fam
    fam = CounterMetricFamily("edgefleet_label_joins", "Labels joined to the device's "
                              "decision, per model: predicted (the decision) vs actual "
                              "(the label).", labels=["digest", "predicted", "actual"])
    # Zero for every cell of the newest models that answered: a series must exist before
    # its first label for Prometheus' increase() to count that label (a rollout's label
    # gate reads the new bundle's counts that way, fleet/label_gates.py).
    joins = {(m, p, a): n for m, p, a, n in snap["joins"]}
    for info in models[-_ZERO_MODELS:]:
        for pred in (0, 1):
            for actual in (0, 1):
                joins.setdefault((info.index, pred, actual), 0)
    for (model, pred, actual), n in sorted(joins.items()):
        info = models[model] if 0 <= model < len(models) else None
        fam.add_metric([info.digest if info is not None else "none", LABEL_NAMES[pred],
                        LABEL_NAMES[actual]], n)
    yield fam
    yield GaugeMetricFamily("edgefleet_labels_pending", "Labels queued for the join.",
                            value=snap["pending"])


