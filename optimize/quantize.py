"""Stage 6: INT8 with ONNX Runtime. Two candidates, the better by parity with FP32 is kept.

- static: QDQ, per-channel INT8 weights, UINT8 activations whose ranges come from a MinMax
  calibration on training passes. Only the autoencoder's layers are quantized
  (`nodes_to_quantize`); their outputs stay float (`OpTypesToExcludeOutputQuantization`), so
  ORT fuses each into one QGemm that accumulates in int32 and writes float. Preprocessing, the
  residual, the score reduction and TopK stay float: an 8-bit residual would wipe out exactly
  the small, well-predicted deviations that reveal subtle defects. Output quantization of the
  last layer was the largest error we measured (score rank correlation 0.993 with it, 0.9997
  without).
- dynamic: per-channel INT8 weights, activation ranges computed at run time. Its activation
  scale is per tensor, i.e. per *batch*: a die's score then depends on which other dies share
  its batch.

Parity = decision agreement at the FP32 threshold, then Spearman rank correlation of scores, on
validation rows, taking the worse of scoring them one row at a time (as a device usually does)
and in batches of 256 (as a device may), so batch dependence counts against a candidate. On a
tie the static model wins: differences below 1e-3 (4 decisions in 4,000 validation rows) are
noise, and the static graph is the faster at one row (each layer one fused QGemm; the dynamic
one quantizes every activation at run time and keeps ReLU apart: on the floor data 28.4 vs
30.1 us for the pruned teacher, and slower than FP32 for the small distilled student).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import spearmanr

from optimize.export import AE_NODE_PREFIX, ae_node_names, run, session, to_onnx
from optimize.train import Detector

log = logging.getLogger("edgefleet.optimize")
METHODS = ("auto", "static", "dynamic")
TIE = 1e-3  # parity differences this small are noise (4 decisions in 4,000 rows)


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "auto"  # auto (better parity), static or dynamic
    calibration_rows: int = 2000  # training passes fed to the static calibration
    calibration_batch: int = 200


@dataclass(frozen=True)
class Parity:
    agreement: float  # share of rows with the same decision as FP32 at the FP32 threshold
    spearman: float  # rank correlation of scores
    max_abs_diff: float
    median_rel_diff: float

    def key(self) -> tuple[float, float]:
        """Ordering for "better": differences below 1e-4 are noise, not a reason to choose."""
        return (round(self.agreement, 4), round(self.spearman, 4))

    def ties(self, other: Parity, tol: float = TIE) -> bool:
        """As good as `other`: neither figure more than `tol` below."""
        return self.agreement >= other.agreement - tol and self.spearman >= other.spearman - tol


@dataclass(frozen=True)
class QuantResult:
    model: bytes
    method: str
    parity: dict[str, Parity]  # every candidate tried


@contextmanager
def _quiet_ort() -> Iterator[None]:
    """The ORT quantizer logs advice ("consider pre-processing") to the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def score_rows(model: bytes, x: np.ndarray) -> np.ndarray:
    """Scores computed one row at a time, as a device computes them: (n,) float32."""
    sess = session(model, threads=1)
    x = np.asarray(x, dtype=np.float32)
    return np.array([sess.run(["score"], {"params": x[i : i + 1]})[0][0] for i in range(len(x))],
                    dtype=np.float32)


def parity(reference: np.ndarray, scores: np.ndarray, threshold: float) -> Parity:
    ref, got = reference.astype(np.float64), scores.astype(np.float64)
    diff = np.abs(got - ref)
    rho = float(spearmanr(ref, got).statistic) if len(ref) > 2 else 1.0
    return Parity(
        agreement=float(np.mean((ref > threshold) == (got > threshold))),
        spearman=rho if np.isfinite(rho) else 0.0,
        max_abs_diff=float(diff.max()),
        median_rel_diff=float(np.median(diff / np.maximum(np.abs(ref), 1e-12))),
    )


def share_int8_weights(model: bytes) -> bytes:
    """The quantizer leaves the refinement branch (`optimize.export`: an `If` that re-runs the
    autoencoder when a value is missing) in float on the float weights, so the INT8 file would
    carry every weight twice and the branch would run in float. Here each branch layer gets the
    quantization of its main-graph twin (`_mirror_qdq`: the same activation scales and INT8
    weights, so the rounds compute what the main graph computes) and the float copies go. ONNX
    Runtime does not fuse these into QGemm inside the branch: a die with a missing value pays
    for the dequantization (docs/model.md, "The model"), a complete die never enters it."""
    g = onnx.load_from_string(model)
    branch = next((n for n in g.graph.node if n.op_type == "If" and n.name == "refine"), None)
    if branch is None:
        return model
    sub = next(a.g for a in branch.attribute if a.name == "then_branch")
    producer = {o: n for n in g.graph.node for o in n.output}
    inits = {i.name for i in g.graph.initializer}
    main = {n.name: n for n in g.graph.node}
    nodes: list[onnx.NodeProto] = []
    for node in sub.node:
        twin = main.get(node.name.rsplit("_r", 1)[0]) if node.name.startswith(
            AE_NODE_PREFIX) else None
        if twin is not None and twin.op_type == node.op_type:
            nodes += _mirror_qdq(node, twin, producer)  # right before the layer
        nodes += _dequantized_weights(node, inits)  # what is still float (dynamic INT8)
        nodes.append(node)
    del sub.node[:]
    sub.node.extend(nodes)
    read = {i for n in g.graph.node for i in n.input} | {i for n in sub.node for i in n.input}
    for init in [i for i in g.graph.initializer if i.name not in read]:
        g.graph.initializer.remove(init)  # the float weights only the branch read
    _toposort(g.graph)  # the quantizer's order ignores what the branches read
    onnx.checker.check_model(g)
    return g.SerializeToString()


