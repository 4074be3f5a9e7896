"""`edgefleet fleet quality`: the command around fleet/quality.py (registered in fleet/cli.py).

    edgefleet fleet quality --prometheus http://prometheus:9090 [--window 7d]
    edgefleet fleet quality --prometheus URL -o json > before.json; ...; --since before.json
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.cli_output import check, emit, read_output
from agent.errors import UsageError
from fleet.cli_options import parse_duration
from fleet.label_gates import DEFAULT_MIN_BAD, DEFAULT_MIN_GOOD


def quality_cmd(
    prometheus: str = typer.Option(..., "--prometheus", envvar="EDGEFLEET_PROMETHEUS",
                                   help="The Prometheus that scrapes the agents."),
    window: str = typer.Option(None, "--window", help="Count the labels joined over this "
                               "window (7d); default: every label since the agents started."),
    since: Path = typer.Option(None, "--since", help="An earlier `quality -o json` report: "
                               "count only the labels joined since (exact)."),
    min_good: int = typer.Option(DEFAULT_MIN_GOOD, "--min-good", min=1, help="Labelled good "
                                 "dies before a false-fail rate is shown."),
    min_bad: int = typer.Option(DEFAULT_MIN_BAD, "--min-bad", min=1, help="Labelled bad dies "
                                "before a recall is shown."),
    output: str = read_output(),
) -> None:
    """Per model on the fleet: devices serving it, input drift (worst PSI against the bundle's
    alert threshold: ALARM above it), and the final-test labels joined to its decisions
    (good and bad dies, realized false-fail rate, recall; shown only over --min-good good /
    --min-bad bad labelled dies, as the rollout's label gates judge them).

    Examples:

      edgefleet fleet quality --prometheus http://prometheus:9090 --window 7d

      edgefleet fleet quality --prometheus http://prometheus:9090 -o json > before.json

      edgefleet fleet quality --prometheus http://prometheus:9090 --since before.json

    With -o json: {"models": [{digest, name, version, devices, drift_psi, drift_alert,
    drifting, labels: {true_pass, false_fail, true_fail, missed_fail}, good, bad,
    false_fail_rate, recall}], ...}; a rate is null below its minimum.
    """
    from fleet.prometheus import PrometheusClient
    from fleet.quality import fleet_quality, quality_table

    check(output)
    if window is not None and since is not None:
        raise UsageError("--window and --since count labels two different ways: give one")
    before = None
    if since is not None:
        try:
            before = json.loads(since.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--since {since}: not a `quality -o json` report: {e}") from None
    models = fleet_quality(PrometheusClient(prometheus),
                           window_s=parse_duration(window, "--window"), since=before)
    doc = {"prometheus": prometheus, "window": window, "since": str(since) if since else None,
           "min_good": min_good, "min_bad": min_bad,
           "models": [q.to_json(min_good, min_bad) for q in models]}
    emit(output, doc, text=lambda: quality_table(models, min_good, min_bad),
         names=lambda: [f"model/{q.digest}" for q in models])
