"""Stage 7: the threshold hits the target false-fail rate on validation; confidence follows the
bundle format; the drift reference is valid manifest content for any column (the fallback
rules: tests/test_optimize_rules.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.manifest import parse_manifest
from optimize.calibrate import (
    CalibrateConfig,
    calibrate_threshold,
    confidence,
    drift_reference,
    drift_with_noise_floor,
    learn_max_missing,
    period_psi,
    psi_max,
    window_psi,
)
from tests.conftest import examples, manifest_fields


@settings(max_examples=examples(200), deadline=None)
@given(
    st.lists(st.floats(0, 1e4, allow_nan=False, width=32), min_size=1, max_size=400),
    st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2]),
)
def test_threshold_never_exceeds_the_target_false_fail_rate_on_validation(scores, target):
    s = np.array(scores, dtype=np.float32)
    d = calibrate_threshold(s, target)
    ffr = float(np.mean(s > d.threshold))  # float32 scores as the device compares them
    assert ffr <= target + 1e-12
    assert d.val_ffr == ffr and d.confidence_scale > 0
    if len(set(scores)) == len(scores):  # without ties it is exactly floor(target * n) / n
        assert ffr == np.floor(target * len(s) + 1e-9) / len(s)


def test_threshold_at_one_percent_on_a_realistic_score_distribution():
    s = np.random.default_rng(0).lognormal(0, 0.3, size=4000)
    d = calibrate_threshold(s, 0.01)
    assert d.val_ffr == 0.01
    assert np.quantile(s, 0.985) < d.threshold < np.quantile(s, 0.995)


def test_confidence_is_zero_at_the_threshold_and_grows_away_from_it():
    d = calibrate_threshold(np.linspace(0, 10, 1001), 0.01)
    c = confidence(np.array([d.threshold, d.threshold + d.confidence_scale,
                             d.threshold - 3 * d.confidence_scale, 1e9]), d)
    np.testing.assert_allclose(c, [0.0, 1 - np.exp(-1), 1 - np.exp(-3), 1.0])


def test_drift_reference_is_valid_for_normal_constant_and_never_observed_columns():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(size=300), np.full(300, 3.5), np.full(300, np.nan),
                         rng.integers(0, 3, 300).astype(float), rng.lognormal(0, 2, 300)])
    x[::7, 0] = np.nan
    ref = drift_reference(x, bins=10)
    fields = manifest_fields(n=x.shape[1], drift_reference=ref)
    fields.update(format="edgefleet-bundle", format_version=1, created="2026-01-01T00:00:00Z",
                  signer="0" * 16, files={"model.onnx": {"sha256": "0" * 64, "size": 1}})
    m = parse_manifest(fields)  # the device's own parser accepts it
    edges, props = m.drift_edges, m.drift_proportions
    for e, p in zip(edges, props, strict=True):
        assert len(e) <= 9 and len(p) == len(e) + 1
        assert np.isfinite(e).all() and (np.diff(e) > 0).all()
        assert abs(sum(p) - 1) < 1e-6 and min(p) >= 0
    assert edges[1] == (3.5,) and props[1] == (0.0, 1.0)  # constant: all mass above its value
    assert edges[2] == () and props[2] == (1.0,)  # never observed: one bin
    assert len(edges[0]) == 9 and abs(props[0][0] - 0.1) < 0.02  # deciles hold a tenth each
    assert edges[3] == (0.0, 1.0, 2.0)  # three values: repeated quantiles merge


def test_max_missing_is_learnt_with_a_margin_and_its_histogram_reported():
    x = np.zeros((100, 50))
    x[:10, :8] = np.nan  # the worst pass lacks 8 values
    got = learn_max_missing(x)
    assert got["most_missing_seen"] == 8 and got["max_missing"] == 14  # ceil(8 * 1.5) + 2
    assert got["histogram"] == {"0": 90, "8": 10}
    assert learn_max_missing(np.full((3, 4), np.nan))["max_missing"] == 4  # capped at F


def test_drift_alert_is_set_above_the_in_distribution_noise_floor():
    """Windows of the reference's own period stay under the alert; a shifted period does not."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6000, 8)).astype(np.float32)
    cfg = CalibrateConfig(drift_pool=4096, drift_window=1024)
    ref = drift_with_noise_floor(x, cfg)
    assert 0 < ref["noise_floor_psi"] < 0.05 and ref["lot_to_lot_psi"] < 0.05
    assert ref["alert_psi"] == 0.1  # alert_min
    assert ref["pool"] == 4096 and len(ref["edges"]) == 8
    fresh = rng.normal(size=(2048, 8)).astype(np.float32)
    assert psi_max(ref, fresh) < ref["alert_psi"]
    shifted = fresh + np.float32(0.8)
    assert psi_max(ref, shifted) > 3 * ref["alert_psi"]


