"""The Grafana dashboard (k3s/grafana/), tested the way it can be without a Grafana:

- the committed JSON is what Grafana's own SDK builds (k3s/grafana/build.py, typed builders),
  and the SDK's models read it back;
- the central overlay ships it as the ConfigMap Grafana's sidecar loads;
- every panel's query parses in a real Prometheus, and every agent panel returns series from
  a real agent it scrapes. The rollout panels query the controller's `edgefleet_rollout*`
  series (fleet/controller_metrics.py, the rollout controller's /metrics): parsed here, fed by
  the controller's own test.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tests.conftest import REPO
from tests.prometheus_support import (  # noqa: F401 (fixtures)
    fed_prometheus_fixture,
    prometheus_procs_fixture,
)

GRAFANA = REPO / "k3s" / "grafana"
DASHBOARD = GRAFANA / "edgefleet-dashboard.json"
CONTROLLER = "edgefleet_rollout"

pytestmark = pytest.mark.slow


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with the dashboard's variables as Grafana fills
    them: all sites, a rate window of a few scrapes."""
    out = []
    for p in _dashboard()["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$site", ".*").replace("$__rate_interval", "1m")
            out.append((p["title"], expr))
    return out


def test_the_json_is_what_grafanas_sdk_builds():
    from grafana_foundation_sdk.models.dashboard import Dashboard

    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.build() == _dashboard(), "run: python k3s/grafana/build.py > " + str(DASHBOARD)
    model = Dashboard.from_json(_dashboard())
    assert model.uid == "edgefleet-fleet"
    assert len(model.panels) == len(_dashboard()["panels"]) >= 15


def test_panels_cover_what_an_operator_looks_at():
    d = _dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(set(ids)) == len(ids) and 0 not in ids
    for p in d["panels"]:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(set(refs)) == len(refs) and all(refs), p["title"]
    text = " ".join(q for _, q in _queries())
    for series in ("edgefleet_model_info", "edgefleet_rollout_devices",
                   "edgefleet_rollout_gate_passing", "edgefleet_rollout_stage",
                   "edgefleet_rollout_paused", "edgefleet_request_duration_seconds",
                   'source="fallback"', "edgefleet_errors_total", "edgefleet_drift_psi_max"):
        assert series in text, series
    assert [v["name"] for v in d["templating"]["list"]] == ["DS_PROMETHEUS", "site"]


def test_the_central_overlay_ships_the_dashboard():
    overlay = yaml.safe_load((REPO / "k3s/overlays/central/kustomization.yaml").read_text())
    assert "../../grafana" in overlay["resources"]
    kust = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    (gen,) = kust["configMapGenerator"]
    assert gen["files"] == [DASHBOARD.name]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}


def test_every_panel_query_parses_and_agent_panels_return_series(fed_prometheus):
    prom, _ = fed_prometheus
    queries = _queries()
    assert [(t, q, e) for t, q in queries if (e := prom.parse_error(q))] == []
    agent_panels = [(t, q) for t, q in queries if CONTROLLER not in q]
    assert len(agent_panels) >= 10
    assert prom.without_series(agent_panels) == []
