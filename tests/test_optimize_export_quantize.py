"""Stages 5-6: the exported graph follows the model contract and matches PyTorch; its INT8
version keeps the decisions and leaves preprocessing and the score reduction in float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from agent.engine import INPUT_NAME, OUTPUT_NAMES
from optimize.export import OPSET, ae_node_names, check_export, run, session, to_onnx
from optimize.quantize import QuantizeConfig, quantize, score_rows
from optimize.train import Detector
from tests.optimize_support import small_model, small_split

TOP_K = 5


@pytest.fixture(scope="module")
def exported() -> tuple[Detector, bytes]:
    split, prep = small_split()
    det = Detector.fit(prep, small_model(), split.train.x)
    return det, to_onnx(det, TOP_K)


def test_graph_follows_the_model_contract(exported):
    _, model = exported
    proto = onnx.load_from_string(model)
    assert proto.opset_import[0].version == OPSET >= 18
    sess = session(model)
    (inp,) = sess.get_inputs()
    assert inp.name == INPUT_NAME and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1] == 32  # dynamic batch
    outs = {o.name: o for o in sess.get_outputs()}
    assert set(outs) == set(OUTPUT_NAMES)
    assert outs["top_index"].type == "tensor(int64)"
    assert outs["top_contribution"].shape[1] == TOP_K


def test_onnx_scores_match_pytorch(exported):
    det, model = exported
    split, _ = small_split()
    x = split.test.x
    ref = det.scores(x)
    got = run(model, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert check_export(model, det, x) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_log_columns_are_mirrored_in_the_graph_including_zero_negative_and_missing_values():
    """Skewed positive columns go through ln(max(x, floor)) in both the reference and the
    graph; a reading at or below zero stays finite and a missing one is imputed."""
    from optimize.preprocess import fit_preprocessor

    split, _ = small_split()
    prep = fit_preprocessor(split.train.x, log_skewed=True)
    assert prep.log is not None and 0 < prep.log.sum() < 32  # leakage and IDDQ columns
    det = Detector.fit(prep, small_model(), split.train.x)
    model = to_onnx(det, TOP_K)
    x = split.test.x[:64].copy()
    col = int(np.flatnonzero(prep.log)[0])
    x[0, col], x[1, col], x[2, col] = 0.0, -5.0, np.nan
    got, ref = run(model, x)[0], det.scores(x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_any_batch_size_missing_values_and_infinities_give_finite_scores(exported):
    _, model = exported
    x = small_split()[0].test.x[:7].astype(np.float32).copy()
    x[1, :5] = np.nan
    x[2, :] = np.nan  # nothing measured: score 0
    x[3, 0], x[4, 1] = np.inf, -np.inf
    score, top_index, top_contrib = run(model, x)
    assert score.shape == (7,) and top_index.shape == (7, TOP_K)
    assert np.isfinite(score).all() and np.isfinite(top_contrib).all()
    assert score[2] == 0.0
    assert not np.isin(top_index[1][top_contrib[1] > 0], np.arange(5)).any()  # missing: no blame
    assert (np.diff(top_contrib, axis=1) <= 0).all()  # descending
    assert (top_contrib.sum(axis=1) <= score * (1 + 1e-5) + 1e-6).all()
    single = np.concatenate([run(model, x[i : i + 1])[0] for i in range(7)])
    np.testing.assert_allclose(single, score, rtol=1e-6)


def test_int8_keeps_decisions_and_quantizes_only_the_autoencoder(exported):
    det, fp32 = exported
    split, _ = small_split()
    ref_val = run(fp32, split.val.x)[0]
    threshold = float(np.quantile(ref_val[split.val.passes], 0.99))
    q = quantize(fp32, det, TOP_K, split.train.x, split.val.x, threshold,
                 QuantizeConfig(method="static"))
    assert q.method == "static" and set(q.parity) == {"static"}
    ref, got = run(fp32, split.test.x)[0], score_rows(q.model, split.test.x)
    assert np.mean((ref > threshold) == (got > threshold)) >= 0.98
    assert np.corrcoef(np.argsort(np.argsort(ref)), np.argsort(np.argsort(got)))[0, 1] > 0.99
    nodes = onnx.load_from_string(q.model).graph.node
    quantized = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear"}
    assert "z" not in quantized and "params" not in quantized  # preprocessing stays float
    ops = {n.op_type for n in nodes}
    assert {"IsNaN", "Where", "ReduceSum", "TopK"} <= ops
    assert sum(n.op_type == "QuantizeLinear" for n in nodes) == len(ae_node_names(det)) \
        == len(det.model.layers)
    # the refinement branch (dies with missing values) runs the same INT8 layers, no float copy
    (branch,) = [a.g for n in nodes if n.op_type == "If" for a in n.attribute
                 if a.name == "then_branch"]
    assert sum(n.op_type == "QuantizeLinear" for n in branch.node) == \
        len(det.model.layers) * det.refine
    floats = {i.name for i in onnx.load_from_string(q.model).graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT}
    assert not any(f"ae_w{i}" in floats for i in range(len(det.model.layers)))
    # static INT8 scores do not depend on the other rows of a batch
    np.testing.assert_array_equal(run(q.model, split.test.x)[0], got)


def test_auto_quantization_tries_both_and_keeps_the_better_parity(exported):
    det, fp32 = exported
    split, _ = small_split()
    q = quantize(fp32, det, TOP_K, split.train.x, split.val.x, 1.0)
    assert set(q.parity) == {"static", "dynamic"}
    best = max(q.parity.values(), key=lambda p: p.key())
    assert q.parity[q.method].key() == best.key() or (
        q.method == "static" and q.parity["static"].ties(best))  # near-tie: static wins
    assert len(q.model) < len(fp32)


def test_a_parity_difference_under_one_in_a_thousand_is_a_tie():
    from optimize.quantize import Parity

    dynamic = Parity(agreement=0.9998, spearman=0.99988, max_abs_diff=0.2, median_rel_diff=1e-3)
    assert Parity(0.9992, 0.99972, 4.9, 1e-3).ties(dynamic)  # floor data: static wins
    assert not Parity(0.9960, 0.99972, 4.9, 1e-3).ties(dynamic)
    assert not Parity(0.9998, 0.9950, 4.9, 1e-3).ties(dynamic)


def test_missing_inputs_are_refined_by_the_model_in_the_graph_as_in_the_reference(exported):
    """A die with a skipped test block: the graph re-imputes the block with the model's own
    reconstruction `refine` times, exactly as `Detector.scores`; a complete die's score does
    not depend on the rounds. Without the rounds (refine=0) the blanked block is the median
    (z = 0), which reads as a family disagreeing with the rest: the die scores higher."""
    import dataclasses

    det, model = exported
    split, _ = small_split()
    x = split.test.x[split.test.passes].astype(np.float32)
    x = x[~np.isnan(x).any(axis=1)][:40].copy()
    complete = run(model, x)[0]
    once = dataclasses.replace(det, refine=0)
    np.testing.assert_allclose(once.scores(x), complete, rtol=1e-4, atol=1e-5)
    x[:, 8:16] = np.nan  # one block of 8 adjacent parameters not measured
    got = run(model, x)[0]
    np.testing.assert_allclose(got, det.scores(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(to_onnx(once, TOP_K), x)[0], once.scores(x), rtol=1e-4,
                               atol=1e-5)
    assert np.median(np.abs(got - complete)) < np.median(np.abs(once.scores(x) - complete))


def test_missing_share_factor_is_in_the_graph_and_leaves_complete_dies_alone(exported):
    """A die missing a share m of its values has its score divided by the missing-share
    factor, in the graph as in the reference; a complete die is divided by exactly 1."""
    import dataclasses

    det, _ = exported
    plain = dataclasses.replace(det, spread=((), ()))
    steep = dataclasses.replace(det, spread=((0.0, 0.2), (0.5, 4.0)))
    x = small_split()[0].test.x[:40].astype(np.float32).copy()
    x = x[~np.isnan(x).any(axis=1)][:20]
    for i, k in enumerate((0, 1, 3, 8, 12, 16)):  # rows 1..5 miss k of 32 values
        x[i, :k] = np.nan
    got, ref = run(to_onnx(steep, TOP_K), x)[0], steep.scores(x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    before = run(to_onnx(plain, TOP_K), x)[0]
    assert np.array_equal(got[6:], before[6:])  # complete rows: bit for bit
    m = np.array([1, 3, 8, 12, 16]) / det.prep.active.sum()
    factor = 1 + 0.5 * m + 4.0 * np.maximum(m - 0.2, 0)
    np.testing.assert_allclose(got[1:6] * factor, before[1:6], rtol=1e-4)
