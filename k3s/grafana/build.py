"""Build the edgefleet Grafana dashboard with Grafana's own SDK (grafana-foundation-sdk: typed
builders, so every field has the type and place the dashboard schema gives it) and print its
JSON. The committed `edgefleet-dashboard.json` is this script's output; tests regenerate it and
run every panel's query against a real Prometheus (tests/test_grafana_dashboard.py).

    python k3s/grafana/build.py > k3s/grafana/edgefleet-dashboard.json

Rows: the fleet (devices up, by model version: the bundle digest is the one identifier),
rollouts (the controller's `edgefleet_rollout_*` series: state, stage, devices done / failed,
gate verdicts and values, pauses), per device (time per die, p99 per request, fallback and
error shares, input drift against the bundle's threshold). A `site` variable filters the agent
panels; `DS_PROMETHEUS` picks the Prometheus data source.
"""

from __future__ import annotations

import json
import sys

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh

UID = "edgefleet-fleet"
DS = DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
AGENT = 'job=~"edgefleet-agent.*", site=~"$site"'
RATE = "$__rate_interval"


def q(expr: str, legend: str = "", *, instant: bool = False, ref: str = "A"
      ) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DS).ref_id(ref)
    if legend:
        query = query.legend_format(legend)
    if instant:
        query = query.instant().format("table")
    return query


def per_device(expr_sum: str, expr_total: str) -> str:
    return (f"sum by (site, device) ({expr_sum}) / sum by (site, device) ({expr_total})")


def panels() -> list[tuple[str, list]]:
    """(row title, [panel builder, ...]) in order; each row is one 24-unit-wide band."""
    fleet = [
        stat.Panel().title("Devices up").with_target(
            q(f'sum(up{{{AGENT}}})', "up")).datasource(DS),
        stat.Panel().title("Devices down").with_target(
            q(f'count(up{{{AGENT}}} == 0) or vector(0)', "down")).datasource(DS),
        bargauge.Panel().title("Fleet by model version").with_target(
            q(f"count by (name, version, digest) (edgefleet_model_info{{{AGENT}}})",
              "{{name}} {{version}} ({{digest}})")).datasource(DS),
        timeseries.Panel().title("Devices per bundle over time").with_target(
            q(f"count by (version, digest) (edgefleet_model_info{{{AGENT}}})",
              "{{version}} {{digest}}")).datasource(DS),
    ]
    rollouts = [
        stat.Panel().title("Rollouts by state").with_target(
            q("sum by (state) (edgefleet_rollouts)", "{{state}}")).datasource(DS),
        table.Panel().title("Current stage").with_target(
            q("edgefleet_rollout_stage == 1", instant=True)).datasource(DS),
        bargauge.Panel().title("Rollout progress: devices by status").with_target(
            q("sum by (rollout, status) (edgefleet_rollout_devices)",
              "{{rollout}} {{status}}")).datasource(DS),
        timeseries.Panel().title("Time in stage").unit("s").with_target(
            q("edgefleet_rollout_stage_seconds", "{{rollout}}")).datasource(DS),
        table.Panel().title("Gate verdicts (1 pass, 0 fail, -1 inconclusive)").with_target(
            q("edgefleet_rollout_gate_passing", instant=True)).datasource(DS),
        timeseries.Panel().title("Gate values").with_target(
            q("edgefleet_rollout_gate_value", "{{rollout}} {{gate}}")).datasource(DS),
        table.Panel().title("Paused rollouts and why").with_target(
            q("edgefleet_rollout_paused == 1", instant=True)).datasource(DS),
    ]
    devices = [
        timeseries.Panel().title("Server time per die").unit("s").with_target(
            q(per_device(f"rate(edgefleet_request_duration_seconds_sum{{{AGENT}}}[{RATE}])",
                         f"rate(edgefleet_predictions_total{{{AGENT}}}[{RATE}])"),
              "{{device}}")).datasource(DS),
        timeseries.Panel().title("p99 time per request (one die or one batch)").unit("s")
        .with_target(q("histogram_quantile(0.99, sum by (site, device, le) (rate("
                       f"edgefleet_request_duration_seconds_bucket{{{AGENT}}}[{RATE}])))",
                       "{{device}}")).datasource(DS),
        timeseries.Panel().title("Fallback share of dies").unit("percentunit").with_target(
            q(per_device(
                f'rate(edgefleet_predictions_total{{{AGENT}, source="fallback"}}[{RATE}])',
                f"rate(edgefleet_predictions_total{{{AGENT}}}[{RATE}])"),
              "{{device}}")).datasource(DS),
        timeseries.Panel().title("Refused share of requests and rows").unit("percentunit")
        .with_target(q(
            f"sum by (site, device) (rate(edgefleet_errors_total{{{AGENT}}}[{RATE}])) / "
            f"(sum by (site, device) (rate(edgefleet_errors_total{{{AGENT}}}[{RATE}])) + "
            f"sum by (site, device) (rate(edgefleet_predictions_total{{{AGENT}}}[{RATE}])))",
            "{{device}}")).datasource(DS),
        timeseries.Panel().title("Input drift: worst feature PSI").with_target(
            q(f"max by (site, device) (edgefleet_drift_psi_max{{{AGENT}}})", "{{device}}")
        ).with_target(
            q(f"max by (site, device) (edgefleet_drift_psi_alert{{{AGENT}}})",
              "{{device}} threshold", ref="B")).datasource(DS),
        table.Panel().title("Worst drifting features").with_target(
            q(f"topk(10, edgefleet_drift_feature_psi{{{AGENT}}})", instant=True)
        ).datasource(DS),
    ]
    return [("Fleet", fleet), ("Rollouts", rollouts), ("Devices", devices)]


def build() -> dict:
    site = (db.QueryVariable("site").label("site").datasource(DS)
            .query("label_values(edgefleet_model_info, site)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
            .all_value(".*"))
    source = db.DatasourceVariable("DS_PROMETHEUS").label("Prometheus").type("prometheus")
    dash = (db.Dashboard("edgefleet: fleet, rollouts, devices").uid(UID)
            .tags(["edgefleet"]).refresh("30s").time("now-6h", "now")
            .timezone("browser").editable().with_variable(source).with_variable(site))
    y, ids = 0, iter(range(1, 1000))
    for title, row in panels():
        dash = dash.with_row(db.Row(title).id(next(ids))
                             .grid_pos(GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        width = max(24 // len(row), 4)
        for i, panel in enumerate(row):
            x = (i * width) % 24
            if i and x == 0:
                y += 8
            dash = dash.with_panel(panel.id(next(ids))
                                   .grid_pos(GridPos(h=8, w=width, x=x, y=y)))
        y += 8
    return _drop_nulls(json.loads(json.dumps(dash.build(), cls=JSONEncoder)))


def _drop_nulls(value):
    """Unset fields are left out, as Grafana itself saves them (`"options": null` is not)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


if __name__ == "__main__":
    sys.stdout.write(json.dumps(build(), indent=2, sort_keys=True) + "\n")
