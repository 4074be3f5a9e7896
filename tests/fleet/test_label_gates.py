"""Label gates (fleet/label_gates.py): realized false-fail and recall, inconclusive below the
minimum evidence, counts read from a Prometheus vector."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.gates import parse_gate
from fleet.label_gates import (
    LABEL_METRICS,
    LabelCounts,
    evaluate_labels,
    label_counts_query,
)

GATES = [parse_gate("false_fail_rate<=0.02", LABEL_METRICS), parse_gate("recall>=0.5",
                                                                          LABEL_METRICS)]


def test_the_secom_failure_fails_both_gates_once_enough_labels_exist():
    """The model that failed 4% of good dies and caught none of 26 fails."""
    counts = LabelCounts(true_pass=960, false_fail=40, true_fail=0, missed_fail=26)
    v = evaluate_labels(GATES, counts)
    assert v.verdict == "fail"
    assert [r.verdict for r in v.results] == ["fail", "fail"]
    assert math.isclose(v.results[0].value, 0.04) and v.results[1].value == 0.0


def test_too_few_labels_is_inconclusive_never_a_pass():
    counts = LabelCounts(true_pass=150, false_fail=0, true_fail=19, missed_fail=0)
    v = evaluate_labels(GATES, counts)
    assert v.verdict == "inconclusive"
    assert "150 labelled good dies, 200 needed" in v.explain()
    assert "19 labelled bad dies, 20 needed" in v.explain()


def test_a_good_model_passes():
    v = evaluate_labels(GATES, LabelCounts(990, 10, 30, 5))
    assert v.verdict == "pass" and v.evidence["labels"]["false_fail"] == 10


def test_counts_from_a_prometheus_vector():
    result = [{"metric": {"predicted": "fail", "actual": "pass"}, "value": [0, "3.0000001"]},
              {"metric": {"predicted": "pass", "actual": "pass"}, "value": [0, "97"]},
              {"metric": {"predicted": "pass", "actual": "fail"}, "value": [0, "NaN"]}]
    assert LabelCounts.from_prometheus(result) == LabelCounts(97, 3, 0, 0)
    q = label_counts_query("ab12", "7d", 'site="fab1"')
    assert q == ('sum by (predicted, actual) (increase(edgefleet_label_joins_total'
                 '{digest="ab12",site="fab1"}[7d]))')


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**4), st.integers(0, 10**4))
def test_a_pass_always_rests_on_enough_labels(tp, ff, tf, mf):
    counts = LabelCounts(tp, ff, tf, mf)
    v = evaluate_labels(GATES, counts, min_good=100, min_bad=10)
    for r in v.results:
        if r.verdict != "inconclusive":
            assert (counts.good if "false_fail" in r.gate else counts.bad) >= (
                100 if "false_fail" in r.gate else 10)
