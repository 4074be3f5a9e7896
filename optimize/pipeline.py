"""`edgefleet optimize build`: data file in, signed bundle and report out.

    load -> split -> preprocess -> train -> prune -> distill -> export -> quantize
         -> calibrate -> supervised head -> evaluate -> baselines -> gates -> package

Each stage is a function in its own module; `build` calls them in order and is the only place
that knows the order. Everything is written into a staging directory inside `out_dir` and moved
into place only when the bundle is signed and has passed its own golden self-test, so a failed
build leaves the previous build's files untouched and no partial bundle behind. A build that
fails a gate (`optimize.gates`) writes its report but no bundle and raises `BuildRefused`
(exit 1), unless the config's `gate.accept_risk` (`--accept-risk`) gives a reason to sign.

Configuration: one frozen dataclass per stage, gathered in `BuildConfig`. `load_config` reads,
in increasing precedence, the defaults, a JSON file (`{"train": {"epochs": 10}, ...}`),
environment variables `EDGEFLEET_OPTIMIZE_<SECTION>_<FIELD>` (e.g.
`EDGEFLEET_OPTIMIZE_TRAIN_EPOCHS=10`) and explicit overrides (the CLI flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.calibration import manifest_block
from agent.errors import UsageError
from agent.keys import load_private_key
from agent.manifest import Manifest
from optimize.baselines import compare
from optimize.breakdown import ffr_by_group
from optimize.calibrate import (
    CalibrateConfig,
    Decision,
    calibrate_threshold,
    calibration_figures,
    calibration_params,
    drift_with_noise_floor,
    learn_max_missing,
    window_psi,
)
from optimize.data import Dataset, load_dataset
from optimize.distill import DistillConfig, offer_student
from optimize.evaluate import EvaluateConfig, Scored, evaluate, measure_latency, write_report
from optimize.export import check_export, run, to_onnx
from optimize.gates import BuildRefused, GateConfig, gate_reasons, gate_record
from optimize.package import (
    BUNDLE_NAME,
    golden_rows,
    golden_vectors,
    next_sequence,
    package,
    version_string,
)
from optimize.preprocess import PreprocessConfig, fit_preprocessor
from optimize.prune import PruneConfig, prune
from optimize.quantize import QuantizeConfig, quantize, score_rows
from optimize.rules import RulesConfig, fallback_rules, rule_report, rule_violations
from optimize.split import Split, SplitConfig, split_dataset
from optimize.supervised import SupervisedConfig, offer_head
from optimize.train import (
    AEConfig,
    Detector,
    TrainConfig,
    new_autoencoder,
    torch_threads,
    train,
)

log = logging.getLogger("edgefleet.optimize")
ENV_PREFIX = "EDGEFLEET_OPTIMIZE_"


@dataclass(frozen=True)
class PackageConfig:
    name: str = "die-ae"
    valid_days: int = 365  # bundle expiry; 0 = never expires


@dataclass(frozen=True)
class BuildConfig:
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: AEConfig = field(default_factory=AEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    gate: GateConfig = field(default_factory=GateConfig)


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> BuildConfig:
    """Defaults < JSON file < EDGEFLEET_OPTIMIZE_* environment < overrides. Raises UsageError
    naming the source and key of anything unknown or of the wrong type."""
    sections = {f.name: f.type for f in dataclasses.fields(BuildConfig)}
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    if path is not None:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"{path}: cannot read config: {e.strerror or e}") from None
        except ValueError as e:
            raise UsageError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{path}: expected a JSON object of sections like "
                             '{"train": {"epochs": 10}}')
        for section, fields_ in doc.items():
            if section not in sections or not isinstance(fields_, dict):
                raise UsageError(f"{path}: unknown section {section!r}; expected one of "
                                 f"{', '.join(sections)} holding an object")
            values[section].update({k: (v, f"{path}: {section}.{k}") for k, v in fields_.items()})
    for key, raw in sorted((env if env is not None else os.environ).items()):
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise UsageError(f"environment {key}: unknown section; expected "
                             f"{ENV_PREFIX}<{'|'.join(s.upper() for s in sections)}>_<FIELD>")
        values[section][rest[len(section) + 1:]] = (raw, f"environment {key}")
    for section, fields_ in (overrides or {}).items():
        values[section].update({k: (v, f"option {section}.{k}") for k, v in fields_.items()
                                if v is not None})
    built = {}
    for section, items in values.items():
        default = getattr(BuildConfig(), section)
        types = {f.name: type(getattr(default, f.name)) for f in dataclasses.fields(default)}
        kwargs = {}
        for name, (value, where) in items.items():
            if name not in types:
                raise UsageError(f"{where}: unknown setting; expected one of {', '.join(types)}")
            kwargs[name] = _coerce(value, types[name], where, getattr(default, name))
        built[section] = dataclasses.replace(default, **kwargs)
    return BuildConfig(**built)


def _coerce(value: Any, kind: type, where: str, like: Any = None) -> Any:
    """`value` as a `kind`; a tuple's items as the default `like`'s (float when any is)."""
    try:
        if kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            item = float if any(isinstance(v, float) for v in like or ()) else int
            if item is int and any(isinstance(v, float) and not v.is_integer() for v in items):
                raise ValueError(value)
            return tuple(item(v) for v in items)
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {kind.__name__}, found {value!r}") from None


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    manifest: Manifest
    report: dict[str, Any]
    seconds: float


def _data_summary(data: Dataset, split: Split, active: np.ndarray) -> dict[str, Any]:
    x = np.asarray(data.X)
    missing = np.isnan(x)
    never = np.flatnonzero(missing.all(axis=0))
    inactive = np.flatnonzero(~active)
    names = data.feature_names
    out: dict[str, Any] = {
        "source": str(data.source) if data.source else "generated",
        "rows": data.n_rows,
        "features": data.n_features,
        "missing_cells": f"{missing.mean():.2%}",
        "never_observed_columns": len(never),
        "inactive_columns": f"{len(inactive)} (constant or never observed in training passes;"
                            f" e.g. {', '.join(names[i] for i in inactive[:6]) or 'none'})",
        "labels": "none" if data.labels is None else
                  f"{int(data.labels.sum())} fail / {int((data.labels == 0).sum())} pass",
        "split": f"{'time-ordered' if split.time_ordered else 'shuffled'}"
                 f"{' at lot boundaries' if split.lot_aligned else ''}: train "
                 f"{len(split.train)} passes ({split.dropped_train_fails} fails of the training "
                 f"period left out), validation {len(split.val)}, test {len(split.test)}",
    }
    if split.test.labels is not None:
        out["test_fails"] = int(split.test.labels.sum())
    if data.defect is not None:
        kinds, counts = np.unique(split.test.defect, return_counts=True)
        out["test_classes"] = ", ".join(f"{k} {c}" for k, c in zip(kinds, counts, strict=True))
    return out


def _findings(data: Dataset, split: Split, rules: list[dict[str, Any]], int8: bytes,
              threshold: float) -> dict[str, Any]:  # fmt: skip
    """What drives the decisions on the test split: the parameters most often at the top of a
    flagged die's contributions, and the fallback rules test passes violate most."""
    names, t = data.feature_names, split.test
    scores, top_index, _ = run(int8, t.x)
    flagged = top_index[scores > threshold, 0]
    ids, counts = np.unique(flagged, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:5]
    rates = []
    x = t.x[t.passes]
    if len(x):
        with np.errstate(invalid="ignore"):
            for r in rules:
                v = x[:, r["feature"]]
                bad = np.zeros(len(v), bool)
                if r["low"] is not None:
                    bad |= v < r["low"]
                if r["high"] is not None:
                    bad |= v > r["high"]
                rates.append((float(bad.mean()), names[r["feature"]]))
    rates = sorted((r for r in rates if r[0] > 0), reverse=True)[:5]
    return {
        "top_parameter_of_flagged_test_dies": {names[ids[i]]: int(counts[i]) for i in order},
        "rules_most_violated_by_test_passes": {n: round(v, 4) for v, n in rates},
    }


