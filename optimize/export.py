"""Stage 5: one ONNX graph, raw parameters in, score and top-k contributions out.

    params (batch, F) float32, NaN = missing
      -> preprocessing (optimize.preprocess: log of skewed columns, impute, bound, robust
                        scale; clip for the AE input)
      -> autoencoder   (Gemm [+ Relu] per layer; MatMul + Add with layer_op="MatMul")
      -> refinement    (`det.refine` times: missing inputs <- clipped reconstruction, the
                        autoencoder again with the same weights; optimize.train)
      -> contribution  = where(missing, 0, (z - recon)^2 * weight) / max(1, measured features)
                         / missing-share factor (1 for a complete die; optimize.train)
      -> score         = sum of contributions (batch,)
      -> top_index, top_contribution = TopK(contribution, top_k)

The graph is written directly with `onnx.helper` from the trained weights rather than traced
with `torch.onnx.export`: torch 2.13 defaults to the dynamo exporter (needs onnxscript, not
installed), a trace would not contain the numpy preprocessing anyway, and writing the nodes by
hand gives one deterministic graph whose every node has a name we can pass to the quantizer
(`AE_NODE_PREFIX`). Layers are Gemm nodes (bias inside): static INT8 quantization turns each
into one QGemm with a float output, the fastest and the most accurate form we measured; ORT's
dynamic quantizer only handles MatMul, hence the MatMul + Add variant.

Preprocessing uses plain ONNX ops rather than skl2onnx: it is six elementwise nodes, needs NaN
imputation with inactive columns pinned to 0 (RobustScaler's converter does neither), and it
stays float when the rest is quantized without any converter-generated names to chase.
Opset 18 (ReduceSum takes axes as an input); the batch dimension is symbolic.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from agent.engine import INPUT_NAME, OUTPUT_NAMES, session_options
from optimize.train import SPREAD_MIN, Detector

OPSET = 18
IR_VERSION = 8
AE_NODE_PREFIX = "ae_layer_"  # names of the autoencoder's Gemm / MatMul nodes (quantized)


def ae_node_names(det: Detector) -> list[str]:
    """The autoencoder's layer nodes of the main graph (the INT8 quantizer's; the refinement
    rounds live in the `If` branch and share their weights: `optimize.quantize`)."""
    return [f"{AE_NODE_PREFIX}{i}" for i in range(len(det.model.layers))]


def to_onnx(det: Detector, top_k: int, name: str = "die_ae", layer_op: str = "Gemm") -> bytes:
    """The detector as a serialized ONNX model following the contract in
    docs/bundle-format.md. `layer_op`: Gemm (default) or MatMul (+ Add)."""
    if layer_op not in ("Gemm", "MatMul"):
        raise ValueError(f"layer_op must be Gemm or MatMul, not {layer_op!r}")
    prep, n = det.prep, det.prep.n_features
    top_k = max(1, min(top_k, n))
    f32 = np.float32
    inits = [
        numpy_helper.from_array(prep.center.astype(f32), "center"),
        numpy_helper.from_array(prep.low.astype(f32), "low"),
        numpy_helper.from_array(prep.high.astype(f32), "high"),
        numpy_helper.from_array(prep.inv_scale.astype(f32), "inv_scale"),
        numpy_helper.from_array(np.array(-prep.clip, f32), "clip_low"),
        numpy_helper.from_array(np.array(prep.clip, f32), "clip_high"),
        numpy_helper.from_array(det.weights.astype(f32), "weight"),
        numpy_helper.from_array(prep.active.astype(f32), "active"),
        numpy_helper.from_array(np.array(0.0, f32), "zero"),
        numpy_helper.from_array(np.array(1.0, f32), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([top_k], np.int64), "k"),
    ]

    def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    nodes = [node("IsNaN", [INPUT_NAME], "missing")]  # (batch, F) bool
    source = INPUT_NAME
    if prep.log is not None and prep.log_floor is not None and prep.log.any():
        inits += [numpy_helper.from_array(prep.log, "log_mask"),
                  numpy_helper.from_array(prep.log_floor.astype(f32), "log_floor")]
        nodes += [node("Max", [INPUT_NAME, "log_floor"], "floored"),
                  node("Log", ["floored"], "logged"),
                  node("Where", ["log_mask", "logged", INPUT_NAME], "params_log")]
        source = "params_log"
    nodes += [
        node("Where", ["missing", "center", source], "imputed"),
        node("Min", ["imputed", "high"], "upper"),
        node("Max", ["upper", "low"], "bounded"),
        node("Sub", ["bounded", "center"], "centered"),
        node("Mul", ["centered", "inv_scale"], "z"),  # (batch, F), |z| <= bound
        node("Clip", ["z", "clip_low", "clip_high"], "z_in"),  # |z_in| <= clip
    ]
    layers = list(det.model.layers)
    for i, layer in enumerate(layers):  # shared by the refinement rounds
        w = layer.weight.detach().numpy().astype(f32)  # (out, in)
        if layer_op != "Gemm":
            w = np.ascontiguousarray(w.T)
        inits += [numpy_helper.from_array(w, f"ae_w{i}"),
                  numpy_helper.from_array(layer.bias.detach().numpy().astype(f32), f"ae_b{i}")]
    def ae(h: str, suffix: str, out: str) -> list[onnx.NodeProto]:
        """The autoencoder's layers from input `h` to `out`; node names end in `suffix`."""
        made = []
        for i in range(len(layers)):
            last = i == len(layers) - 1
            y = out if last else f"ae_pre{i}{suffix}"
            name = f"{AE_NODE_PREFIX}{i}{suffix}"
            if layer_op == "Gemm":  # y = h @ w.T + b
                made.append(helper.make_node("Gemm", [h, f"ae_w{i}", f"ae_b{i}"], [y],
                                             name=name, transB=1))
            else:
                made += [node("MatMul", [h, f"ae_w{i}"], name), node("Add", [name, f"ae_b{i}"], y)]
            if not last:
                made.append(node("Relu", [y], f"ae_h{i}{suffix}"))  # (batch, width_i)
                h = f"ae_h{i}{suffix}"
        return made

    if not det.refine:
        nodes += ae("z_in", "", "recon")
    else:  # refinement only when the batch has a missing value (optimize.train)
        nodes += ae("z_in", "", "recon_r0")
        inner = []
        for r in range(1, det.refine + 1):
            out = "recon_refined" if r == det.refine else f"recon_r{r}"
            inner += [node("Clip", [f"recon_r{r - 1}", "clip_low", "clip_high"], f"fill_r{r}"),
                      node("Where", ["missing", f"fill_r{r}", "z_in"], f"z_in_r{r}"),
                      *ae(f"z_in_r{r}", f"_r{r}", out)]
        then = helper.make_graph(inner, "refine", [], [
            helper.make_tensor_value_info("recon_refined", TensorProto.FLOAT, ["batch", n])])
        keep = helper.make_graph([node("Identity", ["recon_r0"], "recon_kept")], "complete", [], [
            helper.make_tensor_value_info("recon_kept", TensorProto.FLOAT, ["batch", n])])
        nodes += [node("Cast", ["missing"], "missing_f", to=TensorProto.FLOAT),
                  node("ReduceMax", ["missing_f"], "any_missing_f", keepdims=0),
                  node("Cast", ["any_missing_f"], "any_missing", to=TensorProto.BOOL),
                  helper.make_node("If", ["any_missing"], ["recon"], name="refine",
                                   then_branch=then, else_branch=keep)]
    nodes += [
        node("Sub", ["z", "recon"], "resid"),  # (batch, F)
        node("Mul", ["resid", "resid"], "sq"),
        node("Mul", ["sq", "weight"], "weighted"),
        node("Where", ["missing", "zero", "weighted"], "masked"),
        node("Where", ["missing", "zero", "active"], "measured"),  # (batch, F) 0/1
        node("ReduceSum", ["measured", "axis1"], "count", keepdims=1),  # (batch, 1)
        *_denominator(det, inits),
        node("Div", ["masked", "denom"], OUTPUT_NAMES[2] + "_all"),  # (batch, F)
        node("ReduceSum", [OUTPUT_NAMES[2] + "_all", "axis1"], OUTPUT_NAMES[0], keepdims=0),
        helper.make_node("TopK", [OUTPUT_NAMES[2] + "_all", "k"],
                         [OUTPUT_NAMES[2], OUTPUT_NAMES[1]], name="topk", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n])],
        [
            helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.INT64, ["batch", top_k]),
            helper.make_tensor_value_info(OUTPUT_NAMES[2], TensorProto.FLOAT, ["batch", top_k]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgefleet-optimize")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _denominator(det: Detector, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """`count` (batch, 1) -> `denom`: max(count, 1), times the missing-share factor
    max(1 + relu(m - knots) . slopes, SPREAD_MIN), m = 1 - count / active features, when the
    detector has one (`optimize.train.missing_spread`; exactly 1 for a complete die)."""
    knots, slopes = det.spread
    if not knots:
        return [helper.make_node("Max", ["count", "one"], ["denom"], name="denom")]
    f32 = np.float32
    inits += [numpy_helper.from_array(np.array(det.prep.active.sum(), f32), "n_active"),
              numpy_helper.from_array(np.asarray(knots, f32), "spread_knots"),
              numpy_helper.from_array(np.asarray(slopes, f32)[:, None], "spread_slopes"),
              numpy_helper.from_array(np.array(SPREAD_MIN, f32), "spread_min")]
    steps = [("Max", ["count", "one"], "count_1"),
             ("Div", ["count", "n_active"], "observed_share"),
             ("Sub", ["one", "observed_share"], "missing_share"),  # (batch, 1)
             ("Sub", ["missing_share", "spread_knots"], "spread_from"),  # (batch, K)
             ("Relu", ["spread_from"], "spread_hinge"),
             ("MatMul", ["spread_hinge", "spread_slopes"], "spread_rise"),  # (batch, 1)
             ("Add", ["spread_rise", "one"], "spread_raw"),
             ("Max", ["spread_raw", "spread_min"], "spread"),
             ("Mul", ["count_1", "spread"], "denom")]
    return [helper.make_node(op, ins, [out], name=out) for op, ins, out in steps]


def session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime session with the device's options (agent.engine.session_options)."""
    return ort.InferenceSession(model, sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])


def run(model: bytes | ort.InferenceSession, x: np.ndarray,
        batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(score (n,), top_index (n, k), top_contribution (n, k)) of raw rows x (n, F)."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    x = np.asarray(x, dtype=np.float32)
    parts = [sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i : i + batch]})
             for i in range(0, len(x), batch)]
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


def check_export(model: bytes, det: Detector, x: np.ndarray) -> float:
    """Max abs difference between the ONNX scores and the PyTorch reference on rows x."""
    return float(np.max(np.abs(run(model, x)[0] - det.scores(x))))
