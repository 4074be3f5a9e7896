"""Find and open the model to serve at start-up. One function, `load_from_store`, for the model
store (agent/store.py) to replace.

Today's store layout is the smallest that works: `STORE/active/` holds an unpacked bundle as
`agent.bundle.unpack_bundle` writes it (`manifest.json`, `manifest.sig`, `model.onnx`, ...).
Before it is served, it is checked again, in order:

  1. manifest.json parses (v1 schema)                        -> ManifestError
  2. manifest.sig is a signature over it by a trusted,
     non-revoked release key                                 -> SignatureError
  3. every file the manifest lists has its size and SHA-256  -> DigestMismatch, MissingFile
  4. the model loads and follows the model contract          -> EngineError
  5. it reproduces the golden scores within tolerance        -> SelfTestError
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path

from agent.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SIGNING_CONTEXT,
    DigestMismatch,
    MissingFile,
    SignatureError,
)
from agent.engine import Engine
from agent.keys import Keyring, KeyringError, verify_signature
from agent.manifest import MODEL_FILE, Manifest, parse_manifest_bytes

log = logging.getLogger("edgefleet.agent")
ACTIVE_DIR = "active"


def load_from_store(store: Path, keyring: Keyring | None, *, threads: int = 1
                    ) -> tuple[Engine, Manifest] | None:
    """The verified, self-tested model in `store`, or None when the store holds none. Raises a
    `BundleError`/`EngineError` subclass when there is one that must not be served."""
    model_dir = Path(store) / ACTIVE_DIR
    if not (model_dir / MANIFEST_NAME).is_file():
        log.warning("store %s holds no active model (%s missing)", store, model_dir / MANIFEST_NAME)
        return None
    if keyring is None:
        raise SignatureError(f"{model_dir}: a keyring is needed to verify the stored model",
                             hint="pass --keyring DIR")
    manifest = verify_model_dir(model_dir, keyring)
    engine = open_model_dir(model_dir, manifest, threads=threads)
    return engine, manifest


def verify_model_dir(model_dir: Path, keyring: Keyring) -> Manifest:
    """Check an unpacked bundle directory (steps 1-3 above) and return its manifest."""
    model_dir = Path(model_dir)
    manifest_bytes = (model_dir / MANIFEST_NAME).read_bytes()
    manifest = parse_manifest_bytes(manifest_bytes, str(model_dir / MANIFEST_NAME))
    sig_path = model_dir / SIGNATURE_NAME
    try:
        sig = json.loads(sig_path.read_bytes())
        kid = sig["key_id"]
        signature = base64.b64decode(sig["signature"], validate=True)
        if sig["algorithm"] != "ed25519":
            raise ValueError(f"algorithm {sig['algorithm']!r}, expected 'ed25519'")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{sig_path}: unreadable or malformed: {e}") from None
    if kid != manifest.signer:
        raise SignatureError(f"{sig_path}: key id {kid!r} does not match manifest signer "
                             f"{manifest.signer!r}")
    try:
        public_key = keyring.public_key(kid, "release")
    except KeyringError as e:
        raise SignatureError(f"{sig_path}: {e}") from None
    if not verify_signature(public_key, signature, SIGNING_CONTEXT + manifest_bytes):
        raise SignatureError(f"{sig_path}: signature does not match {MANIFEST_NAME} "
                             f"for key {kid}")
    for name, entry in sorted(manifest.files.items()):
        path = model_dir / name
        if not path.is_file():
            raise MissingFile(f"{model_dir}: {name} is listed in the manifest but missing")
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        if size != entry.size:
            raise DigestMismatch(f"{path}: size expected {entry.size}, found {size}")
        if digest.hexdigest() != entry.sha256:
            raise DigestMismatch(f"{path}: sha256 expected {entry.sha256}, "
                                 f"found {digest.hexdigest()}")
    return manifest


def open_model_dir(model_dir: Path, manifest: Manifest | None = None, *, threads: int = 1
                   ) -> Engine:
    """Load an already verified model directory and self-test it (steps 4-5 above)."""
    model_dir = Path(model_dir)
    if manifest is None:
        manifest = parse_manifest_bytes((model_dir / MANIFEST_NAME).read_bytes(),
                                        str(model_dir / MANIFEST_NAME))
    engine = Engine(model_dir / MODEL_FILE, manifest, threads=threads)
    worst = engine.self_test()
    log.info("model %s %s passed its self-test (worst difference %.3g)", manifest.name,
             manifest.version, worst)
    return engine