def build(
    data_path: Path,
    key_path: Path,
    out_dir: Path,
    cfg: BuildConfig = BuildConfig(),
    *,
    sequence: int | None = None,
) -> BuildResult:
    """Run every stage on `data_path`; write `out_dir/model.efb` (signed with `key_path`),
    report.json, report.md, the plots and the three ONNX models (models/)."""
    with torch_threads(cfg.train.threads):
        return _build(Path(data_path), Path(key_path), Path(out_dir), cfg, sequence)


def _build(data_path: Path, key_path: Path, out_dir: Path, cfg: BuildConfig,
           sequence: int | None) -> BuildResult:  # fmt: skip
    t_start = time.perf_counter()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file", hint="give a directory (created if needed)")
    key = load_private_key(key_path)  # fail on a bad key before minutes of training
    seq = sequence if sequence is not None else next_sequence(out_dir)

    cpu_start = time.process_time()  # CPU time: steadier than wall time on a shared machine

    def stage(name: str) -> None:
        log.info("== %s (%.1fs, CPU %.1fs)", name, time.perf_counter() - t_start,
                 time.process_time() - cpu_start)

    stage(f"load {data_path}")
    data = load_dataset(data_path)
    where = str(data_path)
    split = split_dataset(data, cfg.split)
    stage("preprocess")
    prep = fit_preprocessor(split.train.x, cfg.preprocess.clip, cfg.preprocess.bound, where,
                            log_skewed=cfg.preprocess.log_skewed)
    x_val_pass = split.val.x[split.val.passes]
    z_train, z_val = prep.transform(split.train.x), prep.transform(x_val_pass)

    stage("train")
    model = new_autoencoder(data.n_features, cfg.model, cfg.train.seed)
    log.info("autoencoder %s, %d parameters, %d training passes",
             "-".join(map(str, model.sizes)), model.n_params(), len(z_train))
    model, history = train(model, z_train, z_val, cfg.train)
    stage("prune")
    pruned = prune(model, z_train, z_val, cfg.prune, cfg.train)
    log.info("pruned %d -> %d parameters (%s)", pruned.params_before, pruned.params_after,
             "-".join(map(str, pruned.sizes_after)))
    top_k = max(1, min(cfg.calibrate.top_k, data.n_features))
    stage("distill")
    net, distilled = offer_student(pruned.model, prep, split.train.x, split, cfg.distill,
                                   cfg.train, top_k, cfg.calibrate.target_ffr)
    pruned = dataclasses.replace(pruned, model=net, params_after=net.n_params(),
                                 sizes_after=net.sizes)

    stage("export")
    det_fp32 = Detector.fit(prep, model, split.train.x, x_holdout=x_val_pass)
    det_pruned = Detector.fit(prep, pruned.model, split.train.x, x_holdout=x_val_pass)
    fp32, pruned_fp32 = to_onnx(det_fp32, top_k), to_onnx(det_pruned, top_k)
    check_rows = split.val.x[:2000]
    export_diff = {"fp32": check_export(fp32, det_fp32, check_rows),
                   "pruned_fp32": check_export(pruned_fp32, det_pruned, check_rows)}
    log.info("export: max |onnx - torch| score difference %.3g (fp32), %.3g (pruned)",
             export_diff["fp32"], export_diff["pruned_fp32"])
    scored: dict[str, Scored] = {}
    for name, onnx_model in (("fp32", fp32), ("pruned_fp32", pruned_fp32)):
        val, test = run(onnx_model, split.val.x)[0], run(onnx_model, split.test.x)[0]
        dec = calibrate_threshold(val[split.val.passes], cfg.calibrate.target_ffr)
        scored[name] = Scored(val, test, dec.threshold, dec, onnx_model)

    stage("quantize")
    quant = quantize(pruned_fp32, det_pruned, top_k, split.train.x, split.val.x,
                     scored["pruned_fp32"].threshold, cfg.quantize)
    stage("calibrate")
    val8, test8 = score_rows(quant.model, split.val.x), score_rows(quant.model, split.test.x)
    decision = calibrate_threshold(val8[split.val.passes], cfg.calibrate.target_ffr)
    scored["pruned_int8"] = Scored(val8, test8, decision.threshold, decision, quant.model)
    stage("supervised head")
    head = offer_head(split, det_pruned, pruned_fp32, quant.model, val8, test8, cfg.supervised,
                      cfg.calibrate.target_ffr, cfg.train.seed)
    if head.kept and head.fp32 and head.int8 and head.int8_val is not None \
            and head.int8_test is not None:  # the head ships
        pruned_fp32, quant = head.fp32, dataclasses.replace(quant, model=head.int8)
        val8, test8 = head.int8_val, head.int8_test
        decision = calibrate_threshold(val8[split.val.passes], cfg.calibrate.target_ffr)
        scored["pruned_int8"] = Scored(val8, test8, decision.threshold, decision, quant.model)
        val, test = run(pruned_fp32, split.val.x)[0], run(pruned_fp32, split.test.x)[0]
        dec = calibrate_threshold(val[split.val.passes], cfg.calibrate.target_ffr)
        scored["pruned_fp32"] = Scored(val, test, dec.threshold, dec, pruned_fp32)
    per_tester = calibration_params(cfg.calibrate, val8, split.val.passes, split.val.x,
                                    decision.threshold, split.val.groups.get("tester"),
                                    split.val.groups.get("lot"))
    made = fallback_rules(split.train.x, data.spec, x_val_passes=x_val_pass,
                          target_ffr=cfg.calibrate.target_ffr, cfg=cfg.rules)
    rules, rules_source = made.rules, made.source
    scored["rules"] = Scored(rule_violations(rules, split.val.x).astype(np.float64),
                             rule_violations(rules, split.test.x).astype(np.float64), 0.5)
    recent = np.vstack([split.train.x, x_val_pass])  # time order: training, then validation
    missing = learn_max_missing(recent)
    drift = drift_with_noise_floor(recent, cfg.calibrate, cfg.train.seed,
                                   max_window=max(len(split.test), 200), horizon=len(split.test))
    log.info("threshold %.4g (validation false-fail %.2f%% of %d passes), confidence scale "
             "%.3g, %d fallback rules from %s, max_missing %d, drift alert PSI %.3g (noise "
             "floor %.3g)", decision.threshold, 100 * decision.val_ffr, decision.n_val_passes,
             decision.confidence_scale, len(rules), rules_source, missing["max_missing"],
             drift["alert_psi"], drift["noise_floor_psi"])

    stage("evaluate")
    latency = measure_latency({k: scored[k].model for k in ("fp32", "pruned_fp32", "pruned_int8")},
                              split.test.x, cfg.evaluate)  # type: ignore[misc]
    params = {"fp32": pruned.params_before, "pruned_fp32": pruned.params_after,
              "pruned_int8": pruned.params_after}
    report = evaluate(split, scored, latency, params)
    report["data"] = _data_summary(data, split, prep.active)
    report["findings"] = _findings(data, split, rules, quant.model, decision.threshold)
    report["export_max_abs_diff"] = export_diff
    if distilled is not None:
        report["distillation"] = distilled
    if head.report is not None:
        report["supervised"] = head.report
    stage("baselines")
    report.update(_floor_figures(split, cfg, scored, decision, drift, missing))
    report["fallback"] = rule_report(made, data.feature_names, x_val_pass,
                                     split.test.x[split.test.passes])
    if per_tester is not None and split.test.labels is not None:
        report["calibration"] = calibration_figures(
            per_tester, test8, split.test.x, split.test.passes, split.test.defect,
            split.test.groups, decision.threshold, cfg.calibrate.target_ffr)
    reasons = gate_reasons(report, cfg.calibrate.target_ffr, cfg.gate)
    report["gates"] = gate_record(reasons, cfg.gate)
    report["quantization"] = {"method": quant.method,
                              "candidates": {k: dataclasses.asdict(v)
                                             for k, v in quant.parity.items()}}
    report["training"] = {"epochs": len(history.val_loss), "best_epoch": history.best_epoch,
                          "best_val_loss": min(history.val_loss), "seconds": history.seconds,
                          "sizes": list(pruned.sizes_before), "pruned_sizes":
                          list(pruned.sizes_after)}

    stage("package")
    golden = golden_vectors(quant.model, pruned_fp32, golden_rows(split.test, test8),
                            decision.threshold)
    version = version_string(seq)
    report["notes"] = _notes(cfg, decision, quant.method, golden, rules, rules_source)
    report["build"] = {"name": cfg.package.name, "version": version, "sequence": seq,
                       "seconds_until_report": round(time.perf_counter() - t_start, 1),
                       "cpu_seconds_until_report": round(time.process_time() - cpu_start, 1),
                       "config": dataclasses.asdict(cfg)}

    def write_models(staging: Path) -> list[Path]:
        (staging / "models").mkdir()
        for name in ("fp32", "pruned_fp32", "pruned_int8"):
            (staging / "models" / f"{name}.onnx").write_bytes(scored[name].model or b"")
        return sorted((staging / "models").iterdir())

    if not report["gates"]["signed"]:
        report["build"]["version"] = f"{version} (refused, not signed)"
        # The models too (unsigned ONNX: the agent loads only signed bundles): what an engineer
        # needs to replay a refused model's scores without building it again with --accept-risk
        _publish(out_dir, lambda staging: ([*write_models(staging),
                                            *write_report(staging, report, split, scored)], None),
                 bundle=False)
        raise BuildRefused(
            f"{data_path}: build refused, not signed: " + "; ".join(reasons),
            hint=f"report in {out_dir / 'report.md'}; fix the data or model, or sign anyway "
                 'with --accept-risk "why"')

    def write(staging: Path) -> tuple[list[Path], Manifest]:
        models = write_models(staging)
        files = write_report(staging, report, split, scored)
        manifest = package(
            staging / BUNDLE_NAME,
            model=quant.model,
            name=cfg.package.name,
            version=version,
            sequence=seq,
            feature_names=data.feature_names,
            decision={"threshold": decision.threshold,
                      "confidence_scale": decision.confidence_scale, "top_k": top_k,
                      **({"calibration": manifest_block(*per_tester)} if per_tester else {})},
            rules=rules,
            max_missing=missing["max_missing"],
            rules_min_measured=cfg.calibrate.rules_min_measured,
            golden=golden,
            evaluation=_manifest_evaluation(report, decision, cfg, len(split.train)),
            drift=drift,
            key=key,
            valid_days=cfg.package.valid_days,
        )
        return [*models, *files], manifest

    manifest = _publish(out_dir, write)
    seconds = time.perf_counter() - t_start
    stage(f"done: {out_dir / BUNDLE_NAME} sequence {seq}")
    return BuildResult(out_dir / BUNDLE_NAME, manifest, report, seconds)