def test_dies_with_imputed_values_get_a_stratum_only_when_their_rate_differs():
    """At the common threshold, imputed passes failing near the target share it (one
    stratum: a threshold of its own would rest on a handful of scores); failing at 5x the
    target, they get their own."""
    from optimize.calibrate import imputed_differs

    rng = np.random.default_rng(0)
    scores = rng.random(12_000)
    passes = np.ones(12_000, bool)
    imputed = np.zeros(12_000, bool)
    imputed[:1_500] = True
    threshold = 0.99  # 1% of uniform scores above it
    assert not imputed_differs(scores, passes, imputed, threshold, 0.01)
    scores[:1_500] = np.where(rng.random(1_500) < 0.05, 1.5, scores[:1_500] * 0.98)
    assert imputed_differs(scores, passes, imputed, threshold, 0.01)
    assert not imputed_differs(scores, passes, np.zeros(12_000, bool), threshold, 0.01)


def test_tester_prior_shrinks_hard_when_testers_differ_by_noise_only():
    """Testers whose validation false-fail differs only by binomial noise get a prior near
    the maximum (the device stays near the fixed threshold); testers that really differ get
    one near p(1 - p) / tau^2 (empirical Bayes), never below the minimum."""
    from optimize.calibrate import MIN_PRIOR, tester_prior

    rng = np.random.default_rng(1)
    testers = np.repeat(np.array(["T1", "T2", "T3", "T4"]), 3_000)
    passes = np.ones(12_000, bool)
    same = rng.random(12_000)
    assert tester_prior(same, passes, testers, 0.99) >= 5_000  # noise: tau^2 ~ 0
    rate = np.repeat([0.004, 0.008, 0.012, 0.016], 3_000)  # real spread: sd ~0.005
    apart = np.where(rng.random(12_000) < rate, 1.5, 0.5)
    got = tester_prior(apart, passes, testers, 0.99)
    assert MIN_PRIOR <= got <= 1_000  # ~0.01 * 0.99 / 0.005^2 = 396
    assert tester_prior(same, passes, np.repeat(np.array(["T1"]), 12_000), 0.99) is None
    # testers alike over the whole part, but the process wanders from lot to lot: the lots'
    # spread sets the prior (a tester's ring spans about two lots)
    lots = np.tile(np.repeat(np.array([f"L{i}" for i in range(6)]), 500), 4)
    walk = np.tile(np.repeat([0.004, 0.016, 0.008, 0.014, 0.006, 0.012], 500), 4)
    wander = np.where(rng.random(12_000) < walk, 1.5, 0.5)
    assert tester_prior(wander, passes, testers, 0.99) >= 2_000
    assert MIN_PRIOR <= tester_prior(wander, passes, testers, 0.99, lots) <= 1_000


def test_the_build_ships_the_data_driven_prior_with_a_level_tuned_for_it():
    """calibration_params sets `prior` from the testers' validation spread and tunes the
    level with that prior: replayed on the same dies, the device fails no more validation
    passes than the fixed threshold."""
    from agent.calibration import simulate
    from optimize.calibrate import CalibrateConfig, calibration_params, tester_prior

    rng = np.random.default_rng(2)
    n = 4_000
    testers = np.tile(np.array(["T1", "T2", "T3", "T4"]), n // 4)
    scores = rng.gamma(20.0, 0.05, n)
    passes = np.ones(n, bool)
    x = np.zeros((n, 3))
    threshold = float(np.quantile(scores, 0.99))
    strata = calibration_params(CalibrateConfig(), scores, passes, x, threshold, testers)
    assert strata is not None and strata[1] is None
    p = strata[0]
    assert p.prior == tester_prior(scores, passes, testers, threshold) >= 200
    replay = scores > simulate(p, scores, testers)
    assert replay.mean() <= (scores > np.float32(threshold)).mean() + 1e-12


def test_drift_alert_covers_the_process_own_wander_over_a_test_long_period():
    """A process whose lots random-walk (as the floor generator's factors do) moves further
    over the six lots of a test part than inside the pool's windows: an alert set from the
    pool alone (2x its noise floor and lot-to-lot windows) refuses that normal period. Replayed
    on the history at the test part's length, the period-to-period term keeps it quiet, and a
    period shifted by 1.5 sigma still alarms."""
    rng = np.random.default_rng(6)
    lots, per = 30, 1000
    walk = np.cumsum(rng.normal(0, 0.12, lots))
    x = (walk[np.arange(lots * per) // per][:, None] + rng.normal(size=(lots * per, 8)))
    history, test = x[:24000].astype(np.float32), x[24000:].astype(np.float32)
    ref = drift_with_noise_floor(history, CalibrateConfig(drift_pool=4096, drift_window=1024),
                                 horizon=len(test))
    assert ref["horizon"] == 6000 and ref["period_psi"] is not None
    pool_only = 2 * max(ref["noise_floor_psi"], ref["lot_to_lot_psi"])
    normal = window_psi(ref, test)
    assert pool_only < normal < ref["alert_psi"], (pool_only, normal, ref)
    assert ref["alert_psi"] == pytest.approx(2 * ref["period_psi"], abs=1e-3)
    assert window_psi(ref, test + np.float32(1.5)) > ref["alert_psi"]


def test_period_psi_needs_a_history_longer_than_two_windows_and_the_period():
    x = np.random.default_rng(0).normal(size=(5000, 4)).astype(np.float32)
    got = period_psi(x, 4096, 1024, 1024, CalibrateConfig())  # the pool shrinks to 3976
    assert got is not None and 0 < got < 0.1  # in-distribution: sampling noise only
    assert period_psi(x, 4096, 1024, 3000, CalibrateConfig()) is None  # 2000 left < 2 windows
