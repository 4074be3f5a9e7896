"""From a float32 batch to per-die answers: model first, rules when the model cannot answer.

A `Predictor` is an immutable snapshot of what answers requests (an engine or none, its
manifest, the fallback rules) plus the constants derived from them, built once per model swap
so the request path only reads attributes. A request reads `Runtime.active()` once and uses
that snapshot to the end, so a swap never mixes two models in one answer.

Per row, in order:
  1. an infinite value (float32 overflow included) -> error NOT_FINITE naming the column;
     more than `max_missing` NaNs (the bundle's learnt limit, else the agent's share) -> the
     rules' decision when they have enough measured values (`agent.fallback`), else error
     TOO_MANY_MISSING; NaNs below that are imputed by the model's graph and counted;
  2. the model, unless there is none, it is forced off, or it failed less than `retry_s` ago;
  3. the rules when the session raised (the whole batch) or the score is not finite (that row);
     without rules the row gets error UNAVAILABLE.
Answers are records in the protocol's layout (`agent.protocol.record_dtype`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from agent.calibration import DEFAULT_CONTEXT, Calibration
from agent.digest import cached_bundle_digest
from agent.drift import DriftMonitor, alert_threshold
from agent.engine import Engine
from agent.fallback import RuleSet, max_missing
from agent.manifest import Manifest
from agent.protocol import (
    NO_SEQUENCE,
    Decision,
    ErrorCode,
    OneResult,
    Source,
    pad_version,
    record_dtype,
    row_struct,
)

log = logging.getLogger("edgefleet.agent")
# The finite check below multiplies by zero on purpose; inf * 0 warning about it says nothing.
warnings.filterwarnings("ignore", message="invalid value encountered in dot",
                        category=RuntimeWarning)

# Why an answer came from the rules (bounded label values for metrics).
NO_MODEL = "no_model"
FORCED = "forced"
MODEL_ERROR = "model_error"
NON_FINITE_SCORE = "non_finite_score"
TOO_MANY_MISSING = "too_many_missing"  # beyond the bundle's max_missing, rules measured enough
FALLBACK_REASONS = (NO_MODEL, FORCED, MODEL_ERROR, NON_FINITE_SCORE, TOO_MANY_MISSING)
BATCH_SLICE = 256
# Plain ints for the single-row path (IntEnum member lookups cost more than the arithmetic).
_PASS, _FAIL = int(Decision.PASS), int(Decision.FAIL)
_MODEL, _FALLBACK = int(Source.MODEL), int(Source.FALLBACK)
_INF = math.inf
_exp = math.exp
_perf = time.perf_counter

# A row as a tuple in record field order (the single-row path avoids numpy structs):
# (die_id, decision, source, error_code, imputed, error_column, score, threshold, confidence,
#  top_index list, top_contribution list)
Row = tuple


@dataclass
class Limits:
    max_missing_share: float = 0.2
    fallback_retry_s: float = 5.0
    drift_window: int = 2048
    drift_top_k: int = 5
    drift_interval_s: float = 10.0


class ModelHealth:
    """Circuit breaker for one model: after the session raises, answers come from the rules
    for `retry_s`, then the model is tried again. Entering and leaving are logged once each."""

    def __init__(self, retry_s: float, on_change: Callable[[], None] | None = None) -> None:
        self.retry_s = retry_s
        self.failing = False
        self.reason: str | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._on_change = on_change

    def usable(self) -> bool:
        return not self.failing or time.monotonic() >= self._retry_at

    def failed(self, reason: str) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self.retry_s
            if self.failing:
                return
            self.failing, self.reason = True, reason
        log.warning("entering fallback: %s; retrying the model in %.3g s", reason, self.retry_s)
        if self._on_change:
            self._on_change()

    def succeeded(self) -> None:
        with self._lock:
            if not self.failing:
                return
            self.failing, self.reason = False, None
        log.warning("leaving fallback: the model answers again")
        if self._on_change:
            self._on_change()


class Predictor:
    """One snapshot: engine (or None), manifest (or None), rules (or None), derived constants."""

    def __init__(self, engine: Engine | None, manifest: Manifest | None, rules: RuleSet | None,
                 limits: Limits, *, forced_reason: str | None = None,
                 on_health_change: Callable[[], None] | None = None,
                 drift: DriftMonitor | None = None,
                 calibration: Calibration | None = None) -> None:
        if engine is not None and manifest is None:
            manifest = engine.manifest
        self.engine = engine
        self.manifest = manifest
        self.forced_reason = forced_reason
        self.limits = limits
        if manifest is not None:
            n, k = manifest.input.n_features, manifest.top_k
            # as float32, like the score: the one-row path compares in double, batches in
            # float32 (numpy), and a client compares the two float32 fields it gets
            self.threshold = float(np.float32(manifest.threshold))
            self.inv_scale = 1.0 / manifest.confidence_scale
            self.version: str | None = manifest.version
            self.sequence: int | None = manifest.sequence
            self.feature_names: tuple[str, ...] | None = manifest.input.feature_names
            if manifest.rules:
                rules = RuleSet.from_manifest(manifest)
            elif rules is not None and rules.n_features != n:
                log.warning("rules file has %d features, model %d: fallback disabled",
                            rules.n_features, n)
                rules = None
        elif rules is not None:
            n, k = rules.n_features, rules.top_k
            self.threshold, self.inv_scale = 0.0, 1.0
            self.version, self.sequence = None, None
            self.feature_names = rules.feature_names
        else:
            n, k = 0, 1
            self.threshold, self.inv_scale = 0.0, 1.0
            self.version, self.sequence = None, None
            self.feature_names = None
        self.rules = rules.with_top_k(k) if rules is not None else None
        # JSON text of the constant parts of every answer
        self.threshold_json = str(np.float32(self.threshold))  # shortest float32 text
        self.version_json = json.dumps(self.version)
        # the bundle's sha256, the digest the fleet names a model by (None: not from a store)
        self.bundle_digest = _bundle_digest(engine) if manifest is not None else None
        self.model_json = (f'"model_version":{self.version_json},"model_sequence":'
                           f'{json.dumps(self.sequence)},"model_digest":'
                           f'{json.dumps(self.bundle_digest)}')
        self.feature_names_json = _names_json(self.feature_names) if self.feature_names else None
        self.n_features, self.k = n, k
        self.max_missing = max_missing(manifest, n, limits.max_missing_share)
        self.dtype = record_dtype(k)
        self.record = row_struct(k)
        self.version_bytes = (self.version or "").encode("ascii")
        self.version_padded = pad_version(self.version_bytes)
        self.sequence_u64 = NO_SEQUENCE if self.sequence is None else self.sequence
        self.one_result = OneResult(k, self.version_bytes, self.sequence_u64)  # one-row answers
        self.health = ModelHealth(limits.fallback_retry_s, on_health_change)
        self.drift: DriftMonitor | None = drift
        if drift is None and manifest is not None and manifest.drift_edges is not None:
            self.drift = DriftMonitor(manifest.drift_edges, manifest.drift_proportions or (),
                                      window=limits.drift_window, top_k=limits.drift_top_k,
                                      interval=limits.drift_interval_s,
                                      alert_psi=alert_threshold(manifest.head.get("drift_reference")),
                                      padded=manifest.drift_arrays)
        # per-tester threshold (agent.calibration); None: the manifest's fixed threshold
        self.calibration = calibration if manifest is not None else None
        self._use_model = engine is not None and forced_reason is None
        self.available = self._use_model or self.rules is not None  # a model, or rules
        self._no_top = ([-1] * k, [0.0] * k)
        self._zeros = np.zeros(n, dtype=np.float32)
        self._rules_only_reason = FORCED if forced_reason else NO_MODEL

    # -- state, for health/info/metrics

    def fallback_reason(self) -> str | None:
        """Why answers currently come from the rules (None when the model answers)."""
        if self.forced_reason:
            return f"forced: {self.forced_reason}"
        if self.engine is None:
            return "no model loaded"
        if self.health.failing:
            return self.health.reason
        return None

    # -- scoring

    def score_one(self, v: np.ndarray, die_id: int | str | None,
                  tester: str = DEFAULT_CONTEXT) -> tuple[Row, float, str | None]:
        """One row, shape (n,): (row tuple, inference seconds, fallback reason label). The path
        every single-die request takes, so it avoids numpy calls on tiny arrays where plain
        Python is cheaper. `tester` picks the calibration context (agent.calibration)."""
        imputed = 0
        # v . 0 is 0 exactly when every value is finite (NaN * 0 and inf * 0 are NaN): one BLAS
        # call, half the cost of isfinite().all() (the method: np.dot's dispatch costs 0.4 us).
        if v.dot(self._zeros) != 0:
            nan = np.isnan(v)
            imputed = int(np.count_nonzero(nan))
            if imputed + np.count_nonzero(np.isfinite(v)) != self.n_features:  # an infinity
                col = int(np.argmax(~nan & ~np.isfinite(v)))
                return self._error_row(die_id, ErrorCode.NOT_FINITE, col, 0), 0.0, None
            if imputed > self.max_missing:
                return self._beyond_max_missing(v, die_id, imputed)
        drift = self.drift
        if drift is not None:
            drift.observe_one(v)
        reason = self._rules_only_reason
        t_inf = 0.0
        health = self.health
        if self._use_model and (not health.failing or health.usable()):
            t0 = _perf()
            try:
                out = self.engine.predict_one(v)  # type: ignore[union-attr]
                s = float(out[0][0])
            except Exception as e:  # onnxruntime raises its own types; any failure falls back
                health.failed(f"model error: {type(e).__name__}: {_short(e)}")
                reason = MODEL_ERROR
            else:
                t_inf = _perf() - t0
                if -_INF < s < _INF:
                    if health.failing:
                        health.succeeded()
                    cal = self.calibration
                    thr = self.threshold if cal is None else cal.judge(tester, s, imputed > 0)
                    if s > thr:
                        top_i, top_c = out[1][0].tolist(), out[2][0].tolist()
                        return ((die_id, _FAIL, _MODEL, 0, imputed, -1, s, thr,
                                 1.0 - _exp((thr - s) * self.inv_scale), top_i, top_c),
                                t_inf, None)
                    return ((die_id, _PASS, _MODEL, 0, imputed, -1, s, thr,
                             1.0 - _exp((s - thr) * self.inv_scale), *self._no_top), t_inf, None)
                reason = NON_FINITE_SCORE
                _warn_non_finite(1)
        elif self._use_model:
            reason = MODEL_ERROR
        if self.rules is None:
            return self._error_row(die_id, ErrorCode.UNAVAILABLE, -1, imputed), t_inf, None
        sc = self.rules.screen(v.reshape(1, -1))
        n = int(sc.violations[0])
        return ((die_id, _FAIL if n else _PASS, _FALLBACK, 0, imputed, -1, float(n), 0.0, 1.0,
                 sc.top_index[0].tolist(), sc.top_contribution[0].tolist()), t_inf, reason)

    def _beyond_max_missing(self, v: np.ndarray, die_id: int | str | None,
                            imputed: int) -> tuple[Row, float, str | None]:
        """A die missing more than max_missing: the rules' decision when they have enough of
        its values (agent.fallback), else a refusal."""
        rules = self.rules
        if rules is None or not rules.enough_measured(v.reshape(1, -1))[0]:
            return self._error_row(die_id, ErrorCode.TOO_MANY_MISSING, -1, imputed), 0.0, None
        sc = rules.screen(v.reshape(1, -1))
        n = int(sc.violations[0])
        return ((die_id, _FAIL if n else _PASS, _FALLBACK, 0, imputed, -1, float(n), 0.0, 1.0,
                 sc.top_index[0].tolist(), sc.top_contribution[0].tolist()), 0.0,
                TOO_MANY_MISSING)

    def _error_row(self, die_id, code: ErrorCode, column: int, imputed: int) -> Row:
        return (die_id, Decision.ERROR, Source.NONE, int(code), imputed, column, math.nan,
                math.nan, math.nan, *self._no_top)

    def score_rows(self, x: np.ndarray, die_ids: list[int],
                   tester: str | Sequence[str] = DEFAULT_CONTEXT
                   ) -> tuple[list[Row], float, np.ndarray] | None:
        """Single-row requests of several connections in one model run (agent/server.py):
        (row tuples as `score_one` gives them, inference seconds, the scores), or None when a
        row needs more than the model (an infinite value, too many missing, a model failing or
        absent, a non-finite score): `score_batch` answers those. The lean path: a handful of
        numpy calls for the whole batch, then plain Python per row, with `score_one`'s
        arithmetic (double precision, calibration die by die in order), so a row answers the
        same alone or gathered. `tester`: the calibration context of every row, or one per
        row."""
        if not self._use_model or self.health.failing:
            return None
        nan = np.isnan(x)
        imputed = np.count_nonzero(nan, axis=1)
        if imputed.max() > self.max_missing or np.isinf(x).any():
            return None
        t0 = _perf()
        try:
            out = self.engine.predict(x)  # type: ignore[union-attr]
        except Exception:  # score_batch runs it again and takes the fallback
            return None
        t_inf = _perf() - t0
        scores = out.score.reshape(-1)
        if not np.isfinite(scores).all() or out.top_index.shape != (len(die_ids), self.k):
            return None
        if self.drift is not None:
            self.drift.observe(x)
        cal, thr, inv, no_top = self.calibration, self.threshold, self.inv_scale, self._no_top
        keys = [tester] * len(die_ids) if isinstance(tester, str) else tester
        rows: list[Row] = []
        for i, (die_id, s, m, key) in enumerate(zip(die_ids, scores.tolist(), imputed.tolist(),
                                                   keys, strict=True)):
            if cal is not None:
                thr = cal.judge(key, s, m > 0)
            if s > thr:
                rows.append((die_id, _FAIL, _MODEL, 0, m, -1, s, thr,
                             1.0 - _exp((thr - s) * inv), out.top_index[i].tolist(),
                             out.top_contribution[i].tolist()))
            else:
                rows.append((die_id, _PASS, _MODEL, 0, m, -1, s, thr,
                             1.0 - _exp((s - thr) * inv), *no_top))
        return rows, t_inf, scores

    def score_batch(self, x: np.ndarray, die_ids: np.ndarray,
                    tester: str | Sequence[str] = DEFAULT_CONTEXT
                    ) -> tuple[np.ndarray, float, dict[str, int]]:
        """A (rows, n) batch: (records, inference seconds, fallback rows by reason). Big
        batches run in slices of `BATCH_SLICE` rows: the same speed, a quarter of the memory
        for ONNX Runtime's intermediate tensors. `tester`: the calibration context of every
        row, or one per row."""
        if x.shape[0] <= BATCH_SLICE:
            return self._score_batch(x, die_ids, tester)
        parts, t_inf, fallback = [], 0.0, {}
        for i in range(0, x.shape[0], BATCH_SLICE):
            rec, t, fb = self._score_batch(
                x[i:i + BATCH_SLICE], die_ids[i:i + BATCH_SLICE],
                tester if isinstance(tester, str) else tester[i:i + BATCH_SLICE])
            parts.append(rec)
            t_inf += t
            for reason, count in fb.items():
                fallback[reason] = fallback.get(reason, 0) + count
        return np.concatenate(parts), t_inf, fallback

    def _score_batch(self, x: np.ndarray, die_ids: np.ndarray,
                     tester: str | Sequence[str] = DEFAULT_CONTEXT
                     ) -> tuple[np.ndarray, float, dict[str, int]]:
        rows = x.shape[0]
        rec = np.zeros(rows, dtype=self.dtype)
        rec["die_id"] = die_ids
        rec["top_index"] = -1
        rec["error_column"] = -1
        fallback: dict[str, int] = {}
        finite = np.isfinite(x)
        if finite.all():
            ok = np.arange(rows)
            xs = x
        else:
            nan = np.isnan(x)
            missing = nan.sum(axis=1)
            rec["imputed"] = missing
            infinite = ~finite & ~nan
            bad_inf = infinite.any(axis=1)
            too_many = (missing > self.max_missing) & ~bad_inf
            self._set_errors(rec, np.flatnonzero(bad_inf), ErrorCode.NOT_FINITE,
                             np.argmax(infinite[bad_inf], axis=1) if bad_inf.any() else -1)
            answered = bad_inf.copy()  # rows the model must not see
            if too_many.any() and self.rules is not None:
                ruled = np.flatnonzero(too_many)
                ruled = ruled[self.rules.enough_measured(x[ruled])]
                if len(ruled):
                    self._rules_answer(rec, x, ruled)
                    fallback[TOO_MANY_MISSING] = len(ruled)
                    too_many[ruled] = False
                    answered[ruled] = True
            self._set_errors(rec, np.flatnonzero(too_many), ErrorCode.TOO_MANY_MISSING, -1)
            ok = np.flatnonzero(~(answered | too_many))
            xs = x[ok]
        if not len(ok):
            return rec, 0.0, fallback
        if self.drift is not None:
            self.drift.observe(xs)
        t_inf = 0.0
        to_rules = ok  # rows the rules must answer
        reason = self._rules_only_reason
        if self._use_model and self.health.usable():
            t0 = time.perf_counter()
            try:
                out = self.engine.predict(xs)  # type: ignore[union-attr]
                s = np.asarray(out.score, dtype=np.float32).reshape(len(ok))
                if out.top_index.shape != (len(ok), self.k):
                    raise ValueError(f"top_index has shape {out.top_index.shape}, "
                                     f"expected {(len(ok), self.k)}")
            except Exception as e:
                self.health.failed(f"model error: {type(e).__name__}: {_short(e)}")
                reason = MODEL_ERROR
            else:
                t_inf = time.perf_counter() - t0
                good = np.isfinite(s)
                g = ok[good]
                sg = s[good]
                cal = self.calibration
                if cal is None:
                    thr = self.threshold
                elif isinstance(tester, str) and (cal.imputed is None
                                                  or not rec["imputed"][g].any()):
                    thr = cal.judge_batch(tester, sg)
                else:  # several testers, or dies with imputed values: one by one, in order
                    keys = [tester] * rows if isinstance(tester, str) else tester
                    imp = rec["imputed"][g] > 0
                    thr = np.array([cal.judge(keys[i], v, m) for i, v, m in
                                    zip(g.tolist(), sg.tolist(), imp.tolist(), strict=True)],
                                   np.float32)
                fail = sg > thr
                rec["decision"][g] = np.where(fail, Decision.FAIL, Decision.PASS)
                rec["source"][g] = Source.MODEL
                rec["score"][g] = sg
                rec["threshold"][g] = thr
                # in double, as `score_one` does: a single row answers the same whether it is
                # scored alone or with other connections' rows (agent/server.py)
                rec["confidence"][g] = 1.0 - np.exp(-np.abs(sg.astype(np.float64) - thr)
                                                    * self.inv_scale)
                fails = g[fail]
                if len(fails):
                    sel = np.flatnonzero(good)[fail]
                    rec["top_index"][fails] = out.top_index[sel]
                    rec["top_contribution"][fails] = out.top_contribution[sel]
                if good.all():
                    if self.health.failing:
                        self.health.succeeded()
                    return rec, t_inf, fallback
                to_rules = ok[~good]
                reason = NON_FINITE_SCORE
                _warn_non_finite(len(to_rules))
        elif self._use_model:
            reason = MODEL_ERROR
        if self.rules is None:
            self._set_errors(rec, to_rules, ErrorCode.UNAVAILABLE, -1)
            return rec, t_inf, fallback
        self._rules_answer(rec, x, to_rules)
        fallback[reason] = fallback.get(reason, 0) + len(to_rules)
        return rec, t_inf, fallback

    def _rules_answer(self, rec: np.ndarray, x: np.ndarray, rows: np.ndarray) -> None:
        """Fill `rec[rows]` with the rules' decisions on `x[rows]`."""
        sc = self.rules.screen(x[rows])  # type: ignore[union-attr]
        rec["decision"][rows] = np.where(sc.violations > 0, Decision.FAIL, Decision.PASS)
        rec["source"][rows] = Source.FALLBACK
        rec["score"][rows] = sc.violations
        rec["threshold"][rows] = 0.0
        rec["confidence"][rows] = 1.0
        rec["top_index"][rows] = sc.top_index
        rec["top_contribution"][rows] = sc.top_contribution

    @staticmethod
    def _set_errors(rec: np.ndarray, idx: np.ndarray, code: ErrorCode, column) -> None:
        if not len(idx):
            return
        rec["decision"][idx] = Decision.ERROR
        rec["source"][idx] = Source.NONE
        rec["error_code"][idx] = code
        rec["error_column"][idx] = column
        for f in ("score", "threshold", "confidence"):
            rec[f][idx] = np.nan


