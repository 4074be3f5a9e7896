"""`edgefleet fleet ...`: publish bundles and run rollouts across the fleet."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Publish bundles and roll them out to devices over MQTT: canary, waves, rollback.",
    no_args_is_help=True,
)
