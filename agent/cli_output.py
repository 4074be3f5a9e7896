"""`-o/--output` for every command, as kubectl users expect it.

Read commands take `text` (the table for people, the default), `wide` (the table with more
columns), `json`, `yaml` and `name` (one `kind/name` per line, for `xargs`); write commands
take `text` and `json` (what was done, as a document). The data a command prints as JSON and
YAML is the same document; `name` lists what the command is about.

YAML needs PyYAML, which the device's base install does not carry: `-o yaml` says so in one
line where it is missing (pip install pyyaml).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import typer

from agent.errors import UsageError

READ_FORMATS = ("text", "wide", "json", "yaml", "name")
WRITE_FORMATS = ("text", "json")

__all__ = ["READ_FORMATS", "WRITE_FORMATS", "check", "emit", "read_output", "write_output"]


def read_output() -> Any:
    return typer.Option("text", "--output", "-o", help="text, wide, json, yaml or name.")


def write_output() -> Any:
    return typer.Option("text", "--output", "-o", help="text or json.")


def check(output: str, formats: tuple[str, ...] = READ_FORMATS) -> None:
    """Refuse an unknown format before the command does anything."""
    if output not in formats:
        raise UsageError(f"--output must be {', '.join(formats[:-1])} or {formats[-1]}, "
                         f"not {output!r}")


def emit(output: str, data: Any, *, text: Callable[[], str], wide: Callable[[], str] | None = None,
         names: Callable[[], Iterable[str]] | None = None) -> None:
    """Print `data` in the format asked for; `text`/`wide` render the tables, `names` the
    `kind/name` lines (without it, `-o name` is refused as unsupported by the command)."""
    if output == "json":
        typer.echo(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        typer.echo(to_yaml(data), nl=False)
    elif output == "name":
        if names is None:
            raise UsageError("this command has nothing to name: use -o text, json or yaml")
        for n in names():
            typer.echo(n)
    elif output == "wide" and wide is not None:
        typer.echo(wide())
    else:
        typer.echo(text())


def to_yaml(data: Any) -> str:
    try:
        import yaml
    except ImportError:
        raise UsageError("-o yaml needs PyYAML, which this install lacks",
                         hint="pip install pyyaml, or use -o json") from None
    # Round-trip through JSON so paths, tuples and dataclass leftovers become plain types.
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)
