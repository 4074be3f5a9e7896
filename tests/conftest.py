"""Shared fixtures: real keys, a real keyring and real signed bundles in temp directories."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from agent.bundle import write_bundle
from agent.keys import Keyring, generate_keypair, load_private_key, trust_key
from agent.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]

# The image suite needs a built container image: `make image-test` names it in EDGEFLEET_IMAGE
# and runs that file alone. Without one it is not collected at all, rather than skipped.
collect_ignore = [] if os.environ.get("EDGEFLEET_IMAGE") else ["test_image.py"]
SHARED = REPO.parent / "shared"
N_FEATURES = 16

# Hypothesis profiles. "ci", the default everywhere (not only where CI is set): derandomized, so
# every run tries the same examples and a red run is a bug, never bad luck; no deadline and no
# too-slow check, which a busy machine would trip; no example database; a failure prints the
# blob that replays it. "dev", by hand: random examples, ten times as many, and the local
# database replays the last failure first:
#   HYPOTHESIS_PROFILE=dev .venv/bin/pytest tests/test_jsonfast.py
#   .venv/bin/pytest --hypothesis-profile=dev tests/test_jsonfast.py
settings.register_profile("ci", settings.get_profile("ci"), max_examples=100)
# "dev" starts from Hypothesis's own "default" profile, not from the loaded one: where CI is set,
# Hypothesis makes its derandomized "ci" profile the default, and "dev" must stay random there.
settings.register_profile("dev", settings.get_profile("default"), derandomize=False,
                          max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """A property test's example count: `n` under "ci", scaled like the loaded profile's own
    max_examples (100 under "ci"), so "dev" runs each test ten times as long."""
    return max(1, n * settings.default.max_examples // 100)


@dataclass
class Signer:
    keyring_dir: Path
    key_path: Path
    key_id: str

    @property
    def keyring(self) -> Keyring:
        return Keyring.load(self.keyring_dir)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    """A release key trusted by a fresh keyring."""
    pair = generate_keypair(tmp_path / "keys", "release")
    ring = tmp_path / "keyring"
    trust_key(ring, pair.public_path, "release")
    return Signer(ring, pair.private_path, pair.key_id)


def manifest_fields(n: int = N_FEATURES, **overrides: Any) -> dict[str, Any]:
    """A valid v1 manifest body (without format, files and signer) for an n-feature model."""
    rng = np.random.default_rng(1)
    fields: dict[str, Any] = {
        "model": {"name": "test-model", "version": "1.0.0", "sequence": 1},
        "input": {
            "n_features": n,
            "feature_names": [f"p{i:03d}" for i in range(n)],
            "dtype": "float32",
        },
        "decision": {"threshold": 2.0, "confidence_scale": 0.5, "top_k": min(3, n)},
        "fallback": {"rules": [{"feature": i, "low": -6.0, "high": 6.0} for i in range(n)]},
        "golden": {
            "abs_tol": 1e-3,
            "rel_tol": 1e-2,
            "vectors": [{"params": rng.normal(size=n).round(4).tolist(), "score": 1.0}],
        },
        "evaluation": {"note": "test fixture"},
    }
    for key, value in overrides.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return fields


@pytest.fixture
def make_bundle(tmp_path: Path, signer: Signer) -> Callable[..., tuple[Path, Manifest]]:
    """Factory: write a signed bundle with a small stand-in model file; kwargs override fields."""
    counter = iter(range(10_000))

    def _make(
        files: dict[str, bytes] | None = None, key_path: Path | None = None, **overrides: Any
    ) -> tuple[Path, Manifest]:
        out = tmp_path / f"bundle-{next(counter)}.efb"
        files = files if files is not None else {"model.onnx": b"\x08\x07onnx-model-bytes" * 64}
        key = load_private_key(key_path or signer.key_path)
        manifest = write_bundle(out, manifest_fields(**overrides), files, key)
        return out, manifest

    return _make
