"""A realistic stand-in for the optimizer's model: a 512-128-32-128-512 MLP autoencoder as ONNX,
following the model contract (docs/bundle-format.md), in a signed bundle unpacked into a store.

The weights come from PCA of synthetic correlated dies (32 latent process factors), so scores
behave like a real reconstruction error: low on dies like the training data, high on dies that
break the correlations. Used by bench/agent_bench.py and handy for demos:

    .venv/bin/python bench/ae_model.py OUT_DIR    # OUT_DIR/{keys,keyring,store,model.efb,dies.csv}
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_FEATURES, HIDDEN, LATENT, TOP_K = 512, 128, 32, 5


@dataclass
class BenchModel:
    onnx_path: Path  # the installed model.onnx (STORE/active/model.onnx)
    store: Path
    keyring: Path
    bundle: Path
    normal: np.ndarray  # (rows, 512) float32 dies like the training data
    threshold: float


def synthetic_dies(rows: int, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """Dies driven by 32 latent process factors plus noise; `shift` moves every parameter."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).normal(size=(LATENT, N_FEATURES)) / np.sqrt(LATENT)
    z = rng.normal(size=(rows, LATENT))
    x = 1.0 + 0.1 * (z @ mixing) + 0.02 * rng.normal(size=(rows, N_FEATURES)) + shift
    return x.astype(np.float32)


def build_onnx(train: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    center = np.median(train, axis=0).astype(np.float32)
    scale = (train.std(axis=0) + 1e-6).astype(np.float32)
    z = (train - center) / scale
    _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    enc1 = vt[:HIDDEN].T  # 512 -> 128
    enc2 = np.eye(HIDDEN, LATENT)  # 128 -> 32 (the leading components)
    weights = [enc1, enc2, enc2.T, enc1.T]  # 32 -> 128 -> 512
    inits = [
        numpy_helper.from_array(center, "center"),
        numpy_helper.from_array((1.0 / scale).astype(np.float32), "inv_scale"),
        numpy_helper.from_array(np.array([TOP_K], dtype=np.int64), "k"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("IsNaN", ["params"], ["missing"]),
        helper.make_node("Where", ["missing", "center", "params"], ["imputed"]),  # (batch, 512)
        helper.make_node("Sub", ["imputed", "center"], ["centered"]),
        helper.make_node("Mul", ["centered", "inv_scale"], ["h0"]),  # standardized
    ]
    prev = "h0"
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(w.shape[1], np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < len(weights) - 1:  # LeakyRelu keeps the PCA path nearly linear
            nodes.append(helper.make_node("LeakyRelu", [prev], [f"a{i}"], alpha=0.9))
            prev = f"a{i}"
    nodes += [
        helper.make_node("Sub", ["h0", prev], ["err"]),  # (batch, 512)
        helper.make_node("Mul", ["err", "err"], ["contrib"]),
        helper.make_node("ReduceMean", ["contrib", "axis1"], ["score"], keepdims=0),  # (batch,)
        helper.make_node("TopK", ["contrib", "k"], ["top_contribution", "top_index"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "die_ae",
        [helper.make_tensor_value_info("params", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("top_index", TensorProto.INT64, ["batch", TOP_K]),
         helper.make_tensor_value_info("top_contribution", TensorProto.FLOAT, ["batch", TOP_K])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def build(out: Path) -> BenchModel:
    """Keys, keyring, a signed bundle, and a model store with the bundle installed by the real
    installer (what `agent serve --store` loads)."""
    import onnxruntime as ort

    from agent.bundle import write_bundle
    from agent.drift import drift_reference
    from agent.keys import generate_keypair, load_private_key, trust_key

    out.mkdir(parents=True, exist_ok=True)
    train = synthetic_dies(5000, seed=0)
    onnx_bytes = build_onnx(train)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    scores = sess.run(["score"], {"params": train})[0]
    threshold = float(np.quantile(scores, 0.995))
    q25, q75 = np.quantile(scores, [0.25, 0.75])
    golden = train[:4]
    golden_scores = sess.run(["score"], {"params": golden})[0]
    lo, hi = np.quantile(train, [0.0005, 0.9995], axis=0)
    pad = 0.5 * (hi - lo)
    fields = {
        "model": {"name": "die-ae-bench", "version": "bench-1", "sequence": 1},
        "input": {"n_features": N_FEATURES,
                  "feature_names": [f"param_{i:03d}" for i in range(N_FEATURES)],
                  "dtype": "float32"},
        "decision": {"threshold": threshold, "confidence_scale": float(max(q75 - q25, 1e-6)),
                     "top_k": TOP_K},
        "fallback": {"rules": [{"feature": i, "low": float(a), "high": float(b)}
                               for i, (a, b) in enumerate(zip(lo - pad, hi + pad, strict=True))]},
        "golden": {"abs_tol": 1e-4, "rel_tol": 1e-3,
                   "vectors": [{"params": row.tolist(), "score": float(s)}
                               for row, s in zip(golden, golden_scores, strict=True)]},
        "evaluation": {"kind": "benchmark stand-in: PCA-initialized MLP autoencoder"},
        "drift_reference": drift_reference(train),
    }
    keys, keyring = out / "keys", out / "keyring"
    if not (keys / "release.key").exists():
        generate_keypair(keys, "release")
        trust_key(keyring, keys / "release.pub", "release")
    bundle = out / "model.efb"
    write_bundle(bundle, fields, {"model.onnx": onnx_bytes}, load_private_key(keys / "release.key"))
    store = out / "store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    install_bundle(store, keyring, bundle)
    return BenchModel(store / "active" / "model.onnx", store, keyring, bundle,
                      synthetic_dies(20000, seed=1), threshold)


def install_bundle(store: Path, keyring: Path, bundle: Path) -> Path:
    """Install a bundle into a model store (created if new) through the real installer, as
    `edgefleet agent install` would; returns the store."""
    from agent.install import InstallConfig, Installer

    installer = Installer.open(store, keyring, InstallConfig(max_latency_s=None))
    try:
        installer.start()
        installer.install(bundle)
    finally:
        installer.close()
    return store


def write_dies_csv(path: Path, rows: int = 5000, seed: int = 7) -> Path:
    """Dies for a demo: mostly normal, 3% with broken correlations, a few missing values."""
    rng = np.random.default_rng(seed)
    x = synthetic_dies(rows, seed=seed)
    bad = rng.random(rows) < 0.03
    x[bad] += rng.normal(scale=0.3, size=(int(bad.sum()), N_FEATURES)).astype(np.float32)
    x[rng.random(x.shape) < 0.001] = np.nan
    with open(path, "w") as f:
        f.write("die_id," + ",".join(f"param_{i:03d}" for i in range(N_FEATURES)) + "\n")
        for i, row in enumerate(x):
            f.write(f"D{i:06d}," + ",".join("" if np.isnan(v) else f"{v:.6g}" for v in row)
                    + "\n")
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/bench-model")
    m = build(target)
    csv_path = write_dies_csv(target / "dies.csv")
    print(f"store {m.store}\nkeyring {m.keyring}\nbundle {m.bundle}\ndies {csv_path}")
