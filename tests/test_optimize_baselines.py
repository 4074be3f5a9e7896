"""Judging methods at equal overkill, false-fail per group, and the build gates: pure
functions, millisecond tests."""

from __future__ import annotations

import numpy as np
import pytest

from optimize.baselines import RobustScaler, judge
from optimize.breakdown import band_summary, ffr_by_group, powered_min_passes, wilson
from optimize.gates import GateConfig, gate_reasons, gate_record


def _scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(2000, int), np.ones(100, int)]
    scores = np.r_[rng.normal(0, 1, 2000), rng.normal(2.5, 1, 100)]
    val_pass = rng.normal(0.3, 1, 2000)  # validation sits a little higher: test FFR < target
    return scores, val_pass, labels


def test_judge_sets_the_threshold_on_validation_and_compares_recall_at_equal_test_ffr():
    s, v, y = _scores()
    classes = {"a": y == 1}
    j = judge(s, v, y, classes, 0.01, boot=100)
    assert j.threshold == pytest.approx(np.sort(v)[-21:-19].mean())  # 20 of 2000 above
    assert j.ffr < 0.01 and j.passes_flagged == (round(j.ffr * 2000), 2000)
    r = j.recall["a"]
    assert r["recall_equal_ffr"] > r["recall"]  # the test threshold is lower: more caught
    assert r["ci"][0] <= r["recall"] <= r["ci"][1] and r["n"] == 100
    assert j.auc_ci[0] <= j.auc <= j.auc_ci[1] and j.ffr_ci[0] <= j.ffr <= j.ffr_ci[1]
    assert judge(s, v, None, {}, 0.01).auc is None  # no labels: nothing to judge


def test_robust_scaler_takes_skewed_positive_columns_in_log_space():
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.lognormal(0, 0.8, 5000), rng.normal(5, 1, 5000)])
    s = RobustScaler.fit(x)
    assert s.log.tolist() == [True, False]
    z = s.raw_z(x)
    assert np.percentile(np.abs(z[:, 0]), 99.9) < 5  # near-normal in log space


