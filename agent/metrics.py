"""Prometheus metrics for one agent, and the HTTP endpoint that serves them with the probes.

Every agent instance has its own `CollectorRegistry` (tests run several agents in a process).
Updates sit on the request path, so each costs well under a microsecond or two: label children
are resolved once, and the per-row score histogram takes whole batches in one numpy call.

| metric | type | labels |
| --- | --- | --- |
| edgefleet_predictions_total | counter | decision (pass, fail), source (model, fallback) |
| edgefleet_errors_total | counter | code (see agent.protocol.ErrorCode) |
| edgefleet_fallback_answers_total | counter | reason (no_model, forced, model_error,
  non_finite_score, too_many_missing) |
| edgefleet_imputed_values_total | counter | |
| edgefleet_request_duration_seconds | histogram | encoding (json, binary) |
| edgefleet_inference_duration_seconds | histogram | |
| edgefleet_anomaly_score | histogram | (model answers only) |
| edgefleet_connections_active, edgefleet_connections_total | gauge, counter | |
| edgefleet_connections_closed_total | counter | reason (agent.server.CloseReason) |
| edgefleet_model_info | gauge = 1 | name, version, sequence, digest (the bundle's sha256, as
  devices report it and rollouts name it), model_sha256 (the ONNX file's) |
| edgefleet_model_swaps_total | counter | |
| edgefleet_fallback_active, edgefleet_ready | gauge 0/1 | |
| edgefleet_uptime_seconds | gauge | |
| edgefleet_drift_psi_max | gauge | |
| edgefleet_drift_psi_alert | gauge | (the bundle's drift alert threshold: `drift_reference.
  alert_psi`, set by the build above its measured noise floor; 0.25 without one) |
| edgefleet_drift_feature_psi | gauge | rank (1..k), feature (its name) |
| edgefleet_drift_window_rows | gauge | |

HTTP: `/metrics`, `/healthz` (200 while the process serves HTTP), `/readyz` (200 when a model
or fallback rules can answer, else 503).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from agent.predictor import FALLBACK_REASONS
from agent.protocol import DECISION_LABELS, SOURCE_LABELS, Decision, ErrorCode, Source
from agent.runtime import Runtime

log = logging.getLogger("edgefleet.agent")

# Resolve tens of microseconds at the low end, still see a stalled request at the top.
LATENCY_BUCKETS = (
    10e-6, 20e-6, 30e-6, 40e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)
_bisect = bisect.bisect_left
_ERROR, _MODEL = int(Decision.ERROR), int(Source.MODEL)
SCORE_BUCKETS = tuple(float(f"{v:.3g}") for v in np.geomspace(1e-3, 1e4, 22))


class _Histogram:
    """Bucket counts and a sum; the caller holds the lock. `add` takes one value, `add_many` a
    numpy batch in one call (prometheus_client's histogram takes one value per call, ~0.6 us,
    which a 100k rows/s stream notices)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = list(buckets)
        self._np_bounds = np.array(self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def add(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def add_many(self, values: np.ndarray) -> None:
        if not len(values):
            return
        counts = np.bincount(np.searchsorted(self._np_bounds, values, side="left"),
                             minlength=len(self.counts))
        for i in np.flatnonzero(counts):
            self.counts[i] += int(counts[i])
        self.sum += float(values.sum(dtype=np.float64))

    def family(self, name: str, doc: str, labels: list[str] | None = None,
               family: HistogramMetricFamily | None = None,
               label_values: list[str] | None = None) -> HistogramMetricFamily:
        fam = family or HistogramMetricFamily(name, doc, labels=labels)
        cumulative, buckets = 0, []
        for bound, c in zip([*self.bounds, float("inf")], self.counts, strict=True):
            cumulative += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        fam.add_metric(label_values or [], buckets, self.sum)
        return fam


class AgentMetrics:
    """All metrics of one agent. `record_*` run on the request path: one lock, a few list
    increments (about a microsecond per request); the series are built at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._req = {"json": _Histogram(LATENCY_BUCKETS), "binary": _Histogram(LATENCY_BUCKETS)}
        self._inference = _Histogram(LATENCY_BUCKETS)
        self._scores = _Histogram(SCORE_BUCKETS)
        self._pred = [0] * 9  # decision * 3 + source
        self._errors = [0] * (max(ErrorCode) + 1)
        self._fallback = dict.fromkeys(FALLBACK_REASONS, 0)
        self._imputed = 0
        self.connections_active = Gauge("edgefleet_connections_active",
                                        "Open client connections.", registry=self.registry)
        self.connections_total = Counter("edgefleet_connections", "Accepted client connections.",
                                         registry=self.registry)
        self.connections_closed = Counter(
            "edgefleet_connections_closed", "Client connections closed (refused ones too), by "
            "reason (agent.server.CloseReason).", ["reason"], registry=self.registry)
        self.registry.register(_RequestCollector(self))
        self.registry.register(_RuntimeCollector(runtime))

    # -- request path

    def record_row(self, row: tuple, encoding: str, latency: float, inference: float,
                   fallback_reason: str | None) -> None:
        """One single-row request; every single-die answer passes here, so the histogram
        adds are inlined (`_Histogram.add`) and the enum members are plain ints."""
        decision, source = row[1], row[2]
        with self._lock:
            h = self._req[encoding]
            h.counts[_bisect(h.bounds, latency)] += 1
            h.sum += latency
            if decision == _ERROR:
                self._errors[row[3]] += 1
                return
            self._pred[decision * 3 + source] += 1
            if inference:
                h = self._inference
                h.counts[_bisect(h.bounds, inference)] += 1
                h.sum += inference
            if row[4]:
                self._imputed += row[4]
            if source == _MODEL:
                h, v = self._scores, row[6]
                h.counts[_bisect(h.bounds, v)] += 1
                h.sum += v
            elif fallback_reason:
                self._fallback[fallback_reason] += 1

    def record_rows(self, rows: list[tuple], encoding: str, latency: list[float],
                    inference: float) -> None:
        """Single-row requests the model answered in one run (`Predictor.score_rows`): one
        latency per request, one inference time for the run."""
        req, scores, pred = self._req[encoding], self._scores, self._pred
        with self._lock:
            for lat in latency:
                req.add(lat)
            if inference:
                self._inference.add(inference)
            for row in rows:
                pred[row[1] * 3 + row[2]] += 1
                if row[4]:
                    self._imputed += row[4]
                scores.add(row[6])

    def record_batch(self, records: np.ndarray, encoding: str, latency: float | np.ndarray,
                     inference: float, fallback: dict[str, int]) -> None:
        """One batch request (`latency` a float), or single-row requests answered by one model
        run (`latency` an array: one per request)."""
        decision = records["decision"]
        pairs = np.bincount(decision.astype(np.intp) * 3 + records["source"], minlength=9)
        error_rows = decision == Decision.ERROR
        codes = (np.bincount(records["error_code"][error_rows], minlength=len(self._errors))
                 if pairs[Decision.ERROR * 3 + Source.NONE] else None)
        imputed = int(records["imputed"][~error_rows].sum())
        model_scores = records["score"][records["source"] == Source.MODEL]
        with self._lock:
            if type(latency) is float:
                self._req[encoding].add(latency)
            else:
                self._req[encoding].add_many(latency)
            if inference:
                self._inference.add(inference)
            for i in np.flatnonzero(pairs[:6]):
                self._pred[i] += int(pairs[i])
            if codes is not None:
                for c in np.flatnonzero(codes):
                    self._errors[c] += int(codes[c])
            self._imputed += imputed
            self._scores.add_many(model_scores)
            for reason, n in fallback.items():
                self._fallback[reason] += n

    def record_error(self, code: ErrorCode) -> None:
        with self._lock:
            self._errors[code] += 1

    def totals(self) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """Counters since start, for windowed health (agent.health): answered dies by
        `decision * 3 + source`, refused requests and rows, and request-latency bucket counts
        (both encodings, buckets `LATENCY_BUCKETS` then +Inf)."""
        with self._lock:
            latency = tuple(sum(c) for c in zip(*(h.counts for h in self._req.values()),
                                                strict=True))
            return tuple(self._pred), sum(self._errors), latency

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector:
    """The request-path counters and histograms of `AgentMetrics`, as Prometheus series."""

    def __init__(self, m: AgentMetrics) -> None:
        self.m = m

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Metric]:
        m = self.m
        with m._lock:
            pred, errors = list(m._pred), list(m._errors)
            fallback, imputed = dict(m._fallback), m._imputed
            req = HistogramMetricFamily(
                "edgefleet_request_duration_seconds",
                "Server-side time per request, complete message in to answer out.",
                labels=["encoding"])
            for enc, h in m._req.items():
                h.family("", "", family=req, label_values=[enc])
            inference = m._inference.family("edgefleet_inference_duration_seconds",
                                            "ONNX Runtime time per request (one batch).")
            scores = m._scores.family("edgefleet_anomaly_score",
                                      "Anomaly scores of model answers.")
        fam = CounterMetricFamily("edgefleet_predictions", "Answered dies by decision and source.",
                                  labels=["decision", "source"])
        for d in (Decision.PASS, Decision.FAIL):
            for s in (Source.MODEL, Source.FALLBACK):
                fam.add_metric([DECISION_LABELS[d], SOURCE_LABELS[s]], pred[d * 3 + s])
        yield fam
        fam = CounterMetricFamily("edgefleet_errors", "Refused requests and rows by error code.",
                                  labels=["code"])
        for c in ErrorCode:
            fam.add_metric([c.label], errors[c])
        yield fam
        fam = CounterMetricFamily("edgefleet_fallback_answers",
                                  "Dies answered by the fallback rules, by why.", labels=["reason"])
        for reason, n in fallback.items():
            fam.add_metric([reason], n)
        yield fam
        yield CounterMetricFamily("edgefleet_imputed_values",
                                  "Missing values (NaN/null) imputed by the model.", value=imputed)
        yield req
        yield inference
        yield scores


class _RuntimeCollector:
    """Series read from the runtime at scrape time: model info, fallback, readiness, drift."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> list:
        return []  # series vary with the model; collected fresh on every scrape

    def collect(self) -> Iterable[Metric]:
        p = self.runtime.active()
        info = GaugeMetricFamily("edgefleet_model_info", "The model being served (value 1).",
                                 labels=["name", "version", "sequence", "digest", "model_sha256"])
        if p.manifest is not None and p.engine is not None:
            m = p.manifest
            # the bundle digest (one identifier everywhere: the state devices publish,
            # rollouts and gates use it too), computed once per model by the snapshot
            info.add_metric([m.name, m.version, str(m.sequence), p.bundle_digest or "",
                             m.model_digest], 1)
        yield info
        swaps = CounterMetricFamily("edgefleet_model_swaps", "Models swapped in since start.")
        swaps.add_metric([], self.runtime.swaps)
        yield swaps
        yield GaugeMetricFamily("edgefleet_fallback_active",
                                "1 while answers come from the fallback rules.",
                                value=1 if p.fallback_reason() is not None else 0)
        yield GaugeMetricFamily("edgefleet_ready", "1 when a model or fallback rules can answer.",
                                value=1 if p.available else 0)
        yield GaugeMetricFamily("edgefleet_uptime_seconds", "Seconds since the agent started.",
                                value=self.runtime.uptime())
        drift_rows = GaugeMetricFamily("edgefleet_drift_window_rows",
                                       "Recent input rows the drift monitor holds.")
        if p.drift is None:
            drift_rows.add_metric([], 0)
            yield drift_rows
            return
        report = p.drift.report()
        drift_rows.add_metric([], report.rows)
        yield drift_rows
        if report.worst:
            yield GaugeMetricFamily("edgefleet_drift_psi_max",
                                    "Largest population stability index over all features.",
                                    value=report.psi_max)
            yield GaugeMetricFamily("edgefleet_drift_psi_alert",
                                    "The bundle's drift alert threshold (PSI).",
                                    value=_drift_alert_psi(p.manifest))
            worst = GaugeMetricFamily("edgefleet_drift_feature_psi",
                                      "PSI of the worst features (rank 1 = worst).",
                                      labels=["rank", "feature"])
            names = p.feature_names
            for rank, (j, value) in enumerate(report.worst, 1):
                worst.add_metric([str(rank), names[j] if names else str(j)], value)
            yield worst


def _drift_alert_psi(manifest) -> float:
    """`drift_reference.alert_psi` of the manifest when the build shipped one, else 0.25 (the
    rule of thumb for a real shift)."""
    value = ((manifest.head if manifest is not None else {}).get("drift_reference") or {}
             ).get("alert_psi")
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else 0.25


class MetricsServer:
    """`/metrics`, `/healthz` and `/readyz` on HOST:PORT (port 0 picks a free one)."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int) -> None:
        handler = _make_handler(metrics)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(metrics: AgentMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefleet-agent"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                p = metrics.runtime.active()
                if p.available:
                    reason = p.fallback_reason()
                    self._send(200, f"ready ({'fallback: ' + reason if reason else 'model'})\n"
                               .encode())
                else:
                    self._send(503, b"not ready: no model and no fallback rules\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            log.debug("metrics http: " + format, *args)

    return Handler
