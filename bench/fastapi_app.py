"""The reference design's service, for comparison: FastAPI + uvicorn serving the same ONNX model
over a Unix socket, JSON in and out (pydantic validation, one session, async endpoint).

    MODEL=path/to/model.onnx THRESHOLD=3.2 uvicorn bench.fastapi_app:app --uds /tmp/fa.sock
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

from agent.engine import session_options

_session = ort.InferenceSession(os.environ["MODEL"], sess_options=session_options(1),
                                providers=["CPUExecutionProvider"])
_threshold = float(os.environ.get("THRESHOLD", "1.0"))
app = FastAPI()


class Die(BaseModel):
    die_id: str | int | None = None
    params: list[float | None]


@app.post("/predict")
async def predict(die: Die) -> dict:
    t0 = time.perf_counter()
    x = np.array([[np.nan if v is None else v for v in die.params]], dtype=np.float32)
    score, top_index, top_contribution = _session.run(
        ["score", "top_index", "top_contribution"], {"params": x})
    s = float(score[0])
    fail = s > _threshold
    return {
        "die_id": die.die_id, "decision": "fail" if fail else "pass", "score": s,
        "threshold": _threshold, "source": "model",
        "top": [{"index": int(i), "contribution": float(c)}
                for i, c in zip(top_index[0], top_contribution[0], strict=True)] if fail else [],
        "latency_us": (time.perf_counter() - t0) * 1e6,
    }
