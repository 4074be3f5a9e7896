"""Stage 4b: distillation. A smaller student autoencoder learns to reproduce the (pruned)
teacher's reconstructions; it replaces the teacher only when it is smaller, faster and as good.

Why a student at all: on 256 parameters the pruned teacher (256-154-38-10-38-154-256 on the
floor data) is no longer what a single-row call costs; the graph's fixed part is
(preprocessing, residual, TopK, the runtime's per-call and per-node cost: 18.5 us of the
unpruned model's 49.6 us on the floor data). Fewer layers mean fewer nodes as well as fewer
multiply-adds, which pruning, that keeps the depth, cannot give.

Training: the student sees the teacher's *function*, not the data's: target = teacher(input)
for the same input, and the inputs are the training passes, the same passes with a block of
columns imputed (as the teacher was trained: `optimize.train._mask_blocks`) and the same
passes with Gaussian noise on a random share of the columns (`noise`, in robust sigmas). The
noisy inputs matter most: an anomaly score is the reconstruction error of dies *off* the
pass manifold, so the student must follow the teacher there, where no training pass lies.
Adam on mean squared difference, early stopping on the validation passes' difference.

The student's residual weights are its own (`Detector.fit`), so its score is on the same
footing as the teacher's (about 1 for a typical pass).

`judge_student` scores teacher and student (FP32 ONNX, each at its own threshold calibrated
on validation passes) on the validation and test rows and keeps the student only when it has
fewer parameters in no more layers (fewer multiply-adds and no more nodes: faster on any CPU;
the single-row p50 of both is measured, interleaved, and reported, but a build must not depend
on the load of the box it runs on, so it does not decide) and, on both
the validation and the time-ordered test part, a ROC AUC no more than `auc_tolerance` below
the teacher's and a recall at equal false-fail no more than `recall_tolerance` (or one die,
whichever is more) below it on every defect class with at least `min_class` dies, a
false-fail at its own threshold inside [0.5x, 2x] of the target wherever the teacher's is,
and no more false fails than the teacher's beyond noise: paired on the same passes, the good
dies only the student fails against those only the teacher fails, one-sided exact binomial
(McNemar) p >= `ffr_p_value` (0.05). Each model's threshold is set at the target on the
validation passes, so this bites on the test part: a student whose tail sits higher on later
dies (floor seed 0, earlier: 1.09-1.12% vs the teacher's 0.91%) is dropped only when the
difference is more than the two models' shared sampling noise.
Without labels quality cannot be judged and the teacher stays.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optimize.baselines import part_figures
from optimize.calibrate import calibrate_threshold
from optimize.evaluate import EvaluateConfig, measure_latency
from optimize.export import run, to_onnx
from optimize.quantize import parity
from optimize.split import Split
from optimize.train import AutoEncoder, Detector, TrainConfig, _mask_blocks, torch_threads

log = logging.getLogger("edgefleet.optimize")


@dataclass(frozen=True)
class DistillConfig:
    enabled: bool = True
    widths: tuple[int, ...] = (64,)  # student encoder hidden widths; the decoder mirrors them
    epochs: int = 40
    lr: float = 3e-3
    patience: int = 4
    noise: float = 1.0  # sd of the noise on perturbed inputs, robust sigmas
    noise_share: float = 0.25  # share of a perturbed row's columns that get noise
    auc_tolerance: float = 0.005  # student AUC may be this much below the teacher's
    recall_tolerance: float = 0.02  # per class, at equal false-fail
    min_class: int = 20  # classes smaller than this are reported, not judged
    ffr_p_value: float = 0.05  # student fails more good dies than the teacher beyond noise
    latency_runs: int = 2000  # single-row runs per model for the keep decision


@dataclass(frozen=True)
class DistillResult:
    student: AutoEncoder
    seconds: float
    best_epoch: int
    val_mse: float  # mean squared difference to the teacher on validation passes


def student_sizes(n_features: int, cfg: DistillConfig) -> tuple[int, ...]:
    hidden = [max(2, min(w, n_features)) for w in cfg.widths]
    return (n_features, *hidden, *hidden[-2::-1], n_features)


def _inputs(z: torch.Tensor, cfg: DistillConfig,
            gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """A batch of training inputs: a third clean, a third with an imputed block, a third with
    noise on a random share of the columns (module docstring)."""
    kind = torch.randint(0, 3, (len(z),), generator=gen)
    masked = _mask_blocks(z, 1.0, gen)
    pick = torch.rand(z.shape, generator=gen) < cfg.noise_share
    noisy = z + pick * torch.randn(z.shape, generator=gen) * cfg.noise
    return torch.where((kind == 1)[:, None], masked, torch.where((kind == 2)[:, None], noisy, z))


def distill(teacher: AutoEncoder, z_train: np.ndarray, z_val: np.ndarray, cfg: DistillConfig,
            train_cfg: TrainConfig) -> DistillResult:  # fmt: skip
    """Train a student (`student_sizes`) on the teacher's outputs; z_train / z_val: (n, F)
    autoencoder inputs of passing dies. Same seed, same data, same threads -> same weights."""
    t0 = time.perf_counter()
    teacher = copy.deepcopy(teacher).eval()
    torch.manual_seed(train_cfg.seed + 101)
    student = AutoEncoder(student_sizes(z_train.shape[1], cfg))
    xt, xv = torch.from_numpy(z_train), torch.from_numpy(z_val)
    gen = torch.Generator().manual_seed(train_cfg.seed + 101)
    with torch.no_grad():
        val_target = teacher(xv)
    batch = max(8, min(train_cfg.batch_size, len(xt) // 16))
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    best, best_epoch, best_state, stale = math.inf, 0, copy.deepcopy(student.state_dict()), 0
    with torch_threads(train_cfg.threads):
        for epoch in range(1, cfg.epochs + 1):
            student.train()
            for idx in torch.randperm(len(xt), generator=gen).split(batch):
                zin = _inputs(xt[idx], cfg, gen)
                with torch.no_grad():
                    target = teacher(zin)
                loss = ((student(zin) - target) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            student.eval()
            with torch.no_grad():
                val = float(((student(xv) - val_target) ** 2).mean())
            if val < best * (1 - 1e-3):
                best, best_epoch, best_state, stale = val, epoch, copy.deepcopy(
                    student.state_dict()), 0
            else:
                stale += 1
            log.info("distill: epoch %d/%d  student-teacher val mse %.5f", epoch, cfg.epochs, val)
            if stale >= cfg.patience:
                break
    student.load_state_dict(best_state)
    student.eval()
    return DistillResult(student, time.perf_counter() - t0, best_epoch, best)


@dataclass(frozen=True)
class Candidate:
    """One model's FP32 graph and its scores, threshold set on the validation passes."""

    onnx: bytes
    params: int
    layers: int
    val: np.ndarray
    test: np.ndarray
    threshold: float


