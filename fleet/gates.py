"""Rollout gates: thresholds on what the devices report (and, optionally, on PromQL queries),
each evaluated to `pass`, `fail` or `inconclusive`.

A gate is `metric OP threshold` (OP one of <=, <, >=, >):

    bake gates (devices on the new model, over the bake window; their health summaries)
      error_rate        errors / requests                                   in [0, 1]
      fallback_rate     rule-fallback answers / requests                    in [0, 1]
      p99_ms            worst device p99 latency, ms                        >= 0
      p99_ratio         median p99 of new-model devices / old-model devices >= 0
      fail_rate_delta   |fail rate (new) - fail rate (old)|; "old" = devices still on the old
                        model, or, when none are left, the same devices before the rollout
      max_psi           worst device drift PSI                              >= 0
      unhealthy         devices whose health is not `ok`                    >= 0
    shadow gates (canary devices scoring live dies with the candidate, off the hot path)
      agreement         dies where candidate and live model decide alike / dies scored
      fail_rate_delta   |candidate fail rate - live fail rate| on the same dies
      score_psi         PSI between the two models' score distributions, each score taken as
                        its margin from the model's own threshold (agent.wire.MARGIN_EDGES),
                        every die clearly passing (margin < -1) in one bucket: the shift where
                        decisions are made, not in the bulk of good dies (a retrained model
                        scores those differently without deciding differently)

    PromQL gates: `query OP threshold` against `--prometheus URL` (every series of the result
    must satisfy it); `{{rollout}}`, `{{digest}}`, `{{version}}`, `{{model}}` are substituted.

Evidence rules: a rate over fewer than `min_requests` requests (bake) or fewer than `min_dies`
dies (shadow) is *inconclusive*, never a pass; an empty PromQL result or NaN is inconclusive;
a Prometheus that does not answer fails the gate, with the reason. The verdict of a set of
gates: any `fail` -> fail, else any `inconclusive` -> inconclusive, else pass.
"""

from __future__ import annotations

import math
import operator
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import UsageError
from agent.wire import MARGIN_EDGES  # not agent.shadow: that loads ONNX Runtime
from fleet.prometheus import PrometheusClient, PrometheusError

__all__ = [
    "BAKE_METRICS",
    "DEFAULT_BAKE_GATES",
    "DEFAULT_SHADOW_GATES",
    "SHADOW_METRICS",
    "Gate",
    "GateResult",
    "PromGate",
    "Verdict",
    "bake_part",
    "check_consistent",
    "evaluate_bake",
    "evaluate_prometheus",
    "evaluate_shadow",
    "judge_bake",
    "parse_gate",
    "parse_prom_gate",
    "psi",
]

INF = math.inf
# metric -> (lowest, highest) value it can take
BAKE_METRICS: dict[str, tuple[float, float]] = {
    "error_rate": (0.0, 1.0), "fallback_rate": (0.0, 1.0), "p99_ms": (0.0, INF),
    "p99_ratio": (0.0, INF), "fail_rate_delta": (0.0, 1.0), "max_psi": (0.0, INF),
    "unhealthy": (0.0, INF),
}
SHADOW_METRICS: dict[str, tuple[float, float]] = {
    "agreement": (0.0, 1.0), "fail_rate_delta": (0.0, 1.0), "score_psi": (0.0, INF),
}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}
_GATE_RE = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$")
_PROM_RE = re.compile(r"^(.*\S)\s*(<=|>=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*$", re.S)
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass(frozen=True)
class Gate:
    """`metric op threshold` on device reports."""

    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def to_json(self) -> str:
        return str(self)


@dataclass(frozen=True)
class PromGate:
    """`query op threshold` against Prometheus."""

    query: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.query} {self.op} {self.threshold:g}"

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def to_json(self) -> str:
        return str(self)


def parse_gate(text: str, metrics: Mapping[str, tuple[float, float]], what: str = "gate"
               ) -> Gate:
    """`error_rate<=0.01` -> Gate; raises `UsageError` naming the problem."""
    m = _GATE_RE.match(text)
    if not m:
        raise UsageError(f"{what} {text!r}: expected METRIC OP NUMBER, e.g. error_rate<=0.01",
                         hint=f"metrics: {', '.join(metrics)}; OP: <=, <, >=, >")
    metric, op, number = m.group(1), m.group(2), float(m.group(3))
    if metric not in metrics:
        raise UsageError(f"{what} {text!r}: unknown metric {metric!r}",
                         hint=f"one of {', '.join(metrics)}")
    if not math.isfinite(number):
        raise UsageError(f"{what} {text!r}: the threshold must be a finite number")
    return Gate(metric, op, number)


