"""Label gates: judge a model by what its dies turned out to be (final-test labels joined on the
devices, agent/labels.py), not only against the model it replaces (which can be just as wrong).

Evidence is the counter `edgefleet_label_joins_total{digest, predicted, actual}`, summed over
the devices and window a rollout cares about (`label_counts_query` gives the PromQL), as four
counts:

                      actual pass      actual fail
    predicted pass    true_pass        missed_fail
    predicted fail    false_fail       true_fail

Metrics a gate can name (`parse_gate(text, LABEL_METRICS)` from fleet/gates.py, e.g.
`false_fail_rate<=0.02`, `recall>=0.5`):

    false_fail_rate   false_fail / (true_pass + false_fail): good dies the model failed
    recall            true_fail / (true_fail + missed_fail): bad dies the model caught

Evidence rules: a rate over fewer than `min_good` labelled good dies (false-fail rate) or
`min_bad` labelled bad dies (recall) is *inconclusive*, never a pass; fails are rare, so recall
needs its own, smaller minimum. The verdict of a set: any fail -> fail, else any inconclusive ->
inconclusive, else pass (fleet.gates.Verdict). `evaluate_labels` is pure;
`evaluate_label_gates` reads the counts from Prometheus first, as the rollout driver does at
every measurement of a bake (fleet/driver.py; `--label-gate`, docs/rollouts.md "Label gates").
A Prometheus that does not answer fails the gates, with the reason (as for PromQL gates).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.gates import FAIL, INCONCLUSIVE, PASS, Gate, GateResult, Verdict
from fleet.prometheus import PrometheusClient, PrometheusError

LABEL_METRICS: dict[str, tuple[float, float]] = {
    "false_fail_rate": (0.0, 1.0),
    "recall": (0.0, 1.0),
}
DEFAULT_MIN_GOOD = 200
DEFAULT_MIN_BAD = 20

__all__ = ["LABEL_METRICS", "LabelCounts", "evaluate_label_gates", "evaluate_labels",
           "label_counts_query", "window_text"]


@dataclass(frozen=True)
class LabelCounts:
    true_pass: int = 0
    false_fail: int = 0
    true_fail: int = 0
    missed_fail: int = 0

    @property
    def good(self) -> int:
        return self.true_pass + self.false_fail

    @property
    def bad(self) -> int:
        return self.true_fail + self.missed_fail

    @property
    def false_fail_rate(self) -> float:
        return self.false_fail / self.good if self.good else math.nan

    @property
    def recall(self) -> float:
        return self.true_fail / self.bad if self.bad else math.nan

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str, float]]) -> LabelCounts:
        """From (predicted, actual, count) rows, e.g. the series of `label_counts_query`."""
        cells = {("pass", "pass"): 0, ("fail", "pass"): 0, ("fail", "fail"): 0,
                 ("pass", "fail"): 0}
        for predicted, actual, n in pairs:
            if (predicted, actual) in cells and math.isfinite(n):
                cells[(predicted, actual)] += round(n)
        return cls(cells[("pass", "pass")], cells[("fail", "pass")], cells[("fail", "fail")],
                   cells[("pass", "fail")])

    @classmethod
    def from_prometheus(cls, result: Iterable[Mapping[str, Any]]) -> LabelCounts:
        """From a Prometheus instant-vector result (`[{"metric": {...}, "value": [t, "n"]}]`)."""
        return cls.from_pairs((r["metric"].get("predicted", ""), r["metric"].get("actual", ""),
                               float(r["value"][1])) for r in result)

    def to_json(self) -> dict[str, Any]:
        return {"true_pass": self.true_pass, "false_fail": self.false_fail,
                "true_fail": self.true_fail, "missed_fail": self.missed_fail}


def window_text(seconds: float) -> str:
    """A PromQL range for `seconds` (whole seconds, at least 1): `86400s`."""
    return f"{max(1, round(seconds))}s"


def label_counts_query(digest: str, window: str = "1d", selector: str = "") -> str:
    """PromQL for a model's label counts over `window`; `selector` adds label matchers (e.g.
    `site="fab1"`). Labels arrive late: the window must reach back past the dies' test time."""
    extra = f",{selector}" if selector else ""
    return (f'sum by (predicted, actual) (increase(edgefleet_label_joins_total'
            f'{{digest="{digest}"{extra}}}[{window}]))')


def evaluate_labels(gates: Iterable[Gate], counts: LabelCounts, *,
                    min_good: int = DEFAULT_MIN_GOOD, min_bad: int = DEFAULT_MIN_BAD) -> Verdict:
    """Judge `gates` (on LABEL_METRICS) against realized label counts."""
    enough = {"false_fail_rate": (counts.good, min_good, "good"),
              "recall": (counts.bad, min_bad, "bad")}
    results = []
    for g in gates:
        if g.metric not in enough:
            results.append(GateResult(str(g), INCONCLUSIVE, None,
                                      f"unknown label metric {g.metric!r}"))
            continue
        have, need, kind = enough[g.metric]
        if have < need:
            results.append(GateResult(str(g), INCONCLUSIVE, None,
                                      f"{have} labelled {kind} dies, {need} needed"))
            continue
        value = getattr(counts, g.metric)
        if g.holds(value):
            results.append(GateResult(str(g), PASS, value))
        else:
            results.append(GateResult(str(g), FAIL, value, f"threshold {g.op} {g.threshold:g}"))
    return Verdict.of(results, {"labels": counts.to_json(), "min_good": min_good,
                                "min_bad": min_bad})


def evaluate_label_gates(gates: Sequence[Gate], client: PrometheusClient | None, digest: str,
                         *, window_s: float, min_good: int = DEFAULT_MIN_GOOD,
                         min_bad: int = DEFAULT_MIN_BAD) -> Verdict:
    """Read bundle `digest`'s label counts over the last `window_s` from Prometheus and judge
    `gates` on them. No client, or a Prometheus that does not answer: every gate fails, with
    the reason (never a silent pass)."""
    if not gates:
        return Verdict.of([], {})
    query = label_counts_query(digest, window_text(window_s))
    if client is None:
        why = "no --prometheus URL given"
    else:
        try:
            rows = client.series(query)
        except PrometheusError as e:
            why = str(e)
        else:
            counts = LabelCounts.from_pairs((m.get("predicted", ""), m.get("actual", ""), v)
                                            for m, v in rows)
            return evaluate_labels(gates, counts, min_good=min_good, min_bad=min_bad)
    return Verdict.of([GateResult(str(g), FAIL, None, why) for g in gates], {})
