"""The inference engine: one ONNX Runtime session for one verified model.

The model contract (docs/bundle-format.md): input `params` float32 [batch, n_features] with NaN
for a missing measurement; outputs `score` float32 [batch], `top_index` int64 [batch, k] and
`top_contribution` float32 [batch, k]. Preprocessing (imputation, scaling) is inside the graph,
so the engine passes raw measurements through untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.errors import EdgefleetError
from agent.manifest import Manifest

INPUT_NAME = "params"
OUTPUT_NAMES = ("score", "top_index", "top_contribution")


class EngineError(EdgefleetError):
    """The model could not be loaded or does not follow the model contract."""


class SelfTestError(EngineError):
    """The model's scores on the bundle's golden vectors are outside the stated tolerance."""


@dataclass(frozen=True)
class Scores:
    score: np.ndarray  # (batch,) float32
    top_index: np.ndarray  # (batch, k) int64
    top_contribution: np.ndarray  # (batch, k) float32


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options tuned for single-row latency: one intra-op thread (a 512-wide MLP is too small
    to split across cores; threads only add wake-up latency), sequential execution, all graph
    optimizations."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class Engine:
    """A loaded model plus the manifest it came with. Thread-safe for concurrent `predict`."""

    def __init__(self, model_path: Path, manifest: Manifest, *, threads: int = 1) -> None:
        self.manifest = manifest
        self.model_path = Path(model_path)
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=session_options(threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load model {model_path}: {e}") from None
        self._check_contract()

    def _check_contract(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        n = self.manifest.input.n_features
        if set(inputs) != {INPUT_NAME}:
            raise EngineError(f"{self.model_path}: inputs {sorted(inputs)}, expected ['params']")
        shape = inputs[INPUT_NAME].shape
        if len(shape) != 2 or shape[1] != n:
            raise EngineError(
                f"{self.model_path}: input shape {shape}, expected [batch, {n}] per manifest"
            )
        missing = set(OUTPUT_NAMES) - outputs
        if missing:
            raise EngineError(f"{self.model_path}: missing outputs {sorted(missing)}")

    def predict(self, params: np.ndarray) -> Scores:
        """Score a float32 batch (batch, n_features). Raises whatever ONNX Runtime raises; the
        caller decides on fallback."""
        score, top_index, top_contribution = self.session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: params}
        )
        return Scores(score, top_index, top_contribution)

    def self_test(self) -> float:
        """Score the golden vectors and compare with the manifest's tolerances; return the
        worst absolute difference. INT8 kernels differ between x86 and ARM, which is why the
        tolerance is part of the bundle."""
        m = self.manifest
        if not m.golden:
            raise SelfTestError(f"{m.name} {m.version}: bundle has no golden vectors")
        x = np.array([g.params for g in m.golden], dtype=np.float32)
        expected = np.array([g.score for g in m.golden], dtype=np.float64)
        got = self.predict(x).score.astype(np.float64)
        diff = np.abs(got - expected)
        allowed = m.golden_abs_tol + m.golden_rel_tol * np.abs(expected)
        if not np.all(np.isfinite(got)) or np.any(diff > allowed):
            i = int(np.argmax(np.where(np.isfinite(diff), diff - allowed, np.inf)))
            raise SelfTestError(
                f"{m.name} {m.version}: golden vector {i}: score expected {expected[i]:.6g} "
                f"+/- {allowed[i]:.3g}, found {got[i]:.6g}"
            )
        return float(diff.max())

    def latency_check(self, rows: int = 200) -> float:
        """Median single-row latency in seconds over `rows` runs of the first golden vector."""
        x = np.array([self.manifest.golden[0].params], dtype=np.float32)
        times = []
        for _ in range(rows):
            t0 = time.perf_counter()
            self.predict(x)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
