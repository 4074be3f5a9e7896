"""Stage 8: judge every model on the test split and write the report.

Models: the unpruned FP32 autoencoder (the baseline every ratio is against), the pruned FP32
one (the distilled student when `optimize.distill` kept it; with the supervised head when
`optimize.supervised` kept it), its INT8 form that ships, and the rule-based fallback. Each
is judged at its own threshold, calibrated on validation passes; the rules' "score" is the
number of violated limits (fail when > 0), so their ROC curve has a single operating point.

Figures: ROC AUC, recall per defect class at the threshold, false-fail rate on test passes,
INT8-vs-FP32 decision agreement and score rank correlation, file sizes, ONNX Runtime single-row
latency (p50/p99) and batch throughput on one thread. Latency runs are interleaved across the
models in rounds, so load from other processes hits all of them alike and the ratios hold even
when the absolute numbers are noisy. Without labels only parity, latency and sizes exist.

The report (`write_report`) opens with "What this build means" in plain sentences (the gates,
the baseline verdict, counts at the threshold, false-fail per group, drift against the noise
floor, missing values, the rules), then the tables (models, baselines) and the plots: ROC,
score histograms, latency on a log scale with the host named, false-fail vs threshold,
false-fail per lot / wafer / tester with intervals, missing values per die vs max_missing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from optimize.breakdown import BAND, wilson
from optimize.calibrate import Decision, calibrate_threshold
from optimize.export import session
from optimize.quantize import parity
from optimize.split import Split
from optimize.steps_report import markdown as steps_markdown

log = logging.getLogger("edgefleet.optimize")

MODELS = ("fp32", "pruned_fp32", "pruned_int8", "rules")
LABELS = {"fp32": "FP32", "pruned_fp32": "pruned FP32", "pruned_int8": "pruned INT8",
          "rules": "rule fallback"}


@dataclass(frozen=True)
class EvaluateConfig:
    latency_runs: int = 3000  # single-row runs per model (after warm-up)
    latency_rounds: int = 10  # interleaved rounds the runs are spread over
    throughput_batch: int = 1024
    throughput_runs: int = 5


@dataclass(frozen=True)
class Scored:
    """One model's scores on the validation and test rows, and its decision."""

    val: np.ndarray  # (n_val,)
    test: np.ndarray  # (n_test,)
    threshold: float
    decision: Decision | None = None  # None for the rules
    model: bytes | None = None  # ONNX bytes (None for the rules)


def _classes(split: Split) -> dict[str, np.ndarray]:
    """Failing classes of the test rows -> (n_test,) bool masks."""
    t = split.test
    if t.defect is not None:
        return {str(c): t.defect == c for c in sorted(set(t.defect.tolist())) if c != "none"}
    if t.labels is not None:
        return {"fail": t.labels == 1}
    return {}


def model_figures(split: Split, s: Scored) -> dict[str, Any]:
    t = split.test
    fails = s.test > s.threshold
    out: dict[str, Any] = {
        "threshold": s.threshold,
        "test_flag_rate": float(fails.mean()) if len(fails) else 0.0,
        "test_ffr": (float(fails[t.passes].mean())
                     if t.labels is not None and t.passes.any() else None),
        "test_passes": int(t.passes.sum()) if t.labels is not None else None,
        "test_false_fails": int(fails[t.passes].sum()) if t.labels is not None else None,
        "val_ffr": float((s.val > s.threshold)[split.val.passes].mean()),
        "scores_finite": bool(np.isfinite(s.test).all() and np.isfinite(s.val).all()),
    }
    if s.decision is not None:
        out["confidence_scale"] = s.decision.confidence_scale
        out["target_ffr"] = s.decision.target_ffr
    if s.model is not None:
        out["size_bytes"] = len(s.model)
    if t.labels is not None and 0 < t.labels.sum() < len(t.labels):
        out["roc_auc"] = float(roc_auc_score(t.labels, s.test))
    out["recall"] = {c: float(fails[m].mean()) for c, m in _classes(split).items() if m.any()}
    if s.decision is not None and t.labels is not None and t.passes.any():
        out["at_target_test_ffr"] = operating_point(s.test, t.passes, _classes(split),
                                                    s.decision.target_ffr)
    return out


