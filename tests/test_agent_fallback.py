"""Rule-based fallback: when there is no model, when the session raises, when the score is not
finite, or when forced; every fallback answer is marked and counted, and entering and leaving
are logged once each."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

import numpy as np
import pytest
from onnx import TensorProto, helper, load_from_string, numpy_helper

from agent.client import Client
from agent.fallback import RulesError, RuleSet
from agent.predictor import Limits
from optimize.baseline import RobustZ, to_onnx
from tests.agent_support import build_model, make_keys, running_agent, training_rows

N = 16


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def model(tmp_path_factory, keys):
    return build_model(tmp_path_factory.mktemp("model"), *keys, n_features=N)


def _rules(tmp_path, low=0.5, high=1.5):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({
        "n_features": N, "top_k": 3, "version": "limits-7",
        "feature_names": [f"p{i:03d}" for i in range(N)],
        "rules": [{"feature": i, "low": low, "high": high} for i in range(N)],
    }))
    return RuleSet.load(path)


def _gauge(url: str, name: str) -> float | None:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _series(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {name}{{{want}}}")


def test_no_model_screens_dies_with_the_rules_file_and_marks_every_answer(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "edgefleet.agent")
    x = training_rows(N)[:3].copy()
    x[1, 4] = 9.0  # above high = 1.5
    x[1, 6] = 0.1  # below low = 0.5, by less
    x[2, 2] = np.nan  # missing never violates a rule
    with running_agent(rules=_rules(tmp_path)) as agent, Client(agent.path) as c:
        rs = c.predict_batch(x).results()
        a = c.request({"id": 1, "params": x[1].tolist()})
        h = c.health()
        agent.runtime.log_state()  # what the agent says at start-up (agent/app.py)
        url = agent.http.url
        assert _gauge(url, "edgefleet_fallback_active") == 1
        assert _series(url, "edgefleet_fallback_answers_total", reason="no_model") == 4
        assert _series(url, "edgefleet_predictions_total", decision="fail",
                       source="fallback") == 2
    assert [r.decision for r in rs] == ["pass", "fail", "pass"]
    assert all(r.source == "fallback" for r in rs) and rs[2].imputed == 1
    assert [i for i, _ in rs[1].top] == [4, 6] and rs[1].score == 2.0
    assert rs[1].top[0][1] == pytest.approx(9.0 - 1.5)
    assert a["source"] == "fallback" and a["model_version"] is None and a["threshold"] == 0.0
    assert a["top"][0]["name"] == "p004" and a["confidence"] == 1.0
    assert h["status"] == "fallback" and h["fallback_reason"] == "no model loaded"
    assert "no model installed: screening with 16 fallback rules (limits-7)" in caplog.text


def test_no_model_and_no_rules_refuses_dies_and_is_not_ready():
    with running_agent() as agent, Client(agent.path) as c:
        a = c.request({"params": [1.0] * N})
        assert a["error"]["code"] == "unavailable"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(agent.http.url + "/readyz", timeout=5)
        assert e.value.code == 503
        assert urllib.request.urlopen(agent.http.url + "/healthz", timeout=5).status == 200
        assert c.health() | {"uptime_s": 0} == {"id": None, "ok": False, "status": "unavailable",
                                                "fallback_reason": "no model loaded",
                                                "model_version": None, "model_sequence": None,
                                                "model_digest": None, "uptime_s": 0}
        info = c.info()  # says the same as health: nothing to describe
        assert info["status"] == "unavailable" and info["ready"] is False
        assert info["n_features"] is None and info["top_k"] is None
        assert info["fallback"]["active"] is False and info["fallback"]["rules"] == 0


def test_installing_a_model_leaves_fallback(tmp_path, model):
    with running_agent(rules=_rules(tmp_path)) as agent, Client(agent.path) as c:
        assert c.predict(model.train[0]).source == "fallback"
        agent.runtime.swap(model.engine(), model.manifest)
        r = c.predict(model.train[0])
        assert r.source == "model" and r.model_version == "1.0.0"
        assert _gauge(agent.http.url, "edgefleet_fallback_active") == 0
        assert c.health()["status"] == "ok"


class FlakyEngine:
    """A real engine that raises like a broken session while `broken` is set."""

    def __init__(self, engine) -> None:
        self.engine, self.manifest, self.broken = engine, engine.manifest, False

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : simulated")

    def predict(self, x):
        self._check()
        return self.engine.predict(x)

    def predict_one(self, x):
        self._check()
        return self.engine.predict_one(x)

    def warm_up(self) -> None:
        self.engine.warm_up()


def test_session_errors_enter_fallback_and_recovery_leaves_it(model, caplog):
    caplog.set_level(logging.WARNING, "edgefleet.agent")
    flaky = FlakyEngine(model.engine())
    with running_agent(limits=Limits(fallback_retry_s=0.0)) as agent, Client(agent.path) as c:
        agent.runtime.swap(flaky, model.manifest)
        assert c.predict(model.train[0]).source == "model"
        flaky.broken = True
        r = c.predict(model.train[0])
        b = c.predict_batch(model.train[:4])
        assert r.source == "fallback" and r.model_version == "1.0.0"
        assert {x.source for x in b.results()} == {"fallback"}
        assert c.health()["fallback_reason"].startswith("model error: RuntimeError")
        assert _gauge(agent.http.url, "edgefleet_fallback_active") == 1
        assert _series(agent.http.url, "edgefleet_fallback_answers_total",
                       reason="model_error") == 5
        flaky.broken = False
        assert c.predict(model.train[0]).source == "model"
        assert c.health()["status"] == "ok"
        assert _gauge(agent.http.url, "edgefleet_fallback_active") == 0
    assert caplog.text.count("entering fallback: model error") == 1
    assert caplog.text.count("leaving fallback: the model answers again") == 1


def test_after_a_session_error_the_model_rests_for_the_retry_interval(model):
    flaky = FlakyEngine(model.engine())
    with running_agent(limits=Limits(fallback_retry_s=3600)) as agent, Client(agent.path) as c:
        agent.runtime.swap(flaky, model.manifest)
        flaky.broken = True
        assert c.predict(model.train[0]).source == "fallback"
        flaky.broken = False
        assert c.predict(model.train[0]).source == "fallback"  # not retried yet


def _gather_model(x: np.ndarray) -> bytes:
    """RobustZ, plus a Gather indexed by the value of parameter 0: any die whose parameter 0
    is 1000 makes ONNX Runtime raise at run time (index out of bounds), like a real bug."""
    m = load_from_string(to_onnx(RobustZ.fit(x), top_k=3))
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(np.zeros(N, np.float32), "table"),
                          numpy_helper.from_array(np.array([0], np.int64), "i0"),
                          numpy_helper.from_array(np.array([1], np.int64), "i1"),
                          numpy_helper.from_array(np.float32(0), "zero")])
    score = next(n for n in g.node if n.output[0] == "score")
    score.output[0] = "score_raw"
    g.node.extend([
        helper.make_node("Slice", ["params", "i0", "i1", "i1"], ["p0"]),
        helper.make_node("Cast", ["p0"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["g"]),
        helper.make_node("ReduceSum", ["g", "i1"], ["gs"], keepdims=0),
        helper.make_node("Mul", ["gs", "zero"], ["g0"]),
        helper.make_node("Add", ["score_raw", "g0"], ["score"]),
    ])
    return m.SerializeToString()


def test_a_model_that_raises_at_run_time_falls_back_for_that_request(tmp_path, keys):
    x = training_rows(N)
    broken = build_model(tmp_path, *keys, n_features=N, onnx_bytes=_gather_model(x))
    with running_agent(broken, limits=Limits(fallback_retry_s=0.0)) as agent, \
            Client(agent.path) as c:
        bad = x[0].copy()
        bad[0] = 1000.0
        r = c.predict(bad)
        assert r.source == "fallback" and r.decision == "fail" and r.top[0][0] == 0
        assert c.predict(x[1]).source == "model"


def test_a_non_finite_score_falls_back_for_that_row_only(tmp_path, keys):
    x = training_rows(N)
    fitted = RobustZ.fit(x)
    scale = fitted.scale.copy()
    scale[0] = 1e-18  # (x - center) * 1e18, squared: inf once parameter 0 is ~1 off center
    model = build_model(tmp_path, *keys, n_features=N,
                        onnx_bytes=to_onnx(RobustZ(fitted.center, scale), top_k=3))
    rows = x[:3].copy()
    rows[0, 0] = fitted.center[0]  # exactly on center: finite score
    rows[1, 0] = fitted.center[0] + 100.0  # overflows to inf
    rows[2, 0] = fitted.center[0]
    with running_agent(model) as agent, Client(agent.path) as c:
        rs = c.predict_batch(rows).results()
        one = c.predict(rows[1])
        assert _series(agent.http.url, "edgefleet_fallback_answers_total",
                       reason="non_finite_score") == 2
        assert c.health()["status"] == "ok"  # the model is fine, one die was not
    assert [r.source for r in rs] == ["model", "fallback", "model"]
    assert rs[1].decision == "fail" and one.source == "fallback"


def test_forced_fallback_keeps_the_model_loaded_until_left(model):
    with running_agent(model) as agent, Client(agent.path) as c:
        agent.runtime.enter_fallback("operator request")
        r = c.predict(model.train[0])
        assert r.source == "fallback" and c.health()["fallback_reason"] == \
            "forced: operator request"
        agent.runtime.leave_fallback()
        assert c.predict(model.train[0]).source == "model"


def test_unloading_the_model_returns_to_the_rules_file(tmp_path, model):
    with running_agent(model, rules=_rules(tmp_path)) as agent, Client(agent.path) as c:
        agent.runtime.unload("removed by test")
        r = c.predict(model.train[0])
        assert r.source == "fallback" and r.model_version is None


@pytest.mark.parametrize(("body", "needle"), [
    ({"rules": []}, "n_features"),
    ({"n_features": 4, "rules": [{"feature": 9, "low": 0, "high": 1}]}, "rules[0].feature"),
    ({"n_features": 4, "rules": [{"feature": 1, "low": 2, "high": 1}]}, "low 2.0 is above high"),
    ({"n_features": 4, "rules": [{"feature": 1, "low": "x"}]}, "rules[0].low"),
])
def test_a_bad_rules_file_is_refused_naming_the_field(tmp_path, body, needle):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(body))
    with pytest.raises(RulesError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        RuleSet.load(path)


def test_a_die_beyond_the_bundles_max_missing_gets_the_rules_when_they_have_enough_values(
        tmp_path, keys):
    """The bundle's learnt max_missing replaces the agent's share; beyond it the rules decide
    when at least `fallback.min_measured` of their parameters are measured, else the die is
    refused. Both the single-die and the batch path."""
    base = build_model(tmp_path, *keys, n_features=N)
    fb = dict(base.manifest.raw["fallback"], min_measured=0.5)
    m = build_model(tmp_path, *keys, n_features=N, input=dict(base.manifest.raw["input"],
                    max_missing=4), fallback=fb)
    x = training_rows(N)[:3].copy()
    x[0, :6] = np.nan  # 10 of 16 measured: rules
    x[0, 8] = 9.0  # and a violation among them
    x[1, :12] = np.nan  # 4 of 16 measured: refused
    x[2, :3] = np.nan  # within max_missing: the model
    with running_agent(m) as agent, Client(agent.path) as c:
        rs = c.predict_batch(x).results()
        one = [c.request({"params": [None if np.isnan(v) else float(v) for v in row]})
               for row in x]
        reason = _series(agent.http.url, "edgefleet_fallback_answers_total",
                         reason="too_many_missing")
    assert (rs[0].source, rs[0].decision, rs[0].imputed) == ("fallback", "fail", 6)
    assert rs[1].decision == "error" and rs[2].source == "model"
    assert one[0]["source"] == "fallback" and one[0]["decision"] == "fail"
    assert one[1]["error"]["code"] == "too_many_missing" and one[2]["source"] == "model"
    assert reason == 2


def test_max_missing_and_min_measured_come_from_the_bundle_or_the_agent_default(tmp_path, keys):
    from agent.fallback import max_missing

    plain = build_model(tmp_path, *keys, n_features=N)
    assert max_missing(plain.manifest, N, 0.2) == 3  # floor(0.2 * 16)
    assert max_missing(None, N, 0.5) == 8
    assert RuleSet.from_manifest(plain.manifest).min_measured is None
    rules = RuleSet(4, [(0, 0.0, 1.0), (2, None, 1.0)], min_measured=0.5)
    x = np.array([[0.5, np.nan, np.nan, np.nan], [np.nan, 1, np.nan, 1]], dtype=np.float32)
    assert rules.enough_measured(x).tolist() == [True, False]  # ruled features: 0 and 2
