"""`edgefleet optimize ...`: make data and build signed model bundles.

Heavy imports (torch, onnx) happen inside the commands, so loading this group stays cheap.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Build models: generate die data, train, prune, quantize to INT8, sign a bundle.",
    no_args_is_help=True,
)