def operating_point(scores: np.ndarray, passes: np.ndarray, classes: dict[str, np.ndarray],
                    target: float) -> dict[str, Any]:
    """Recall per class where the test false-fail is the target: the threshold set on the test
    passes themselves (`calibrate_threshold`: at most floor(target x passes) above it). This is
    the model's quality at the target rate, free of where the validation threshold happened to
    land; whether that threshold holds is the false-fail band check's job."""
    d = calibrate_threshold(scores[passes], target)
    fails = scores > d.threshold
    return {"threshold": d.threshold, "test_ffr": d.val_ffr,
            "recall": {c: float(fails[m].mean()) for c, m in classes.items() if m.any()}}


def measure_latency(models: dict[str, bytes], x: np.ndarray,
                    cfg: EvaluateConfig) -> dict[str, dict[str, float]]:  # fmt: skip
    """Single-row p50/p99 (microseconds) and batch throughput (rows/s), one thread each."""
    sessions = {name: session(m, threads=1) for name, m in models.items()}
    rows = np.asarray(x[:64], dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in models}
    for sess in sessions.values():
        for i in range(100):  # warm-up
            sess.run(["score"], {"params": rows[i % len(rows)][None]})
    per_round = max(1, cfg.latency_runs // cfg.latency_rounds)
    for r in range(cfg.latency_rounds):
        for name, sess in sessions.items():
            bucket = times[name]
            for i in range(per_round):
                row = rows[(r * per_round + i) % len(rows)][None]  # (1, F)
                t0 = time.perf_counter()
                sess.run(None, {"params": row})
                bucket.append(time.perf_counter() - t0)
        if (r + 1) % max(1, cfg.latency_rounds // 4) == 0:
            log.info("latency: %d/%d rounds of %d single-row runs per model", r + 1,
                     cfg.latency_rounds, per_round)
    reps = -(-cfg.throughput_batch // len(rows))
    batch = np.tile(rows, (reps, 1))[: cfg.throughput_batch]
    out = {}
    for name, sess in sessions.items():
        sess.run(None, {"params": batch})
        per_call = []
        for _ in range(cfg.throughput_runs):
            t0 = time.perf_counter()
            sess.run(None, {"params": batch})
            per_call.append(time.perf_counter() - t0)
        t = np.array(times[name]) * 1e6
        out[name] = {
            "p50_us": float(np.percentile(t, 50)),
            "p99_us": float(np.percentile(t, 99)),
            "rows_per_s": float(len(batch) / np.median(per_call)),
            "runs": len(t),
        }
    return out


def evaluate(split: Split, scored: dict[str, Scored], latency: dict[str, dict[str, float]],
             params: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """The report's figures (a JSON-ready dict) for the models in `scored` (keys of MODELS)."""
    report: dict[str, Any] = {"models": {}, "parity": {}, "latency": latency}
    for name, s in scored.items():
        report["models"][name] = model_figures(split, s)
        if name in params:
            report["models"][name]["params"] = params[name]
    q = scored["pruned_int8"]
    for ref in ("pruned_fp32", "fp32"):
        p = parity(scored[ref].test, q.test, scored[ref].threshold)
        agree = float(np.mean((scored[ref].test > scored[ref].threshold) == (q.test > q.threshold)))
        report["parity"][f"int8_vs_{ref}"] = {
            "decision_agreement": agree,  # each at its own calibrated threshold
            "agreement_at_fp32_threshold": p.agreement,
            "spearman": p.spearman,
            "median_rel_diff": p.median_rel_diff,
        }
    report["checks"] = _checks(report)
    return report


def _checks(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's acceptance numbers for the 512-parameter synthetic data, evaluated on this
    build (informational on other data)."""
    m, lat, par = r["models"], r["latency"], r["parity"]
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float | None, limit: float, *, at_most: bool) -> None:
        if value is None:
            return
        ok = value <= limit if at_most else value >= limit
        checks[name] = {"value": value, "limit": limit, "rule": "<=" if at_most else ">=",
                        "ok": bool(ok)}

    check("int8_size_ratio", m["pruned_int8"]["size_bytes"] / m["fp32"]["size_bytes"], 0.15,
          at_most=True)
    check("int8_p50_latency_ratio", lat["pruned_int8"]["p50_us"] / lat["fp32"]["p50_us"], 0.5,
          at_most=True)
    if "roc_auc" in m["fp32"]:
        check("int8_auc_minus_fp32_auc", m["pruned_int8"]["roc_auc"] - m["fp32"]["roc_auc"],
              -0.005, at_most=False)
    check("int8_vs_pruned_fp32_agreement", par["int8_vs_pruned_fp32"]["decision_agreement"],
          0.995, at_most=False)
    recall = m["pruned_int8"]["recall"]
    check("int8_subtle_recall", recall.get("subtle"), 0.90, at_most=False)
    at_target = m["pruned_int8"].get("at_target_test_ffr") or {}
    check("int8_subtle_recall_at_target_test_ffr", at_target.get("recall", {}).get("subtle"),
          0.90, at_most=False)
    ffr_check = _ffr_band_check(m["pruned_int8"])
    if ffr_check is not None:
        checks["int8_test_ffr_in_band"] = ffr_check
    check("int8_gross_recall", recall.get("gross"), 0.99, at_most=False)
    check("rules_gross_recall", m["rules"]["recall"].get("gross"), 0.99, at_most=False)
    return checks


def _ffr_band_check(m: dict[str, Any]) -> dict[str, Any] | None:
    """The threshold set on validation holds on the test part: its test false-fail inside
    [0.5x, 2x] of the target (issue 13's bar for every lot and tester). Not `<= target`: the
    threshold sits at the target on validation, so the test rate is the target plus the
    sampling noise of both parts, and `<=` failed about half of well-calibrated builds. The
    Wilson interval is recorded beside it; `ci_contains_target` is information, not the
    check: with validation and test parts of equal size an exactly calibrated build misses
    it about one time in six (the validation quantile's own noise is not in the interval)."""
    ffr, n, k = m.get("test_ffr"), m.get("test_passes"), m.get("test_false_fails")
    target = m.get("target_ffr")
    if ffr is None or not target or not n:
        return None
    lo, hi = BAND[0] * target, BAND[1] * target
    ci = wilson(int(k), int(n))
    return {"value": ffr, "limit": [lo, hi], "rule": "in", "ok": bool(lo <= ffr <= hi),
            "ci": list(ci), "ci_contains_target": bool(ci[0] <= target <= ci[1])}


# --------------------------------------------------------------------------------------------
# Writing the report


def summary_table(report: dict[str, Any]) -> str:
    """A fixed-width table of the headline figures, and the checks."""
    m, lat = report["models"], report["latency"]
    classes = sorted({c for v in m.values() for c in v.get("recall", {})})
    labelled = any(v.get("test_ffr") is not None for v in m.values())
    head = ["model", "size", "params", "p50 us", "p99 us", "rows/s", "AUC",
            "FFR test" if labelled else "flagged test", *[f"rec {c}" for c in classes]]
    rows = []
    for name in MODELS:
        v, lv = m[name], lat.get(name, {})
        rows.append([
            LABELS[name],
            _size(v.get("size_bytes")),
            f"{v['params']:,}" if "params" in v else "-",
            _num(lv.get("p50_us"), ".1f"),
            _num(lv.get("p99_us"), ".1f"),
            _num(lv.get("rows_per_s"), ",.0f"),
            _num(v.get("roc_auc"), ".4f"),
            _num(v.get("test_ffr") if labelled else v.get("test_flag_rate"), ".2%"),
            *[_num(v["recall"].get(c), ".3f") for c in classes],
        ])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    for name, p in report["parity"].items():
        lines.append(f"{name.replace('_', ' ')}: decisions agree {p['decision_agreement']:.2%}, "
                     f"rank correlation {p['spearman']:.5f}")
    if report.get("checks"):
        lines.append("targets (set for the 512-parameter synthetic benchmark):")
    lines += [check_line(name, c) for name, c in report.get("checks", {}).items()]
    return "\n".join(lines)


def check_line(name: str, c: dict[str, Any]) -> str:
    """One target check as text: '[ok] name = value[, 95% CI [lo, hi]] (target rule limit)'."""
    ci = f", 95% CI [{c['ci'][0]:.4g}, {c['ci'][1]:.4g}]" if "ci" in c else ""
    return (f"[{'ok' if c['ok'] else 'MISS'}] {name} = {c['value']:.4g}{ci} "
            f"(target {c['rule']} {c['limit']})")


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def write_report(out_dir: Path, report: dict[str, Any], split: Split,
                 scored: dict[str, Scored]) -> list[Path]:  # fmt: skip
    """report.json, report.md and the PNG plots into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    files = [out_dir / "report.json", out_dir / "report.md"]
    files[0].write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plots = []
    t = split.test
    if t.labels is not None and 0 < t.labels.sum() < len(t.labels):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for name in MODELS:
            fpr, tpr, _ = roc_curve(t.labels, scored[name].test)
            auc = report["models"][name].get("roc_auc", float("nan"))
            ax.plot(np.maximum(fpr, 1e-4), tpr, label=f"{LABELS[name]} (AUC {auc:.4f})",
                    marker="o" if name == "rules" else None)
        ax.set(xscale="log", xlim=(1e-4, 1), xlabel="false-fail rate (test passes; 0 at 1e-4)",
               ylabel="recall (test fails)", title="ROC on the test split")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        plots.append(("roc.png", "ROC curves", fig))
    groups = {"pass" if t.labels is not None else "all": t.passes, **_classes(split)}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, name in zip(axes, MODELS[:3], strict=True):
        s = scored[name]
        positive = np.maximum(s.test, 1e-3)
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max() * 1.01), 60)
        for label, mask in groups.items():
            if mask.any():
                ax.hist(positive[mask], bins=bins, alpha=0.55, label=f"{label} ({mask.sum()})")
        ax.axvline(s.threshold, color="k", ls="--", lw=1, label="threshold")
        ax.set(xscale="log", yscale="log", title=LABELS[name], xlabel="score")
    axes[0].set_ylabel("test dies")
    axes[0].legend(fontsize=8)
    plots.append(("scores.png", "Score histograms by class (test split)", fig))
    lat = report["latency"]
    names = [n for n in MODELS if n in lat]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [lat[n]["p50_us"] for n in names], 0.4, label="p50")
    ax.bar(xs + 0.2, [lat[n]["p99_us"] for n in names], 0.4, label="p99")
    ax.set_xticks(xs, [LABELS[n] for n in names])
    ax.set(yscale="log", ylabel="single-row latency (us, log scale), 1 thread",
           title=f"ONNX Runtime latency on {_host()}")
    ax.legend()
    plots.append(("latency.png", "Single-row latency", fig))
    plots += _floor_plots(plt, report, split, scored)
    for fname, _, fig in plots:
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        files.append(out_dir / fname)
    files[1].write_text(_markdown(report, [(f, title) for f, title, _ in plots]))
    return files


def _readable(value: Any) -> str:
    """A findings value as text: {'f1': 3, 'f2': 0.5} -> 'f1 (3), f2 (0.5)'."""
    if isinstance(value, dict):
        return ", ".join(f"{k} ({v:.2%})" if isinstance(v, float) else f"{k} ({v})"
                         for k, v in value.items()) or "none"
    return str(value) if value else "none"


def _host() -> str:
    import platform

    return f"{platform.node() or 'host'} ({platform.machine()}, {os.cpu_count()} CPUs)"


def _floor_plots(plt: Any, report: dict[str, Any], split: Split,
                 scored: dict[str, Scored]) -> list[tuple[str, str, Any]]:  # fmt: skip
    """False-fail vs threshold, per-group false-fail, missing values vs max_missing."""
    out = []
    t, s = split.test, scored["pruned_int8"]
    target = (s.decision.target_ffr if s.decision else None)
    if t.labels is not None and t.passes.any():
        fig, ax = plt.subplots(figsize=(6, 4))
        p = np.sort(s.test[t.passes])
        thr = np.quantile(p, np.linspace(0.5, 1.0, 200))
        ax.plot(thr, [(p > x).mean() for x in thr], label="test passes")
        v = s.val[split.val.passes]
        ax.plot(thr, [(v > x).mean() for x in thr], label="validation passes", ls=":")
        ax.axvline(s.threshold, color="k", ls="--", lw=1, label="shipped threshold")
        if target:
            ax.axhline(target, color="r", lw=1, label=f"target {target:.2%}")
        ax.set(yscale="log", xlabel="threshold (score)", ylabel="false-fail rate",
               title="False-fail vs threshold (shipped model)")
        ax.legend(fontsize=8)
        out.append(("ffr_threshold.png", "False-fail vs threshold", fig))
    by = report.get("breakdown") or {}
    if by:
        fig, axes = plt.subplots(1, len(by), figsize=(5 * len(by), 4), squeeze=False)
        for ax, (kind, g) in zip(axes[0], by.items(), strict=True):
            names = list(g["groups"])
            rates = [g["groups"][n]["ffr"] for n in names]
            lo = [max(0.0, r - g["groups"][n]["ci"][0]) for n, r in zip(names, rates,
                                                                        strict=True)]
            hi = [max(0.0, g["groups"][n]["ci"][1] - r) for n, r in zip(names, rates,
                                                                        strict=True)]
            ax.errorbar(range(len(names)), rates, yerr=[lo, hi], fmt="o", ms=3)
            for edge in g["band"]:
                ax.axhline(edge, color="r", ls="--", lw=1)
            ax.set(title=f"false-fail per {kind} (95% CI)", ylabel="false-fail rate")
            ax.set_xticks(range(len(names)), names if len(names) <= 12 else [""] * len(names),
                          rotation=60, fontsize=7)
        out.append(("ffr_groups.png", "False-fail per lot, wafer, tester", fig))
    miss = report.get("missing")
    if miss:
        fig, ax = plt.subplots(figsize=(6, 4))
        counts = np.isnan(t.x).sum(axis=1)
        ax.hist(counts, bins=np.arange(0, max(counts.max(), miss["max_missing"]) + 2) - 0.5,
                log=True, label="test dies")
        ax.axvline(miss["max_missing"], color="r", ls="--",
                   label=f"max_missing {miss['max_missing']}")
        ax.set(xlabel="missing values per die", ylabel="dies",
               title="Missing values per die vs max_missing")
        ax.legend(fontsize=8)
        out.append(("missing.png", "Missing values per die", fig))
    return out


def _findings_text(report: dict[str, Any]) -> list[str]:
    """Readable sentences for the engineer: gates, verdict, per-group rates, drift, rules."""
    lines = []
    g = report.get("gates")
    if g:
        if g["passed"]:
            lines.append("All build gates passed: the bundle is signed.")
        else:
            head = ("Signed despite failed gates, accepted risk: " + str(g["accepted_risk"])
                    if g["signed"] else "REFUSED, not signed:")
            lines.append(head)
            lines += [f"  - {r}" for r in g["reasons"]]
    cmp = report.get("baselines")
    if cmp:
        lines.append(cmp["verdict"])
    lines += [report[k]["verdict"] for k in ("distillation", "supervised") if report.get(k)]
    c = report.get("confusion")
    if c:
        lines.append(f"At the threshold {c['threshold']:.4g}: {c['fail_flagged']} fails caught, "
                     f"{c['fail_passed']} missed (escapes), {c['pass_flagged']} good dies failed "
                     f"(overkill), {c['pass_passed']} good dies passed.")
    if report.get("breakdown"):
        from optimize.breakdown import band_summary

        lines.append("False-fail per group: " + band_summary(report["breakdown"]) + ".")
    if report.get("calibration"):
        lines.append(_calibration_text(report["calibration"]))
    d = report.get("drift")
    if d:
        psi = "not measured (under 200 test dies)" if d["test_psi"] is None else \
            f"{d['test_psi']:.3f}"
        lines.append(f"Drift: test part PSI max {psi} against a reference of the "
                     f"{d['reference_rows']} most recent passes (windows of {d['window']} dies); "
                     f"sampling noise floor {d['noise_floor_psi']:.3f}, worst lot-to-lot window "
                     f"{d.get('lot_to_lot_psi', 0.0):.3f}, {_period_text(d)}shipped alert "
                     f"threshold {d['alert_psi']:.3f}.")
    m = report.get("missing")
    if m:
        lines.append(f"Missing values: passes lack at most {m['most_missing_seen']}; max_missing "
                     f"= {m['max_missing']}; {m['test_dies_beyond']} test dies beyond it (they "
                     "get a rules decision or a refusal on the device).")
    f = report.get("fallback")
    if f:
        skipped = ", ".join(f"{v} {k}" for k, v in f["skipped"].items() if v) or "none"
        ffr = "-" if f["test_ffr"] is None else f"{f['test_ffr']:.2%}"
        lines.append(f"Fallback: {f['rules']} rules from {f['source']} (left out: {skipped}); "
                     f"they fail {f['val_ffr']:.2%} of validation and {ffr} of test passes.")
        lines.extend(_fallback_detail(f))
    return lines


def _limit(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _fallback_detail(f: dict[str, Any]) -> list[str]:
    """How the PAT margin was chosen, the rules that fail passes, the signals left out."""
    lines = []
    if f.get("margin") is not None:
        tried = ", ".join(f"{m}x {v:.2%}" for m, v in f["holdout_val_ffr"].items()) or "none"
        lines.append(f"Fallback limits sit {f['margin']:g}x beyond the furthest pass (at least "
                     f"{f['sigmas']:g} robust sigma): the smallest margin whose training-only "
                     f"rules fail at most {f['budget']:.2%} of validation passes (tried: "
                     f"{tried}; the validation figure above is theirs); shipped refitted on "
                     "training and validation passes.")
    failing = [r for r in f.get("per_rule", []) if r["val_fails"] or r["test_fails"]]
    if failing:
        lines.append("Rules that fail passes: " + "; ".join(
            f"{r['feature']} [{_limit(r['low'])}, {_limit(r['high'])}] {r['val_fails']} "
            f"validation, {r['test_fails']} test" for r in failing) + ".")
    if f.get("dropped"):
        lines.append("No rule on: " + "; ".join(f"{k} ({v})" for k, v in f["dropped"].items())
                     + ".")
    return lines


def baselines_table(report: dict[str, Any]) -> str:
    """Methods on the same test rows: AUC, false-fail, recall per class (equal false-fail)."""
    cmp = report.get("baselines")
    if not cmp:
        return ""
    methods = cmp["methods"]
    classes = sorted({c for m in methods.values() for c in m["recall"]})
    head = ["method", "AUC [95% CI]", "FFR test", *[f"{c} @eq.FFR" for c in classes]]
    rows = []
    for name, m in methods.items():
        ci = m["roc_auc_ci"]
        rows.append([cmp["titles"][name], f"{m['roc_auc']:.4f}" + (
            f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
            f"{m['test_ffr']:.2%} ({m['passes_flagged'][0]}/{m['passes_flagged'][1]})",
            *[(f"{m['recall'][c]['recall_equal_ffr']:.3f} ({m['recall'][c]['n']})"
               if c in m["recall"] else "-") for c in classes]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows])


def _markdown(report: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    data, b = report.get("data", {}), report.get("build", {})
    lines = [f"# Build report: {b.get('name', 'model')} {b.get('version', '')}", ""]
    if data:
        lines += ["## Data", ""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in data.items()]
        lines.append("")
    text = _findings_text(report)
    if text:
        lines += ["## What this build means", ""] + [
            (t if t.startswith("  -") else f"- {t}") for t in text] + [""]
    lines += ["## Results (test split)", "", "```", summary_table(report), "```", ""]
    table = baselines_table(report)
    if table:
        lines += ["## Baselines (same test rows; recall at equal false-fail, class size in "
                  "brackets)", "", "```", table, "```", ""]
    lines += steps_markdown(report)
    findings = report.get("findings", {})
    if findings:
        lines += ["## Findings", ""] + [f"- {k.replace('_', ' ')}: {_readable(v)}"
                                        for k, v in findings.items()]
        lines.append("")
    notes = report.get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if b:
        lines += ["## Build", ""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in b.items()
                                     if k != "config"]
        lines.append("- config: see report.json (`build.config`)")
        lines.append("")
    for fname, title in plots:
        lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    return "\n".join(lines)


def _calibration_text(cal: dict[str, Any]) -> str:
    """One sentence: the device's per-tester calibration against the fixed threshold."""
    on, off = cal["on"], cal["off"]

    def share(fig: dict[str, Any], kind: str) -> str:
        g = (fig.get("breakdown") or {}).get(kind)
        if not g or not g["counted"]:
            return "-"
        return f"{round(g['in_band'] * g['counted'])} of {g['counted']}"

    parts = [f"Per-tester calibration on the device (the agent's algorithm replayed on the test "
             f"part in time order from an empty state): false-fail {on['test_ffr']:.2%} "
             f"(fixed threshold {off['test_ffr']:.2%})"]
    for kind in ("lot", "tester"):
        parts.append(f"{kind}s in band {share(on, kind)} (fixed {share(off, kind)})")
    for c in ("subtle_multi", "subtle_uni"):
        if c in on.get("recall", {}):
            parts.append(f"{c} recall {on['recall'][c]:.3f} (fixed {off['recall'][c]:.3f})")
    w = cal.get("warmup")
    if w and w["on"]["first_dies"] is not None and w["on"]["later_dies"] is not None:
        parts.append(f"false-fail on each tester's first {w['dies_per_tester']} dies "
                     f"{w['on']['first_dies']:.2%}, later {w['on']['later_dies']:.2%}")
    return "; ".join(parts) + "."


def _period_text(d: dict[str, Any]) -> str:
    """The drift line's period-to-period figure, when the history was long enough for it."""
    if d.get("period_psi") is None:
        return ""
    return (f"worst earlier period of {d['horizon']} dies against the passes before it "
            f"{d['period_psi']:.3f}, ")
