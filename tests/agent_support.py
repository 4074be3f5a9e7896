"""Helpers for the agent tests: a real model (optimize.baseline) in a real signed bundle,
unpacked into a store, and agents started on temp sockets and free ports."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.bundle import unpack_bundle, verify_bundle, write_bundle
from agent.config import AgentConfig
from agent.drift import drift_reference
from agent.engine import Engine
from agent.fallback import RuleSet
from agent.install import Installer
from agent.keys import Keyring, generate_keypair, load_private_key, trust_key
from agent.manifest import Manifest
from agent.predictor import Limits
from agent.runtime import Runtime
from agent.server import AgentServer
from optimize.baseline import RobustZ, to_onnx


@dataclass
class Model:
    manifest: Manifest
    model_dir: Path  # an unpacked, verified bundle (model.onnx, manifest.json, manifest.sig)
    bundle: Path
    train: np.ndarray  # rows the model and its drift reference were fitted on

    def engine(self) -> Engine:
        return Engine(self.model_dir / "model.onnx", self.manifest)


def make_keys(directory: Path) -> tuple[Path, Path]:
    """(keyring dir, release private key path): a fresh release key trusted by a keyring."""
    pair = generate_keypair(directory / "keys", "release")
    trust_key(directory / "keyring", pair.public_path, "release")
    return directory / "keyring", pair.private_path


def training_rows(n_features: int, rows: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(loc=1.0, scale=0.1, size=(rows, n_features)).astype(np.float32)


def build_model(tmp: Path, keyring_dir: Path, key_path: Path, *, n_features: int = 16,
                version: str = "1.0.0", sequence: int = 1, top_k: int = 3,
                onnx_bytes: bytes | None = None, drift: bool = True,
                **overrides: Any) -> Model:
    """Fit RobustZ on synthetic passing dies, sign a bundle, verify and unpack it."""
    x = training_rows(n_features)
    model = RobustZ.fit(x)
    onnx_bytes = onnx_bytes or to_onnx(model, top_k=top_k)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    scores = sess.run(["score"], {"params": x})[0]
    threshold = float(np.quantile(scores, 0.99))
    golden = x[:3]
    golden_scores = sess.run(["score"], {"params": golden})[0]
    low, high = model.center - 6 * model.scale, model.center + 6 * model.scale
    fields: dict[str, Any] = {
        "model": {"name": "robust-z", "version": version, "sequence": sequence},
        "input": {"n_features": n_features,
                  "feature_names": [f"p{i:03d}" for i in range(n_features)], "dtype": "float32"},
        "decision": {"threshold": threshold, "confidence_scale": 0.5, "top_k": top_k},
        "fallback": {"rules": [{"feature": i, "low": float(lo), "high": float(hi)}
                               for i, (lo, hi) in enumerate(zip(low, high, strict=True))]},
        "golden": {"abs_tol": 1e-4, "rel_tol": 1e-4,
                   "vectors": [{"params": row.tolist(), "score": float(s)}
                               for row, s in zip(golden, golden_scores, strict=True)]},
        "evaluation": {"kind": "test"},
    }
    if drift:
        fields["drift_reference"] = drift_reference(x)
    fields.update(overrides)
    out_dir = tmp / f"model-{version}-{time.monotonic_ns()}"
    out_dir.mkdir(parents=True)
    bundle = out_dir / "model.efb"
    write_bundle(bundle, fields, {"model.onnx": onnx_bytes}, load_private_key(key_path))
    manifest = verify_bundle(bundle, Keyring.load(keyring_dir))
    model_dir = out_dir / "unpacked"
    model_dir.mkdir()
    unpack_bundle(bundle, manifest, model_dir)
    return Model(manifest, model_dir, bundle, x)


def install_into_store(model: Model, store: Path, keyring: Path) -> Path:
    """Install the model's bundle into a model store through the real installer."""
    installer = Installer.open(store, keyring)
    try:
        installer.install(model.bundle)
    finally:
        installer.close()
    return store


@contextlib.contextmanager
def short_tmp() -> Iterator[Path]:
    """A short directory for sockets (Unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def running_agent(model: Model | None = None, *, rules: RuleSet | None = None,
                  limits: Limits | None = None, **config: Any) -> Iterator[AgentServer]:
    """An agent in this process on a temp socket, metrics on a free port."""
    with short_tmp() as d:
        cfg = replace(AgentConfig(), socket=d / "agent.sock", metrics_addr="127.0.0.1:0",
                      **config)
        runtime = Runtime(limits or Limits(fallback_retry_s=0.0), rules)
        if model is not None:
            runtime.swap(model.engine(), model.manifest)
        server = AgentServer(cfg, runtime)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
             what: str | None = None) -> Any:
    """Poll until `predicate()` is truthy; return its value or fail after `timeout`, naming
    `what` (default: the predicate)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{what or predicate}")
        time.sleep(interval)