def parse_prom_gate(text: str) -> PromGate:
    """`sum(rate(x[1m])) <= 0.5` -> PromGate (the last comparison is the threshold)."""
    m = _PROM_RE.match(text)
    if not m:
        raise UsageError(f"PromQL gate {text!r}: expected QUERY OP NUMBER, e.g. "
                         "'sum(rate(edgefleet_errors_total[1m])) <= 0.5'")
    try:
        number = float(m.group(3))
    except ValueError:
        raise UsageError(f"PromQL gate {text!r}: {m.group(3)!r} is not a number") from None
    return PromGate(m.group(1).strip(), m.group(2), number)


def check_consistent(gates: Iterable[Gate | PromGate],
                     metrics: Mapping[str, tuple[float, float]] | None = None,
                     what: str = "gates") -> None:
    """Raise `UsageError` if some gates can never all pass: two bounds on one metric that leave
    nothing between them, or a bound outside the values a metric can take."""
    bounds: dict[str, list[Gate | PromGate]] = {}
    for g in gates:
        bounds.setdefault(g.metric if isinstance(g, Gate) else g.query, []).append(g)
    for name, gs in bounds.items():
        lo, lo_open, hi, hi_open = -INF, False, INF, False
        if metrics is not None and name in metrics:
            lo, hi = metrics[name]
        for g in gs:
            t = g.threshold
            if g.op in (">=", ">"):
                if t > lo or (t == lo and g.op == ">"):
                    lo, lo_open = t, g.op == ">"
            elif t < hi or (t == hi and g.op == "<"):
                hi, hi_open = t, g.op == "<"
        if lo > hi or (lo == hi and (lo_open or hi_open)):
            shown = " and ".join(str(g) for g in gs)
            domain = ""
            if metrics is not None and name in metrics:
                a, b = metrics[name]
                domain = f" ({name} is always between {a:g} and {b:g})"
            raise UsageError(f"contradictory {what}: {shown} can never pass{domain}",
                             hint="fix or drop one of them")


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: str  # pass | fail | inconclusive
    value: float | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "verdict": self.verdict,
                "value": None if self.value is None or not math.isfinite(self.value)
                else round(self.value, 6), "reason": self.reason}


@dataclass(frozen=True)
class Verdict:
    verdict: str
    results: tuple[GateResult, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, results: Sequence[GateResult], evidence: dict[str, Any]) -> Verdict:
        vs = {r.verdict for r in results}
        v = FAIL if FAIL in vs else INCONCLUSIVE if INCONCLUSIVE in vs else PASS
        return cls(v, tuple(results), evidence)

    def merge(self, other: Verdict) -> Verdict:
        return Verdict.of([*self.results, *other.results], {**self.evidence, **other.evidence})

    def explain(self) -> str:
        """One line: the gates that did not pass (or all of them, when all passed)."""
        bad = [r for r in self.results if r.verdict != PASS] or list(self.results)
        parts = []
        for r in bad:
            val = "" if r.value is None else f" = {r.value:.4g}"
            why = f" ({r.reason})" if r.reason else ""
            parts.append(f"{r.gate}: {r.verdict}{val}{why}")
        return "; ".join(parts) or "no gates"

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "results": [r.to_json() for r in self.results],
                "evidence": self.evidence}