def candidate(det: Detector, top_k: int, split: Split, target_ffr: float) -> Candidate:
    model = to_onnx(det, top_k)
    val, test = run(model, split.val.x)[0], run(model, split.test.x)[0]
    thr = calibrate_threshold(val[split.val.passes], target_ffr).threshold
    return Candidate(model, det.model.n_params(), len(det.model.layers), val, test, thr)


def judge_student(teacher: Candidate, student: Candidate, split: Split, cfg: DistillConfig,
                  target_ffr: float, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The report's `distillation` object: both models' size, parameters, latency, quality on
    validation and test, the student's parity with the teacher, and the keep decision."""
    lat = measure_latency({"teacher": teacher.onnx, "student": student.onnx}, split.test.x,
                          EvaluateConfig(latency_runs=cfg.latency_runs, latency_rounds=10,
                                         throughput_runs=1, throughput_batch=256))
    out: dict[str, Any] = {"teacher": {}, "student": {}}
    vp = split.val.passes
    for name, c in (("teacher", teacher), ("student", student)):
        out[name] = {"params": c.params, "layers": c.layers, "size_bytes": len(c.onnx),
                     "p50_us": lat[name]["p50_us"], "p99_us": lat[name]["p99_us"],
                     "val": part_figures(split.val, c.val, c.val[vp], c.threshold, target_ffr,
                                         seed=seed, boot=100),
                     "test": part_figures(split.test, c.test, c.val[vp], c.threshold,
                                          target_ffr, seed=seed, boot=100)}
    p = parity(teacher.test, student.test, teacher.threshold)
    out["parity_with_teacher"] = {
        "decision_agreement": float(np.mean((teacher.test > teacher.threshold)
                                            == (student.test > student.threshold))),
        "spearman": p.spearman}
    out["target_ffr"] = target_ffr
    out["ffr_vs_teacher"] = {name: extra_false_fails(teacher, student, part, scores)
                             for name, part, scores in (("val", split.val, "val"),
                                                        ("test", split.test, "test"))}
    reasons = _why_not(out, cfg)
    out["kept"] = not reasons
    out["reasons"] = reasons
    t, s = out["teacher"], out["student"]
    out["verdict"] = (
        f"Distillation: student {s['params']:,} parameters ({s['p50_us']:.1f} us p50) vs teacher "
        f"{t['params']:,} ({t['p50_us']:.1f} us); "
        + ("kept: as good, smaller and no deeper." if not reasons else
           "dropped: " + "; ".join(reasons) + "."))
    return out


def extra_false_fails(teacher: Candidate, student: Candidate, part: Any,
                      scores: str) -> dict[str, Any] | None:  # fmt: skip
    """Passes of `part` the student fails and the teacher passes (`student_only`) and the
    other way round, and the one-sided exact binomial (McNemar) p-value of the student failing
    more good dies than the teacher. Paired on the same dies, so it separates a real shift of
    the student's tail from the sampling noise both false-fail rates share. None without
    labels."""
    from scipy.stats import binomtest

    if part.labels is None or not part.passes.any():
        return None
    p = part.passes
    t = getattr(teacher, scores)[p] > teacher.threshold
    s = getattr(student, scores)[p] > student.threshold
    b, c = int((s & ~t).sum()), int((t & ~s).sum())
    pvalue = float(binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    return {"student_only": b, "teacher_only": c, "passes": int(p.sum()), "p_value": pvalue}


def _why_not(r: dict[str, Any], cfg: DistillConfig) -> list[str]:
    t, s = r["teacher"], r["student"]
    reasons = []
    if s["params"] >= t["params"]:
        reasons.append("not smaller")
    if s["layers"] > t["layers"]:
        reasons.append(f"deeper ({s['layers']} vs {t['layers']} layers)")
    low, high = 0.5 * r["target_ffr"], 2 * r["target_ffr"]
    for part in ("val", "test"):
        tq, sq = t[part], s[part]
        if tq is None or sq is None:
            reasons.append(f"no labels on the {part} part to judge quality")
            continue
        if low <= tq["ffr"] <= high and not low <= sq["ffr"] <= high:
            reasons.append(f"{part} false-fail {sq['ffr']:.2%} outside [{low:.2%}, {high:.2%}] "
                           f"(teacher {tq['ffr']:.2%})")
        extra = (r.get("ffr_vs_teacher") or {}).get(part)
        if extra and extra["p_value"] < cfg.ffr_p_value:
            reasons.append(f"{part} false-fail {sq['ffr']:.2%} vs teacher {tq['ffr']:.2%}: the "
                           f"student fails {extra['student_only']} good dies the teacher passes,"
                           f" the teacher {extra['teacher_only']} the student passes (paired "
                           f"p = {extra['p_value']:.3f})")
        if sq["roc_auc"] < tq["roc_auc"] - cfg.auc_tolerance:
            reasons.append(f"{part} ROC AUC {sq['roc_auc']:.4f} vs teacher {tq['roc_auc']:.4f}")
        for cls, rec in tq["recall_equal_ffr"].items():
            if tq["class_size"][cls] < cfg.min_class:
                continue
            got = sq["recall_equal_ffr"].get(cls, 0.0)
            if got < rec - max(cfg.recall_tolerance, 1.0 / tq["class_size"][cls]):
                reasons.append(f"{part} {cls} recall {got:.3f} vs teacher {rec:.3f}")
    return reasons


def offer_student(teacher: AutoEncoder, prep: Any, x_train: np.ndarray, split: Split,
                  cfg: DistillConfig, train_cfg: TrainConfig, top_k: int,
                  target_ffr: float) -> tuple[AutoEncoder, dict[str, Any] | None]:  # fmt: skip
    """Distil `teacher`, judge the student, and return the network the build goes on with (the
    student when kept, else the teacher) and the report's `distillation` object (None when
    the stage is off). `prep`: the build's `Preprocessor`; x_train: raw training passes."""
    if not cfg.enabled:
        return teacher, None
    z_train, z_val = prep.transform(x_train), prep.transform(split.val.x[split.val.passes])
    result = distill(teacher, z_train, z_val, cfg, train_cfg)
    held = split.val.x[split.val.passes]
    t = candidate(Detector.fit(prep, teacher, x_train, x_holdout=held), top_k, split, target_ffr)
    s = candidate(Detector.fit(prep, result.student, x_train, x_holdout=held), top_k, split,
                  target_ffr)
    report = judge_student(t, s, split, cfg, target_ffr, seed=train_cfg.seed)
    report.update(sizes={"teacher": list(teacher.sizes), "student": list(result.student.sizes)},
                  seconds=round(result.seconds, 1), best_epoch=result.best_epoch,
                  val_mse_vs_teacher=result.val_mse)
    log.info("%s", report["verdict"])
    return (result.student if report["kept"] else teacher), report
