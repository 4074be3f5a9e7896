"""`edgefleet optimize ...`: make data and build signed model bundles.

Heavy imports (torch, onnx) happen inside the commands, so loading this group stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agent.cli_output import WRITE_FORMATS, check, emit, write_output
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
    profile: str = typer.Option(
        "floor", "--profile", help="floor (lots, wafers, testers with their own offset and gain, "
        "slow drift, quantized signals, missing blocks, five defect classes; 256 parameters) or "
        "classic (one population, gross and subtle defects; 512 parameters)."
    ),
    n: int = typer.Option(20_000, "--n", min=1, help="Number of dies."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
    params: int = typer.Option(
        None, "--params", min=15, help="Parameters measured per die (default: 256 floor, 512 "
        "classic)."
    ),
    drift: bool = typer.Option(
        False, "--drift/--no-drift", help="Shift the process speed factor over the second half."
    ),
    drift_size: float = typer.Option(
        2.5, "--drift-size", min=0.0, max=20.0,
        help="floor: how far the speed factor moves, in sigma of the factor (dies pushed out "
        "of spec by it fail their label, as on a real floor).",
    ),
    drift_ramp: float = typer.Option(
        0.5, "--drift-ramp", min=0.01, max=0.5,
        help="floor: share of the run the shift takes to build up from the midpoint (0.5: "
        "the whole second half; 0.05: a step, then a process that stays shifted).",
    ),
    wafers_per_lot: int = typer.Option(
        10, "--wafers-per-lot", min=1, max=50,
        help="floor: wafers per lot (~200 dies each); a production lot is 25, the default 10 "
        "keeps a small file several lots long.",
    ),
    missing_rate: float = typer.Option(
        0.001, "--missing-rate", min=0.0, max=0.5,
        help="classic: share of cells left empty (missing).",
    ),
    gross_rate: float = typer.Option(
        None, "--gross-rate", min=0.0, max=1.0,
        help="Share of dies with a parameter out of spec (default: 0.01 floor, 0.02 classic).",
    ),
    subtle_rate: float = typer.Option(
        0.03, "--subtle-rate", min=0.0, max=1.0,
        help="classic: share of dies inside spec on every parameter but with broken correlations.",
    ),
    output: str = write_output(),
) -> None:
    """Generate synthetic die test records with their spec limits.

    floor (default): a test floor, with lots, wafers, die x/y, several testers, slow drift,
    correlated parameter families, quantized signals, missing test blocks and five labelled
    defect classes (gross, subtle_uni, subtle_multi, spatial, tester); see optimize/floor.py.
    classic: the earlier single-population generator (gross and subtle defects).

    Examples:

      edgefleet optimize make-data --out dies.csv

      edgefleet optimize make-data --out drift.csv --n 5000 --seed 7 --drift

      edgefleet optimize make-data --out step.csv --n 8000 --drift --drift-ramp 0.05 --drift-size 5

      edgefleet optimize make-data --out lots.csv --n 25000 --wafers-per-lot 25

      edgefleet optimize make-data --out classic.npz --profile classic --params 128

      edgefleet optimize make-data --out dies.csv --n 2000 -o json
    """
    import numpy as np

    from optimize.data import (
        DieConfig,
        generate_dies,
        spec_path_for,
        write_csv,
        write_npz,
        write_spec,
    )
    from optimize.floor import FloorConfig, generate_floor

    check(output, WRITE_FORMATS)
    if profile == "floor":
        data = generate_floor(FloorConfig(
            n_dies=n, n_params=params or 256, seed=seed, drift=drift, drift_ramp=drift_ramp,
            drift_size=drift_size, wafers_per_lot=wafers_per_lot,
            gross_rate=0.010 if gross_rate is None else gross_rate))
    elif profile == "classic":
        gross = 0.02 if gross_rate is None else gross_rate
        if gross + subtle_rate > 1.0:
            raise UsageError("--gross-rate plus --subtle-rate must be at most 1")
        data = generate_dies(DieConfig(
            n_dies=n, n_params=params or 512, seed=seed, gross_rate=gross,
            subtle_rate=subtle_rate, missing_rate=missing_rate, drift=drift))
    else:
        raise UsageError(f"--profile must be floor or classic, not {profile!r}")
    assert data.defect is not None and data.spec is not None
    if out.suffix.lower() == ".npz":
        write_npz(out, data)
        write_spec(spec_path_for(out), data.spec)
        columns = data.n_features
    else:
        write_csv(out, data)
        columns = 4 + len(data.extra) + data.n_features  # id, time, label, defect, extra, params
    kinds, counts = np.unique(data.defect[data.defect != "none"], return_counts=True)
    classes = ", ".join(f"{k} {c}" for k, c in zip(kinds.tolist(), counts.tolist(), strict=True))
    missing = float(np.isnan(data.X).mean()) * 100
    spec = spec_path_for(out)
    doc = {"data": str(out), "sha256": _sha256(out), "spec": str(spec), "spec_sha256":
           _sha256(spec), "profile": profile, "seed": seed, "dies": data.n_rows,
           "parameters": data.n_features, "columns": columns, "fail": int(counts.sum()),
           "defects": dict(zip(kinds.tolist(), counts.tolist(), strict=True)),
           "missing_cells_pct": round(missing, 4), "drift": drift}
    emit(output, doc, text=lambda: (
        f"wrote {out} and {spec}: {profile} profile, {data.n_rows} dies x "
        f"{data.n_features} parameters ({columns} columns); {int(counts.sum())} fail "
        f"({classes or 'none'}); {missing:.2f}% cells missing; drift {'on' if drift else 'off'}"))


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@app.command("build")
def build(
    data: Path = typer.Option(
        ..., "--data", help="Die data: .csv (header row; optional label/defect/time columns and a "
        ".spec.json sidecar with limits), .npz, or a directory from `edgefleet fleet collect`."
    ),
    key: Path = typer.Option(..., "--key", help="Release private key (PEM, mode 0600)."),
    out: Path = typer.Option(
        ..., "--out", help="Output directory: model.efb, report.md/json, plots, models/*.onnx."
    ),
    config: Path = typer.Option(
        None, "--config", help="JSON config, e.g. {\"train\": {\"epochs\": 10}}; sections: split, "
        "preprocess, model, train, prune, quantize, calibrate, evaluate, package. "
        "EDGEFLEET_OPTIMIZE_<SECTION>_<FIELD> variables override it; flags override both."
    ),
    sequence: int = typer.Option(
        None, "--sequence", min=0, help="Bundle sequence (default: one above OUT/model.efb, or 1)."
    ),
    name: str = typer.Option(None, "--name", help="Model name in the bundle (default: die-ae)."),
    epochs: int = typer.Option(
        None, "--epochs", min=1, help="Maximum training epochs (default: 30)."
    ),
    seed: int = typer.Option(
        None, "--seed", help="Seed for training and row shuffling (default: 0)."
    ),
    keep: float = typer.Option(
        None, "--keep", min=0.01, max=1.0,
        help="Share of hidden units kept by pruning (default: 0.3).",
    ),
    target_ffr: float = typer.Option(
        None, "--target-ffr", min=0.0, max=0.5,
        help="False-fail rate the threshold is set to on validation passes (default: 0.01).",
    ),
    top_k: int = typer.Option(
        None, "--top-k", min=1, help="Contributing parameters reported (default: 5)."
    ),
    quantization: str = typer.Option(
        None, "--quantization", help="auto (better parity of static and dynamic), static or "
        "dynamic (default: auto)."
    ),
    accept_risk: str = typer.Option(
        None, "--accept-risk", help="Sign even when a build gate fails (model not better than "
        "the best unsupervised baseline, test false-fail > 2x target, test part drifted, rules "
        "failing > 5x target); the reason is written into the manifest and the report."
    ),
    output: str = write_output(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Train, prune, quantize and sign a die anomaly model.

    Splits DATA by time (training on passing dies only), fits the
    preprocessing, trains a dense autoencoder, prunes whole hidden units,
    distils a smaller student (kept when as good), exports one ONNX graph
    (raw parameters in; score and top-k contributing parameters out),
    quantizes it to INT8, offers a supervised head on the autoencoder's
    features when the labels hold fails (kept when it beats the autoencoder
    on validation and test), calibrates the threshold at the
    target false-fail rate, evaluates FP32 / pruned / INT8 / rule fallback and
    the baselines (static and dynamic PAT, Hotelling T2 on PCA,
    IsolationForest, logistic regression when labels exist) on the test
    split, and writes OUT/model.efb signed with KEY, with report.md,
    report.json, plots and the ONNX models next to it. Progress goes to
    stderr, the summary table to stdout.

    Gates: the build is refused (exit 1, report and unsigned models written,
    no bundle) when the model does not beat the best unsupervised baseline on
    test ROC AUC, when test false-fail is above 2x the target, when the test
    part drifts beyond the alert threshold, or when the fallback rules fail
    above 5x the target of test passes; --accept-risk "why" signs it anyway
    and records why.

    Examples:

      edgefleet optimize build --data dies.csv --key release.key --out build/

      edgefleet optimize build --data dataset/ --key release.key --out build/ --epochs 10 --seed 1

      edgefleet optimize build --data dies.csv --key release.key --out build/ -q -o json

    With -o json, stdout is one document saying what was written: the bundle and its
    sha256 (null when refused), signed or not with the gates' reasons, the reports' paths.
    """
    import json
    import logging
    import sys
    import time

    from optimize.evaluate import summary_table
    from optimize.pipeline import build as run_build
    from optimize.pipeline import load_config

    check(output, WRITE_FORMATS)
    if quantization is not None and quantization not in ("auto", "static", "dynamic"):
        raise UsageError(f"--quantization must be auto, static or dynamic, not {quantization!r}")
    cfg = load_config(config, overrides={
        "train": {"epochs": epochs, "seed": seed},
        "split": {"seed": seed},
        "prune": {"keep": keep},
        "calibrate": {"target_ffr": target_ffr, "top_k": top_k},
        "quantize": {"method": quantization},
        "package": {"name": name},
        "gate": {"accept_risk": accept_risk},
    })
    logger = logging.getLogger("edgefleet.optimize")
    if not quiet:
        start = time.perf_counter()

        class _Elapsed(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return f"[{time.perf_counter() - start:6.1f}s] {record.getMessage()}"

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Elapsed())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # ORT's quantizer configures the root logger
    from optimize.dataset_dir import data_file
    from optimize.gates import BuildRefused

    try:
        with data_file(data) as data_path:  # a `fleet collect` directory becomes a temp .npz
            result = run_build(data_path, key, out, cfg, sequence=sequence)
    except BuildRefused:
        if output == "json":  # the report is written: say so, then the one-line error
            report = json.loads((out / "report.json").read_text())
            emit(output, _written(out, None, report), text=str)
        raise
    finally:
        if not quiet:
            logger.removeHandler(handler)
            logger.propagate = True
    m = result.manifest
    emit(output, _written(out, result.bundle, result.report), text=lambda: "\n".join([
        summary_table(result.report),
        f"build time {result.seconds:.1f}s",
        f"wrote {result.bundle}: {m.name} {m.version} sequence {m.sequence}, "
        f"threshold {m.threshold:.4g}, report {out / 'report.md'}"]))


def _written(out: Path, bundle: Path | None, report: dict[str, Any]) -> dict[str, Any]:
    """`build -o json`: what the build left in OUT (`bundle` is None when a gate refused it)."""
    build = report.get("build", {})
    return {"bundle": str(bundle) if bundle else None,
            "sha256": _sha256(bundle) if bundle else None,
            "signed": bundle is not None, "gates": report.get("gates"),
            "name": build.get("name"), "version": build.get("version"),
            "sequence": build.get("sequence"),
            "report": str(out / "report.md"), "report_json": str(out / "report.json")}
