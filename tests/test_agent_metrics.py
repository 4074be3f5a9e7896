"""Metrics scraped over HTTP from a running agent: names, labels, counts that match the traffic
sent, histograms that resolve tens of microseconds, model info, probes, one registry per agent."""

from __future__ import annotations

import hashlib
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.client import Client
from tests.agent_support import build_model, make_keys, running_agent

N = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=N)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics, parsed as Prometheus does."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_count_the_traffic_sent(model):
    x = model.train[:10].copy()
    x[0, 1] = 60.0  # a fail
    x[1, 2] = np.nan  # one imputed value
    with running_agent(model) as agent, Client(agent.path) as c:
        for row in x[:4]:
            c.predict(row)  # 4 binary single rows
        c.predict_batch(x[4:])  # 1 binary request, 6 rows
        c.predict_json(x[0])  # 1 JSON request
        c.request_raw(b"{not json\n")
        c.request({"params": [1.0]})
        m = scrape(agent.http.url)
    assert get(m, "edgefleet_predictions_total", decision="fail", source="model") == 2
    assert get(m, "edgefleet_predictions_total", decision="pass", source="model") == 9
    assert get(m, "edgefleet_predictions_total", decision="pass", source="fallback") == 0
    assert get(m, "edgefleet_errors_total", code="bad_json") == 1
    assert get(m, "edgefleet_errors_total", code="bad_width") == 1
    assert get(m, "edgefleet_imputed_values_total") == 1
    assert get(m, "edgefleet_request_duration_seconds_count", encoding="binary") == 5
    assert get(m, "edgefleet_request_duration_seconds_count", encoding="json") == 1
    assert get(m, "edgefleet_inference_duration_seconds_count") == 6
    assert get(m, "edgefleet_anomaly_score_count") == 11
    assert get(m, "edgefleet_anomaly_score_sum") > 0
    assert get(m, "edgefleet_connections_total") == 1
    assert get(m, "edgefleet_fallback_active") == 0 and get(m, "edgefleet_ready") == 1
    assert get(m, "edgefleet_uptime_seconds") > 0


def test_latency_buckets_resolve_tens_of_microseconds(model):
    with running_agent(model) as agent, Client(agent.path) as c:
        for _ in range(20):
            c.predict(model.train[0])
        m = scrape(agent.http.url)
    bounds = sorted(float(dict(k[1])["le"]) for k in m
                    if k[0] == "edgefleet_request_duration_seconds_bucket"
                    and dict(k[1])["encoding"] == "binary")
    assert bounds[:5] == [1e-05, 2e-05, 3e-05, 4e-05, 5e-05] and bounds[-1] == float("inf")
    counts = [get(m, "edgefleet_request_duration_seconds_bucket", encoding="binary",
                  le=_le(b)) for b in bounds]
    assert counts == sorted(counts) and counts[-1] == 20  # cumulative
    assert counts[bounds.index(1.0)] == 20  # cumulative up to the last finite bucket


def _le(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(b)


def test_model_info_names_the_served_model(model):
    with running_agent(model) as agent:
        m = scrape(agent.http.url)
    info = [dict(k[1]) for k in m if k[0] == "edgefleet_model_info"]
    # One digest everywhere: the bundle's sha256 (what `fleet devices`, rollouts and gates
    # name); the ONNX file's own digest under its own label.
    bundle_sha256 = hashlib.sha256(model.bundle.read_bytes()).hexdigest()
    assert info == [{"name": "robust-z", "version": "1.0.0", "sequence": "1",
                     "digest": bundle_sha256, "model_sha256": model.manifest.model_digest}]
    assert bundle_sha256 != model.manifest.model_digest
    assert get(m, "edgefleet_model_swaps_total") == 1



def test_every_label_value_is_bounded(model):
    with running_agent(model) as agent, Client(agent.path) as c:
        c.predict_batch(np.repeat(model.train[:1], 300, axis=0))
        m = scrape(agent.http.url)
    labels: dict[str, set] = {}
    for name, lab in m:
        for k, v in lab:
            labels.setdefault(f"{name}:{k}", set()).add(v)
    for key, values in labels.items():
        assert len(values) <= 25, key  # no label grows with traffic (le has 22 values)


def test_probes_answer_on_the_metrics_port(model):
    with running_agent(model) as agent:
        for path, body in (("/healthz", b"ok\n"), ("/readyz", b"ready (model)\n")):
            r = urllib.request.urlopen(agent.http.url + path, timeout=5)
            assert r.status == 200 and r.read() == body


def test_each_agent_has_its_own_registry(model):
    with running_agent(model) as a, running_agent(model) as b:
        with Client(a.path) as c:
            c.predict(model.train[0])
        ma, mb = scrape(a.http.url), scrape(b.http.url)
    assert get(ma, "edgefleet_predictions_total", decision="pass", source="model") == 1
    assert get(mb, "edgefleet_predictions_total", decision="pass", source="model") == 0


@pytest.mark.parametrize("shipped, exported", [(None, 0.25), (0.7, 0.7)])
def test_drift_alert_threshold_is_the_bundles(tmp_path, shipped, exported):
    from agent.drift import drift_reference
    from tests.agent_support import training_rows

    ref = drift_reference(training_rows(N))
    if shipped is not None:
        ref["alert_psi"] = shipped
    m = build_model(tmp_path, *make_keys(tmp_path), n_features=N, drift_reference=ref)
    with running_agent(m, drift_interval_s=0.0) as agent, Client(agent.path) as c:
        c.predict_batch(m.train[:300])  # over the drift monitor's 200 rows
        got = scrape(agent.http.url)
    assert get(got, "edgefleet_drift_psi_alert") == exported
    assert get(got, "edgefleet_drift_psi_max") >= 0
