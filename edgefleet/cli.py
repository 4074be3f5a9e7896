"""Root of the `edgefleet` CLI. Each part owns its command group; this file only assembles them
and maps errors to exit codes: 0 ok, 1 failed, 2 bad usage. A failure prints one line on stderr.

Group modules import heavy libraries (torch, onnx) inside their commands, so `edgefleet agent ...`
on a device never loads the optimizer's dependencies.
"""

from __future__ import annotations

import sys

import typer

from agent.cli import app as agent_app
from agent.cli_bundle import bundle_app, keys_app
from agent.errors import EdgefleetError, UsageError
from fleet.cli import app as fleet_app
from optimize.cli import app as optimize_app

app = typer.Typer(
    name="edgefleet",
    help="Edge inference agent and fleet-update tool for semiconductor test floors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")
app.add_typer(optimize_app, name="optimize")
app.add_typer(agent_app, name="agent")
app.add_typer(fleet_app, name="fleet")


def main(argv: list[str] | None = None) -> None:
    """Entry point. Typer handles usage errors itself (exit 2); our own errors become one line
    on stderr with exit 1 (2 for `UsageError`), never a traceback."""
    try:
        app(args=argv, prog_name="edgefleet")
    except UsageError as e:
        print(f"edgefleet: error: {e}", file=sys.stderr)
        sys.exit(2)
    except EdgefleetError as e:
        print(f"edgefleet: error: {e}", file=sys.stderr)
        sys.exit(1)