@functools.lru_cache(maxsize=4)
def _names_json(names: tuple[str, ...]) -> tuple[str, ...]:
    """Each feature name as JSON text. Kept by the names: successive versions of a model
    usually name the same features, and 512 encodes held the GIL ~0.25 ms on every swap."""
    return tuple(orjson.dumps(nm).decode() for nm in names)


def _bundle_digest(engine: Engine | None) -> str | None:
    """sha256 of the bundle an installed model came from (agent.digest: the one the install
    computed while unpacking, else rebuilt from its version directory with the engine's parsed
    manifest); None for an engine not loaded from a store version."""
    path = getattr(engine, "model_path", None)
    if path is None or not (path.parent / "manifest.sig").exists():
        return None
    try:
        return cached_bundle_digest(path.parent, getattr(engine, "manifest", None))
    except (OSError, ValueError, KeyError) as e:
        log.warning("cannot compute the bundle digest of %s: %s", path.parent, e)
        return None


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:200]


_nf_lock = threading.Lock()
_nf_state = {"last": 0.0, "count": 0}


def _warn_non_finite(rows: int) -> None:
    """Non-finite scores fall back per row; log at most once a minute with a count."""
    with _nf_lock:
        _nf_state["count"] += rows
        now = time.monotonic()
        if now - _nf_state["last"] < 60.0:
            return
        count, _nf_state["count"], _nf_state["last"] = _nf_state["count"], 0, now
    log.warning("fallback for %d row(s): the model returned a non-finite score", count)
