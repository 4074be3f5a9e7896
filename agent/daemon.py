"""The serving process: `python -m agent.daemon CONFIG_JSON`.

`edgefleet agent serve` checks its flags, merges them with the environment and the config file,
and replaces itself (exec, same PID) with this module, so the process that serves imports only
what serving needs: the CLI's typer pulls in pydantic and rich, ~11 MB of resident memory that a
box running for months has no use for.
"""

from __future__ import annotations

import sys

from agent.config import AgentConfig
from agent.errors import EdgefleetError
from agent.logfmt import configure


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agent.daemon CONFIG_JSON (see `edgefleet agent serve`)",
              file=sys.stderr)
        sys.exit(2)
    try:
        cfg = AgentConfig.from_json(args[0])
        configure(cfg.log_level, cfg.log_format)
        from agent.app import run

        run(cfg)
    except EdgefleetError as e:
        print(f"edgefleet: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
