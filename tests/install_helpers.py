"""Real bundles for install tests: a RobustZ ONNX model with golden scores measured in numpy.

Used by the install/store tests, the kill -9 driver (tests/install_driver.py) and the benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import write_bundle
from agent.keys import generate_keypair, load_private_key, trust_key
from agent.manifest import Manifest
from optimize.baseline import RobustZ, to_onnx
from tests.conftest import manifest_fields


def make_keys(root: Path) -> tuple[Path, Path]:
    """A release key and a keyring that trusts it: (key path, keyring dir)."""
    pair = generate_keypair(root / "keys", "release")
    ring = root / "keyring"
    trust_key(ring, pair.public_path, "release")
    return pair.private_path, ring


def real_bundle(
    out: Path,
    key_path: Path,
    *,
    n: int = 16,
    sequence: int = 1,
    seed: int = 0,
    golden_offset: float = 0.0,
    n_golden: int = 8,
    extra_files: dict[str, bytes] | None = None,
    **overrides: Any,
) -> Manifest:
    """Sign a bundle holding a real n-feature model (different per `seed`). Golden scores are
    the model's own scores plus `golden_offset` (non-zero: a bundle that fails self-test)."""
    rng = np.random.default_rng(seed)
    train = rng.normal(loc=seed % 7, scale=1 + seed % 3, size=(256, n)).astype(np.float32)
    model = RobustZ.fit(train)
    top_k = min(3, n)
    golden = rng.normal(size=(n_golden, n)).astype(np.float32)
    golden[0, 0] = np.nan  # a missing measurement is imputed inside the graph
    scores = model.score(golden)  # (n_golden,)
    vectors = [
        {"params": [None if np.isnan(v) else float(v) for v in row],
         "score": float(s) + golden_offset}
        for row, s in zip(golden, scores, strict=True)
    ]
    fields = manifest_fields(
        n,
        model={"name": "die-rz", "version": f"1.{sequence}.{seed}", "sequence": sequence},
        decision={"threshold": 2.0, "confidence_scale": 0.5, "top_k": top_k},
        golden={"abs_tol": 1e-3, "rel_tol": 1e-3, "vectors": vectors},
        **overrides,
    )
    files = {"model.onnx": to_onnx(model, top_k=top_k), **(extra_files or {})}
    return write_bundle(out, fields, files, load_private_key(key_path))


def tree_snapshot(root: Path) -> dict[str, Any]:
    """Every path under root with its kind and, for files, content digest (symlinks: target)."""
    import hashlib

    snap: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir",)
            else:
                snap[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return snap
