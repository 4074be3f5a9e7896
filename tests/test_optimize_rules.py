"""The fallback rules (optimize/rules.py): spec limits when given, else PAT limits whose union
holds a false-fail budget on the later validation period, every signal left out with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import UsageError
from optimize.data import ParamSpec
from optimize.rules import RulesConfig, fallback_rules, rule_report, rule_violations


def test_rules_come_from_spec_limits_when_given_else_from_robust_bounds():
    rng = np.random.default_rng(0)
    x = rng.normal(10, 2, size=(500, 3))
    x[:, 2] = 4.0  # constant: no rule
    spec = [ParamSpec("a", "g", "V", 0.0, 20.0), ParamSpec("b", "g", "V", None, 15.0),
            ParamSpec("c", "g", "V", None, None)]
    made = fallback_rules(x, spec)
    assert made.source == "spec"
    assert made.rules == [{"feature": 0, "low": 0.0, "high": 20.0},
                          {"feature": 1, "low": None, "high": 15.0}]
    made = fallback_rules(x, None)
    assert made.source == "pat" and [r["feature"] for r in made.rules] == [0, 1]
    assert made.dropped == {2: "constant"}
    assert all(r["low"] < 10 - 10 and r["high"] > 10 + 10 for r in made.rules)  # >= 6 sigma
    probe = np.array([[10.0, 10.0, 99.0], [30.0, np.nan, 4.0], [np.nan, -50.0, np.nan]])
    assert rule_violations(made.rules, probe).tolist() == [0, 1, 1]


def test_quantized_and_drifted_signals_get_no_rule_and_the_report_says_why():
    """SECOM's f543 failed 76% of later passes: a signal on a few tester steps gets no rule,
    nor one whose median moved between training and validation."""
    rng = np.random.default_rng(1)
    x = rng.normal(10, 2, size=(2000, 4))
    x[:, 1] = np.round(rng.normal(0.008, 0.0004, 2000), 3)  # 0.007 / 0.008 / 0.009 steps
    x[:, 2] = np.where(rng.random(2000) < 0.7, 5.0, rng.normal(5, 1, 2000))  # mostly one value
    val = rng.normal(10, 2, size=(1000, 4))
    val[:, 1], val[:, 2] = 0.009, 5.0
    val[:, 3] += 3.0  # 1.5 sigma: the validation period sits away from training on this one
    made = fallback_rules(x, None, x_val_passes=val, target_ffr=0.01)
    assert [r["feature"] for r in made.rules] == [0]
    assert made.dropped == {1: "quantized", 2: "quantized", 3: "drifted"}
    report = rule_report(made, ["a", "b", "c", "d"], val, val[:10])
    assert report["skipped"] == {"constant": 0, "quantized": 2, "drifted": 1}
    assert report["dropped"]["d"].startswith("median moved from training to validation: 10")
    assert "+1.5 sigma" in report["dropped"]["d"]
    assert "4 distinct values, the most common on 80%" in report["dropped"]["b"]
    assert [r["feature"] for r in report["per_rule"]] == ["a"]


def test_heavy_tailed_signals_get_a_margin_chosen_on_validation_that_holds_the_union():
    """Many heavy-tailed signals (as on SECOM): 6-sigma limits fail a few passes each and most
    passes together; the margin beyond the furthest pass is widened until the training-only
    rules fail at most the budget of the validation passes, and a rule a validation pass
    would have failed is widened to cover it, not dropped."""
    rng = np.random.default_rng(2)
    x, val, later = (rng.standard_t(2, size=(n, 60)) for n in (600, 300, 300))
    six = fallback_rules(x, None, x_val_passes=val, cfg=RulesConfig(margins=(0.0,)))
    assert (rule_violations(six.rules, later) > 0).mean() > 0.1  # 6 sigma alone: 10x target
    made = fallback_rules(x, None, x_val_passes=val, target_ffr=0.01)
    assert len(made.rules) == 60 and not made.dropped
    tried = list(made.holdout.values())
    assert tried[-1] <= 0.01 < tried[0] and made.margin == float(list(made.holdout)[-1])
    assert (rule_violations(made.rules, val) == 0).all()  # refitted on validation too
    assert made.val_fails  # ... so the training-only rules did fail some validation passes
    assert (rule_violations(made.rules, later) > 0).mean() <= 0.02
    report = rule_report(made, [f"f{j}" for j in range(60)], val, later)
    assert report["val_ffr"] == tried[-1] and report["budget"] == 0.01
    assert sum(r["val_fails"] for r in report["per_rule"]) == sum(made.val_fails.values())


def test_the_margins_are_configurable_as_decimals():
    from optimize.pipeline import load_config

    cfg = load_config(env={"EDGEFLEET_OPTIMIZE_RULES_MARGINS": "2,3.5"})
    assert cfg.rules.margins == (2.0, 3.5) and cfg.rules.budget_ratio == 1.0
    with pytest.raises(UsageError, match="MODEL_WIDTHS: expected tuple"):
        load_config(env={"EDGEFLEET_OPTIMIZE_MODEL_WIDTHS": "64,16.5"})  # widths stay whole