def _judge(gates: Iterable[Gate], values: Mapping[str, float | None],
           missing: Mapping[str, str]) -> list[GateResult]:
    out = []
    for g in gates:
        v = values.get(g.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(GateResult(str(g), INCONCLUSIVE, None,
                                  missing.get(g.metric, "no data")))
        elif g.holds(v):
            out.append(GateResult(str(g), PASS, v))
        else:
            out.append(GateResult(str(g), FAIL, v, f"threshold {g.op} {g.threshold:g}"))
    return out


def _num(summary: Mapping[str, Any], key: str) -> float | None:
    v = summary.get(key)
    t = type(v)
    if t is float:  # the common case first: a bake reads this for every device, every measure
        return v if math.isfinite(v) else None
    if t is int:
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def bake_part(summary: Mapping[str, Any]) -> tuple[Any, ...]:
    """What one device's summary brings to a bake's evidence, read once: its requests, errors
    and fallbacks, the requests and failures its fail rate stands for (0, 0 without one), its
    p99 and drift (None without), whether it is unhealthy (`_health`, new-model devices). A
    driver keeps these per device as states change (`fleet.decide.BakeEvidence`), so a measure
    does not read every device's summary again."""
    req, fr = _num(summary, "requests"), _num(summary, "fail_rate")
    rated = bool(req) and fr is not None
    return (req or 0.0, _num(summary, "errors") or 0.0, _num(summary, "fallback") or 0.0,
            req if rated else 0.0, req * fr if rated else 0.0,  # type: ignore[operator]
            _num(summary, "p99_ms"), _num(summary, "max_psi"),
            int(summary.get("_health", "ok") != "ok"))


def _columns(parts: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return list(zip(*parts, strict=True)) if parts else [()] * 8


def _fail_rate(cols: list[tuple[Any, ...]]) -> tuple[float | None, int]:
    """Request-weighted fail rate over `bake_part` columns, and the requests behind it (sums
    with `math.fsum`: exact, whatever the order the parts come in)."""
    total = math.fsum(cols[3])
    return (math.fsum(cols[4]) / total if total else None), int(total)


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def evaluate_bake(gates: Sequence[Gate], new: Sequence[Mapping[str, Any]],
                  old: Sequence[Mapping[str, Any]], *, min_requests: int = 1,
                  baseline: Sequence[Mapping[str, Any]] = ()) -> Verdict:
    """Judge `gates` on the summaries of devices on the new model (`new`: each a device state's
    `summary` plus `health` status under `_health`) against devices still on the old one
    (`old`), or `baseline` (their summaries from before the rollout) when no old ones report."""
    return judge_bake(gates, [bake_part(s) for s in new], [bake_part(s) for s in old],
                      min_requests=min_requests, baseline=[bake_part(s) for s in baseline])


def judge_bake(gates: Sequence[Gate], new: Sequence[tuple[Any, ...]],
               old: Sequence[tuple[Any, ...]], *, min_requests: int = 1,
               baseline: Sequence[tuple[Any, ...]] = ()) -> Verdict:
    """`evaluate_bake` on the devices' `bake_part`s."""
    n, o, b = _columns(new), _columns(old), _columns(baseline)
    requests, errors, fallback = math.fsum(n[0]), math.fsum(n[1]), math.fsum(n[2])
    enough = requests >= max(1, min_requests)
    few = f"{int(requests)} requests on the new model, {min_requests} needed"
    new_fail, _ = _fail_rate(n)
    old_fail, old_req = _fail_rate(o)
    reference = "old-model devices"
    if old_fail is None:
        old_fail, old_req = _fail_rate(b)
        reference = "the same devices before the rollout"
    p99_new = _present(n[5])
    p99_old = _present((o if old else b)[5])
    psis = _present(n[6])
    unhealthy = sum(n[7])
    values: dict[str, float | None] = {
        "error_rate": errors / requests if enough else None,
        "fallback_rate": fallback / requests if enough else None,
        "p99_ms": max(p99_new) if p99_new and enough else None,
        "p99_ratio": (statistics.median(p99_new) / statistics.median(p99_old))
        if enough and p99_new and p99_old and statistics.median(p99_old) > 0 else None,
        "fail_rate_delta": abs(new_fail - old_fail)
        if enough and new_fail is not None and old_fail is not None else None,
        "max_psi": max(psis) if psis else None,
        "unhealthy": float(unhealthy),
    }
    missing = {k: few for k in ("error_rate", "fallback_rate", "p99_ms", "p99_ratio",
                                "fail_rate_delta")}
    if enough:
        missing["fail_rate_delta"] = "no fail rate from the old model to compare with"
        missing["p99_ratio"] = "no p99 from the old model to compare with"
        missing["p99_ms"] = "no device reports p99"
    missing["max_psi"] = "no device reports drift"
    evidence = {"devices": len(new), "requests": int(requests), "errors": int(errors),
                "fallback": int(fallback), "fail_rate_new": new_fail, "fail_rate_old": old_fail,
                "old_requests": old_req, "fail_rate_reference": reference,
                "unhealthy": unhealthy}
    return Verdict.of(_judge(gates, values, missing), evidence)


def psi(p: Sequence[float], q: Sequence[float], eps: float = 1e-4) -> float | None:
    """Population stability index between two histograms (counts); None if either is empty or
    their lengths differ."""
    if len(p) != len(q) or not p:
        return None
    sp, sq = float(sum(p)), float(sum(q))
    if sp <= 0 or sq <= 0:
        return None
    total = 0.0
    for a, b in zip(p, q, strict=True):
        pa, qb = max(a / sp, eps), max(b / sq, eps)
        total += (pa - qb) * math.log(pa / qb)
    return total


def _decision_region(hist: Sequence[float]) -> list[float]:
    """Margin histogram with every bucket below margin -1 merged into one."""
    if len(hist) != len(MARGIN_EDGES) + 1:
        return list(hist)
    k = MARGIN_EDGES.index(-1.0)  # bucket k holds [-2, -1)
    return [float(sum(hist[:k + 1])), *map(float, hist[k + 1:])]


def evaluate_shadow(gates: Sequence[Gate], shadows: Sequence[Mapping[str, Any]], *,
                    min_dies: int) -> Verdict:
    """Judge shadow `gates` on the devices' shadow counters (`summary.shadow`, see
    agent/shadow.py), summed over devices: nothing passes before `min_dies` dies were scored."""
    dies = agree = live_fail = shadow_fail = errors = dropped = 0
    live_hist: list[float] = []
    shadow_hist: list[float] = []
    for s in shadows:
        dies += int(s.get("dies") or 0)
        agree += int(s.get("agree") or 0)
        live_fail += int(s.get("live_fail") or 0)
        shadow_fail += int(s.get("shadow_fail") or 0)
        errors += int(s.get("errors") or 0)
        dropped += int(s.get("dropped") or 0)
        for acc, key in ((live_hist, "live_hist"), (shadow_hist, "shadow_hist")):
            h = s.get(key) or []
            if not acc:
                acc.extend(float(x) for x in h)
            elif len(h) == len(acc):
                for i, x in enumerate(h):
                    acc[i] += float(x)
    scored = dies + errors
    enough = scored >= max(1, min_dies)
    few = f"{scored} dies scored by the candidate, {min_dies} needed before any verdict"
    values: dict[str, float | None] = {
        "agreement": agree / scored if enough else None,
        "fail_rate_delta": abs(shadow_fail - live_fail) / dies if enough and dies else None,
        "score_psi": psi(_decision_region(live_hist), _decision_region(shadow_hist))
        if enough else None,
    }
    missing = dict.fromkeys(values, few)
    if enough:
        missing["score_psi"] = "no score histograms reported"
    evidence = {"shadow_devices": len(shadows), "dies": dies, "agree": agree,
                "live_fail": live_fail, "shadow_fail": shadow_fail, "shadow_errors": errors,
                "dropped": dropped}
    return Verdict.of(_judge(gates, values, missing), evidence)


def evaluate_prometheus(gates: Sequence[PromGate], client: PrometheusClient | None,
                        substitutions: Mapping[str, str] | None = None) -> Verdict:
    """Run each PromQL gate once. An unreachable server or an API error fails the gate (with the
    reason); an empty result or NaN is inconclusive; otherwise every series must hold."""
    results: list[GateResult] = []
    for g in gates:
        query = g.query
        for k, v in (substitutions or {}).items():
            query = query.replace("{{" + k + "}}", v)
        if client is None:
            results.append(GateResult(str(g), FAIL, None, "no --prometheus URL given"))
            continue
        try:
            values = client.query(query)
        except PrometheusError as e:
            results.append(GateResult(str(g), FAIL, None, str(e)))
            continue
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            results.append(GateResult(str(g), INCONCLUSIVE, None,
                                      "empty result" if not values else "NaN"))
            continue
        worst = next((v for v in finite if not g.holds(v)), None)
        if worst is not None:
            results.append(GateResult(str(g), FAIL, worst, f"threshold {g.op} {g.threshold:g}"))
        else:
            shown = max(finite) if g.op in ("<=", "<") else min(finite)
            results.append(GateResult(str(g), PASS, shown))
    return Verdict.of(results, {})


DEFAULT_BAKE_GATES = (
    Gate("error_rate", "<=", 0.01), Gate("fallback_rate", "<=", 0.01),
    Gate("fail_rate_delta", "<=", 0.05), Gate("unhealthy", "<=", 0),
)
DEFAULT_SHADOW_GATES = (
    Gate("agreement", ">=", 0.98), Gate("fail_rate_delta", "<=", 0.02),
    Gate("score_psi", "<=", 0.25),
)


def with_defaults(explicit: Sequence[Gate], defaults: Sequence[Gate]) -> tuple[Gate, ...]:
    """The defaults for every metric no explicit gate names, then the explicit gates."""
    named = {g.metric for g in explicit}
    return tuple([*(g for g in defaults if g.metric not in named), *explicit])
