"""The prediction log's model table: which model answered, as `models.json` in the log directory.

Records name their model by a small index into this table (agent/predformat.py). The serving
process describes a model once, when it first answers (`describe`: bundle digest, ONNX digest,
name, version, sequence, threshold, confidence scale, the build's score-margin reference and
feature names); the log's writer (agent/predlog.py, in the writer process) gives the description
its index, written durably before the first record that names it. The same bundle seen again
(a rollback, a snapshot rebuilt on a fallback change) keeps its index: the table is keyed by
bundle digest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.fsio import atomic_write

log = logging.getLogger("edgefleet.agent")

NO_MODEL = 0xFFFFFFFF  # model index when nothing but a standalone rules file answered

__all__ = ["NO_MODEL", "ModelInfo", "ModelTable", "describe"]


@dataclass
class ModelInfo:
    index: int
    digest: str  # the bundle's sha256, as devices report it and rollouts name it
    model_sha256: str
    name: str
    version: str
    sequence: int
    threshold: float
    confidence_scale: float
    reference: dict[str, Any] | None = None  # score-margin reference of the build, if shipped
    feature_names: list[str] | None = None  # for a dataset built from captured rows

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe(p: Any) -> dict[str, Any] | None:
    """What the table keeps of predictor `p`'s model (ModelInfo's fields but `index`); None
    when no model answers (a standalone rules file)."""
    m = p.manifest
    if m is None:
        return None
    return {"digest": getattr(p, "bundle_digest", None) or _bundle_digest(p) or m.model_digest,
            "model_sha256": m.model_digest, "name": m.name, "version": m.version,
            "sequence": m.sequence, "threshold": float(m.threshold),
            "confidence_scale": float(m.confidence_scale), "reference": _score_reference(m),
            "feature_names": list(m.input.feature_names or ()) or None}


class ModelTable:
    """`models.json`: index -> model. A model gets its index (written durably) before the first
    record that names it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.models: list[ModelInfo] = []
        if path.exists():
            for m in json.loads(path.read_text()):
                self.models.append(ModelInfo(**m))

    def index_of(self, desc: dict[str, Any] | None) -> int:
        """The index of the model `desc` (`describe`'s) describes, added on first sight;
        NO_MODEL for None."""
        if desc is None:
            return NO_MODEL
        for info in self.models:
            if info.digest == desc["digest"]:
                return info.index
        info = ModelInfo(len(self.models), **desc)
        self.models.append(info)
        atomic_write(self.path, json.dumps([i.to_json() for i in self.models]).encode())
        return info.index

    def get(self, index: int) -> ModelInfo | None:
        return self.models[index] if 0 <= index < len(self.models) else None


def _bundle_digest(p: Any) -> str | None:
    """The bundle digest of the loaded model (from its unpacked directory), None if unknown."""
    path = getattr(p.engine, "model_path", None)
    if path is None:
        return None
    # agent.digest, not agent.link (the MQTT client); imported here, in the agent: the writer
    # process reads descriptions, never makes them
    from agent.digest import cached_bundle_digest

    try:
        return cached_bundle_digest(Path(path).parent)
    except (OSError, ValueError, KeyError) as e:
        log.warning("prediction log: no bundle digest for %s: %s", path, e)
        return None


def _score_reference(m: Any) -> dict[str, Any] | None:
    """`evaluation.score_margin_reference` ({"edges": [...], "proportions": [...]}), when the
    build ships the validation passes' margin distribution; else None."""
    ref = (m.evaluation or {}).get("score_margin_reference")
    if isinstance(ref, dict) and isinstance(ref.get("edges"), list) and isinstance(
            ref.get("proportions"), list) and len(ref["proportions"]) == len(ref["edges"]) + 1:
        return ref
    return None
