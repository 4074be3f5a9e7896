"""Rule-based fallback: screen dies against per-parameter limits when the model cannot answer.

A die fails when any measured parameter is below its rule's `low` or above its `high` (None: no
limit); a missing measurement (NaN) never violates a rule. Rules come from the bundle's manifest
(`fallback.rules`) or from a standalone rules file, so a box with no model yet still screens
dies. A fallback answer reports: score = number of violated rules, threshold = 0 (so
score > threshold still means fail), confidence = 1 (limits are not graded), and as top
parameters the violated ones, largest violation (distance outside the limit) first.

A die with more missing values than the bundle's `input.max_missing` is unlike anything the
model learnt from. When the bundle's `fallback.min_measured` is set, such a die gets a rules
decision if at least that share of the rules' parameters is measured (`RuleSet.enough_measured`),
else it is refused (too_many_missing). Bundles without these fields keep the agent's own limit
(`max_missing_share` of the features) and refuse every die beyond it.

Rules file (JSON):

    {"n_features": 512, "top_k": 5, "version": "limits-2026-11",
     "feature_names": ["idd_core_01", ...],            # optional
     "rules": [{"feature": 0, "low": 0.1, "high": 2.5}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import EdgefleetError
from agent.manifest import Manifest


class RulesError(EdgefleetError):
    """A rules file that cannot be used."""


@dataclass(frozen=True)
class Screen:
    violations: np.ndarray  # (rows,) int: number of violated rules
    top_index: np.ndarray  # (rows, k) int32, -1 where unused
    top_contribution: np.ndarray  # (rows, k) float32: distance outside the limit


class RuleSet:
    """Limits compiled to arrays: one column per rule (a feature may have several rules)."""

    def __init__(self, n_features: int, rules: list[tuple[int, float | None, float | None]],
                 *, top_k: int = 5, version: str = "rules",
                 feature_names: tuple[str, ...] | None = None,
                 min_measured: float | None = None) -> None:
        self.n_features = n_features
        self.min_measured = min_measured  # None: never answer a die beyond max_missing
        self.top_k = max(1, min(top_k, n_features))
        self.version = version
        self.feature_names = feature_names
        self.count = len(rules)
        self._feature = np.array([r[0] for r in rules], dtype=np.intp)
        self._low = np.array([-np.inf if r[1] is None else r[1] for r in rules], dtype=np.float32)
        self._high = np.array([np.inf if r[2] is None else r[2] for r in rules], dtype=np.float32)
        self._ruled = np.unique(self._feature)  # features that have a rule

    def enough_measured(self, x: np.ndarray) -> np.ndarray:
        """(rows,) bool: rows of a (rows, n_features) batch with at least `min_measured` of the
        ruled features measured (never, when `min_measured` is None or there are no rules)."""
        if self.min_measured is None or not len(self._ruled):
            return np.zeros(x.shape[0], dtype=bool)
        measured = (~np.isnan(x[:, self._ruled])).mean(axis=1)
        return measured >= self.min_measured

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> RuleSet:
        return cls(manifest.input.n_features, list(manifest.rules),
                   top_k=manifest.top_k, version=manifest.version,
                   feature_names=manifest.input.feature_names,
                   min_measured=_share((manifest.head.get("fallback") or {}).get("min_measured")))

    @classmethod
    def load(cls, path: Path) -> RuleSet:
        """Read a standalone rules file (format in the module docstring)."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise RulesError(f"cannot read rules file {path}: {e.strerror}") from None
        except ValueError as e:
            raise RulesError(f"rules file {path}: not valid JSON: {e}") from None
        return cls.from_json(obj, str(path))

    @classmethod
    def from_json(cls, obj: Any, where: str = "rules") -> RuleSet:
        if not isinstance(obj, dict):
            raise RulesError(f"{where}: expected a JSON object")
        n = obj.get("n_features")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
            raise RulesError(f"{where}: field n_features: expected an integer in 1..100000, "
                             f"found {n!r}")
        top_k = obj.get("top_k", 5)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RulesError(f"{where}: field top_k: expected an integer >= 1, found {top_k!r}")
        version = obj.get("version", "rules")
        if not isinstance(version, str) or not 1 <= len(version) <= 128:
            raise RulesError(f"{where}: field version: expected 1-128 characters")
        names = obj.get("feature_names")
        if names is not None and (not isinstance(names, list) or len(names) != n
                                  or not all(isinstance(x, str) for x in names)):
            raise RulesError(f"{where}: field feature_names: expected {n} strings")
        raw = obj.get("rules")
        if not isinstance(raw, list):
            raise RulesError(f"{where}: field rules: expected a list of "
                             '{"feature", "low", "high"} objects')
        rules = []
        for i, r in enumerate(raw):
            p = f"{where}: field rules[{i}]"
            if not isinstance(r, dict):
                raise RulesError(f"{p}: expected an object")
            feat = r.get("feature")
            if not isinstance(feat, int) or isinstance(feat, bool) or not 0 <= feat < n:
                raise RulesError(f"{p}.feature: expected an index in 0..{n - 1}, found {feat!r}")
            low, high = _limit(r.get("low"), f"{p}.low"), _limit(r.get("high"), f"{p}.high")
            if low is not None and high is not None and low > high:
                raise RulesError(f"{p}: low {low} is above high {high}")
            rules.append((feat, low, high))
        return cls(n, rules, top_k=top_k, version=version,
                   feature_names=tuple(names) if names else None)

    def with_top_k(self, k: int) -> RuleSet:
        """The same rules reporting `k` top parameters (to match a model's answers)."""
        clone = RuleSet.__new__(RuleSet)
        clone.__dict__.update(self.__dict__)
        clone.top_k = max(1, min(k, self.n_features))
        return clone

    def screen(self, x: np.ndarray) -> Screen:
        """Check a (rows, n_features) float32 batch against every rule."""
        rows, k = x.shape[0], self.top_k
        top_index = np.full((rows, k), -1, dtype=np.int32)
        top_contribution = np.zeros((rows, k), dtype=np.float32)
        if not self.count:
            return Screen(np.zeros(rows, dtype=np.int64), top_index, top_contribution)
        v = x[:, self._feature]  # (rows, n_rules); NaN compares False, so never violates
        with np.errstate(invalid="ignore", over="ignore"):
            excess = np.fmax(self._low - v, v - self._high)  # > 0 outside the limits
        bad = excess > 0
        violations = bad.sum(axis=1)
        for i in np.flatnonzero(violations):  # fails only; a handful of rows at most
            cols = np.flatnonzero(bad[i])
            order = cols[np.argsort(-excess[i, cols], kind="stable")]
            feats, seen = [], set()
            for c in order:  # one entry per feature, its largest violation
                f = int(self._feature[c])
                if f not in seen:
                    seen.add(f)
                    feats.append((f, float(excess[i, c])))
                if len(feats) == k:
                    break
            top_index[i, :len(feats)] = [f for f, _ in feats]
            top_contribution[i, :len(feats)] = [e for _, e in feats]
        return Screen(violations, top_index, top_contribution)


def max_missing(manifest: Manifest | None, n_features: int, default_share: float) -> int:
    """The bundle's learnt `input.max_missing` (an int in 0..n_features), else the agent's
    `default_share` of the features."""
    raw = (manifest.head.get("input") or {}).get("max_missing") if manifest is not None else None
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= n_features:
        return raw
    return math.floor(default_share * n_features)


def _share(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        return None
    return float(v)


def _limit(v: Any, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RulesError(f"{where}: expected a finite number or null, found {v!r}")
    return float(v)