def test_wilson_interval_and_the_share_of_groups_inside_half_to_twice_the_target():
    assert wilson(0, 100)[0] == 0.0 and 0.03 < wilson(0, 100)[1] < 0.04
    lo, hi = wilson(10, 1000)
    assert lo < 0.01 < hi
    for n in (1, 2, 7, 200, 3838):  # the rate itself always inside (a plot's error bars)
        for k in range(0, n + 1, max(1, n // 50)):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)
    flagged = np.zeros(1100, bool)
    flagged[:3] = True  # lot A: 3 of 500 = 0.6%
    flagged[500:530] = True  # lot B: 30 of 500 = 6%; lot C: 100 passes, below min_passes
    groups = {"lot": np.array(["A"] * 500 + ["B"] * 500 + ["C"] * 100),
              "tester": np.array(["T"] * 1100)}
    got = ffr_by_group(flagged, np.ones(1100, bool), groups, 0.01, min_passes=200)
    assert got["lot"]["groups"]["B"]["ffr"] == 0.06 and got["lot"]["in_band"] == 0.5
    assert got["lot"]["counted"] == 2 and got["lot"]["groups"]["C"]["passes"] == 100
    assert got["tester"]["in_band"] == 0.0  # 3% overall: above 2x
    assert "lot: 1 of 2 inside [0.50%, 2.00%]; highest B 6.00%" in band_summary(got)
    assert got["lot"]["powered"]["counted"] == 0  # 500 passes: too few to judge the band
    assert got["tester"]["powered"] == {"min_passes": powered_min_passes(0.01), "counted": 1,
                                        "in_band": 0.0, "too_small": []}
    assert got["lot"]["powered"]["too_small"] == ["A", "B", "C"]  # listed, not dropped


def test_powered_group_size_is_where_a_group_at_target_is_in_band_95_percent():
    """At 1%, 280 passes are in band only ~71% of the time; from the powered size (~1,060:
    the binomial's lattice dips below 95% again at 820-920 and 1,020-1,040) always >= 95%."""
    from optimize.breakdown import in_band_probability

    n = powered_min_passes(0.01)
    assert 1000 <= n <= 1100
    assert 0.69 < in_band_probability(280, 0.01) < 0.72
    assert in_band_probability(1020, 0.01) < 0.95 <= in_band_probability(800, 0.01)
    rng = np.random.default_rng(0)
    for m in (n, n + 70, 2 * n):
        inside = ((k := rng.binomial(m, 0.01, 20_000)) >= 0.005 * m) & (k <= 0.02 * m)
        assert inside.mean() >= 0.94


def _report(auc=0.9, base_auc=0.8, ffr=0.012, rules_ffr=0.02, psi=0.1, alert=0.3):
    return {
        "baselines": {"best_unsupervised": "pca_t2", "titles": {"pca_t2": "Hotelling T2 on PCA"},
                      "methods": {"model": {"roc_auc": auc}, "pca_t2": {"roc_auc": base_auc}}},
        "models": {"pruned_int8": {"test_ffr": ffr}, "rules": {"test_ffr": rules_ffr}},
        "drift": {"test_psi": psi, "alert_psi": alert, "noise_floor_psi": 0.05},
    }


def test_gates_pass_a_good_build_and_name_every_failed_gate():
    cfg = GateConfig()
    assert gate_reasons(_report(), 0.01, cfg) == []
    reasons = gate_reasons(_report(auc=0.8, ffr=0.021, rules_ffr=0.06, psi=0.31), 0.01, cfg)
    assert len(reasons) == 4
    assert reasons[0].startswith("the model does not beat the best unsupervised baseline "
                                 "(Hotelling T2 on PCA) on test ROC AUC: 0.8000 vs 0.8000")
    assert "test false-fail 2.10% is above 2x the target 1.00%" in reasons[1]
    assert "PSI max 0.310 above the alert threshold 0.300" in reasons[2]
    assert "the fallback rules fail 6.00% of test passes, above 5x" in reasons[3]
    assert gate_record(reasons, cfg) == {"passed": False, "reasons": reasons,
                                         "accepted_risk": None, "signed": False}
    risky = gate_record(reasons, GateConfig(accept_risk="pilot"))
    assert risky["signed"] and risky["accepted_risk"] == "pilot"
    assert gate_record([], GateConfig(accept_risk="pilot"))["accepted_risk"] is None


def test_without_labels_only_the_drift_gate_applies():
    report = _report(ffr=None, rules_ffr=None, psi=0.5)
    report["baselines"] = None
    assert gate_reasons(report, 0.01, GateConfig()) == [
        "the test part drifts from the drift reference: PSI max 0.500 above the alert "
        "threshold 0.300 (noise floor 0.050)"]


def test_the_verdict_says_when_a_few_test_fails_cannot_tell_the_model_from_a_baseline():
    """As on SECOM (6 test fails): a lead whose paired interval includes 0 is called noise."""
    from optimize.baselines import compare
    from optimize.split import Part, Split

    rng = np.random.default_rng(3)

    def part(n: int, fails: int) -> Part:
        x = rng.normal(size=(n, 4))
        x[:fails] += 0.3  # fails barely off the passes
        labels = np.r_[np.ones(fails, int), np.zeros(n - fails, int)]
        return Part(x, np.arange(n), labels, None)

    train, val, test = part(300, 0), part(200, 6), part(200, 6)
    split = Split(train, val, test, True, 0, train)
    out = compare(split, val.x.sum(axis=1), test.x.sum(axis=1), 0.01, boot=100)
    lo, hi = out["auc_diff_ci"][out["best_unsupervised"]]
    assert lo <= 0 <= hi
    assert out["verdict"].endswith("The interval includes 0: on 6 test fails the two cannot be "
                                   "told apart.")


def test_bootstrap_aucs_equal_sklearn_on_every_resample_ties_included(monkeypatch):
    """The vectorised bootstrap AUC is sklearn's roc_auc_score resample by resample (ties
    count half; a resample without both classes is NaN), in memory-bounded chunks too."""
    from sklearn.metrics import roc_auc_score

    import optimize.baselines
    from optimize.baselines import bootstrap_aucs, roc_auc

    rng = np.random.default_rng(3)
    y = (rng.random(120) < 0.1).astype(int)
    s = np.round(rng.normal(size=120) + y, 1)  # many ties
    idx = np.vstack([rng.integers(0, 120, size=(30, 120)), np.zeros((1, 120), int)])
    got = bootstrap_aucs(y, s, idx)
    want = [roc_auc_score(y[i], s[i]) if 0 < y[i].sum() < 120 else np.nan for i in idx]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    monkeypatch.setattr(optimize.baselines, "_BOOT_CELLS", 500)  # 4 resamples a chunk
    np.testing.assert_array_equal(bootstrap_aucs(y, s, idx), got)
