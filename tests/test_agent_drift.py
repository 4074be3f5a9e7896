"""Input drift: PSI of recent inputs against the bundle's training reference stays low on data
like the training data and rises on shifted data, on the monitor and scraped from an agent."""

from __future__ import annotations

import math
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.client import Client
from agent.drift import DriftMonitor, drift_reference, psi
from agent.predictor import Limits
from tests.agent_support import build_model, make_keys, running_agent, training_rows

N = 16


def _monitor(train: np.ndarray, **kw) -> DriftMonitor:
    ref = drift_reference(train)
    return DriftMonitor(tuple(map(tuple, ref["edges"])), tuple(map(tuple, ref["proportions"])),
                        **kw)


def test_psi_is_zero_for_identical_shares_and_grows_with_the_difference():
    q = np.array([[0.25, 0.25, 0.25, 0.25]])
    assert psi(q, q)[0] == 0
    assert 0 < psi(np.array([[0.3, 0.2, 0.25, 0.25]]), q)[0] < psi(
        np.array([[0.7, 0.1, 0.1, 0.1]]), q)[0]


def test_unshifted_inputs_stay_below_the_stable_threshold():
    mon = _monitor(training_rows(N, seed=0), window=2048)
    mon.observe(training_rows(N, rows=2048, seed=1))
    r = mon.report(force=True)
    assert r.rows == 2048 and r.psi_max < 0.1


def test_a_shifted_feature_rises_above_the_shift_threshold_and_ranks_first():
    mon = _monitor(training_rows(N, seed=0), window=2048, top_k=3)
    x = training_rows(N, rows=2048, seed=1)
    x[:, 5] += 0.2  # two standard deviations
    x[:, 9] += 0.05  # half of one
    mon.observe(x)
    r = mon.report(force=True)
    assert r.psi_max > 0.25 and r.worst[0][0] == 5 and r.worst[1][0] == 9
    assert len(r.worst) == 3 and r.worst[0][1] == r.psi_max


def test_the_window_keeps_only_recent_rows():
    mon = _monitor(training_rows(N, seed=0), window=512)
    shifted = training_rows(N, rows=512, seed=2)
    shifted[:, 0] += 1.0
    mon.observe(shifted)
    for row in training_rows(N, rows=512, seed=3):  # the per-request path, one row at a time
        mon.observe(row.reshape(1, -1))
    assert mon.report(force=True).psi_max < 0.1


def test_too_few_rows_report_nothing():
    mon = _monitor(training_rows(N, seed=0), min_rows=200)
    mon.observe(training_rows(N, rows=50, seed=1))
    r = mon.report(force=True)
    assert r.rows == 50 and math.isnan(r.psi_max) and r.worst == ()


def test_missing_values_are_left_out_not_binned():
    mon = _monitor(training_rows(N, seed=0))
    x = training_rows(N, rows=1000, seed=1)
    x[:600, 4] = np.nan  # most of a feature missing: its shares come from the rest
    mon.observe(x)
    assert mon.report(force=True).psi_max < 0.1


