"""Label gates (fleet/label_gates.py): realized false-fail and recall, inconclusive below the
minimum evidence, counts read from a Prometheus vector; how a rollout plan takes them (flags,
plan JSON, declarative spec). The counts read from a real Prometheus are checked in
tests/test_label_promql.py; a rollout gated on them through the controller in
tests/test_demo_retrain.py."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import UsageError
from fleet.apply import spec_plan
from fleet.gates import parse_gate
from fleet.label_gates import (
    LABEL_METRICS,
    LabelCounts,
    evaluate_label_gates,
    evaluate_labels,
    label_counts_query,
)
from fleet.plan import Plan
from fleet.prometheus import PrometheusClient
from tests.broker_fixtures import free_port

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


def test_an_unreachable_prometheus_fails_label_gates_with_the_reason():
    """Nothing listens on the port: a failed gate naming why, never a pass or a silent skip."""
    client = PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    v = evaluate_label_gates(GATES, client, "ab12", window_s=3600)
    assert v.verdict == "fail" and "does not answer" in v.explain()
    v = evaluate_label_gates(GATES, None, "ab12", window_s=3600)
    assert v.verdict == "fail" and "no --prometheus URL" in v.explain()
    assert evaluate_label_gates((), None, "ab12", window_s=3600).verdict == "pass"


def test_a_plan_takes_label_gates_and_refuses_bad_ones():
    plan = Plan(label_gates=("false_fail_rate<=0.02", "recall>=0.5"),
                prometheus="http://prom:9090", label_window_s=7 * 86400).validate()
    assert [str(g) for g in plan.label_gate_list] == ["false_fail_rate<=0.02", "recall>=0.5"]
    assert Plan.from_json(plan.to_json()) == plan
    for kw, message in [
        ({"label_gates": ("false_fail_rate<=0.02",)}, "need --prometheus"),
        ({"label_gates": ("p99_ms<=3",), "prometheus": "http://p:1"}, "unknown metric"),
        ({"label_gates": ("recall>=1.5",), "prometheus": "http://p:1"}, "can never pass"),
        ({"label_min_good": 0}, "--label-min-good 0"),
        ({"label_window_s": 0}, "--label-window"),
    ]:
        with pytest.raises(UsageError, match=message):
            Plan(**kw).validate()


def test_a_declared_rollout_takes_label_gates():
    _, plan = spec_plan({"bundle": "sha256:ab", "prometheus": "http://prom:9090",
                         "labelGates": {"gates": ["false_fail_rate<=0.03"], "window": "7d",
                                        "minGood": 500, "minBad": 30}}, "rollout.yaml")
    assert (plan.label_gates, plan.label_window_s, plan.label_min_good,
            plan.label_min_bad) == (("false_fail_rate<=0.03",), 7 * 86400.0, 500, 30)
