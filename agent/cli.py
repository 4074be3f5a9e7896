"""`edgefleet agent ...`: run and operate the on-device agent."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Run the on-device agent: serve predictions on a Unix socket, install models.",
    no_args_is_help=True,
)
