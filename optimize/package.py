"""Stage 9: golden vectors and the signed bundle.

Golden vectors are a few test rows (passes near the median score, the highest-scoring fail of
each class, a pass with measurements blanked to NaN, and an all-missing row) with the scores the
INT8 model gives them here, computed as one batch exactly as `agent.engine.Engine.self_test`
does on the device.

Golden tolerance. INT8 results differ between machines: x86 (VNNI / AVX2 u8s8, with AVX2's
16-bit saturation) and ARM (sdot / i8mm) kernels round the quantized input and sum in different
orders. Every such kernel approximates the same FP32 function, and the INT8-vs-FP32 difference
we measure bounds how far one approximation strays from it, so two kernels stay within about
twice that: rel_tol = max(0.05, 2 * the largest relative INT8-vs-FP32 difference on the golden
rows); abs_tol = 1% of the threshold (a score near 0, e.g. the all-missing row, has no useful
relative scale). A device outside that is running something else, not a different kernel.

The sequence is one above the bundle already in the output directory (`model.efb`), or 1; an
explicit `sequence` wins.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import read_manifest_unverified, write_bundle
from agent.engine import Engine
from agent.errors import EdgefleetError
from agent.manifest import Manifest, format_time, utc_now
from optimize.export import run
from optimize.split import Part

BUNDLE_NAME = "model.efb"


class PackageError(EdgefleetError):
    """The bundle could not be produced (e.g. the previous one is unreadable)."""


def next_sequence(out_dir: Path) -> int:
    """One above the sequence of `out_dir/model.efb`, or 1 when there is none."""
    previous = Path(out_dir) / BUNDLE_NAME
    if not previous.exists():
        return 1
    try:
        return read_manifest_unverified(previous).sequence + 1
    except EdgefleetError as e:
        raise PackageError(
            f"{previous}: cannot read the previous bundle's sequence: {e}",
            hint="pass --sequence N, or move the file away",
        ) from None


def version_string(sequence: int) -> str:
    """e.g. 2026.11.27-42: the build date (UTC) and the sequence."""
    return f"{utc_now():%Y.%m.%d}-{sequence}"


def golden_rows(test: Part, int8_scores: np.ndarray, n_passes: int = 3) -> np.ndarray:
    """(m, F) float32 rows: see the module docstring. NaN = missing."""
    x = np.asarray(test.x, dtype=np.float32)
    order = np.argsort(int8_scores, kind="stable")
    passes = [i for i in order if test.passes[i]]
    mid = len(passes) // 2
    picks = passes[max(0, mid - n_passes // 2) : max(0, mid - n_passes // 2) + n_passes]
    if test.defect is not None:
        for c in sorted(set(test.defect.tolist()) - {"none"}):
            rows = np.flatnonzero(test.defect == c)
            picks.append(int(rows[np.argmax(int8_scores[rows])]))
    elif test.labels is not None and test.labels.any():
        rows = np.flatnonzero(test.labels == 1)
        picks.append(int(rows[np.argmax(int8_scores[rows])]))
    out = [x[i] for i in picks]
    with_nan = x[passes[mid] if passes else 0].copy()
    with_nan[:: max(1, len(with_nan) // 4)] = np.nan  # a few parameters not measured
    out += [with_nan, np.full(x.shape[1], np.nan, np.float32)]
    return np.stack(out)


def golden_tolerance(int8_scores: np.ndarray, fp32_scores: np.ndarray,
                     threshold: float) -> tuple[float, float]:  # fmt: skip
    """(abs_tol, rel_tol) per the module docstring."""
    rel = np.abs(int8_scores - fp32_scores) / np.maximum(np.abs(fp32_scores), 1e-6)
    big = np.abs(fp32_scores) > 0.01 * abs(threshold)
    worst = float(rel[big].max()) if big.any() else 0.0
    return round(max(0.01 * abs(threshold), 1e-4), 6), round(max(0.05, 2 * worst), 4)


def golden_vectors(int8: bytes, fp32: bytes, rows: np.ndarray,
                   threshold: float) -> dict[str, Any]:  # fmt: skip
    """The manifest's `golden` object for `rows`."""
    got = run(int8, rows, batch=len(rows))[0]  # one batch, as Engine.self_test runs it
    ref = run(fp32, rows, batch=len(rows))[0]
    abs_tol, rel_tol = golden_tolerance(got, ref, threshold)
    return {
        "abs_tol": abs_tol,
        "rel_tol": rel_tol,
        "vectors": [
            {"params": [None if np.isnan(v) else float(v) for v in row], "score": float(s)}
            for row, s in zip(rows, got, strict=True)
        ],
    }


def package(
    out: Path,
    *,
    model: bytes,
    name: str,
    version: str,
    sequence: int,
    feature_names: tuple[str, ...],
    decision: dict[str, Any],
    rules: list[dict[str, Any]],
    golden: dict[str, Any],
    max_missing: int | None = None,
    rules_min_measured: float | None = None,
    evaluation: dict[str, Any],
    drift: dict[str, Any] | None,
    key: Ed25519PrivateKey,
    valid_days: int = 365,
) -> Manifest:
    """Sign `model` and its manifest into the bundle `out`, then load it the way a device does
    and run the golden self-test (raises `agent.engine.SelfTestError` if it fails)."""
    now = utc_now()
    fields: dict[str, Any] = {
        "model": {"name": name, "version": version, "sequence": sequence},
        "created": format_time(now),
        "input": {"n_features": len(feature_names), "feature_names": list(feature_names),
                  "dtype": "float32"},
        "decision": decision,
        "fallback": {"rules": rules},
        "golden": golden,
        "evaluation": evaluation,
    }
    if max_missing is not None:
        fields["input"]["max_missing"] = int(max_missing)
    if rules_min_measured is not None:
        fields["fallback"]["min_measured"] = float(rules_min_measured)
    if valid_days > 0:
        fields["expires"] = format_time(now + timedelta(days=valid_days))
    if drift is not None:
        fields["drift_reference"] = drift
    manifest = write_bundle(out, fields, {"model.onnx": model}, key)
    model_path = Path(out).with_name(".selftest-model.onnx")
    model_path.write_bytes(model)
    try:
        Engine(model_path, manifest).self_test()
    finally:
        model_path.unlink(missing_ok=True)
    return manifest