def test_reference_bins_count_edges_at_or_below_a_value():
    x = np.array([[0.0], [1.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    ref = drift_reference(x, bins=2)  # one inner edge: the median, 1.0
    assert ref["edges"] == [[1.0]] and ref["proportions"] == [[0.2, 0.8]]


def _scrape(url: str) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=N)


def test_agent_exports_drift_low_on_unshifted_and_high_on_shifted_traffic(model):
    limits = Limits(drift_interval_s=0.0, drift_window=1024, drift_top_k=3)
    with running_agent(model, limits=limits) as agent, Client(agent.path) as c:
        for i in range(0, 1024, 256):
            c.predict_batch(training_rows(N, rows=256, seed=10 + i))
        low = _scrape(agent.http.url)
        shifted = training_rows(N, rows=1024, seed=99)
        shifted[:, 3] += 0.3
        for row in shifted:  # one die per request, as a tester sends them
            c.predict(row)
        high = _scrape(agent.http.url)
    assert low[("edgefleet_drift_psi_max", ())] < 0.1
    assert low[("edgefleet_drift_window_rows", ())] == 1024
    assert high[("edgefleet_drift_psi_max", ())] > 0.25
    worst = sorted((dict(k[1])["rank"], dict(k[1])["feature"], v) for k, v in high.items()
                   if k[0] == "edgefleet_drift_feature_psi")
    assert worst[0][:2] == ("1", "p003") and len(worst) == 3
    assert worst[0][2] == high[("edgefleet_drift_psi_max", ())]



def test_the_alarm_uses_the_bundles_threshold_and_defaults_to_a_quarter():
    from agent.drift import DEFAULT_ALERT_PSI, alert_threshold

    assert alert_threshold({"alert_psi": 0.4}) == 0.4
    assert alert_threshold({}) == alert_threshold(None) == DEFAULT_ALERT_PSI == 0.25
    assert alert_threshold({"alert_psi": -1}) == alert_threshold({"alert_psi": True}) == 0.25
    rng = np.random.default_rng(5)
    mon = _monitor(rng.normal(size=(4000, 4)).astype(np.float32), min_rows=100,
                   alert_psi=0.05)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    x[:, 1] += 0.5
    mon.observe(x)
    r = mon.report(force=True)
    assert r.alert_psi == 0.05 and r.alerting
    assert not DriftMonitor((), ()).report(force=True).alerting  # no rows: NaN, no alarm


@pytest.mark.parametrize("drift", [False, True])
def test_on_floor_data_the_shipped_alarm_is_quiet_in_distribution_and_fires_on_drift(drift):
    """The build's reference (recent passes) and alert (from the noise floor), then the agent's
    own monitor on the later dies of the same run: quiet without --drift, firing with it."""
    from optimize.calibrate import CalibrateConfig, drift_with_noise_floor
    from optimize.floor import FloorConfig, generate_floor

    d = generate_floor(FloorConfig(n_dies=16_000, n_params=32, seed=11, drift=drift))
    ok = d.labels == 0
    early, late = d.X[:8000][ok[:8000]], d.X[-2048:]
    ref = drift_with_noise_floor(early, CalibrateConfig(drift_pool=6000))
    mon = DriftMonitor(tuple(map(tuple, ref["edges"])), tuple(map(tuple, ref["proportions"])),
                       alert_psi=ref["alert_psi"])
    mon.observe(late.astype(np.float32))
    r = mon.report(force=True)
    assert r.alerting is drift, (r.psi_max, ref["alert_psi"], ref["noise_floor_psi"])


def test_agent_exports_the_bundles_alert_threshold_next_to_the_psi(tmp_path):
    from agent.drift import drift_reference as ref_of

    x = training_rows(N)
    m = build_model(tmp_path, *make_keys(tmp_path), n_features=N,
                    drift_reference={**ref_of(x), "alert_psi": 0.33})
    limits = Limits(drift_interval_s=0.0, drift_window=512, drift_top_k=3)
    with running_agent(m, limits=limits) as agent, Client(agent.path) as c:
        c.predict_batch(training_rows(N, rows=512, seed=3))
        got = _scrape(agent.http.url)
    assert got[("edgefleet_drift_psi_alert", ())] == 0.33


def test_features_with_fewer_edges_are_padded_so_their_extra_bins_stay_empty():
    """Features have as many edges as their quantiles were distinct (a constant column has
    none): each row is its own values then padding, in the features' order."""
    mon = DriftMonitor(((1.0, 2.0, 3.0), (), (5.0,)),
                       ((0.1, 0.2, 0.3, 0.4), (1.0,), (0.5, 0.5)), min_rows=1)
    inf = np.inf
    assert mon._edges.tolist() == [[1, 2, 3], [inf, inf, inf], [5, inf, inf]]
    assert mon._ref.tolist() == [[0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0], [0.5, 0.5, 0, 0]]
    mon.observe(np.array([[2.5, 7.0, 6.0]], dtype=np.float32))
    assert mon.report(force=True).rows == 1
    with pytest.raises(ValueError):
        DriftMonitor(((1.0,), (2.0,)), ((0.5, 0.5),))
