"""The supervised head (optimize/supervised.py): the graph with the head in ONNX Runtime
against the Python reference, INT8 parity with the head, and the keep/drop decision.

Data: small Gaussian dies with a few correlated factors (16 parameters, 1,500 dies in time
order), so each test trains its autoencoder in a second or two."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from optimize.data import Dataset
from optimize.export import run, to_onnx
from optimize.preprocess import fit_preprocessor
from optimize.quantize import QuantizeConfig, parity, quantize, score_rows
from optimize.split import Split, split_dataset
from optimize.supervised import (
    SupervisedConfig,
    ae_features,
    attach_head,
    fit_head,
    offer_head,
)
from optimize.train import AEConfig, Detector, TrainConfig, new_autoencoder, train

N, F = 1500, 16


def _dies(kind: str, seed: int = 0) -> Dataset:
    """Passes from 3 latent factors plus noise; 8% fails. `direction`: every fail moves 1.2
    sigma along one fixed direction of 4 parameters (hard for an autoencoder, easy for labels).
    `gross_noise_labels`: fails are +8 sigma on one parameter (an autoencoder sees them), but
    the training period's labels are shuffled, so they carry no signal."""
    rng = np.random.default_rng(seed)
    load = rng.normal(size=(3, F))
    x = rng.normal(size=(N, 3)) @ load + 0.5 * rng.normal(size=(N, F))
    fails = rng.random(N) < 0.08
    if kind == "direction":
        shift = np.zeros(F)
        shift[:4] = [1.2, -1.2, 1.2, -1.2]
        x[fails] += shift * x.std(axis=0)
    else:
        cols = rng.integers(0, F, fails.sum())
        x[np.flatnonzero(fails), cols] += 8 * x.std(axis=0)[cols]
    labels = fails.astype(np.int64)
    if kind == "gross_noise_labels":
        head = int(N * 0.6)
        labels[:head] = rng.permutation(labels[:head])
    times = np.datetime64("2026-01-01T00:00:00") + np.arange(N).astype("timedelta64[s]")
    return Dataset(X=x.astype(np.float32), feature_names=tuple(f"p{i}" for i in range(F)),
                   labels=labels, times=times)


@cache
def _built(kind: str) -> tuple[Split, Detector, bytes]:
    split = split_dataset(_dies(kind))
    prep = fit_preprocessor(split.train.x)
    z_val = prep.transform(split.val.x[split.val.passes])
    model = train(new_autoencoder(F, AEConfig(), 0), prep.transform(split.train.x), z_val,
                  TrainConfig(epochs=8))[0]
    det = Detector.fit(prep, model, split.train.x)
    return split, det, to_onnx(det, top_k=3)


def test_the_graph_with_the_head_matches_the_python_reference():
    split, det, fp32 = _built("direction")
    period = split.train_period
    head = fit_head(ae_features(det, period.x), period.labels)
    x = split.test.x.copy()
    x[:5, :3] = np.nan  # missing values take the same path in both
    got = run(attach_head(fp32, head), x)
    want = head.score(ae_features(det, x))
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-6)
    # the explanation outputs stay the autoencoder's
    np.testing.assert_array_equal(got[1], run(fp32, x)[1])
    assert np.all(got[0] >= 0) and np.all(np.isfinite(got[0]))


def test_int8_with_the_head_agrees_with_fp32_with_the_head():
    split, det, fp32 = _built("direction")
    period = split.train_period
    head = fit_head(ae_features(det, period.x), period.labels)
    base = run(fp32, split.val.x)[0]
    thr_ae = float(np.quantile(base[split.val.passes], 0.99))
    q = quantize(fp32, det, 3, split.train.x, split.val.x, thr_ae, QuantizeConfig("static"))
    fp32_h, int8_h = attach_head(fp32, head), attach_head(q.model, head)
    ref = run(fp32_h, split.test.x)[0]
    thr = float(np.quantile(run(fp32_h, split.val.x)[0][split.val.passes], 0.99))
    p = parity(ref, score_rows(int8_h, split.test.x), thr)
    assert p.agreement >= 0.99
    assert p.spearman >= 0.99


@pytest.mark.parametrize(("kind", "kept"), [("direction", True), ("gross_noise_labels", False)])
def test_the_head_ships_only_when_it_beats_the_autoencoder_on_validation_and_test(kind, kept):
    split, det, fp32 = _built(kind)
    val, test = score_rows(fp32, split.val.x), score_rows(fp32, split.test.x)
    offer = offer_head(split, det, fp32, fp32, val, test, SupervisedConfig(), 0.01)
    r = offer.report
    assert r is not None and r["offered"]
    assert offer.kept is kept and r["kept"] is kept
    for part in ("val", "test"):
        h, u = r["head"][part]["roc_auc"], r["unsupervised"][part]["roc_auc"]
        assert (h > u) if kept else True
    if kept:
        assert r["head"]["test"]["roc_auc"] - r["unsupervised"]["test"]["roc_auc"] > 0.05
        assert r["test_auc_diff_ci"][0] > 0  # not luck: the paired interval is above 0
    else:
        assert r["reasons"] and "not above" in " ".join(r["reasons"])
    assert ("kept" if kept else "dropped") in r["verdict"]


def test_no_head_without_enough_training_fails_or_when_switched_off():
    split, det, fp32 = _built("direction")
    scores = np.zeros(len(split.val)), np.zeros(len(split.test))
    off = offer_head(split, det, fp32, fp32, *scores, SupervisedConfig(mode="off"), 0.01)
    assert not off.kept and off.report is None
    few = offer_head(split, det, fp32, fp32, *scores, SupervisedConfig(min_fails=10_000), 0.01)
    assert not few.kept and few.report is not None and not few.report["offered"]