def _mirror_qdq(node: onnx.NodeProto, twin: onnx.NodeProto,
                producer: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Rewire `node` (a branch layer) so each input goes through the Quantize/Dequantize nodes
    its main-graph `twin` has on the same input; returns the new nodes."""
    made = []
    for j, src in enumerate(twin.input):
        dq = producer.get(src)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        out = f"{node.name}_in{j}"
        if q is not None and q.op_type == "QuantizeLinear":  # an activation
            made.append(onnx.helper.make_node("QuantizeLinear", [node.input[j], *q.input[1:]],
                                              [f"{out}_q"], name=f"{out}_q"))
            made.append(onnx.helper.make_node("DequantizeLinear", [f"{out}_q", *dq.input[1:]],
                                              [out], name=out))
        else:  # a weight or bias: the same INT8 initializers
            made.append(onnx.helper.make_node("DequantizeLinear", list(dq.input), [out], name=out,
                                              **{a.name: onnx.helper.get_attribute_value(a)
                                                 for a in dq.attribute}))
        node.input[j] = out
    return made


def _dequantized_weights(node: onnx.NodeProto, inits: set[str]) -> list[onnx.NodeProto]:
    """Float weights of a branch layer whose INT8 form the main graph has (the dynamic
    quantizer's `<name>_quantized`, per output channel): read through a DequantizeLinear."""
    made = []
    for j, name in enumerate(node.input):
        if node.op_type in ("Gemm", "MatMul") and j == 1 and f"{name}_quantized" in inits:
            made.append(onnx.helper.make_node(
                "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                [f"{node.name}_w"], name=f"{node.name}_w",
                axis=1 if node.op_type == "MatMul" else 0))
            node.input[j] = f"{node.name}_w"
    return made


def _toposort(graph: onnx.GraphProto) -> None:
    """Order `graph`'s nodes so every value is produced before it is read, counting the
    values an If's branches read from the outer graph as inputs of the If."""
    def reads(n: onnx.NodeProto) -> set[str]:
        inner = {i for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                 for m in a.g.node for i in m.input}
        return (set(n.input) | inner) - {""}

    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    todo, done = list(graph.node), []
    while todo:
        k = next(k for k, n in enumerate(todo) if reads(n) <= ready | _inner_outputs(n))
        n = todo.pop(k)
        done.append(n)
        ready |= set(n.output)
    del graph.node[:]
    graph.node.extend(done)


def _inner_outputs(n: onnx.NodeProto) -> set[str]:
    return {o for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
            for m in a.g.node for o in m.output}


def _static(fp32: bytes, det: Detector, x_calib: np.ndarray, cfg: QuantizeConfig) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = np.asarray(x_calib, dtype=np.float32)
            b = cfg.calibration_batch
            self._batches = iter([{"params": x[i : i + b]} for i in range(0, len(x), b)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        with _quiet_ort():
            quantize_static(
                str(src), str(dst), Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_quantize=ae_node_names(det),
                extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            )  # fmt: skip
        return share_int8_weights(dst.read_bytes())


def _dynamic(det: Detector, top_k: int) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(to_onnx(det, top_k, layer_op="MatMul"))
        with _quiet_ort():
            quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                             nodes_to_quantize=ae_node_names(det))
        return share_int8_weights(dst.read_bytes())


def quantize(
    fp32: bytes,
    det: Detector,
    top_k: int,
    x_calib: np.ndarray,
    x_check: np.ndarray,
    threshold: float,
    cfg: QuantizeConfig = QuantizeConfig(),
) -> QuantResult:
    """INT8 version of the FP32 graph `fp32` (exported from `det` with `top_k`). x_calib: raw
    training passes for the static calibration; x_check: raw validation rows for parity;
    threshold: the FP32 model's decision threshold."""
    if cfg.method not in METHODS:
        raise ValueError(f"quantize: method must be one of {METHODS}, not {cfg.method!r}")
    reference = run(fp32, x_check)[0]
    x_calib = x_calib[: cfg.calibration_rows]
    candidates: dict[str, bytes] = {}
    if cfg.method in ("auto", "static"):
        candidates["static"] = _static(fp32, det, x_calib, cfg)
    if cfg.method in ("auto", "dynamic"):
        candidates["dynamic"] = _dynamic(det, top_k)
    results = {}
    for name, model in candidates.items():
        single = parity(reference, score_rows(model, x_check), threshold)
        batched = parity(reference, run(model, x_check, batch=256)[0], threshold)
        results[name] = min(single, batched, key=Parity.key)
    for name, p in results.items():
        log.info("quantize: %s INT8 %d bytes, agreement %.4f, rank correlation %.5f", name,
                 len(candidates[name]), p.agreement, p.spearman)
    best = max(results, key=lambda k: (*results[k].key(), k == "static"))
    if "static" in results and results["static"].ties(results[best]):
        best = "static"
    return QuantResult(candidates[best], best, results)
