"""Distillation (optimize/distill.py): a student that follows its teacher, and the rule that
keeps it only when it is smaller, faster and as good. Small data (600 dies x 32) and a few
epochs, so each test takes seconds."""

from __future__ import annotations

import copy

import numpy as np
from scipy.stats import spearmanr

from optimize.distill import (
    Candidate,
    DistillConfig,
    _why_not,
    distill,
    extra_false_fails,
    offer_student,
    student_sizes,
)
from optimize.export import run, to_onnx
from optimize.train import Detector, TrainConfig
from tests.optimize_support import ae_inputs, small_model, small_split

FAST = DistillConfig(widths=(8,), epochs=15, latency_runs=200)


def test_the_student_is_smaller_and_ranks_dies_like_its_teacher():
    split, prep = small_split()
    teacher = small_model()
    z_train, z_val = ae_inputs()
    result = distill(teacher, z_train, z_val, FAST, TrainConfig(epochs=3))
    student = result.student
    assert student.sizes == student_sizes(32, FAST) == (32, 8, 32)
    assert student.n_params() < teacher.n_params()
    t = run(to_onnx(Detector.fit(prep, teacher, split.train.x), 3), split.test.x)[0]
    s = run(to_onnx(Detector.fit(prep, student, split.train.x), 3), split.test.x)[0]
    assert spearmanr(t, s).statistic > 0.8
    again = distill(teacher, z_train, z_val, FAST, TrainConfig(epochs=3)).student
    for a, b in zip(student.parameters(), again.parameters(), strict=True):
        assert np.array_equal(a.detach().numpy(), b.detach().numpy())  # same seed, same weights


def _figures(params: int, layers: int, auc: float, recall: float, ffr: float = 0.01) -> dict:
    part = {"roc_auc": auc, "ffr": ffr, "recall_equal_ffr": {"subtle": recall, "tiny": 0.0},
            "class_size": {"subtle": 100, "tiny": 5}}
    return {"params": params, "layers": layers, "val": part, "test": copy.deepcopy(part)}


def test_the_student_is_kept_only_when_smaller_no_deeper_and_as_good():
    cfg = DistillConfig()
    teacher = _figures(90_000, 6, 0.990, 0.90)
    assert _why_not({"teacher": teacher, "student": _figures(16_000, 2, 0.987, 0.885, 0.015),
                     "target_ffr": 0.01}, cfg) == []  # within 0.005 AUC, 0.02 recall, FFR band
    worse = _why_not({"teacher": teacher, "student": _figures(16_000, 2, 0.980, 0.80, 0.025),
                      "target_ffr": 0.01}, cfg)
    assert any("ROC AUC" in r for r in worse) and any("subtle recall" in r for r in worse)
    assert any("false-fail 2.50% outside [0.50%, 2.00%]" in r for r in worse)
    deeper = _why_not({"teacher": teacher, "student": _figures(16_000, 8, 0.995, 0.95),
                       "target_ffr": 0.01}, cfg)
    assert deeper == ["deeper (8 vs 6 layers)"]
    bigger = _why_not({"teacher": teacher, "student": _figures(95_000, 2, 0.995, 0.95),
                       "target_ffr": 0.01}, cfg)
    assert bigger == ["not smaller"]


def test_a_student_failing_more_good_dies_than_its_teacher_beyond_noise_is_dropped():
    """Paired on the same test passes: 18 good dies only the student fails against 4 only the
    teacher fails is beyond noise (one-sided exact binomial p = 0.002); 8 against 5 is not,
    though the student's rate is higher there too."""
    split, _ = small_split()
    passes = np.flatnonzero(split.test.passes)
    n = len(split.test)

    def pair(student_only: int, teacher_only: int) -> tuple[Candidate, Candidate]:
        t, s = np.zeros(n), np.zeros(n)
        t[passes[:teacher_only]] = 2.0
        s[passes[teacher_only:teacher_only + student_only]] = 2.0
        t[passes[-3:]] = s[passes[-3:]] = 2.0  # failed by both: not a difference
        return (Candidate(b"", 1, 1, np.zeros(1), t, 1.0),
                Candidate(b"", 1, 1, np.zeros(1), s, 1.0))

    worse = extra_false_fails(*pair(18, 4), split.test, "test")
    assert worse == {"student_only": 18, "teacher_only": 4, "passes": len(passes),
                     "p_value": worse["p_value"]} and worse["p_value"] < 0.01
    noise = extra_false_fails(*pair(8, 5), split.test, "test")
    assert noise is not None and noise["p_value"] > 0.2
    teacher = _figures(90_000, 6, 0.990, 0.90)
    for extra, dropped in ((worse, True), (noise, False)):
        reasons = _why_not({"teacher": teacher, "student": _figures(16_000, 2, 0.990, 0.90),
                            "target_ffr": 0.01, "ffr_vs_teacher": {"test": extra}},
                           DistillConfig())
        assert any("good dies the teacher passes" in r for r in reasons) == dropped


def test_offer_reports_both_models_and_goes_on_with_the_one_it_keeps():
    split, prep = small_split()
    teacher = small_model()
    net, report = offer_student(teacher, prep, split.train.x, split, FAST, TrainConfig(epochs=3),
                                3, 0.01)
    assert report is not None
    assert set(report["teacher"]) >= {"params", "size_bytes", "p50_us", "val", "test"}
    assert 0 <= report["parity_with_teacher"]["decision_agreement"] <= 1
    assert set(report["ffr_vs_teacher"]["test"]) == {"student_only", "teacher_only", "passes",
                                                     "p_value"}
    assert (net is not teacher) == report["kept"]
    assert ("kept" if report["kept"] else "dropped") in report["verdict"]
    off, none = offer_student(teacher, prep, split.train.x, split,
                              DistillConfig(enabled=False), TrainConfig(), 3, 0.01)
    assert off is teacher and none is None
