"""The agent's health over a recent window, for the fleet link's device state, and the install
figures for Prometheus.

`HealthWindow.health_summary()` answers the question a rollout gate asks of one box: over the
last few minutes, how many dies were answered, how many refused, how many by the fallback rules,
how slow (p99), how many failed, how far inputs drifted. It keeps counter snapshots and returns
the differences, so it costs nothing on the request path.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.install import Installer
from agent.metrics import LATENCY_BUCKETS, AgentMetrics
from agent.protocol import Decision, Source
from agent.runtime import Runtime

_ERROR_SHARE_DEGRADED = 0.01  # more refused requests than this share: "degraded"


class HealthWindow:
    """Counters of `metrics` differenced over the last `window_s` seconds (see module doc)."""

    def __init__(self, metrics: AgentMetrics, runtime: Runtime,
                 installer: Installer | None = None, window_s: float = 300.0) -> None:
        self.metrics = metrics
        self.runtime = runtime
        self.installer = installer
        self.window_s = window_s
        self._lock = threading.Lock()
        self._snaps: deque[tuple[float, tuple]] = deque([(time.monotonic(), metrics.totals())])
        self._model = self._model_of(runtime.active())
        runtime.add_listener(self._on_change)

    @staticmethod
    def _model_of(predictor: Any) -> tuple | None:
        m = predictor.manifest if predictor.engine is not None else None
        return (m.name, m.version, m.sequence, m.model_digest) if m is not None else None

    def _on_change(self, predictor: Any) -> None:
        """A new model starts a new window: a rollout's bake gate must judge the new model's
        answers only, not minutes of the old one's."""
        model = self._model_of(predictor)
        if model != self._model:
            self._model = model
            with self._lock:
                self._snaps = deque([(time.monotonic(), self.metrics.totals())])

    def health_summary(self) -> dict[str, Any]:
        now, snap = time.monotonic(), self.metrics.totals()
        with self._lock:
            self._snaps.append((now, snap))
            while len(self._snaps) > 2 and now - self._snaps[1][0] >= self.window_s:
                self._snaps.popleft()
            t0, old = self._snaps[0]
        pred = [a - b for a, b in zip(snap[0], old[0], strict=True)]
        answered = sum(pred)
        fails = sum(pred[Decision.FAIL * 3 + s] for s in (Source.MODEL, Source.FALLBACK))
        fallback = sum(pred[d * 3 + Source.FALLBACK] for d in (Decision.PASS, Decision.FAIL))
        errors = snap[1] - old[1]
        latency = [a - b for a, b in zip(snap[2], old[2], strict=True)]
        predictor = self.runtime.active()
        drift = predictor.drift.report().psi_max if predictor.drift is not None else None
        status, reason = "ok", None
        if predictor.fallback_reason() is not None:
            status, reason = "fallback", predictor.fallback_reason()
        elif self.installer is not None and not self.installer.integrity.ok:
            status, reason = "degraded", "; ".join(self.installer.integrity.problems)
        elif answered + errors and errors / (answered + errors) > _ERROR_SHARE_DEGRADED:
            status, reason = "degraded", f"{errors} of {answered + errors} requests refused"
        return {
            "status": status,
            "reason": reason,
            "window_s": round(now - t0, 1),
            "requests": answered + errors,
            "errors": errors,
            "fallback": fallback,
            "p99_ms": _quantile_ms(latency, 0.99),
            "fail_rate": fails / answered if answered else None,
            "max_psi": drift,
        }


def _quantile_ms(counts: list[int], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile q (None without data)."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for bound, c in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=True):
        seen += c
        if seen >= rank:
            return bound * 1000 if bound != float("inf") else None
    return None


class InstallCollector:
    """`edgefleet_installs_total{op,outcome}` and `edgefleet_model_integrity_ok`, read from the
    installer at scrape time (outcome: committed, unchanged, rolled_back)."""

    def __init__(self, installer: Installer) -> None:
        self.installer = installer

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Metric]:
        fam = CounterMetricFamily("edgefleet_installs", "Install, rollback and integrity jobs "
                                  "finished by this agent, by outcome.", labels=["op", "outcome"])
        counts = dict(self.installer.outcomes)
        for op in ("install", "rollback", "integrity"):
            for outcome in ("committed", "unchanged", "rolled_back"):
                fam.add_metric([op, outcome], counts.get((op, outcome), 0))
        yield fam
        yield GaugeMetricFamily("edgefleet_model_integrity_ok",
                                "0 when the active model's files changed on disk.",
                                value=1 if self.installer.integrity.ok else 0)
