"""Rollout gates: parsing, contradictions, the evidence rules (too little is inconclusive,
never a pass), shadow comparisons, and PromQL gates against a real Prometheus."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import UsageError
from fleet import gates as G
from fleet.prometheus import PrometheusClient, PrometheusError
from tests.agent_support import wait_for
from tests.broker_fixtures import free_port

pytestmark = pytest.mark.timeout(60)


def _s(requests=1000, errors=0, fallback=0, p99=1.0, fail=0.03, psi=0.01, health="ok"):
    return {"requests": requests, "errors": errors, "fallback": fallback, "p99_ms": p99,
            "fail_rate": fail, "max_psi": psi, "_health": health}


def test_gate_parsing_names_what_is_wrong():
    assert G.parse_gate("error_rate<=0.01", G.BAKE_METRICS) == G.Gate("error_rate", "<=", 0.01)
    assert str(G.parse_gate(" p99_ms < 5 ", G.BAKE_METRICS)) == "p99_ms<5"
    with pytest.raises(UsageError, match="unknown metric 'latency'"):
        G.parse_gate("latency<=3", G.BAKE_METRICS)
    with pytest.raises(UsageError, match="expected METRIC OP NUMBER"):
        G.parse_gate("error_rate=0.01", G.BAKE_METRICS)
    g = G.parse_prom_gate('sum(rate(x{a="b"}[1m])) > 0 <= 0.5')
    assert g.query == 'sum(rate(x{a="b"}[1m])) > 0' and g.op == "<=" and g.threshold == 0.5


@pytest.mark.parametrize("gates", [
    ["error_rate<=0.01", "error_rate>=0.05"],
    ["error_rate>1.5"],
    ["fail_rate_delta<0"],
    ["p99_ms<2", "p99_ms>2"],
    ["unhealthy<0"],
])
def test_contradictory_gates_are_refused(gates):
    parsed = [G.parse_gate(t, G.BAKE_METRICS) for t in gates]
    with pytest.raises(UsageError, match="contradictory gates"):
        G.check_consistent(parsed, G.BAKE_METRICS)


def test_consistent_gates_pass_the_check():
    G.check_consistent([G.parse_gate(t, G.BAKE_METRICS) for t in
                        ("error_rate<=0.01", "error_rate>=0", "p99_ms<=2", "p99_ms>=2",
                         "unhealthy<=0")], G.BAKE_METRICS)


_op = st.sampled_from(["<=", "<", ">=", ">"])
_thr = st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0])


@given(st.lists(st.tuples(_op, _thr), min_size=1, max_size=4))
def test_contradiction_check_agrees_with_brute_force(bounds):
    gates = [G.Gate("error_rate", op, t) for op, t in bounds]
    candidates = [x / 8 for x in range(-16, 25)] + [0.0, 1.0]
    feasible = any(0 <= v <= 1 and all(g.holds(v) for g in gates) for v in candidates)
    try:
        G.check_consistent(gates, G.BAKE_METRICS)
        consistent = True
    except UsageError:
        consistent = False
    assert consistent == feasible


def test_bake_gates_pass_fail_and_need_evidence():
    gates = [G.parse_gate(t, G.BAKE_METRICS) for t in
             ("error_rate<=0.01", "fail_rate_delta<=0.05", "p99_ms<=5", "unhealthy<=0")]
    ok = G.evaluate_bake(gates, [_s(), _s()], [_s(fail=0.04)], min_requests=100)
    assert ok.verdict == "pass", ok.explain()
    bad = G.evaluate_bake(gates, [_s(fail=0.3)], [_s(fail=0.03)], min_requests=100)
    assert bad.verdict == "fail" and "fail_rate_delta" in bad.explain()
    assert G.evaluate_bake(gates, [_s(errors=50)], [_s()], min_requests=100).verdict == "fail"
    sick = G.evaluate_bake(gates, [_s(health="fallback")], [_s()], min_requests=100)
    assert sick.verdict == "fail" and "unhealthy" in sick.explain()
    few = G.evaluate_bake(gates, [_s(requests=10)], [_s()], min_requests=100)
    assert few.verdict == "inconclusive"
    assert "10 requests on the new model, 100 needed" in few.explain()


def test_fail_rate_is_compared_with_the_baseline_when_no_old_device_is_left():
    gates = [G.Gate("fail_rate_delta", "<=", 0.05)]
    v = G.evaluate_bake(gates, [_s(fail=0.2)], [], min_requests=1, baseline=[_s(fail=0.03)])
    assert v.verdict == "fail"
    assert v.evidence["fail_rate_reference"] == "the same devices before the rollout"
    assert G.evaluate_bake(gates, [_s()], [], min_requests=1).verdict == "inconclusive"


def _shadow(dies, agree, lf, sf, hist_l=None, hist_s=None, errors=0):
    n = 14
    return {"dies": dies, "agree": agree, "live_fail": lf, "shadow_fail": sf, "errors": errors,
            "live_hist": hist_l or [dies // n] * n, "shadow_hist": hist_s or [dies // n] * n}


def test_shadow_gates_need_min_dies_and_compare_decisions():
    gates = list(G.DEFAULT_SHADOW_GATES)
    few = G.evaluate_shadow(gates, [_shadow(100, 100, 3, 3)], min_dies=1000)
    assert few.verdict == "inconclusive"
    assert "100 dies scored by the candidate, 1000 needed" in few.explain()
    good = G.evaluate_shadow(gates, [_shadow(700, 695, 21, 20), _shadow(700, 694, 20, 22)],
                             min_dies=1000)
    assert good.verdict == "pass", good.explain()
    assert good.evidence["dies"] == 1400
    bad = G.evaluate_shadow(gates, [_shadow(1400, 1100, 40, 320,
                                            hist_s=[0] * 7 + [200] * 7)], min_dies=1000)
    # a retrained model that scores the bulk of good dies differently (but decides alike)
    # does not move score_psi: only the region near and above the boundary counts
    shifted = [0, 400, 900] + [100, 0, 0, 0] + [0] * 7
    same = [0, 0, 1300] + [100, 0, 0, 0] + [0] * 7
    assert G.evaluate_shadow([G.Gate("score_psi", "<=", 0.25)],
                             [_shadow(1400, 1400, 0, 0, hist_l=same, hist_s=shifted)],
                             min_dies=1000).verdict == "pass"
    assert bad.verdict == "fail"
    assert {r.gate.split("<")[0].split(">")[0] for r in bad.results if r.verdict == "fail"} \
        == {"agreement", "fail_rate_delta", "score_psi"}
    # candidate errors count against agreement
    err = G.evaluate_shadow([G.Gate("agreement", ">=", 0.98)],
                            [_shadow(1000, 1000, 0, 0, errors=100)], min_dies=1000)
    assert err.verdict == "fail"


def test_psi_is_zero_for_equal_distributions():
    assert G.psi([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert G.psi([10, 0], [0, 10]) > 1
    assert G.psi([], []) is None


# -- PromQL gates against a real Prometheus ---------------------------------------------------




class _Exporter:
    """A /metrics endpoint whose values the test sets."""

    def __init__(self) -> None:
        self.values = {"gate_error_ratio": 0.002, "gate_p99_seconds": 0.004}
        exporter = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = "".join(f"{k} {v}\n" for k, v in exporter.values.items()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def prometheus(tmp_path: Path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus)", pytrace=False)
    exporter = _Exporter()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: gates\n    static_configs: [{{targets: ['127.0.0.1:{exporter.port}']}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = PrometheusClient(f"http://127.0.0.1:{port}", timeout_s=2)

    def scraped() -> bool:
        try:
            return bool(client.query("gate_error_ratio"))
        except PrometheusError:  # not listening yet
            return False

    wait_for(scraped, 30, interval=0.2, what="prometheus scraping the exporter")
    yield client, exporter
    proc.terminate()
    proc.wait(10)
    exporter.close()


def test_promql_gates_pass_fail_and_report_errors(prometheus):
    client, exporter = prometheus
    gates = [G.parse_prom_gate("max(gate_error_ratio) <= 0.01"),
             G.parse_prom_gate("gate_p99_seconds{job='gates'} < 0.010")]
    v = G.evaluate_prometheus(gates, client)
    assert v.verdict == "pass", v.explain()
    assert v.results[0].value == pytest.approx(0.002)
    exporter.values["gate_error_ratio"] = 0.2
    wait_for(lambda: G.evaluate_prometheus(gates, client).verdict == "fail", 10, interval=0.3,
             what="the gate failing on the scraped 0.2")
    assert G.evaluate_prometheus([G.parse_prom_gate("absent_metric_xyz <= 1")],
                                 client).verdict == "inconclusive"
    syntax = G.evaluate_prometheus([G.parse_prom_gate("sum(rate(x[1m] <= 1")], client)
    assert syntax.verdict == "fail" and "bad_data" in syntax.results[0].reason
    nan = G.evaluate_prometheus([G.parse_prom_gate("0/0 <= 1")], client)
    assert nan.verdict == "inconclusive"
    # templated by the rollout
    t = G.evaluate_prometheus([G.parse_prom_gate("count(gate_error_ratio) + 0*{{x}} <= 1")],
                              client, {"x": "1"})
    assert t.verdict == "pass", t.explain()


def test_a_prometheus_that_does_not_answer_fails_the_gate_with_the_reason():
    dead = PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout_s=1)
    v = G.evaluate_prometheus([G.parse_prom_gate("up <= 1")], dead)
    assert v.verdict == "fail"
    assert "does not answer" in v.results[0].reason
    with pytest.raises(PrometheusError, match="does not answer"):
        dead.check()
    assert math.isnan(float("nan"))


def test_the_shadow_margin_buckets_are_the_agents():
    """fleet/gates.py keeps its own copy (the controller does not load the agent's ONNX
    Runtime side for it): it must be the one devices count in."""
    from agent.shadow import MARGIN_EDGES

    assert G.MARGIN_EDGES == MARGIN_EDGES
