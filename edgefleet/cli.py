"""Root of the `edgefleet` CLI. Each part owns its command group; this file only assembles them
and maps errors to exit codes: 0 ok, 1 failed, 2 bad usage. Every error is one line on stderr
(typer's own usage errors too, which it would draw as a box), never a traceback.

Global: `--version`; `--log-level` and `--log-format text|json` for the CLI's own log (the
fleet controller's MQTT link, for one); shell completion (`--show-completion` prints the
script, `--install-completion` adds it to the shell's start-up file: typer's completion,
answered by this same entry point under `_EDGEFLEET_COMPLETE`).

The root is lazy: a group's module is imported only when that group is invoked (or completed,
or its help asked for), so `edgefleet agent predict` loads the agent's commands alone, not the
fleet's and the optimizer's (pydantic, the database and MQTT clients, ...): that halved the
start-up of a one-die predict. `edgefleet --help` lists every group from `GROUPS` without
importing any; tests/test_cli_tree.py holds each listed help to the group's own. Group modules
import heavy libraries (torch, onnx) inside their commands, so `edgefleet agent ...` on a device
never loads the optimizer's dependencies either.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import typer
from typer.core import TyperGroup

from agent import __version__
from agent.errors import EdgefleetError, UsageError
from agent.logfmt import FORMATS, LEVELS, configure

# name: (module, attribute holding its typer.Typer, the help `edgefleet --help` shows for it,
# which is the group's own help)
GROUPS: dict[str, tuple[str, str, str]] = {
    "keys": ("agent.cli_bundle", "keys_app",
             "Create Ed25519 keys and manage the keyring a device trusts."),
    "bundle": ("agent.cli_bundle", "bundle_app",
               "Sign, verify and inspect model bundles (*.efb)."),
    "optimize": ("optimize.cli", "app",
                 "Build models: generate die data, train, prune, quantize to INT8, sign a "
                 "bundle."),
    "agent": ("agent.cli", "app",
              "Run the on-device agent: serve predictions on a Unix socket, install models."),
    "fleet": ("fleet.cli", "app",
              "Publish bundles and roll them out to devices over MQTT: canary, waves, "
              "rollback."),
}


def load_group(name: str) -> Any:
    """The click group `name`, its module imported now: built as `app.add_typer(sub, name=...)`
    builds it (typer.main.get_group_from_info with the root's settings)."""
    module, attr, _ = GROUPS[name]
    sub = getattr(importlib.import_module(module), attr)
    return typer.main.get_group_from_info(
        typer.models.TyperInfo(sub, name=name),
        pretty_exceptions_short=app.pretty_exceptions_short,
        rich_markup_mode=app.rich_markup_mode, suggest_commands=app.suggest_commands)


class _LazyCommands(Mapping):
    """The root's subcommands, each group built on first access."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in GROUPS:
                raise KeyError(name)
            self._loaded[name] = load_group(name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(GROUPS)

    def __len__(self) -> int:
        return len(GROUPS)


class _LazyRoot(TyperGroup):
    """The root group over `_LazyCommands`; its own help lists the groups from `GROUPS`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.commands = _LazyCommands()  # type: ignore[assignment]
        self._listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return list(GROUPS)  # TyperGroup's walks the commands' items, loading each

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if self._listing and cmd_name in GROUPS:  # the root's help: name and help only
            return typer.core.TyperCommand(cmd_name, help=GROUPS[cmd_name][2])
        return self.commands.get(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="edgefleet",
    cls=_LazyRoot,
    help="Edge inference agent and fleet-update tool for semiconductor test floors.",
    epilog="Examples: edgefleet agent info --socket /run/edgefleet/agent.sock  |  "
           "edgefleet fleet devices -l site=fab2  |  edgefleet COMMAND --help",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


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
