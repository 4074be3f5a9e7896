"""A baseline detector with no training loop: robust z-scores against passing dies.

score = mean over parameters of ((x - median) / scale)^2, with NaN imputed by the median. It
knows nothing about correlations, so it misses subtle defects; it exists as a reference point for
the autoencoder, and as a small real model for demos and tests of the agent and the fleet.
The ONNX graph follows the model contract in docs/bundle-format.md (input `params`, outputs
`score`, `top_index`, `top_contribution`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RobustZ:
    center: np.ndarray  # (n_features,)
    scale: np.ndarray  # (n_features,), > 0

    @classmethod
    def fit(cls, x: np.ndarray) -> RobustZ:
        """Median and IQR/1.349 per column; columns never observed or constant get scale 1."""
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                center = np.nanmedian(x, axis=0)
                q75, q25 = np.nanpercentile(x, [75, 25], axis=0)
        center = np.where(np.isfinite(center), center, 0.0)
        scale = (q75 - q25) / 1.349
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        return cls(center.astype(np.float32), scale.astype(np.float32))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(x), self.center, x)
        return (((x - self.center) / self.scale) ** 2).astype(np.float32)

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.contributions(x).mean(axis=1)


def to_onnx(model: RobustZ, top_k: int = 5, opset: int = 18) -> bytes:
    """The ONNX graph of `model` as serialized bytes (needs the `onnx` package)."""
    from onnx import TensorProto, helper, numpy_helper

    n = model.center.shape[0]
    inits = [
        numpy_helper.from_array(model.center, "center"),
        numpy_helper.from_array((1.0 / model.scale).astype(np.float32), "inv_scale"),
        numpy_helper.from_array(np.array([top_k], dtype=np.int64), "k"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("IsNaN", ["params"], ["missing"]),
        helper.make_node("Where", ["missing", "center", "params"], ["imputed"]),
        helper.make_node("Sub", ["imputed", "center"], ["centered"]),
        helper.make_node("Mul", ["centered", "inv_scale"], ["z"]),
        helper.make_node("Mul", ["z", "z"], ["contrib"]),
        helper.make_node("ReduceMean", ["contrib", "axis1"], ["score"], keepdims=0),
        helper.make_node("TopK", ["contrib", "k"], ["top_contribution", "top_index"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "robust_z",
        [helper.make_tensor_value_info("params", TensorProto.FLOAT, ["batch", n])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("top_index", TensorProto.INT64, ["batch", top_k]),
            helper.make_tensor_value_info("top_contribution", TensorProto.FLOAT, ["batch", top_k]),
        ],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx_model.ir_version = 8
    return onnx_model.SerializeToString()


def bundle_contents(
    x: np.ndarray,
    feature_names: list[str] | tuple[str, ...],
    *,
    labels: np.ndarray | None = None,
    rules: list[dict] | None = None,
    name: str = "robust-z",
    version: str = "0.1.0",
    sequence: int = 1,
    top_k: int = 5,
    false_fail_rate: float = 0.01,
) -> tuple[dict, bytes]:
    """Fit on the passing rows of `x` and return (manifest fields, model.onnx bytes) ready for
    `agent.bundle.write_bundle`. Golden scores are computed by ONNX Runtime on the graph itself,
    so a device's self-test compares like with like."""
    import onnxruntime as ort

    passes = x if labels is None else x[labels == 0]
    model = RobustZ.fit(passes)
    onnx_bytes = to_onnx(model, top_k=min(top_k, x.shape[1]))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    scores = session.run(["score"], {"params": passes.astype(np.float32)})[0]
    threshold = float(np.quantile(scores, 1.0 - false_fail_rate))
    q25, q75 = np.quantile(scores, [0.25, 0.75])
    golden_x = x[: min(4, len(x))].astype(np.float32)
    golden_scores = session.run(["score"], {"params": golden_x})[0]
    if rules is None:  # robust bounds from passes: median +/- 6 robust sigmas
        low = model.center - 6 * model.scale
        high = model.center + 6 * model.scale
        rules = [{"feature": i, "low": float(lo), "high": float(hi)}
                 for i, (lo, hi) in enumerate(zip(low, high, strict=True))]
    fields = {
        "model": {"name": name, "version": version, "sequence": sequence},
        "input": {"n_features": int(x.shape[1]), "feature_names": list(feature_names),
                  "dtype": "float32"},
        "decision": {"threshold": threshold, "confidence_scale": float(max(q75 - q25, 1e-6)),
                     "top_k": min(top_k, x.shape[1])},
        "fallback": {"rules": rules},
        "golden": {
            "abs_tol": 1e-4, "rel_tol": 1e-4,
            "vectors": [
                {"params": [None if np.isnan(v) else float(v) for v in row], "score": float(s)}
                for row, s in zip(golden_x, golden_scores, strict=True)
            ],
        },
        "evaluation": {"kind": "robust z-score baseline", "train_rows": len(passes)},
    }
    return fields, onnx_bytes
