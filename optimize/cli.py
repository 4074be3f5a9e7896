"""`edgefleet optimize ...`: make data and build signed model bundles.

Heavy imports (torch, onnx) happen inside the commands, so loading this group stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import typer

from agent.errors import UsageError

app = typer.Typer(
    help="Build models: generate die data, train, prune, quantize to INT8, sign a bundle.",
    no_args_is_help=True,
)


@app.command("make-data")
def make_data(
    out: Path = typer.Option(
        ..., "--out", help="File to write: .csv (or .npz); the spec goes next to it as .spec.json."
    ),
    n: int = typer.Option(20_000, "--n", min=1, help="Number of dies."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
    params: int = typer.Option(512, "--params", min=15, help="Parameters measured per die."),
    drift: bool = typer.Option(
        False, "--drift/--no-drift", help="Shift the process speed factor over the second half."
    ),
    missing_rate: float = typer.Option(
        0.001, "--missing-rate", min=0.0, max=0.5, help="Share of cells left empty (missing)."
    ),
    gross_rate: float = typer.Option(
        0.02, "--gross-rate", min=0.0, max=1.0, help="Share of dies with a parameter out of spec."
    ),
    subtle_rate: float = typer.Option(
        0.03,
        "--subtle-rate",
        min=0.0,
        max=1.0,
        help="Share of dies inside spec on every parameter but with broken correlations.",
    ),
) -> None:
    """Generate synthetic die test records (a seeded parametric test program with lots, wafers,
    process factors and labelled gross/subtle defects) and write them with their spec limits."""
    import numpy as np

    from optimize.data import (
        DieConfig,
        generate_dies,
        spec_path_for,
        write_csv,
        write_npz,
        write_spec,
    )

    if gross_rate + subtle_rate > 1.0:
        raise UsageError("--gross-rate plus --subtle-rate must be at most 1")
    cfg = DieConfig(
        n_dies=n,
        n_params=params,
        seed=seed,
        gross_rate=gross_rate,
        subtle_rate=subtle_rate,
        missing_rate=missing_rate,
        drift=drift,
    )
    data = generate_dies(cfg)
    assert data.defect is not None and data.spec is not None
    if out.suffix.lower() == ".npz":
        write_npz(out, data)
        write_spec(spec_path_for(out), data.spec)
        columns = data.n_features
    else:
        write_csv(out, data)
        columns = 4 + len(data.extra) + data.n_features  # id, time, label, defect, extra, params
    counts = {k: int((data.defect == k).sum()) for k in ("gross", "subtle")}
    missing = float(np.isnan(data.X).mean()) * 100
    typer.echo(
        f"wrote {out} and {spec_path_for(out)}: {data.n_rows} dies x {data.n_features} "
        f"parameters ({columns} columns); {sum(counts.values())} fail "
        f"(gross {counts['gross']}, subtle {counts['subtle']}); {missing:.2f}% cells missing; "
        f"drift {'on' if drift else 'off'}"
    )
