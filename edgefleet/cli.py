"""Root of the `edgefleet` CLI. Each part owns its command group; this file only assembles them
and maps errors to exit codes: 0 ok, 1 failed, 2 bad usage. Every error is one line on stderr
(typer's own usage errors too, which it would draw as a box), never a traceback.

Global: `--version`; `--log-level` and `--log-format text|json` for the CLI's own log (the
fleet controller's MQTT link, for one); shell completion (`--show-completion` prints the
script, `--install-completion` adds it to the shell's start-up file: typer's completion,
answered by this same entry point under `_EDGEFLEET_COMPLETE`).

Group modules import heavy libraries (torch, onnx) inside their commands, so `edgefleet agent ...`
on a device never loads the optimizer's dependencies.
"""

from __future__ import annotations

import sys

import typer

from agent import __version__
from agent.cli import app as agent_app
from agent.cli_bundle import bundle_app, keys_app
from agent.errors import EdgefleetError, UsageError
from agent.logfmt import FORMATS, LEVELS, configure
from fleet.cli import app as fleet_app
from optimize.cli import app as optimize_app

app = typer.Typer(
    name="edgefleet",
    help="Edge inference agent and fleet-update tool for semiconductor test floors.",
    epilog="Examples: edgefleet agent info --socket /run/edgefleet/agent.sock  |  "
           "edgefleet fleet devices -l site=fab2  |  edgefleet COMMAND --help",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")
app.add_typer(optimize_app, name="optimize")
app.add_typer(agent_app, name="agent")
app.add_typer(fleet_app, name="fleet")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    log_level: str = typer.Option("warning", "--log-level", envvar="EDGEFLEET_LOG_LEVEL",
                                  help="debug, info, warning or error (the CLI's own log; "
                                       "`agent serve` has its own)."),
    log_format: str = typer.Option("text", "--log-format", envvar="EDGEFLEET_LOG_FORMAT",
                                   help="text or json (one object a line)."),
) -> None:
    """Edge inference agent and fleet-update tool for semiconductor test floors."""
    if log_level not in LEVELS:
        raise UsageError(f"--log-level must be {', '.join(LEVELS)}, not {log_level!r}")
    if log_format not in FORMATS:
        raise UsageError(f"--log-format must be text or json, not {log_format!r}")
    configure(log_level, log_format)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage errors (exit 2) and our own errors (exit 1, 2 for `UsageError`)
    become one line on stderr."""
    try:
        from typer._click import exceptions as click_errors  # typer >= 0.2x carries its click
    except ImportError:  # older typer runs on click itself
        from click import exceptions as click_errors

    try:
        rv = app(args=argv, prog_name="edgefleet", standalone_mode=False)
    except click_errors.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a group alone: its help, as asked
            text = e.format_message()
            if text and text.strip():
                print(text, file=sys.stderr)
            sys.exit(2)
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        print(f"edgefleet: error: {_one_line(e.format_message())}{where}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click_errors.ClickException as e:
        print(f"edgefleet: error: {_one_line(e.format_message())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("edgefleet: aborted", file=sys.stderr)
        sys.exit(1)
    except UsageError as e:
        print(f"edgefleet: error: {e}", file=sys.stderr)
        sys.exit(2)
    except EdgefleetError as e:
        print(f"edgefleet: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split())
