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
