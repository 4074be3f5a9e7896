"""The inference engine: one ONNX Runtime session for one verified model.

The model contract (docs/bundle-format.md): input `params` float32 [batch, n_features] with NaN
for a missing measurement; outputs `score` float32 [batch], `top_index` int64 [batch, k] and
`top_contribution` float32 [batch, k]. Preprocessing (imputation, scaling) is inside the graph,
so the engine passes raw measurements through untouched.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from agent.errors import EdgefleetError
from agent.manifest import Manifest
from agent.wire import Reason

INPUT_NAME = "params"
OUTPUT_NAMES = ("score", "top_index", "top_contribution")


class EngineError(EdgefleetError):
    """The model could not be loaded or does not follow the model contract."""

    reason = Reason.LOAD_FAILED


class SelfTestError(EngineError):
    """The model's scores on the bundle's golden vectors are outside the stated tolerance."""

    reason = Reason.SELF_TEST_FAILED


class Scores(NamedTuple):
    """Model outputs for one batch (a named tuple: built on every request, so it is cheap)."""

    score: np.ndarray  # (batch,) float32
    top_index: np.ndarray  # (batch, k) int64
    top_contribution: np.ndarray  # (batch, k) float32


class _Binding:
    """One thread's IO binding: a (1, n) input buffer and (1,)/(1, k) output arrays."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest) -> None:
        n, k = manifest.input.n_features, manifest.top_k
        self.params = np.zeros((1, n), dtype=np.float32)
        self.row = self.params[0]  # a view: writing it fills the bound input
        self.outputs = Scores(np.zeros(1, np.float32), np.zeros((1, k), np.int64),
                              np.zeros((1, k), np.float32))
        self.io = session.io_binding()
        self._input = ort.OrtValue.ortvalue_from_numpy(self.params)  # shares params' memory
        self.io.bind_ortvalue_input(INPUT_NAME, self._input)
        for name, arr in zip(OUTPUT_NAMES, self.outputs, strict=True):
            self.io.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        # The C-level run, skipping the Python wrapper's checks for WebGPU graph capture
        # (~0.5 us a call); the public method where this onnxruntime lacks the internals.
        c_session, c_binding = getattr(session, "_sess", None), getattr(self.io, "_iobinding", None)
        if c_session is not None and c_binding is not None and hasattr(c_session,
                                                                       "run_with_iobinding"):
            self.run = lambda: c_session.run_with_iobinding(c_binding, None)
        else:
            self.run = lambda: session.run_with_iobinding(self.io)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Options tuned for single-row latency: one intra-op thread (a 512-wide MLP is too small
    to split across cores; threads only add wake-up latency), sequential execution, all graph
    optimizations. With more threads, pool threads do not spin while idle: the box runs other
    work (the tester's own software) and a spinning pool would steal its cores.

    The CPU memory arena is off: it keeps the peak of every batch size ever seen (+20 MB after
    1024-row batches on the benchmark model) for no measurable gain at one row (13.0 vs 13.2 us)
    and a small one for batches. Single rows go through `predict_one` (IO binding, ~2 us less)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    if threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        # Bound once: `predict` is on every request's path.
        self._run = self.session.run
        self._outputs = list(OUTPUT_NAMES)
        self._feed_name = INPUT_NAME
        self._local = threading.local()  # per-thread IO binding for predict_one
        self._spare: list[_Binding] = []  # made by warm_up, for the first thread that needs one

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
        if inputs[INPUT_NAME].type != "tensor(float)":
            raise EngineError(
                f"{self.model_path}: input type {inputs[INPUT_NAME].type}, expected tensor(float)"
            )
        missing = set(OUTPUT_NAMES) - outputs
        if missing:
            raise EngineError(f"{self.model_path}: missing outputs {sorted(missing)}")
        k = self.manifest.top_k
        for out in self.session.get_outputs():
            if out.name in ("top_index", "top_contribution") and len(out.shape) == 2 \
                    and isinstance(out.shape[1], int) and out.shape[1] != k:
                raise EngineError(
                    f"{self.model_path}: output {out.name} has {out.shape[1]} columns, "
                    f"expected top_k = {k} per manifest"
                )

    def predict(self, params: np.ndarray) -> Scores:
        """Score a float32 batch (batch, n_features). Raises whatever ONNX Runtime raises; the
        caller decides on fallback."""
        score, top_index, top_contribution = self._run(self._outputs, {self._feed_name: params})
        return Scores(score, top_index, top_contribution)

    def predict_one(self, params: np.ndarray) -> Scores:
        """Score one row, shape (n_features,) or (1, n_features), through this thread's IO
        binding: the input is copied into a preallocated buffer and the outputs land in
        preallocated arrays, which saves ONNX Runtime's per-call allocations (~13 -> ~11 us on
        the benchmark model). The arrays returned belong to the calling thread and are
        overwritten by its next call: read them first. Raises whatever ONNX Runtime raises."""
        b = self._local.__dict__.get("binding")
        if b is None:
            try:
                b = self._spare.pop()  # atomic: two threads never take the same one
            except IndexError:
                b = _Binding(self.session, self.manifest)
            self._local.binding = b
        b.row[:] = params
        b.run()
        return b.outputs

    def warm_up(self) -> None:
        """Run one row so the first real request does not pay for lazy allocations, and make
        the IO binding the serving thread will take on its first row (the server answers
        single rows on one thread: it does not pay ~0.1 ms for it right after a swap)."""
        x = np.zeros((1, self.manifest.input.n_features), dtype=np.float32)
        self.predict(x)
        b = _Binding(self.session, self.manifest)
        b.row[:] = x[0]
        b.run()
        self._spare.append(b)

    def self_test(self) -> float:
        """Score the golden vectors and compare with the manifest's tolerances; return the
        worst absolute difference. INT8 kernels differ between x86 and ARM, which is why the
        tolerance is part of the bundle."""
        m = self.manifest
        if not m.golden:
            raise SelfTestError(f"{m.name} {m.version}: bundle has no golden vectors")
        x = np.array([g.params for g in m.golden], dtype=np.float32)
        expected = np.array([g.score for g in m.golden], dtype=np.float64)
        try:
            got = self.predict(x).score.astype(np.float64)
        except Exception as e:  # onnxruntime raises its own exception types
            raise SelfTestError(f"{m.name} {m.version}: golden vectors: model raised {e}") from None
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
        """Median single-row latency in seconds over `rows` runs of the first golden vector,
        through an IO binding as the server scores single rows (`predict_one`). A binding of
        its own, so the calling thread (the installer's) keeps none; and the least Python per
        row, since the check runs in the serving process beside the serving thread."""
        b = _Binding(self.session, self.manifest)
        b.row[:] = self.manifest.golden[0].params
        run, clock = b.run, time.perf_counter
        times = [0.0] * rows
        for i in range(rows):
            t0 = clock()
            run()
            times[i] = clock() - t0
        return float(np.median(times))