def _publish(out_dir: Path, write: Callable[[Path], tuple[list[Path], Any]], *,
             bundle: bool = True) -> Any:
    """Let `write` fill a staging directory inside `out_dir`, then move its files into place,
    the bundle last (none for a refused build). On failure nothing moves, and an `out_dir` this
    created is removed again."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".build-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files, manifest = write(staging)
        (out_dir / "models").mkdir(exist_ok=True)
        for src in [*files, *([staging / BUNDLE_NAME] if bundle else [])]:
            os.replace(src, out_dir / src.relative_to(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _notes(cfg: BuildConfig, decision: Decision, method: str, golden: dict[str, Any],
           rules: list[dict[str, Any]], rules_source: str) -> list[str]:  # fmt: skip
    source = ("the spec limits" if rules_source == "spec" else
              "static PAT limits of training passes, each a margin beyond the furthest pass "
              "(the margin chosen on validation passes; no rule on constant, quantized or "
              "drifting signals)")
    return [
        "Each model is judged at its own threshold, calibrated on validation passes at "
        f"{cfg.calibrate.target_ffr:.2%} false-fail; test false-fail can differ (drift).",
        f"Confidence = 1 - exp(-|score - threshold| / {decision.confidence_scale:.4g}); the "
        "scale is the robust spread (IQR/1.349) of validation-pass scores.",
        f"INT8 by {method} quantization (per-channel weights; preprocessing, residual and "
        "score reduction stay float).",
        f"Golden tolerance abs {golden['abs_tol']}, rel {golden['rel_tol']}: twice the worst "
        "INT8-vs-FP32 relative difference on the golden rows (>= 5%), so ARM and x86 INT8 "
        "kernels both pass; abs = 1% of the threshold.",
        f"Fallback: {len(rules)} rules from {source}.",
    ]


def _manifest_evaluation(report: dict[str, Any], decision: Decision, cfg: BuildConfig,
                         train_rows: int) -> dict[str, Any]:  # fmt: skip
    """The headline figures a bundle carries (`bundle inspect` shows them)."""
    m8, m32 = report["models"]["pruned_int8"], report["models"]["fp32"]
    out = {
        "roc_auc": m8.get("roc_auc"), "recall": m8["recall"], "test_ffr": m8.get("test_ffr"),
        "val_ffr": decision.val_ffr, "target_ffr": cfg.calibrate.target_ffr,
        "fp32_roc_auc": m32.get("roc_auc"),
        "agreement_vs_fp32": report["parity"]["int8_vs_pruned_fp32"]["decision_agreement"],
        "quantization": report["quantization"]["method"], "params": m8.get("params"),
        "size_ratio_vs_fp32": m8["size_bytes"] / m32["size_bytes"],
        "p50_latency_us": report["latency"]["pruned_int8"]["p50_us"],
        "golden_tolerance": "2x worst INT8-vs-FP32 relative difference (>= 5%); abs 1% of "
                            "threshold (x86 vs ARM INT8 kernels)",
        "data": report["data"]["source"], "train_rows": train_rows,
        "gates": report["gates"],
        "baseline_verdict": (report.get("baselines") or {}).get("verdict"),
        "scorer": ("autoencoder + supervised head" if (report.get("supervised") or {}).get("kept")
                   else "autoencoder"),
        "network": "-".join(map(str, report["training"]["pruned_sizes"])) + (
            " (distilled student)" if (report.get("distillation") or {}).get("kept") else ""),
    }
    return {k: v for k, v in out.items() if v is not None}


def _floor_figures(split: Split, cfg: BuildConfig, scored: dict[str, Scored],
                   decision: Decision, drift: dict[str, Any],
                   missing: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What a product engineer acts on: baselines on the same splits, false-fail per lot /
    wafer / tester, confusion counts, drift against the noise floor, missing values."""
    t, target = split.test, cfg.calibrate.target_ffr
    s8 = scored["pruned_int8"]
    flagged = s8.test > decision.threshold
    out: dict[str, Any] = {}
    out["baselines"] = compare(split, s8.val, s8.test, target, seed=cfg.train.seed)
    if t.labels is not None:
        fails = t.labels == 1
        out["confusion"] = {"fail_flagged": int((flagged & fails).sum()),
                            "fail_passed": int((~flagged & fails).sum()),
                            "pass_flagged": int((flagged & ~fails).sum()),
                            "pass_passed": int((~flagged & ~fails).sum()),
                            "threshold": decision.threshold}
        if t.groups:
            out["breakdown"] = ffr_by_group(flagged, t.passes, t.groups, target)
    test_missing = np.isnan(t.x).sum(axis=1)
    out["missing"] = {**missing, "test_dies_beyond": int((test_missing > missing["max_missing"])
                                                         .sum()),
                      "test_most_missing": int(test_missing.max()) if len(t) else 0}
    test_psi = window_psi(drift, t.x)
    out["drift"] = {"alert_psi": drift["alert_psi"], "noise_floor_psi": drift["noise_floor_psi"],
                    "lot_to_lot_psi": drift["lot_to_lot_psi"], "period_psi": drift["period_psi"],
                    "horizon": drift["horizon"], "test_psi": test_psi,
                    "reference_rows": drift["pool"], "window": drift["window"],
                    "reference": "the most recent passing dies before the test part"}
    return out
